/* RWKV-7 read-out, fused: per-head GroupNorm of the WKV output plus the bonus term.
 *
 * Included by wkv7_cpu.c like wkv7_cpu_impl.h (`real`, NAME). Rows are (token, head) pairs of N channels:
 * row index = token * H + h, data at row * N. For one row, with rho = r_k[h], gamma/beta the GroupNorm
 * affine (channels h*N .. h*N + N - 1):
 *
 *     mu = mean(y), inv = 1 / sqrt(var(y) + eps), yn = (y - mu) inv         (biased variance, as GroupNorm)
 *     c  = sum_j r_j k_j rho_j
 *     out = yn gamma + beta + c v
 *
 * stats keeps (inv, c) per row for the backward; the backward accumulates the parameter gradients
 * (d gamma, d beta, d rho, each [H, N]) into the caller's buffers (one set per thread). */

void NAME(readout_forward)(int64_t row0, int64_t row1, int64_t H, int64_t N, const real *y, const real *r,
                           const real *k, const real *v, const real *rho, const real *gamma, const real *beta,
                           double eps, real *out, real *stats)
{
    for (int64_t row = row0; row < row1; ++row) {
        const int64_t o = row * N, p = (row % H) * N;
        const real *restrict yr = y + o, *restrict rr = r + o, *restrict kr = k + o, *restrict vr = v + o;
        const real *restrict rh = rho + p, *restrict ga = gamma + p, *restrict be = beta + p;
        real *restrict outr = out + o;
        real s = 0, c = 0;
#pragma omp simd reduction(+:s, c)
        for (int64_t j = 0; j < N; ++j) {
            s += yr[j];
            c += rr[j] * kr[j] * rh[j];
        }
        const real mu = s / N;
        real ss = 0;
#pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < N; ++j)
            ss += (yr[j] - mu) * (yr[j] - mu);
        const real inv = (real)1 / sqrt((double)(ss / N) + eps);
#pragma omp simd
        for (int64_t j = 0; j < N; ++j)
            outr[j] = (yr[j] - mu) * inv * ga[j] + be[j] + c * vr[j];
        stats[2 * row] = inv;
        stats[2 * row + 1] = c;
    }
}

void NAME(readout_backward)(int64_t row0, int64_t row1, int64_t H, int64_t N, const real *g, const real *y,
                            const real *r, const real *k, const real *v, const real *rho, const real *gamma,
                            const real *stats, real *dy, real *dr, real *dk, real *dv, real *drho,
                            real *dgamma, real *dbeta)
{
    for (int64_t row = row0; row < row1; ++row) {
        const int64_t o = row * N, p = (row % H) * N;
        const real *restrict gr = g + o, *restrict yr = y + o, *restrict rr = r + o, *restrict kr = k + o;
        const real *restrict vr = v + o, *restrict rh = rho + p, *restrict ga = gamma + p;
        real *restrict dyr = dy + o, *restrict drr = dr + o, *restrict dkr = dk + o, *restrict dvr = dv + o;
        real *restrict drh = drho + p, *restrict dga = dgamma + p, *restrict dbe = dbeta + p;
        const real inv = stats[2 * row], c = stats[2 * row + 1];
        real s = 0, dc = 0;
#pragma omp simd reduction(+:s, dc)
        for (int64_t j = 0; j < N; ++j) {
            s += yr[j];
            dc += gr[j] * vr[j];
        }
        const real mu = s / N;
        /* GroupNorm: dyn = g gamma; dy = inv (dyn - mean(dyn) - yn mean(dyn yn)) */
        real m1 = 0, m2 = 0;
#pragma omp simd reduction(+:m1, m2)
        for (int64_t j = 0; j < N; ++j) {
            const real yn = (yr[j] - mu) * inv, dyn = gr[j] * ga[j];
            m1 += dyn;
            m2 += dyn * yn;
            dga[j] += gr[j] * yn;
            dbe[j] += gr[j];
        }
        m1 /= N;
        m2 /= N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
            const real yn = (yr[j] - mu) * inv;
            dyr[j] = inv * (gr[j] * ga[j] - m1 - yn * m2);
            dvr[j] = gr[j] * c;
            drr[j] = dc * kr[j] * rh[j];
            dkr[j] = dc * rr[j] * rh[j];
            drh[j] += dc * rr[j] * kr[j];
        }
    }
}
