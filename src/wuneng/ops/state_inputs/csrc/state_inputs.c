/* The RWKV-7 state heads' inputs (decay, keys, values, a, b) from the low-rank maps' pre-activations, one pass per
 * row forward and one backward, float32 and float64. Built on first use by wuneng/ops/state_inputs/__init__.py
 * (through wuneng/ops/c_library.py) and called through ctypes. The math, per row (token, head) of N channels:
 *
 *     log_w = -decay_scale * sigmoid(zw)            alpha = sigmoid(za)
 *     v'    = v + (vf - v) * sigmoid(zv)            (value residual; else v' = v, not written)
 *     kk    = (k * k_k) / max(||k * k_k||, 1e-12)   k' = k * (1 + (alpha - 1) * k_a)
 *     a     = -kk                                   b  = kk * alpha
 *     and, with a token mask m (1 real, 0 padding): log_w, k', v', b multiplied by m.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* sigmoid over a row of float32 in 8-lane vectors (GCC vector extensions; the row length is a multiple of 8, the
 * state heads' head-size rule): exp by Cephes' range reduction x = n ln2 + r and degree-6 polynomial (relative error
 * ~2e-7 on [-87, 88], inputs clamped there), 2^n made from its exponent bits. libm's expf is a scalar call that
 * keeps the loops from vectorising. float64 uses libm's exp (the tests' precision). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* where mask (all ones / zeros per lane): b, else a */
static inline v8f blend(v8f a, v8f b, v8i mask)
{
    return (v8f)(((v8i)a & ~mask) | ((v8i)b & mask));
}

static void sigmoid_row_f32(int64_t N, const float *z, float *out)
{
    for (int64_t n = 0; n < N; n += 8) {
        v8f x;
        memcpy(&x, z + n, sizeof x);
        x = -x;
        const v8f lo = (v8f){0} - 87.0f, hi = (v8f){0} + 88.0f;
        x = blend(x, lo, x < lo);
        x = blend(x, hi, x > hi);
        v8f t = x * 1.44269504088896341f + 0.5f;
        v8i ti = __builtin_convertvector(t, v8i);
        v8f fn = __builtin_convertvector(ti, v8f);
        fn = blend(fn, fn - 1.0f, fn > t); /* floor */
        v8f r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
        v8f p = (v8f){0} + 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        v8i bits = (__builtin_convertvector(fn, v8i) + 127) << 23;
        v8f e = p * (v8f)bits;
        v8f s = 1.0f / (1.0f + e);
        memcpy(out + n, &s, sizeof s);
    }
}

static void sigmoid_row_f64(int64_t N, const double *z, double *out)
{
    for (int64_t n = 0; n < N; n++)
        out[n] = 1.0 / (1.0 + exp(-z[n]));
}

#define real float
#define NAME(x) x##_f32
#define SQRT sqrtf
#define SIGROW sigmoid_row_f32
#include "state_inputs_impl.h"
#undef real
#undef NAME
#undef SQRT
#undef SIGROW

#define real double
#define NAME(x) x##_f64
#define SQRT sqrt
#define SIGROW sigmoid_row_f64
#include "state_inputs_impl.h"
#undef real
#undef NAME
#undef SQRT
#undef SIGROW
