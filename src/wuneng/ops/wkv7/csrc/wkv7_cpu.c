/* The RWKV-7 operators' CPU kernels, float32 and float64: WKV-7 (wkv7_cpu_impl.h) and the fused read-out
 * (readout_impl.h). Built on first use by wuneng/ops/wkv7/cpu.py (through wuneng/ops/c_library.py) with the system
 * C compiler and called through ctypes. The fused decoding kernels of whole layers are another library
 * (wuneng/fused/csrc), which includes these headers. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* What c_library.py checks after loading the library: the argument-layout version (cpu.py's KERNEL_ABI; bumped
 * whenever a function's arguments change) and the cache key the library was built for (passed as
 * -DWUNENG_KERNEL_KEY="..."), so that a file of the right name but another build is refused. */
#define WUNENG_KERNEL_ABI 3
#ifndef WUNENG_KERNEL_KEY
#define WUNENG_KERNEL_KEY ""
#endif
int64_t wuneng_kernel_abi(void)
{
    return WUNENG_KERNEL_ABI;
}
const char *wuneng_kernel_key(void)
{
    return WUNENG_KERNEL_KEY;
}

#define real float
#define NAME(x) x##_f32
#include "wkv7_cpu_impl.h"
#include "readout_impl.h"
#undef real
#undef NAME

#define real double
#define NAME(x) x##_f64
#include "wkv7_cpu_impl.h"
#include "readout_impl.h"
#undef real
#undef NAME
