/* The whole RWKV-7 time-mix for one token (decoding), fused: token shift, the r/k/v projections, the
 * decay / in-context-rate / value-residual / gate LoRAs, the WKV-7 step, the read-out and the output
 * projection, in one call instead of ~60 small tensor ops (whose per-op cost is most of a decoding step
 * at small widths).
 *
 * Included by fused_cpu.c after the operators' wkv7_cpu_impl.h and readout_impl.h (`real`, NAME). Shapes (row-major,
 * contiguous): x, shift, shift_out, out [B, C]; v_first, v_first_out [B, A]; state, state_out
 * [B, H, N, N] value-major (S[i][j] = value i, key j); A = H * N. Weights in the layer's layout:
 * nn.Linear W_r, W_k, W_v [A, C] and W_o [C, A] (y = W x); LoRA factors w1 [C, Dw], w2 [Dw, A] etc.
 * (y = x w1 w2); mix [6, C] the token-shift mixes in the order r, w, k, v, a, g; w0, a0, v0, k_k, k_a
 * [A]; r_k [H, N]; ln_w, ln_b [A] (GroupNorm affine). Per token (SPEC section 2, as TimeMix computes it):
 *
 *     x    = x * mask;  xx = shift - x;  x_q = x + xx mix_q                    (q in r, w, k, v, a, g)
 *     r, k, v = W_r x_r, W_k x_k, W_v x_v
 *     w    = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w w1) w2))
 *     alpha = sigmoid(a0 + x_a a1 a2)
 *     v    = v + (v_first - v) sigmoid(v0 + x_v v1 v2)      (value residual; else v_first_out = v)
 *     g    = sigmoid(x_g g1) g2
 *     kk   = normalize_per_head(k k_k);  k = k ((1 - k_a) + alpha k_a);  a = -kk;  b = kk alpha
 *     (masked: w = 1, k = v = b = 0)
 *     y    = WKV-7 step;  out = W_o ((GroupNorm(y) + bonus) g)
 *
 * With sse_blocks > 0 (Meta-State's Self-State Encoder, C = sse_blocks N) head h also reads its new state with
 * q_h = x_k[block h mod sse_blocks] / |.| into readout_out [B][A] (S q_h, before any norm).
 *
 * `work` holds 7 B C + 11 B A + B (Dw + Da + Dv + Dg) + 2 B H reals. mask, v_first (first layer), state
 * (no state yet), v_first_out (value-residual layers) and readout_out (no SSE) may be NULL; v1, v2, v0 are read
 * only with value_residual. */

/* Work split across threads: block [lo, hi) of thread t of T over n items, in whole multiples of `align` (rows of
 * 16 floats share a cache line: no two threads write one line of a result). */
static inline void NAME(share)(int64_t n, int64_t align, int t, int T, int64_t *lo, int64_t *hi)
{
    const int64_t blocks = (n + align - 1) / align;
    const int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

/* One 64-byte vector of reals (16 floats, 8 doubles): GCC/Clang vector extensions, lowered to the widest
 * registers the target has (-march=native: AVX-512 or AVX2 here, NEON elsewhere). Loaded with memcpy
 * (unaligned, no aliasing assumption). */
typedef real NAME(vec) __attribute__((vector_size(64)));
#define VEC_LANES ((int64_t)(64 / sizeof(real)))

static inline NAME(vec) NAME(vload)(const real *p)
{
    NAME(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The weight matrices are stored as `wreal`: `real` itself, or (WUNENG_BF16_WEIGHTS, real = float) bfloat16 bits
 * (uint16_t), widened to float as they are read: a decoding step then streams half the bytes. WGET reads one. */
#if WUNENG_BF16_WEIGHTS
static inline float NAME(bf16)(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define WGET(p, i) NAME(bf16)((p)[i])
typedef uint16_t NAME(hvec) __attribute__((vector_size(32)));
typedef uint32_t NAME(uvec) __attribute__((vector_size(64)));
static inline NAME(vec) NAME(wvload)(const wreal *p)
{
    NAME(hvec) h;
    memcpy(&h, p, sizeof h);
    const NAME(uvec) u = __builtin_convertvector(h, NAME(uvec)) << 16;
    NAME(vec) v;
    memcpy(&v, &u, sizeof v);
    return v;
}
#else
#define WGET(p, i) ((p)[i])
static inline NAME(vec) NAME(wvload)(const wreal *p)
{
    return NAME(vload)(p);
}
#endif

static inline real NAME(vsum)(NAME(vec) v)
{
    real s = 0;
    for (int j = 0; j < (int)VEC_LANES; ++j)
        s += v[j];
    return s;
}

/* Software prefetch in the row products: while a group of four rows is read, each step also asks for the line at
 * the same place in the next group's four rows (4 I elements on, none past the thread's last group). Measured on
 * the 2-core development machine (one thread, a [131072, 768] matrix, the machine loaded): 1.6x the rate of the
 * same loop without it in bfloat16, 1.2x in float32; the hardware prefetcher alone did not keep four interleaved
 * row streams ahead. Prefetches change no result. */
#ifndef WUNENG_LINEAR_PREFETCH_DEFINED
#define WUNENG_LINEAR_PREFETCH_DEFINED
static inline int64_t b_prefetch_ahead(int64_t o, int64_t hi, int64_t I)
{
    return o + 8 <= hi ? 4 * I : 0;
}
#define LINEAR_PREFETCH(at)                                                                                            \
    do {                                                                                                               \
        __builtin_prefetch(w0 + (at));                                                                                 \
        __builtin_prefetch(w1 + (at));                                                                                 \
        __builtin_prefetch(w2 + (at));                                                                                 \
        __builtin_prefetch(w3 + (at));                                                                                 \
    } while (0)
#endif

#if WUNENG_BF16_WEIGHTS
/* linear_rows for bfloat16 weights. Widening 16 bfloat16 to 16 floats in order takes shuffles (the measured rate
 * was the float32 kernel's in elements, not in bytes); instead 32 weights are read as 16 uint32 pairs: the even
 * elements are (pair << 16), the odd ones (pair & 0xffff0000), two bit operations and no shuffle, against x
 * deinterleaved the same way once per call (xp: per 32-block the 16 even then the 16 odd elements). Even and odd
 * products go to two accumulators per row (two FMAs, no add between them), four rows at a time in registers. */
static inline void NAME(pair_fma)(const wreal *w, NAME(vec) xe, NAME(vec) xo, NAME(vec) *even, NAME(vec) *odd)
{
    NAME(uvec) u;
    memcpy(&u, w, sizeof u);
    const NAME(uvec) ue = u << 16, uo = u & 0xffff0000u;
    NAME(vec) we, wo;
    memcpy(&we, &ue, sizeof we);
    memcpy(&wo, &uo, sizeof wo);
    *even += we * xe;
    *odd += wo * xo;
}

static void NAME(linear_rows_pairs)(int64_t B, int64_t O, int64_t I, const wreal *W, const real *x, real *y,
                                    int64_t lo, int64_t hi)
{
    const int64_t I32 = I / 32 * 32;
    real *xp = I32 > 0 ? (real *)malloc((size_t)(B * I32) * sizeof(real)) : 0;
    if (I32 > 0 && !xp) { /* no memory for the deinterleaved copy: one element at a time */
        for (int64_t o = lo; o < hi; ++o)
            for (int64_t b = 0; b < B; ++b) {
                real s = 0;
                for (int64_t i = 0; i < I; ++i)
                    s += WGET(W + o * I, i) * x[b * I + i];
                y[b * O + o] = s;
            }
        return;
    }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < I32; i += 32)
            for (int j = 0; j < 16; ++j) {
                xp[b * I32 + i + j] = x[b * I + i + 2 * j];
                xp[b * I32 + i + 16 + j] = x[b * I + i + 2 * j + 1];
            }
    int64_t o = lo;
    for (; o + 4 <= hi; o += 4) {
        const wreal *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        const int64_t ahead = b_prefetch_ahead(o, hi, I); /* the next group's rows (see LINEAR_PREFETCH) */
        for (int64_t b = 0; b < B; ++b) {
            const real *xb = xp + b * I32;
            NAME(vec) e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0}, d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
            for (int64_t i = 0; i < I32; i += 32) {
                if (b == 0)
                    LINEAR_PREFETCH(i + ahead);
                const NAME(vec) xe = NAME(vload)(xb + i), xo = NAME(vload)(xb + i + 16);
                NAME(pair_fma)(w0 + i, xe, xo, &e0, &d0);
                NAME(pair_fma)(w1 + i, xe, xo, &e1, &d1);
                NAME(pair_fma)(w2 + i, xe, xo, &e2, &d2);
                NAME(pair_fma)(w3 + i, xe, xo, &e3, &d3);
            }
            real s0 = NAME(vsum)(e0 + d0), s1 = NAME(vsum)(e1 + d1), s2 = NAME(vsum)(e2 + d2);
            real s3 = NAME(vsum)(e3 + d3);
            for (int64_t i = I32; i < I; ++i) {
                const real xi = x[b * I + i];
                s0 += WGET(w0, i) * xi;
                s1 += WGET(w1, i) * xi;
                s2 += WGET(w2, i) * xi;
                s3 += WGET(w3, i) * xi;
            }
            real *yb = y + b * O + o;
            yb[0] = s0;
            yb[1] = s1;
            yb[2] = s2;
            yb[3] = s3;
        }
    }
    for (; o < hi; ++o) {
        const wreal *wo = W + o * I;
        for (int64_t b = 0; b < B; ++b) {
            const real *xb = xp + b * I32;
            NAME(vec) e = {0}, d = {0};
            for (int64_t i = 0; i < I32; i += 32)
                NAME(pair_fma)(wo + i, NAME(vload)(xb + i), NAME(vload)(xb + i + 16), &e, &d);
            real s = NAME(vsum)(e + d);
            for (int64_t i = I32; i < I; ++i)
                s += WGET(wo, i) * x[b * I + i];
            y[b * O + o] = s;
        }
    }
    free(xp);
}
#define LINEAR_ROWS NAME(linear_rows_pairs)
#else
#define LINEAR_ROWS NAME(linear_rows)
#endif

#if !WUNENG_BF16_WEIGHTS
/* y[b][o] = sum_i W[o][i] x[b][i] for the rows o in [lo, hi): nn.Linear's layout. Four weight rows at a time
 * against every batch row (the rows stay in L1 while the batch reuses them), each dot product in one vector of
 * independent lanes: a batch-1 step streams W once at the memory's rate. */
static void NAME(linear_rows)(int64_t B, int64_t O, int64_t I, const wreal *W, const real *x, real *y, int64_t lo,
                              int64_t hi)
{
    int64_t o = lo;
    for (; o + 4 <= hi; o += 4) {
        const wreal *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        const int64_t ahead = b_prefetch_ahead(o, hi, I); /* the next group's rows (see LINEAR_PREFETCH) */
        for (int64_t b = 0; b < B; ++b) {
            const real *xb = x + b * I;
            NAME(vec) l0 = {0}, l1 = {0}, l2 = {0}, l3 = {0};
            int64_t i = 0;
            for (; i + VEC_LANES <= I; i += VEC_LANES) {
                if (b == 0)
                    LINEAR_PREFETCH(i + ahead);
                const NAME(vec) xv = NAME(vload)(xb + i);
                l0 += NAME(wvload)(w0 + i) * xv;
                l1 += NAME(wvload)(w1 + i) * xv;
                l2 += NAME(wvload)(w2 + i) * xv;
                l3 += NAME(wvload)(w3 + i) * xv;
            }
            real s0 = NAME(vsum)(l0), s1 = NAME(vsum)(l1), s2 = NAME(vsum)(l2), s3 = NAME(vsum)(l3);
            for (; i < I; ++i) {
                s0 += WGET(w0, i) * xb[i];
                s1 += WGET(w1, i) * xb[i];
                s2 += WGET(w2, i) * xb[i];
                s3 += WGET(w3, i) * xb[i];
            }
            real *yb = y + b * O + o;
            yb[0] = s0;
            yb[1] = s1;
            yb[2] = s2;
            yb[3] = s3;
        }
    }
    for (; o < hi; ++o)
        for (int64_t b = 0; b < B; ++b) {
            const wreal *wo = W + o * I;
            const real *xb = x + b * I;
            real s = 0;
            for (int64_t i = 0; i < I; ++i)
                s += WGET(wo, i) * xb[i];
            y[b * O + o] = s;
        }
}
#endif

/* y[b][o] = sum_i x[b][i] W[i][o] for the columns o in [lo, hi): the LoRA layout (x @ W), a row of W at a
 * time; act: 0 none, 1 tanh, 2 sigmoid, applied to the finished columns. */
/* exp in the activations' precision: expf for float (the state heads' 4-5 exponentials per state row were ~1/3 of
 * that serial phase in double; 1-thread A/B of the hybrid kernel 0.91-0.92 of the time; results move by ~1 float
 * ulp), exp for double */
static inline real NAME(exp_real)(real z)
{
    return sizeof(real) == sizeof(float) ? (real)expf((float)z) : (real)exp((double)z);
}

static inline real NAME(sigmoid)(real z)
{
    return (real)1 / ((real)1 + NAME(exp_real)(-z));
}

/* matmul_cols over the columns [lo, hi), a row of W at a time: the long rows (the second factors, [D, A]) */
static void NAME(matmul_cols_rows)(int64_t B, int64_t I, int64_t O, const real *x, const wreal *W, real *y,
                                   int64_t lo, int64_t hi)
{
    if (hi <= lo)
        return;
    for (int64_t b = 0; b < B; ++b)
        memset(y + b * O + lo, 0, (size_t)(hi - lo) * sizeof(real));
    for (int64_t i = 0; i < I; ++i) {
        const wreal *restrict wi = W + i * O;
        for (int64_t b = 0; b < B; ++b) {
            const real xi = x[b * I + i];
            real *restrict yb = y + b * O;
#pragma omp simd
            for (int64_t o = lo; o < hi; ++o)
                yb[o] += xi * WGET(wi, o);
        }
    }
}

/* matmul_cols for the nv vectors of columns from c, the sums held in registers over all I rows: for the short
 * rows of a LoRA's first factor ([C, D], D of 16-128), where summing into y in memory row after row made each
 * row wait on the previous row's stores (the loop's hot spot in perf). The same products in the same order as
 * matmul_cols_rows (0 + x_0 w_0 + x_1 w_1 + ...). With software prefetch ~2 KB ahead in the rows: the hardware
 * prefetcher alone did not keep ahead of these short slices (1-thread A/B, cold layers: 0.88-0.98 of the time
 * without it). */
#define MATMUL_COLS_BLOCK 8
static inline __attribute__((always_inline)) void NAME(matmul_cols_block)(int64_t I, int64_t O, const real *xb,
                                                                          const wreal *W, real *yb, int64_t c,
                                                                          const int nv)
{
    NAME(vec) acc[MATMUL_COLS_BLOCK];
    for (int j = 0; j < nv; ++j)
        acc[j] = (NAME(vec)){0};
    const int64_t bytes = nv * VEC_LANES * (int64_t)sizeof(wreal);
    const int64_t ahead = (2048 + bytes - 1) / bytes;
    for (int64_t i = 0; i < I; ++i) {
        const wreal *wi = W + i * O + c;
        if (i + ahead < I)
            for (int64_t off = 0; off < bytes; off += 64)
                __builtin_prefetch((const char *)(wi + ahead * O) + off);
        const NAME(vec) xi = (NAME(vec)){0} + xb[i];
        for (int j = 0; j < nv; ++j)
            acc[j] += xi * NAME(wvload)(wi + j * VEC_LANES);
    }
    for (int j = 0; j < nv; ++j)
        memcpy(yb + c + j * VEC_LANES, &acc[j], sizeof acc[j]);
}

static void NAME(matmul_cols)(int64_t B, int64_t I, int64_t O, const real *x, const wreal *W, real *y, int64_t lo,
                              int64_t hi, int act)
{
    if (hi <= lo)
        return;
    int64_t c = lo;
    if ((hi - lo) * (int64_t)sizeof(wreal) < 2048) { /* short rows: in registers, whole vectors of columns */
        for (int64_t b = 0; b < B; ++b) {
            const real *xb = x + b * I;
            real *yb = y + b * O;
            c = lo;
            for (; c + MATMUL_COLS_BLOCK * VEC_LANES <= hi; c += MATMUL_COLS_BLOCK * VEC_LANES)
                NAME(matmul_cols_block)(I, O, xb, W, yb, c, MATMUL_COLS_BLOCK);
            if (c + 4 * VEC_LANES <= hi) {
                NAME(matmul_cols_block)(I, O, xb, W, yb, c, 4);
                c += 4 * VEC_LANES;
            }
            if (c + 2 * VEC_LANES <= hi) {
                NAME(matmul_cols_block)(I, O, xb, W, yb, c, 2);
                c += 2 * VEC_LANES;
            }
            if (c + VEC_LANES <= hi) {
                NAME(matmul_cols_block)(I, O, xb, W, yb, c, 1);
                c += VEC_LANES;
            }
        }
    }
    NAME(matmul_cols_rows)(B, I, O, x, W, y, c, hi); /* the rest (all of the long rows) */
    if (act)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t o = lo; o < hi; ++o) {
                real *p = y + b * O + o;
                *p = act == 1 ? (real)tanh((double)*p) : NAME(sigmoid)(*p);
            }
}

/* The state heads bh in [lo, hi) of the B * H heads (bh = b H + h), from projected r, k, v [B][A] and the LoRA
 * pre-activations (without their biases) wz (decay), az (in-context rate) and, with value residual, vz (value
 * gate): decay, value residual, key normalisation, a and b, the mask, the WKV-7 step and the read-out into `ro`
 * [B][A] (and, with a second query q [B][A], the raw read-out S q into y2 [B][A]; both may be NULL). Overwrites
 * k, v (with the recurrence's k, v), wz (with w), az (with alpha), vz (with a = -kk); bb [B][A], y [B][A] and
 * stats [B H][2] are scratch. Heads are independent: threads take disjoint ranges. */
static void NAME(state_heads_one_token)(int64_t lo, int64_t hi, int64_t H, int64_t N, int64_t value_residual,
                                        double eps, const real *mask, const real *r, real *k, real *v, real *wz,
                                        real *az, real *vz, real *bb, real *y, real *stats, const real *v_first,
                                        real *v_first_out, const real *w0, const real *a0, const real *v0,
                                        const real *k_k, const real *k_a, const real *r_k, const real *ln_w,
                                        const real *ln_b, const real *state, real *state_out, real *ro,
                                        const real *q, real *y2)
{
    const real decay_scale = (real)0.6065306597126334; /* e^{-1/2} */
    real *w = wz, *al = az, *aa = vz;
    for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, h = bh % H, o = bh * N; /* o = b A + h N */
        const real m = mask ? mask[b] : (real)1;
        for (int64_t j = 0; j < N; ++j) {
            const int64_t p = h * N + j;
            /* log w = -e^{-1/2} sigmoid(z), times the mask as the tensor path does (masked: w = 1) */
            const real log_w = -decay_scale * NAME(sigmoid)(w[o + j] + w0[p]);
            w[o + j] = NAME(exp_real)(mask ? log_w * m : log_w);
            al[o + j] = NAME(sigmoid)(al[o + j] + a0[p]);
            if (value_residual) {
                const real gate = NAME(sigmoid)(vz[o + j] + v0[p]);
                v[o + j] = v[o + j] + (v_first[o + j] - v[o + j]) * gate;
            } else if (v_first_out) {
                v_first_out[o + j] = v[o + j];
            }
        }
        real ss = 0;
        for (int64_t j = 0; j < N; ++j) {
            const real t = k[o + j] * k_k[h * N + j];
            ss += t * t;
        }
        real nrm = (real)sqrt((double)ss);
        if (nrm < (real)1e-12)
            nrm = (real)1e-12;
        for (int64_t j = 0; j < N; ++j) {
            const int64_t p = h * N + j;
            const real kk = k[o + j] * k_k[p] / nrm;
            aa[o + j] = -kk;
            bb[o + j] = kk * al[o + j];
            k[o + j] = k[o + j] * (((real)1 - k_a[p]) + al[o + j] * k_a[p]);
        }
        if (mask)
            for (int64_t j = 0; j < N; ++j) {
                k[o + j] *= m;
                v[o + j] *= m;
                bb[o + j] *= m;
            }
    }
    SNAME(wkv7_one_token)(lo, hi, N, r, w, k, v, aa, bb, q, state, y, y2, state_out);
    SNAME(readout_forward)(lo, hi, H, N, y, r, k, v, r_k, ln_w, ln_b, eps, ro, stats);
}

/* xm[q][b][c] = x[b][c] + (shift[b][c] - x[b][c]) mix[q][c] for the Q mixes and the columns c in [lo, hi), x
 * masked first (into xin). */
static void NAME(token_mixes)(int64_t B, int64_t C, int64_t Q, const real *x, const real *mask, const real *shift,
                              const real *mix, real *xin, real *xm, int64_t lo, int64_t hi)
{
    const int64_t BC = B * C;
    for (int64_t b = 0; b < B; ++b) {
        const real m = mask ? mask[b] : (real)1;
        for (int64_t c = lo; c < hi; ++c) {
            const real xc = mask ? x[b * C + c] * m : x[b * C + c];
            const real xx = shift[b * C + c] - xc;
            xin[b * C + c] = xc;
            for (int64_t q = 0; q < Q; ++q)
                xm[q * BC + b * C + c] = xc + xx * mix[q * C + c];
        }
    }
}

/* The fused kernels take one struct of named fields (args.h: the field lists, shared with Python's ctypes
 * structures); NAME(x_layout)() returns the field list as text, which Python compares with its own at load. */
struct NAME(time_mix_args) {
    TIME_MIX_FIELDS(FIELD_INT, FIELD_F64, FIELD_IN, FIELD_OUT)
};
#if !WUNENG_BF16_WEIGHTS
struct NAME(hybrid_state_args) {
    HYBRID_STATE_FIELDS(FIELD_INT, FIELD_F64, FIELD_IN, FIELD_OUT)
};
#endif
const char *NAME(time_mix_one_token_layout)(void)
{
    return TIME_MIX_FIELDS(TEXT_INT, TEXT_F64, TEXT_IN, TEXT_OUT);
}
#if !WUNENG_BF16_WEIGHTS
const char *NAME(hybrid_state_one_token_layout)(void)
{
    return HYBRID_STATE_FIELDS(TEXT_INT, TEXT_F64, TEXT_IN, TEXT_OUT);
}
#endif
int64_t NAME(time_mix_one_token_args_size)(void)
{
    return (int64_t)sizeof(struct NAME(time_mix_args));
}
#if !WUNENG_BF16_WEIGHTS
int64_t NAME(hybrid_state_one_token_args_size)(void)
{
    return (int64_t)sizeof(struct NAME(hybrid_state_args));
}
#endif

/* With threads > 1 the kernel runs as one OpenMP parallel region (the OpenMP runtime torch loaded: the same
 * libgomp, so the same thread pool as torch's own operators): each phase splits its rows, columns or heads across
 * the threads, a barrier between phases. Every output element is computed by one thread in the same order as
 * with one thread, so the result does not depend on the thread count. */
void NAME(time_mix_one_token)(const struct NAME(time_mix_args) *args)
{
    TIME_MIX_FIELDS(UNPACK_INT, UNPACK_F64, UNPACK_IN, UNPACK_OUT)
    const int64_t A = H * N, BC = B * C, BA = B * A;
    real *xm = work;              /* [6][B][C]: x_r, x_w, x_k, x_v, x_a, x_g */
    real *xin = xm + 6 * BC;      /* [B][C] the masked token */
    real *r = xin + BC, *k = r + BA, *v = k + BA, *w = v + BA, *al = w + BA, *g = al + BA;
    real *aa = g + BA, *bb = aa + BA, *y = bb + BA, *yo = y + BA; /* [B][A] each */
    real *h_w = yo + BA, *h_a = h_w + B * Dw, *h_g = h_a + B * Da, *h_v = h_g + B * Dg; /* LoRA hidden [B][D] */
    real *stats = h_v + B * Dv;   /* [B * H][2] */
    real *q = stats + 2 * B * H;  /* [B][A] the self-state query (sse_blocks > 0) */
    const real *x_r = xm, *x_w = xm + BC, *x_k = xm + 2 * BC, *x_v = xm + 3 * BC, *x_a = xm + 4 * BC;
    const real *x_g = xm + 5 * BC;
    const int nthreads = wuneng_team_size(threads);
    (void)nthreads;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        WUNENG_THREAD_INDEX(t, T);
        int64_t lo, hi;
        NAME(share)(C, 16, t, T, &lo, &hi);
        NAME(token_mixes)(B, C, 6, x, mask, shift, mix, xin, xm, lo, hi);
#pragma omp barrier
        NAME(share)(A, 16, t, T, &lo, &hi);
        LINEAR_ROWS(B, A, C, (const wreal *)W_r, x_r, r, lo, hi);
        LINEAR_ROWS(B, A, C, (const wreal *)W_k, x_k, k, lo, hi);
        LINEAR_ROWS(B, A, C, (const wreal *)W_v, x_v, v, lo, hi);
        NAME(share)(Dw, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dw, x_w, (const wreal *)w1, h_w, lo, hi, 1);
        NAME(share)(Da, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Da, x_a, (const wreal *)a1, h_a, lo, hi, 0);
        NAME(share)(Dg, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dg, x_g, (const wreal *)g1, h_g, lo, hi, 2);
        if (value_residual) {
            NAME(share)(Dv, 16, t, T, &lo, &hi);
            NAME(matmul_cols)(B, C, Dv, x_v, (const wreal *)v1, h_v, lo, hi, 0);
        }
#pragma omp barrier
        NAME(share)(A, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, Dw, A, h_w, (const wreal *)w2, w, lo, hi, 0);
        NAME(matmul_cols)(B, Da, A, h_a, (const wreal *)a2, al, lo, hi, 0);
        NAME(matmul_cols)(B, Dg, A, h_g, (const wreal *)g2, g, lo, hi, 0);
        if (value_residual)
            NAME(matmul_cols)(B, Dv, A, h_v, (const wreal *)v2, aa, lo, hi, 0);
        NAME(share)(B * H, 1, t, T, &lo, &hi);
        if (sse_blocks > 0) /* Meta-State: head h also reads S q_h, q_h = the unit block h mod sse_blocks of x_k */
            for (int64_t bh = lo; bh < hi; ++bh) {
                const int64_t b = bh / H, hh = bh % H;
                const real *blk = x_k + b * C + (hh % sse_blocks) * N;
                real *qh = q + bh * N;
                real nrm = (real)sqrt((double)SNAME(dot)(blk, blk, N));
                if (nrm < (real)1e-12)
                    nrm = (real)1e-12;
                for (int64_t j = 0; j < N; ++j)
                    qh[j] = blk[j] / nrm;
            }
#pragma omp barrier
        NAME(state_heads_one_token)(lo, hi, H, N, value_residual, eps, mask, r, k, v, w, al, aa, bb, y, stats,
                                    v_first, v_first_out, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, state, state_out,
                                    yo, sse_blocks > 0 ? q : 0, sse_blocks > 0 ? readout_out : 0);
        for (int64_t i = lo * N; i < hi * N; ++i)
            yo[i] *= g[i];
#pragma omp barrier
        NAME(share)(C, 16, t, T, &lo, &hi);
        LINEAR_ROWS(B, C, A, (const wreal *)W_o, yo, out, lo, hi);
        NAME(share)(BC, 16, t, T, &lo, &hi);
        if (hi > lo)
            memcpy(shift_out + lo, xin + lo, (size_t)(hi - lo) * sizeof(real));
    }
}

#if !WUNENG_BF16_WEIGHTS
/* The state side of a WuNeng hybrid mixer for one token (SPEC section 3; HybridMixer decoding): from the
 * layer input u [B][C], the teacher's projections q [B][A] (before RoPE) and k, v [B][Hkv N] (kv head j
 * serving query heads j n_rep ... (j + 1) n_rep - 1), the state heads' output (after the read-out)
 * y_out [B][A], and the low-rank maps the fusion reads: gamma_out = sigmoid(u G1 G2 + gate_bias) [B][A]
 * (Dg > 0) and middle_out = sigmoid(u P1 P2) [B][Wm] (Dm > 0):
 *
 *     x = u mask;  x_q = x + (shift - x) mix_q        (q = w, a(, v): the rows of mix)
 *     r = q + (u R1) R2;  k_s, v_s = k, v repeated over the query heads
 *     state heads (as time_mix_one_token from r, k_s, v_s, the decay / rate / value LoRAs on x_w, x_a, x_v)
 *
 * The receptance, gate and middle maps read u itself (unmasked), as the tensor path does. work holds
 * 4 B C + 8 B A + B (Dw + Da + Dv + Dr + Dg + Dm) + 2 B H reals. Runs as one OpenMP region of `threads` threads,
 * as time_mix_one_token (same split, same guarantee: the result does not depend on the thread count). */
void NAME(hybrid_state_one_token)(const struct NAME(hybrid_state_args) *args)
{
    HYBRID_STATE_FIELDS(UNPACK_INT, UNPACK_F64, UNPACK_IN, UNPACK_OUT)
    const int64_t A = H * N, BC = B * C, BA = B * A, n_rep = H / Hkv, Akv = Hkv * N;
    real *xm = work;              /* [3][B][C]: x_w, x_a, x_v */
    real *xin = xm + 3 * BC;      /* [B][C] the masked token */
    real *r = xin + BC, *ks = r + BA, *vs = ks + BA, *w = vs + BA, *al = w + BA, *aa = al + BA, *bb = aa + BA;
    real *y = bb + BA;            /* [B][A] each */
    real *h_r = y + BA, *h_w = h_r + B * Dr, *h_a = h_w + B * Dw, *h_v = h_a + B * Da, *h_g = h_v + B * Dv;
    real *h_m = h_g + B * Dg;     /* the LoRA hidden [B][D] each */
    real *stats = h_m + B * Dm;   /* [B * H][2] */
    const int nthreads = wuneng_team_size(threads);
    (void)nthreads;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        WUNENG_THREAD_INDEX(t, T);
        int64_t lo, hi;
        NAME(share)(C, 16, t, T, &lo, &hi);
        NAME(token_mixes)(B, C, value_residual ? 3 : 2, u, mask, shift, mix, xin, xm, lo, hi);
        NAME(share)(B * H, 1, t, T, &lo, &hi);
        for (int64_t bh = lo; bh < hi; ++bh) { /* k, v repeated over the query heads of each kv head */
            const int64_t b = bh / H, hh = bh % H;
            const int64_t src = b * Akv + (hh / n_rep) * N, dst = b * A + hh * N;
            memcpy(ks + dst, k + src, (size_t)N * sizeof(real));
            memcpy(vs + dst, v + src, (size_t)N * sizeof(real));
        }
        /* the maps of u need no barrier before them */
        NAME(share)(Dr, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dr, u, R1, h_r, lo, hi, 0);
        NAME(share)(Dg, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dg, u, G1, h_g, lo, hi, 0);
        NAME(share)(Dm, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dm, u, P1, h_m, lo, hi, 0);
#pragma omp barrier
        NAME(share)(Dw, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Dw, xm, w1, h_w, lo, hi, 1);
        NAME(share)(Da, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, C, Da, xm + BC, a1, h_a, lo, hi, 0);
        if (value_residual) {
            NAME(share)(Dv, 16, t, T, &lo, &hi);
            NAME(matmul_cols)(B, C, Dv, xm + 2 * BC, v1, h_v, lo, hi, 0);
        }
#pragma omp barrier
        NAME(share)(A, 16, t, T, &lo, &hi);
        NAME(matmul_cols)(B, Dr, A, h_r, R2, r, lo, hi, 0);
        NAME(matmul_cols)(B, Dw, A, h_w, w2, w, lo, hi, 0);
        NAME(matmul_cols)(B, Da, A, h_a, a2, al, lo, hi, 0);
        if (value_residual)
            NAME(matmul_cols)(B, Dv, A, h_v, v2, aa, lo, hi, 0);
        if (Dg > 0)
            NAME(matmul_cols)(B, Dg, A, h_g, G2, gamma_out, lo, hi, 0);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t i = lo; i < hi; ++i) {
                r[b * A + i] += q[b * A + i];
                if (Dg > 0)
                    gamma_out[b * A + i] = NAME(sigmoid)(gamma_out[b * A + i] + gate_bias[i]);
            }
        if (Dm > 0) {
            NAME(share)(Wm, 16, t, T, &lo, &hi);
            NAME(matmul_cols)(B, Dm, Wm, h_m, P2, middle_out, lo, hi, 2);
        }
#pragma omp barrier
        NAME(share)(B * H, 1, t, T, &lo, &hi);
        NAME(state_heads_one_token)(lo, hi, H, N, value_residual, eps, mask, r, ks, vs, w, al, aa, bb, y, stats,
                                    v_first, v_first_out, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, state, state_out,
                                    y_out, 0, 0);
        NAME(share)(BC, 16, t, T, &lo, &hi);
        if (hi > lo)
            memcpy(shift_out + lo, xin + lo, (size_t)(hi - lo) * sizeof(real));
    }
}
#endif
