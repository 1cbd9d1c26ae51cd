/* The fused decoding kernels of whole layers, float32 and float64: the RWKV-7 time-mix and the state side of a
 * WuNeng hybrid mixer for one token (one_token_impl.h), the RWKV-7 channel-mix and a linear map of a few rows (the
 * language-model head; channel_mix_impl.h). Built on first use by wuneng/fused/cpu.py (through
 * wuneng/ops/c_library.py) and called through ctypes with one struct of named fields per kernel (args.h).
 *
 * The kernels call the operators' C code (the WKV-7 step, the read-out): their headers are included from the
 * operators' folder, wuneng/ops/wkv7/csrc, given to the compiler with -I (the dependency points down). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "parallel.h" /* the kernels' OpenMP preamble (omp.h when built with -fopenmp) */

#ifdef _OPENMP /* built with -fopenmp: the kernels split their work across `threads` threads */
#define WUNENG_OPENMP 1
#else
#define WUNENG_OPENMP 0
#endif

/* What c_library.py checks after loading the library: the argument-layout version (args.h) and the cache key
 * the library was built for (passed as -DWUNENG_KERNEL_KEY="..."); _abi.py then compares each kernel's layout. */
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
/* 1 when the kernels were built with OpenMP (threads > 1 runs in parallel), else 0 (one thread always) */
int64_t wuneng_fused_openmp(void)
{
    return WUNENG_OPENMP;
}

/* real: the activations' type; wreal: how the weight matrices are stored; SNAME: the operators' functions of
 * the activations' type */
#define WUNENG_BF16_WEIGHTS 0
#define real float
#define wreal float
#define NAME(x) x##_f32
#define SNAME(x) x##_f32
#include "wkv7_cpu_impl.h"
#include "readout_impl.h"
#include "one_token_impl.h"
#include "channel_mix_impl.h"
#undef real
#undef wreal
#undef NAME
#undef SNAME

#define real double
#define wreal double
#define NAME(x) x##_f64
#define SNAME(x) x##_f64
#include "wkv7_cpu_impl.h"
#include "readout_impl.h"
#include "one_token_impl.h"
#include "channel_mix_impl.h"
#undef real
#undef wreal
#undef NAME
#undef SNAME
#undef WGET
#undef LINEAR_ROWS

/* bfloat16 weight matrices, float32 activations and state (the time-mix, channel-mix and linear kernels) */
#undef WUNENG_BF16_WEIGHTS
#define WUNENG_BF16_WEIGHTS 1
#define real float
#define wreal uint16_t
#define NAME(x) x##_bf16
#define SNAME(x) x##_f32
#include "one_token_impl.h"
#include "channel_mix_impl.h"
#undef real
#undef wreal
#undef NAME
#undef SNAME
