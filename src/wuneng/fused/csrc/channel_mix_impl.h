/* The RWKV-7 channel-mix for one token and a bias-free linear map of a few rows (the language-model head), each one
 * multi-threaded call that streams its weight matrices once at the memory's rate (the matrix-vector products of a
 * batch-1 decoding step are memory-bound: the weights are read once per token).
 *
 * Included by fused_cpu.c after one_token_impl.h (`real`, `wreal`, NAME, LINEAR_ROWS and NAME(share) from there).
 * Shapes (row-major, contiguous), nn.Linear's layout:
 *
 *     channel_mix_one_token:  x, shift, out, shift_out [B, C]; mask [B] or NULL; mix [C] (the key's token-shift
 *                             mix); W_key [F, C]; W_value [C, F]; work B (C + F) reals.
 *         x = x mask;  x_k = x + (shift - x) mix;  k = relu(W_key x_k)^2;  out = W_value k;  shift_out = x
 *     linear_one_token:       x [B, I]; W [O, I]; y [B, O]:  y = W x
 *
 * Threads as in time_mix_one_token: one OpenMP region, each phase splits its rows (in blocks of 16) across the
 * threads, a barrier between phases; every output element is computed by one thread in the same order whatever the
 * thread count, so the result does not depend on it. */

struct NAME(channel_mix_args) {
    CHANNEL_MIX_FIELDS(FIELD_INT, FIELD_F64, FIELD_IN, FIELD_OUT)
};
struct NAME(linear_args) {
    LINEAR_FIELDS(FIELD_INT, FIELD_F64, FIELD_IN, FIELD_OUT)
};
const char *NAME(channel_mix_one_token_layout)(void)
{
    return CHANNEL_MIX_FIELDS(TEXT_INT, TEXT_F64, TEXT_IN, TEXT_OUT);
}
int64_t NAME(channel_mix_one_token_args_size)(void)
{
    return (int64_t)sizeof(struct NAME(channel_mix_args));
}
const char *NAME(linear_one_token_layout)(void)
{
    return LINEAR_FIELDS(TEXT_INT, TEXT_F64, TEXT_IN, TEXT_OUT);
}
int64_t NAME(linear_one_token_args_size)(void)
{
    return (int64_t)sizeof(struct NAME(linear_args));
}

void NAME(channel_mix_one_token)(const struct NAME(channel_mix_args) *args)
{
    CHANNEL_MIX_FIELDS(UNPACK_INT, UNPACK_F64, UNPACK_IN, UNPACK_OUT)
    real *xk = work;     /* [B][C] the key's input */
    real *k = xk + B * C; /* [B][F] the hidden activations */
    const int nthreads = wuneng_team_size(threads);
    (void)nthreads;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        WUNENG_THREAD_INDEX(t, T);
        int64_t lo, hi;
        NAME(share)(C, 16, t, T, &lo, &hi);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t c = lo; c < hi; ++c) {
                const real xc = mask ? x[b * C + c] * mask[b] : x[b * C + c];
                shift_out[b * C + c] = xc;
                xk[b * C + c] = xc + (shift[b * C + c] - xc) * mix[c];
            }
#pragma omp barrier
        NAME(share)(F, 16, t, T, &lo, &hi);
        LINEAR_ROWS(B, F, C, (const wreal *)W_key, xk, k, lo, hi);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t f = lo; f < hi; ++f) {
                const real z = k[b * F + f] > 0 ? k[b * F + f] : (real)0;
                k[b * F + f] = z * z;
            }
#pragma omp barrier
        NAME(share)(C, 16, t, T, &lo, &hi);
        LINEAR_ROWS(B, C, F, (const wreal *)W_value, k, out, lo, hi);
    }
}

void NAME(linear_one_token)(const struct NAME(linear_args) *args)
{
    LINEAR_FIELDS(UNPACK_INT, UNPACK_F64, UNPACK_IN, UNPACK_OUT)
    const int nthreads = wuneng_team_size(threads);
    (void)nthreads;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        WUNENG_THREAD_INDEX(t, T);
        int64_t lo, hi;
        NAME(share)(O, 16, t, T, &lo, &hi);
        LINEAR_ROWS(B, O, I, (const wreal *)W, x, y, lo, hi);
    }
}
