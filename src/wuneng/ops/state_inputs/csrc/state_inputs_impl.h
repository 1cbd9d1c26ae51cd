/* Included by state_inputs.c once per scalar type (real, NAME, SQRT, EXP defined there). Rows r0..r1 of a
 * [rows = tokens * H, N] layout; the parameters k_k, k_a are [H * N]; mask (or NULL) is one value per token. zv, vf,
 * v_out (forward) and their gradients (backward) are NULL without value residual. */


/* The forward for grouped keys and values (no backward: the no-grad prefill): k, v are [tokens * G, N] with G
 * key/value heads shared by H / G consecutive state heads each (the teacher's grouped-query attention), read in
 * place of a repeated copy; v_out is written where given (v' of the value residual, else v itself), times the mask.
 * With G = H it is the plain forward (state_inputs_forward). */
void NAME(state_inputs_forward_grouped)(int64_t r0, int64_t r1, int64_t H, int64_t G, int64_t N, double decay_scale,
                                        const real *zw, const real *za, const real *zv, const real *k, const real *v,
                                        const real *vf, const real *k_k, const real *k_a, const real *mask,
                                        real *log_w, real *k_out, real *v_out, real *a_out, real *b_out)
{
    const real c = (real)decay_scale;
    const int64_t rep = H / G;
    for (int64_t row = r0; row < r1; row++) {
        const int64_t o = row * N, p = (row % H) * N, g = ((row / H) * G + (row % H) / rep) * N;
        const real m = mask ? mask[row / H] : (real)1;
        real ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t n = 0; n < N; n++) {
            const real q = k[g + n] * k_k[p + n];
            ss += q * q;
        }
        real nrm = SQRT(ss);
        const real inv = (real)1 / (nrm > (real)1e-12 ? nrm : (real)1e-12);
        real sa[N], sw[N], sg[N];
        SIGROW(N, za + o, sa);
        SIGROW(N, zw + o, sw);
        if (zv)
            SIGROW(N, zv + o, sg);
#pragma omp simd
        for (int64_t n = 0; n < N; n++) {
            const real alpha = sa[n];
            const real kk = k[g + n] * k_k[p + n] * inv;
            log_w[o + n] = -c * sw[n] * m;
            k_out[o + n] = k[g + n] * ((real)1 + (alpha - (real)1) * k_a[p + n]) * m;
            a_out[o + n] = -kk;
            b_out[o + n] = kk * alpha * m;
        }
        if (zv) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++)
                v_out[o + n] = (v[g + n] + (vf[o + n] - v[g + n]) * sg[n]) * m;
        } else if (v_out) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++)
                v_out[o + n] = v[g + n] * m;
        }
    }
}

/* The forward of the training path: k, v are [rows, N] (one key/value row per state head); v_out is NULL without
 * value residual. The grouped forward with one state head per key/value head. */
void NAME(state_inputs_forward)(int64_t r0, int64_t r1, int64_t H, int64_t N, double decay_scale, const real *zw,
                                const real *za, const real *zv, const real *k, const real *v, const real *vf,
                                const real *k_k, const real *k_a, const real *mask, real *log_w, real *k_out,
                                real *v_out, real *a_out, real *b_out)
{
    NAME(state_inputs_forward_grouped)(r0, r1, H, H, N, decay_scale, zw, za, zv, k, v, vf, k_k, k_a, mask, log_w,
                                       k_out, zv ? v_out : NULL, a_out, b_out);
}


/* d_kk, d_ka: this range's own [H * N] accumulators (summed by the caller), zeroed by the caller. */
void NAME(state_inputs_backward)(int64_t r0, int64_t r1, int64_t H, int64_t N, double decay_scale, const real *zw,
                                 const real *za, const real *zv, const real *k, const real *v, const real *vf,
                                 const real *k_k, const real *k_a, const real *mask, const real *g_logw,
                                 const real *g_k, const real *g_v, const real *g_a, const real *g_b, real *d_zw,
                                 real *d_za, real *d_zv, real *d_k, real *d_v, real *d_vf, real *d_kk,
                                 real *d_ka)
{
    const real c = (real)decay_scale;
    for (int64_t row = r0; row < r1; row++) {
        const int64_t o = row * N, p = (row % H) * N;
        const real m = mask ? mask[row / H] : (real)1;
        real ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t n = 0; n < N; n++) {
            const real q = k[o + n] * k_k[p + n];
            ss += q * q;
        }
        const real nrm = SQRT(ss);
        const int normed = nrm > (real)1e-12;
        const real inv = (real)1 / (normed ? nrm : (real)1e-12);
        real sa[N], sw[N], sg[N];
        SIGROW(N, za + o, sa);
        SIGROW(N, zw + o, sw);
        if (d_v)
            SIGROW(N, zv + o, sg);
        /* <d kk, kk> over the row, d kk = -g_a + m g_b alpha */
        real dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t n = 0; n < N; n++) {
            const real alpha = sa[n];
            const real kk = k[o + n] * k_k[p + n] * inv;
            dot += (-g_a[o + n] + m * g_b[o + n] * alpha) * kk;
        }
#pragma omp simd
        for (int64_t n = 0; n < N; n++) {
            const real alpha = sa[n];
            const real s_w = sw[n];
            const real kk = k[o + n] * k_k[p + n] * inv;
            const real gk = m * g_k[o + n];
            const real dkk = -g_a[o + n] + m * g_b[o + n] * alpha;
            const real dq = normed ? (dkk - kk * dot) * inv : dkk * inv;
            const real d_alpha = gk * k[o + n] * k_a[p + n] + m * g_b[o + n] * kk;
            d_zw[o + n] = -c * m * g_logw[o + n] * s_w * ((real)1 - s_w);
            d_za[o + n] = d_alpha * alpha * ((real)1 - alpha);
            d_k[o + n] = gk * ((real)1 + (alpha - (real)1) * k_a[p + n]) + dq * k_k[p + n];
            d_kk[p + n] += dq * k[o + n];
            d_ka[p + n] += gk * k[o + n] * (alpha - (real)1);
        }
        if (d_v) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) {
                const real g = sg[n];
                const real gv = m * g_v[o + n];
                d_v[o + n] = gv * ((real)1 - g);
                d_vf[o + n] = gv * g;
                d_zv[o + n] = gv * (vf[o + n] - v[o + n]) * g * ((real)1 - g);
            }
        }
    }
}

/* The gate fusion z = a + sigmoid(zg) rho (y - a) over rows r0..r1 of [rows = tokens * H, N]; rho is [H * N]. */
void NAME(gate_fusion_forward)(int64_t r0, int64_t r1, int64_t H, int64_t N, const real *a, const real *y,
                               const real *zg, const real *rho, real *z)
{
    for (int64_t row = r0; row < r1; row++) {
        const int64_t o = row * N, p = (row % H) * N;
        real s[N];
        SIGROW(N, zg + o, s);
#pragma omp simd
        for (int64_t n = 0; n < N; n++)
            z[o + n] = a[o + n] + s[n] * rho[p + n] * (y[o + n] - a[o + n]);
    }
}

/* d_rho: this range's own [H * N] accumulator, zeroed by the caller. */
void NAME(gate_fusion_backward)(int64_t r0, int64_t r1, int64_t H, int64_t N, const real *a, const real *y,
                                const real *zg, const real *rho, const real *g, real *d_a, real *d_y, real *d_zg,
                                real *d_rho)
{
    for (int64_t row = r0; row < r1; row++) {
        const int64_t o = row * N, p = (row % H) * N;
        real s[N];
        SIGROW(N, zg + o, s);
#pragma omp simd
        for (int64_t n = 0; n < N; n++) {
            const real w = s[n] * rho[p + n], gy = g[o + n] * (y[o + n] - a[o + n]);
            d_a[o + n] = g[o + n] - g[o + n] * w;
            d_y[o + n] = g[o + n] * w;
            d_zg[o + n] = gy * rho[p + n] * s[n] * ((real)1 - s[n]);
            d_rho[p + n] += gy * s[n];
        }
    }
}
