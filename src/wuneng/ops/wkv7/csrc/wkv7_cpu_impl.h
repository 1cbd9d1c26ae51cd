/* The WKV-7 recurrence on the CPU, one head at a time, for one scalar type.
 *
 * Included twice by wkv7_cpu.c, with `real` = float and = double and NAME(x) adding the suffix.
 * Layout (row-major, contiguous): sequences [B, T, H, N] (token stride H * N), states [B, H, N, N]
 * with S[i][j] = (value i, key j). Per head and token (SPEC section 1):
 *
 *     sa_i    = sum_j S[i][j] a[j]                          (the OLD state)
 *     S[i][j] = S[i][j] w[j] + sa_i b[j] + v[i] k[j]
 *     y_i     = sum_j S[i][j] r[j]      (and y2_i with q, when q is given)
 *
 * Inside the kernels the state is held transposed, key-major (ST[j][i] = S[i][j]): then every loop
 * over a key j is a vector operation over the N values i (sa, y and the update accumulate without
 * horizontal sums), which the compiler vectorises. Only the backward's sums over i (dr, dk, db, dw,
 * da) are reductions. States cross the interface value-major and are transposed on entry and exit.
 *
 * Backward: the forward stores the (key-major) state at the start of every chunk of L tokens; the
 * backward walks the chunks from the last, recomputes the chunk's L + 1 states from its checkpoint
 * into a work buffer (in L2 at N = 64, L = 16: 272 KB) and runs the state gradient G = dL/dS back
 * through them.
 *
 * Heads [bh0, bh1) of the B * H heads: callers split heads across threads, each with its own work.
 *
 * Head size 64 (every RWKV-7 and most teacher head sizes) takes its own vector path, wkv64_forward and
 * wkv64_backward below (rows in registers, a value-major backward, value-major checkpoints); the generic loops
 * serve every other N.
 */

static inline real NAME(dot)(const real *restrict x, const real *restrict y, int64_t n)
{
    real s = 0;
#pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < n; ++j)
        s += x[j] * y[j];
    return s;
}

/* dst[j][i] = src[i][j], N x N */
static void NAME(transpose)(real *restrict dst, const real *restrict src, int64_t N)
{
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j)
            dst[j * N + i] = src[i * N + j];
}

/* One token: ST (key-major) advances in place (old -> nw may alias only when equal, see callers), sa
 * receives S_old a. y/y2 (nullable) receive the read-outs. */
static inline void NAME(step)(int64_t N, const real *old, real *nw, real *restrict sa, real *restrict ys,
                              real *restrict y2s, const real *restrict rt, const real *restrict wt,
                              const real *restrict kt, const real *restrict vt, const real *restrict at,
                              const real *restrict bt, const real *restrict qt)
{
    for (int64_t i = 0; i < N; ++i)
        sa[i] = 0;
    for (int64_t j = 0; j < N; ++j) {
        const real aj = at[j];
        const real *restrict row = old + j * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i)
            sa[i] += aj * row[i];
    }
    if (ys)
        for (int64_t i = 0; i < N; ++i)
            ys[i] = 0;
    if (y2s)
        for (int64_t i = 0; i < N; ++i)
            y2s[i] = 0;
    for (int64_t j = 0; j < N; ++j) {
        const real wj = wt[j], bj = bt[j], kj = kt[j];
        const real *ro = old + j * N;
        real *rn = nw + j * N;
        if (!ys) {
#pragma omp simd
            for (int64_t i = 0; i < N; ++i)
                rn[i] = ro[i] * wj + bj * sa[i] + kj * vt[i];
        } else if (!y2s) {
            const real rj = rt[j];
#pragma omp simd
            for (int64_t i = 0; i < N; ++i) {
                const real s = ro[i] * wj + bj * sa[i] + kj * vt[i];
                rn[i] = s;
                ys[i] += rj * s;
            }
        } else {
            const real rj = rt[j], qj = qt[j];
#pragma omp simd
            for (int64_t i = 0; i < N; ++i) {
                const real s = ro[i] * wj + bj * sa[i] + kj * vt[i];
                rn[i] = s;
                ys[i] += rj * s;
                y2s[i] += qj * s;
            }
        }
    }
}

/* ---- Head size 64: the same recurrence with every state row held as W64_NV vectors of 64 bytes ----
 *
 * GCC/Clang vector extensions (lowered to AVX-512, AVX2 or NEON by -march=native); with the row length a
 * compile-time constant the per-token vectors (sa, y, v and the gradient accumulators) stay in registers,
 * which the generic loops above cannot do (they reload and store sa and y for every key).
 * - Forward: key-major state, one pass over the state per token: the new row j updates y and, with the next
 *   token's a, the next token's sa = S_t a_{t+1} (no separate pass for sa).
 * - Backward: value-major (rows i), one pass per token: every sum over the keys j (dr, dk, db, dw, da) is a
 *   vector accumulation, and only dv_i and dsa_i are horizontal sums (two per row, against five per key in the
 *   key-major form). The checkpoints are therefore stored value-major by wkv64_forward; both functions are
 *   chosen together, on N alone (wkv7_forward / wkv7_backward), so the layout always matches.
 * Tested against the float64 oracle at N = 64 (tests/ops/test_wkv7_cpu.py). */
typedef real NAME(w64v) __attribute__((vector_size(64)));
typedef real NAME(w64h) __attribute__((vector_size(32)));
typedef real NAME(w64q) __attribute__((vector_size(16)));
#define W64_LANES ((int)(64 / sizeof(real)))
#define W64_NV ((int)(64 / W64_LANES))

static inline NAME(w64v) NAME(w64load)(const real *p)
{
    NAME(w64v) x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void NAME(w64store)(real *p, NAME(w64v) x)
{
    memcpy(p, &x, sizeof x);
}

/* the sum of the lanes, as a tree of halves */
static inline real NAME(w64sum)(NAME(w64v) x)
{
    NAME(w64h) lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (const char *)&x + sizeof lo, sizeof hi);
    lo += hi;
    NAME(w64q) l2, h2;
    memcpy(&l2, &lo, sizeof l2);
    memcpy(&h2, (const char *)&lo + sizeof l2, sizeof h2);
    l2 += h2;
    real s = 0;
    for (int j = 0; j < (int)(16 / sizeof(real)); ++j)
        s += l2[j];
    return s;
}

#ifndef WKV64_TRANSPOSE32
#define WKV64_TRANSPOSE32
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
/* dst = src^T for 64 x 64 32-bit words, as 16 x 16 blocks of 16-lane vectors, each transposed in registers by four
 * butterfly stages (stage s swaps the off-diagonal s x s sub-blocks of every 2s x 2s block). The scalar loop costs
 * several times more, and the checkpoints of the N = 64 path need one transpose per chunk of tokens. */
typedef uint32_t wkv64_u32x16 __attribute__((vector_size(64)));
#define WKV64_LIST(...) __VA_ARGS__
#define WKV64_STAGE(s, LO, HI)                                                                                       \
    for (int i = 0; i < 16; ++i)                                                                                     \
        if (!(i & (s))) {                                                                                            \
            const wkv64_u32x16 a = m[i], b = m[i + (s)];                                                             \
            m[i] = __builtin_shufflevector(a, b, WKV64_LIST LO);                                                 \
            m[i + (s)] = __builtin_shufflevector(a, b, WKV64_LIST HI);                                           \
        }
static void wkv64_transpose32(void *restrict dst, const void *restrict src)
{
    const char *in = (const char *)src;
    char *out = (char *)dst;
    for (int bi = 0; bi < 4; ++bi)
        for (int bj = 0; bj < 4; ++bj) {
            wkv64_u32x16 m[16];
            for (int i = 0; i < 16; ++i)
                memcpy(&m[i], in + ((bi * 16 + i) * 64 + bj * 16) * 4, 64);
            WKV64_STAGE(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                        (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
            WKV64_STAGE(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                        (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
            WKV64_STAGE(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                        (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
            WKV64_STAGE(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                        (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
            for (int i = 0; i < 16; ++i)
                memcpy(out + ((bj * 16 + i) * 64 + bi * 16) * 4, &m[i], 64);
        }
}
#undef WKV64_STAGE
#undef WKV64_LIST
#define WKV64_HAVE_TRANSPOSE32 1
#else
#define WKV64_HAVE_TRANSPOSE32 0
#endif
#endif

/* dst = src^T for 64 x 64 (float: the vector transpose above where the compiler has it; else 8 x 8 blocks) */
static void NAME(w64transpose)(real *restrict dst, const real *restrict src)
{
#if WKV64_HAVE_TRANSPOSE32
    if (sizeof(real) == 4) {
        wkv64_transpose32(dst, src);
        return;
    }
#endif
    for (int i0 = 0; i0 < 64; i0 += 8)
        for (int j0 = 0; j0 < 64; j0 += 8)
            for (int i = i0; i < i0 + 8; ++i)
                for (int j = j0; j < j0 + 8; ++j)
                    dst[j * 64 + i] = src[i * 64 + j];
}

/* One token on the key-major state ST: sa = S_{t-1} a_t (given) -> ST = S_t, y (and y2) = S_t r (q), and
 * sa <- S_t an (the next token's a). */
static inline __attribute__((always_inline)) void
NAME(w64token)(real *restrict ST, NAME(w64v) *sa, const real *restrict rt, const real *restrict wt,
               const real *restrict kt, const real *restrict vt, const real *restrict bt, const real *restrict qt,
               const real *restrict an, real *restrict yt, real *restrict y2t, const int has_q)
{
    NAME(w64v) vv[W64_NV], yv[W64_NV], y2v[W64_NV], sn[W64_NV];
    for (int u = 0; u < W64_NV; ++u) {
        vv[u] = NAME(w64load)(vt + u * W64_LANES);
        yv[u] = y2v[u] = sn[u] = (NAME(w64v)){0};
    }
    for (int j = 0; j < 64; ++j) {
        const real wj = wt[j], bj = bt[j], kj = kt[j], rj = rt[j], aj = an[j], qj = has_q ? qt[j] : 0;
        real *row = ST + j * 64;
        for (int u = 0; u < W64_NV; ++u) {
            const NAME(w64v) s = NAME(w64load)(row + u * W64_LANES) * wj + sa[u] * bj + vv[u] * kj;
            NAME(w64store)(row + u * W64_LANES, s);
            yv[u] += s * rj;
            sn[u] += s * aj;
            if (has_q)
                y2v[u] += s * qj;
        }
    }
    for (int u = 0; u < W64_NV; ++u) {
        NAME(w64store)(yt + u * W64_LANES, yv[u]);
        if (has_q)
            NAME(w64store)(y2t + u * W64_LANES, y2v[u]);
        sa[u] = sn[u];
    }
}

/* wkv7_forward at N = 64 (same arguments); ckpt value-major. work: 64 * 64 reals. */
static void NAME(wkv64_forward)(int64_t bh0, int64_t bh1, int64_t T, int64_t H, int64_t L, const real *r,
                                const real *w, const real *k, const real *v, const real *a, const real *b,
                                const real *q, const real *s0, real *y, real *y2, real *s_out, real *ckpt,
                                real *work)
{
    const int64_t stride = H * 64, NN = 64 * 64, n_chunks = (T + L - 1) / L;
    real *ST = work;
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t base = (bh / H) * T * stride + (bh % H) * 64;
        if (s0)
            NAME(w64transpose)(ST, s0 + bh * NN);
        else
            memset(ST, 0, NN * sizeof(real));
        NAME(w64v) sa[W64_NV];
        for (int u = 0; u < W64_NV; ++u)
            sa[u] = (NAME(w64v)){0};
        if (s0)
            for (int j = 0; j < 64; ++j)
                for (int u = 0; u < W64_NV; ++u)
                    sa[u] += NAME(w64load)(ST + j * 64 + u * W64_LANES) * a[base + j];
        for (int64_t t = 0; t < T; ++t) {
            if (ckpt && t % L == 0)
                NAME(w64transpose)(ckpt + (bh * n_chunks + t / L) * NN, ST);
            const int64_t o = base + t * stride, on = t + 1 < T ? o + stride : o;
            if (q)
                NAME(w64token)(ST, sa, r + o, w + o, k + o, v + o, b + o, q + o, a + on, y + o, y2 + o, 1);
            else
                NAME(w64token)(ST, sa, r + o, w + o, k + o, v + o, b + o, 0, a + on, y + o, 0, 0);
        }
        NAME(w64transpose)(s_out + bh * NN, ST);
    }
}

/* One token of the backward on value-major states: G = dL/dS_t -> dL/dS_{t-1}; writes the token's gradients. */
static inline __attribute__((always_inline)) void
NAME(w64token_backward)(real *restrict G, const real *restrict old, const real *restrict nw,
                        const real *restrict sa, const real *restrict rt, const real *restrict wt,
                        const real *restrict kt, const real *restrict vt, const real *restrict at,
                        const real *restrict bt, const real *restrict qt, const real *restrict dyt,
                        const real *restrict dy2t, real *restrict drt, real *restrict dwt, real *restrict dkt,
                        real *restrict dvt, real *restrict dat, real *restrict dbt, real *restrict dqt,
                        const int has_q)
{
    NAME(w64v) rv[W64_NV], wv[W64_NV], kv[W64_NV], av[W64_NV], bv[W64_NV], qv[W64_NV];
    NAME(w64v) dr[W64_NV], dw[W64_NV], dk[W64_NV], da[W64_NV], db[W64_NV], dq[W64_NV];
    for (int u = 0; u < W64_NV; ++u) {
        rv[u] = NAME(w64load)(rt + u * W64_LANES);
        wv[u] = NAME(w64load)(wt + u * W64_LANES);
        kv[u] = NAME(w64load)(kt + u * W64_LANES);
        av[u] = NAME(w64load)(at + u * W64_LANES);
        bv[u] = NAME(w64load)(bt + u * W64_LANES);
        qv[u] = has_q ? NAME(w64load)(qt + u * W64_LANES) : (NAME(w64v)){0};
        dr[u] = dw[u] = dk[u] = da[u] = db[u] = dq[u] = (NAME(w64v)){0};
    }
    for (int i = 0; i < 64; ++i) {
        real *g = G + i * 64;
        const real *o_row = old + i * 64, *n_row = nw + i * 64;
        const real dyi = dyt[i], dy2i = has_q ? dy2t[i] : 0, sai = sa[i], vi = vt[i];
        /* x = G + dy r^T (+ dy2 q^T) (row i); dr += dy_i S_t[i]; dv_i = x k, dsa_i = x b */
        NAME(w64v) x[W64_NV], pk = {0}, pb = {0};
        for (int u = 0; u < W64_NV; ++u) {
            const NAME(w64v) s = NAME(w64load)(n_row + u * W64_LANES);
            x[u] = NAME(w64load)(g + u * W64_LANES) + rv[u] * dyi;
            dr[u] += s * dyi;
            if (has_q) {
                x[u] += qv[u] * dy2i;
                dq[u] += s * dy2i;
            }
            pk += x[u] * kv[u];
            pb += x[u] * bv[u];
        }
        const real dsai = NAME(w64sum)(pb);
        dvt[i] = NAME(w64sum)(pk);
        /* S_t = S_{t-1} w + sa b^T + v k^T, sa = S_{t-1} a */
        for (int u = 0; u < W64_NV; ++u) {
            const NAME(w64v) s_old = NAME(w64load)(o_row + u * W64_LANES);
            dk[u] += x[u] * vi;
            db[u] += x[u] * sai;
            dw[u] += x[u] * s_old;
            da[u] += s_old * dsai;
            NAME(w64store)(g + u * W64_LANES, x[u] * wv[u] + av[u] * dsai);
        }
    }
    for (int u = 0; u < W64_NV; ++u) {
        NAME(w64store)(drt + u * W64_LANES, dr[u]);
        NAME(w64store)(dwt + u * W64_LANES, dw[u]);
        NAME(w64store)(dkt + u * W64_LANES, dk[u]);
        NAME(w64store)(dat + u * W64_LANES, da[u]);
        NAME(w64store)(dbt + u * W64_LANES, db[u]);
        if (has_q)
            NAME(w64store)(dqt + u * W64_LANES, dq[u]);
    }
}

/* wkv7_backward at N = 64 (same arguments; ckpt value-major as wkv64_forward stores it). work: (L + 1) 64^2
 * + L 64 reals for the chunk's states and sa rows, 64^2 for G. */
static void NAME(wkv64_backward)(int64_t bh0, int64_t bh1, int64_t T, int64_t H, int64_t L, const real *r,
                                 const real *w, const real *k, const real *v, const real *a, const real *b,
                                 const real *q, const real *ckpt, const real *dy, const real *dy2,
                                 const real *ds_final, real *dr, real *dw, real *dk, real *dv, real *da, real *db,
                                 real *dq, real *ds0, real *work)
{
    const int64_t stride = H * 64, NN = 64 * 64, n_chunks = (T + L - 1) / L;
    real *G = work, *states = work + NN, *sas = states + (L + 1) * NN;
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t base = (bh / H) * T * stride + (bh % H) * 64;
        if (ds_final)
            memcpy(G, ds_final + bh * NN, NN * sizeof(real));
        else
            memset(G, 0, NN * sizeof(real));
        for (int64_t c = n_chunks - 1; c >= 0; --c) {
            const int64_t t0 = c * L, n = (T - t0 < L) ? T - t0 : L;
            /* states[l] = before token t0 + l, states[l + 1] = after it; sas[l] = S_{t-1} a_t */
            memcpy(states, ckpt + (bh * n_chunks + c) * NN, NN * sizeof(real));
            for (int64_t l = 0; l < n; ++l) {
                const int64_t o = base + (t0 + l) * stride;
                const real *old = states + l * NN;
                real *nw = states + (l + 1) * NN, *sa = sas + l * 64;
                NAME(w64v) av[W64_NV], wv[W64_NV], bv[W64_NV], kv[W64_NV];
                for (int u = 0; u < W64_NV; ++u) {
                    av[u] = NAME(w64load)(a + o + u * W64_LANES);
                    wv[u] = NAME(w64load)(w + o + u * W64_LANES);
                    bv[u] = NAME(w64load)(b + o + u * W64_LANES);
                    kv[u] = NAME(w64load)(k + o + u * W64_LANES);
                }
                for (int i = 0; i < 64; ++i) {
                    NAME(w64v) row[W64_NV], p = {0};
                    for (int u = 0; u < W64_NV; ++u) {
                        row[u] = NAME(w64load)(old + i * 64 + u * W64_LANES);
                        p += row[u] * av[u];
                    }
                    const real sai = NAME(w64sum)(p), vi = v[o + i];
                    sa[i] = sai;
                    for (int u = 0; u < W64_NV; ++u)
                        NAME(w64store)(nw + i * 64 + u * W64_LANES, row[u] * wv[u] + bv[u] * sai + kv[u] * vi);
                }
            }
            for (int64_t l = n - 1; l >= 0; --l) {
                const int64_t o = base + (t0 + l) * stride;
                const real *old = states + l * NN, *nw = states + (l + 1) * NN, *sa = sas + l * 64;
                if (q)
                    NAME(w64token_backward)(G, old, nw, sa, r + o, w + o, k + o, v + o, a + o, b + o, q + o, dy + o,
                                            dy2 + o, dr + o, dw + o, dk + o, dv + o, da + o, db + o, dq + o, 1);
                else
                    NAME(w64token_backward)(G, old, nw, sa, r + o, w + o, k + o, v + o, a + o, b + o, 0, dy + o, 0,
                                            dr + o, dw + o, dk + o, dv + o, da + o, db + o, 0, 0);
            }
        }
        memcpy(ds0 + bh * NN, G, NN * sizeof(real));
    }
}

/* y (and y2 when q), the final states s_out [B*H, N, N] value-major; ckpt (nullable): [B*H, ceil(T/L),
 * N, N] key-major chunk-start states for the backward (value-major at N = 64, see wkv64_forward). s0 may be
 * NULL (zero state). work: N*N + 3N reals. */
void NAME(wkv7_forward)(int64_t bh0, int64_t bh1, int64_t T, int64_t H, int64_t N, int64_t L,
                        const real *r, const real *w, const real *k, const real *v, const real *a,
                        const real *b, const real *q, const real *s0, real *y, real *y2, real *s_out,
                        real *ckpt, real *work)
{
    if (N == 64) {
        NAME(wkv64_forward)(bh0, bh1, T, H, L, r, w, k, v, a, b, q, s0, y, y2, s_out, ckpt, work);
        return;
    }
    const int64_t stride = H * N, NN = N * N, n_chunks = (T + L - 1) / L;
    real *ST = work, *sa = work + NN, *ys = sa + N, *y2s = ys + N;
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t base = (bh / H) * T * stride + (bh % H) * N;
        if (s0)
            NAME(transpose)(ST, s0 + bh * NN, N);
        else
            memset(ST, 0, NN * sizeof(real));
        for (int64_t t = 0; t < T; ++t) {
            if (ckpt && t % L == 0)
                memcpy(ckpt + (bh * n_chunks + t / L) * NN, ST, NN * sizeof(real));
            const int64_t o = base + t * stride;
            NAME(step)(N, ST, ST, sa, ys, q ? y2s : 0, r + o, w + o, k + o, v + o, a + o, b + o, q ? q + o : 0);
            memcpy(y + o, ys, N * sizeof(real));
            if (q)
                memcpy(y2 + o, y2s, N * sizeof(real));
        }
        NAME(transpose)(s_out + bh * NN, ST, N);
    }
}

/* Gradients of wkv7_forward. q, dy2 and dq go together (all NULL without the extra query); ds_final
 * may be NULL (zero). Writes dr, dw (d/dw, not d/dlog_w), dk, dv, da, db (, dq) [B, T, H, N] for the
 * heads and ds0 [B*H, N, N] value-major. work: (L + 2) N^2 + (L + 2) N reals. */
void NAME(wkv7_backward)(int64_t bh0, int64_t bh1, int64_t T, int64_t H, int64_t N, int64_t L,
                         const real *r, const real *w, const real *k, const real *v, const real *a,
                         const real *b, const real *q, const real *ckpt, const real *dy, const real *dy2,
                         const real *ds_final, real *dr, real *dw, real *dk, real *dv, real *da, real *db,
                         real *dq, real *ds0, real *work)
{
    if (N == 64) {
        NAME(wkv64_backward)(bh0, bh1, T, H, L, r, w, k, v, a, b, q, ckpt, dy, dy2, ds_final, dr, dw, dk, dv, da, db,
                             dq, ds0, work);
        return;
    }
    const int64_t stride = H * N, NN = N * N, n_chunks = (T + L - 1) / L;
    real *G = work, *states = work + NN, *sas = states + (L + 1) * NN, *dsa = sas + L * N, *spare = dsa + N;
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t base = (bh / H) * T * stride + (bh % H) * N;
        if (ds_final)
            NAME(transpose)(G, ds_final + bh * NN, N);
        else
            memset(G, 0, NN * sizeof(real));
        for (int64_t c = n_chunks - 1; c >= 0; --c) {
            const int64_t t0 = c * L, n = (T - t0 < L) ? T - t0 : L;
            /* states[l] = before token t0 + l, states[l + 1] = after it */
            memcpy(states, ckpt + (bh * n_chunks + c) * NN, NN * sizeof(real));
            for (int64_t l = 0; l < n; ++l) {
                const int64_t o = base + (t0 + l) * stride;
                NAME(step)(N, states + l * NN, states + (l + 1) * NN, sas + l * N, 0, 0, 0, w + o, k + o, v + o,
                           a + o, b + o, 0);
            }
            for (int64_t l = n - 1; l >= 0; --l) {
                const int64_t o = base + (t0 + l) * stride;
                const real *restrict old = states + l * NN, *restrict nw = states + (l + 1) * NN;
                const real *restrict sa = sas + l * N, *restrict vt = v + o, *restrict dyt = dy + o;
                const real *restrict dy2t = dq ? dy2 + o : 0;
                real *restrict dvt = dv + o;
                for (int64_t i = 0; i < N; ++i)
                    dvt[i] = 0, dsa[i] = 0;
                /* G += dy r^T (+ dy2 q^T); then through S_t = S_{t-1} w + sa b^T + v k^T. Two keys per
                 * pass: the sums over i are dependency chains, and two in flight halve their latency. */
                for (int64_t j0 = 0; j0 < N; j0 += 2) {
                    const int64_t j1 = j0 + 1 < N ? j0 + 1 : j0;
                    const real on = j1 != j0; /* 0: the odd last key, seen once */
                    real *restrict g0 = G + j0 * N, *restrict g1 = spare;
                    if (on)
                        g1 = G + j1 * N;
                    else
                        memset(spare, 0, N * sizeof(real)); /* a zero row with zero weights: adds nothing */
                    const real *rn0 = nw + j0 * N, *rn1 = nw + j1 * N, *ro0 = old + j0 * N, *ro1 = old + j1 * N;
                    if (dy2t) {
                        const real q0 = q[o + j0], q1 = q[o + j1] * on;
                        real s0 = 0, s1 = 0;
#pragma omp simd reduction(+:s0, s1)
                        for (int64_t i = 0; i < N; ++i) {
                            s0 += rn0[i] * dy2t[i];
                            s1 += rn1[i] * dy2t[i];
                            g0[i] += q0 * dy2t[i];
                            g1[i] += q1 * dy2t[i];
                        }
                        dq[o + j0] = s0;
                        dq[o + j1] = s1;
                    }
                    const real r0 = r[o + j0], r1 = r[o + j1] * on;
                    const real k0 = k[o + j0], k1 = k[o + j1] * on, b0 = b[o + j0], b1 = b[o + j1] * on;
                    real sr0 = 0, sk0 = 0, sb0 = 0, sw0 = 0, sr1 = 0, sk1 = 0, sb1 = 0, sw1 = 0;
#pragma omp simd reduction(+:sr0, sk0, sb0, sw0, sr1, sk1, sb1, sw1)
                    for (int64_t i = 0; i < N; ++i) {
                        const real x0 = g0[i] + r0 * dyt[i], x1 = g1[i] + r1 * dyt[i];
                        sr0 += rn0[i] * dyt[i];
                        sr1 += rn1[i] * dyt[i];
                        dvt[i] += k0 * x0 + k1 * x1;
                        dsa[i] += b0 * x0 + b1 * x1;
                        sk0 += x0 * vt[i];
                        sk1 += x1 * vt[i];
                        sb0 += x0 * sa[i];
                        sb1 += x1 * sa[i];
                        sw0 += x0 * ro0[i];
                        sw1 += x1 * ro1[i];
                        g1[i] = x1;
                        g0[i] = x0;
                    }
                    dr[o + j0] = sr0, dk[o + j0] = sk0, db[o + j0] = sb0, dw[o + j0] = sw0;
                    if (on)
                        dr[o + j1] = sr1, dk[o + j1] = sk1, db[o + j1] = sb1, dw[o + j1] = sw1;
                }
                /* sa = S_{t-1} a: into da and the gradient of the old state */
                for (int64_t j0 = 0; j0 < N; j0 += 2) {
                    const int64_t j1 = j0 + 1 < N ? j0 + 1 : j0;
                    real *restrict g0 = G + j0 * N, *restrict g1 = G + j1 * N;
                    const real *ro0 = old + j0 * N, *ro1 = old + j1 * N;
                    const real w0 = w[o + j0], a0 = a[o + j0], w1 = w[o + j1], a1 = a[o + j1];
                    real s0 = 0, s1 = 0;
                    if (j1 != j0) {
#pragma omp simd reduction(+:s0, s1)
                        for (int64_t i = 0; i < N; ++i) {
                            s0 += ro0[i] * dsa[i];
                            s1 += ro1[i] * dsa[i];
                            g0[i] = g0[i] * w0 + a0 * dsa[i];
                            g1[i] = g1[i] * w1 + a1 * dsa[i];
                        }
                        da[o + j1] = s1;
                    } else {
#pragma omp simd reduction(+:s0)
                        for (int64_t i = 0; i < N; ++i) {
                            s0 += ro0[i] * dsa[i];
                            g0[i] = g0[i] * w0 + a0 * dsa[i];
                        }
                    }
                    da[o + j0] = s0;
                }
            }
        }
        NAME(transpose)(ds0 + bh * NN, G, N);
    }
}

/* One token (decoding) in the interface's value-major layout, no transposes: per row i, sa_i and y_i are
 * dot products of the row (latency-bound, but a decoding step is one token: the transposes of
 * wkv7_forward would cost more than the step). r..b, q, y, y2: [B*H, N]; s0 (nullable), s_out: [B*H, N, N]. */
void NAME(wkv7_one_token)(int64_t bh0, int64_t bh1, int64_t N, const real *r, const real *w, const real *k,
                          const real *v, const real *a, const real *b, const real *q, const real *s0, real *y,
                          real *y2, real *s_out)
{
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t o = bh * N;
        const real *rt = r + o, *wt = w + o, *kt = k + o, *at = a + o, *bt = b + o, *qt = q ? q + o : 0;
        for (int64_t i = 0; i < N; ++i) {
            real *restrict row = s_out + (bh * N + i) * N;
            const real *restrict old = s0 ? s0 + (bh * N + i) * N : 0;
            const real sa = old ? NAME(dot)(old, at, N) : 0, vi = v[o + i];
            if (old) {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j)
                    row[j] = old[j] * wt[j] + sa * bt[j] + vi * kt[j];
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j)
                    row[j] = vi * kt[j];
            }
            y[o + i] = NAME(dot)(row, rt, N);
            if (qt)
                y2[o + i] = NAME(dot)(row, qt, N);
        }
    }
}
