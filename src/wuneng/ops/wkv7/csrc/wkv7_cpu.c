/* RWKV-7 CPU kernels, float32 and float64: WKV-7 (wkv7_cpu_impl.h), the fused read-out (readout_impl.h) and
 * the one-token time-mix and hybrid state side (one_token_impl.h). Built on first use by
 * wuneng/ops/wkv7/cpu.py with the system C compiler and called through ctypes. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "args.h"

/* What cpu.py checks after loading the library: the argument-layout version (args.h) and the cache key the
 * library was built for (passed by cpu.py as -DWUNENG_KERNEL_KEY="..."), so that a file of the right name
 * but another build is refused. */
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
#include "one_token_impl.h"
#undef real
#undef NAME

#define real double
#define NAME(x) x##_f64
#include "wkv7_cpu_impl.h"
#include "readout_impl.h"
#include "one_token_impl.h"
#undef real
#undef NAME
