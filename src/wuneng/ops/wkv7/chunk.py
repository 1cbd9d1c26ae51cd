"""Chunked WKV-7: the parallel-within-chunk form for training and prefill.

The recurrence (SPEC section 1; per head, S[i, j]: value i, key j)::

    sa_t = S_{t-1} a_t
    S_t  = S_{t-1} diag(w_t) + sa_t b_t^T + v_t k_t^T
    y_t  = S_t r_t

is a diagonal-plus-rank-1 transition. Cut the sequence into chunks of L tokens. Inside a chunk, with
the chunk-start state S_0 and the cumulative log decays ``g_t = sum_{s<=t} log w_s`` (``g_{-1} = 0``),
unrolling the recurrence gives, for every token t of the chunk::

    S_t  = S_0 diag(e^{g_t}) + sum_{s<=t} (sa_s b_s^T + v_s k_s^T) diag(e^{g_t - g_s})
    sa_t = S_0 (a_t e^{g_{t-1}}) + sum_{s<t} [A_ab]_{ts} sa_s + [A_ak]_{ts} v_s
           [A_ab]_{ts} = sum_j a_t[j] b_s[j] e^{g_{t-1}[j] - g_s[j]}     (s < t; A_ak: k instead of b)

Collecting the rows sa_t into SA [L, N], ``(I - A_ab) SA = (a e^{g_-}) S_0^T + A_ak V``: a unit lower
triangular system (the WY / UT transform of DeltaNet-style kernels). Its solution splits into a
state-free part and a part linear in S_0:  SA = W S_0^T + U  with
``W = (I - A_ab)^{-1} (a e^{g_-})`` and ``U = (I - A_ab)^{-1} A_ak V``. Then, with A_rb, A_rk the
inclusive (s <= t) matrices built from r instead of a and e^{g_t - g_s}::

    Y       = R' S_0^T + Y_in,          R' = r e^{g} + A_rb W,   Y_in = A_rb U + A_rk V
    S_L     = S_0 M + D,                M  = diag(e^{g_L}) + W^T B',   D = U^T B' + V^T K'
                                        B' = b e^{g_L - g},  K' = k e^{g_L - g}

Everything except ``S_{c+1} = S_c M_c + D_c`` is independent of the state and is computed for all
chunks at once with batched matmuls; the only sequential part is one N x N matmul per chunk. The
extra query (``extra_query``, a second read-out S_t q_t of the same state) reuses W, U and the
chunk-start states: Q' = q e^{g} + A_qb W, Y2 = Q' S_0^T + A_qb U + A_qk V.

Numerics. Decays are only ever applied as ``exp`` of a difference of cumulative log decays. The
products ``a_t e^{g_{t-1}}`` x ``b_s e^{-g_s}`` that turn A_ab into a matmul are factored around a
reference point m in the middle of the chunk (e^{g_{t-1} - g_m} and e^{g_m - g_s}), so neither factor
exceeds e^{|g_0 - g_L| / 2}; the chunk length is capped so that ``L * max|log w|`` stays below 80
(float32; 600 in float64), far inside the exponent range. For RWKV-7 decays (log w >= -0.6065) this
allows L <= 131 without capping. The cumulative sums are taken in the state dtype: summing them in
float64 was measured 2-4x more accurate (T = 4096: 1-3e-7 instead of 2-9e-7 relative) but 15% slower.
The state is float32 whatever the input dtype (float64 inputs stay float64).

Gradients: plain autograd through these tensor operations (to r, log_w, k, v, a, b, initial_state and
extra_query).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype

DEFAULT_CHUNK_SIZE = 32

# Largest total |log decay| over one chunk: the factored exponents stay within +-half of it.
_MAX_CHUNK_LOG_DECAY = {torch.float32: 80.0, torch.float64: 600.0}


def effective_chunk_size(log_w: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> int:
    """The chunk length actually used: ``chunk_size``, shortened if ``L * max|log_w|`` would leave the safe range."""
    if log_w.numel() == 0:
        return chunk_size
    max_abs = float(log_w.detach().abs().max())
    limit = _MAX_CHUNK_LOG_DECAY[dtype]
    if max_abs * chunk_size <= limit:
        return chunk_size
    return max(1, int(limit // max_abs)) if math.isfinite(max_abs) else 1


def _to_chunks(x: torch.Tensor, n_chunks: int, L: int, pad: int) -> torch.Tensor:
    """[B, T, H, N] -> [B * H, n_chunks, L, N] (zero-padded at the end of time)."""
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    B, _, H, N = x.shape
    return x.reshape(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4).reshape(B * H, n_chunks, L, N).contiguous()


def _from_chunks(y: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n_chunks, L, N] -> [B, T, H, N] (drops the padding)."""
    B, H, nC, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, nC * L, H, N)[:, :T]


def _decay_factors(log_w: torch.Tensor):
    """Every decay factor a chunk needs, each the exp of a difference of cumulative log decays.

    log_w: [..., L, N] (one chunk per leading index), in the state dtype.
    Returns the reference index m and a dict of [..., L, N] and [..., 1, N] factors.
    """
    L = log_w.shape[-2]
    g = log_w.cumsum(dim=-2)  # g_t, inclusive
    m = (L - 1) // 2  # reference point in the middle of the chunk
    g_ref = g[..., m : m + 1, :]
    g_end = g[..., L - 1 :, :]
    to_ref = g - g_ref
    e_r = torch.exp(to_ref)
    return m, {
        "e_r": e_r,  # e^{g_t - g_m}          (r, q side of the intra-chunk matrices)
        "e_b": torch.reciprocal(e_r),  # e^{g_m - g_t}  (b, k side)
        "e_a": torch.exp(to_ref - log_w),  # e^{g_{t-1} - g_m}  (a side)
        # [..., 1, N] factors, all <= 1; they turn the factored operands into decays from the chunk
        # start (a e^{g_{t-1}} = a_hat e^{g_m}, r e^{g_t} = r_hat e^{g_m}) and to the chunk end
        # (b e^{g_L - g_t} = b_hat e^{g_L - g_m}).
        "start_to_ref": torch.exp(g_ref),  # e^{g_m}
        "ref_to_end": torch.exp(g_end - g_ref),  # e^{g_L - g_m}
        "decay_L": torch.exp(g_end),  # e^{g_L}
    }


def _intra_masks(L: int, n_left: int, dtype, device) -> torch.Tensor:
    """[n_left * L, 2L] 0/1 mask: strictly causal for the ``a`` rows (old state), causal for r (and q) rows."""
    strict = torch.ones(L, L, dtype=dtype, device=device).tril(-1)
    incl = torch.ones(L, L, dtype=dtype, device=device).tril()
    rows = [torch.cat([strict, strict], dim=1)] + [torch.cat([incl, incl], dim=1)] * (n_left - 1)
    return torch.cat(rows, dim=0)


def _products(pairs) -> torch.Tensor:
    """Stack x * f for (x, f) pairs of [BH, C, L, N] along the row axis -> [BH, C, len * L, N] (no extra cat pass)."""
    x0 = pairs[0][0]
    L = x0.shape[-2]
    out = x0.new_empty(*x0.shape[:-2], len(pairs) * L, x0.shape[-1])
    for i, (x, f) in enumerate(pairs):
        torch.mul(x, f, out=out[..., i * L : (i + 1) * L, :])
    return out


class _ChunkedWKV7(torch.autograd.Function):
    """The chunked computation with a hand-written backward (see the module docstring for the algebra).

    Inputs are already chunked, [BH, C, L, N], in the state dtype; S0 [BH, N, N]; q may be None.
    Outputs: Y [BH, C, nR * L, N] (rows: the r read-outs, then the q read-outs if any) and S_final.
    """

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, S0, q):
        BH, nC, L, N = r.shape
        Z = BH * nC
        dt, dev = r.dtype, r.device
        m, e = _decay_factors(log_w)
        queries = [r] if q is None else [r, q]
        nR = len(queries)

        # Intra-chunk matrices in one matmul: rows [a; r; (q)] (factored decay to m) x columns [b; k].
        left4 = _products([(a, e["e_a"])] + [(x, e["e_r"]) for x in queries])
        right4 = _products([(b, e["e_b"]), (k, e["e_b"])])
        left, right = left4.view(Z, (1 + nR) * L, N), right4.view(Z, 2 * L, N)
        mask = _intra_masks(L, 1 + nR, dt, dev)
        A = torch.bmm(left, right.transpose(1, 2)).mul_(mask)  # [[A_ab A_ak]; [A_rb A_rk]; ([A_qb A_qk])]
        A_ab, A_ak, A_rq = A[:, :L, :L], A[:, :L, L:], A[:, L:, :]

        # P = (I - A_ab)^{-1} (unit lower triangular), then [W | U] = P [a e^{g_-} | A_ak V].
        eye = torch.eye(L, dtype=dt, device=dev)
        P = torch.linalg.solve_triangular(-A_ab, eye.expand(Z, L, L), upper=False, unitriangular=True)
        v3 = v.reshape(Z, L, N)
        X = r.new_empty(Z, L, 2 * N)
        a_e = X[..., :N]
        torch.mul(left4[:, :, :L], e["start_to_ref"], out=X.view(BH, nC, L, 2 * N)[..., :N])  # a e^{g_{t-1}}
        torch.bmm(A_ak, v3, out=X[..., N:])
        WU = torch.bmm(P, X)
        W = WU[..., :N]
        UV = r.new_empty(Z, 2 * L, N)  # [U; V]
        UV[:, :L] = WU[..., N:]
        UV[:, L:] = v3

        # Read-outs, state-free parts: X' = x e^{g} + A_xb W,  Y_in = [A_xb A_xk] [U; V].
        rq_e = (left4[:, :, L:] * e["start_to_ref"]).view(Z, nR * L, N)  # r e^{g_t} (and q)
        RQp = torch.baddbmm(rq_e, A_rq[:, :, :L], W)
        Y = torch.bmm(A_rq, UV)

        # Chunk transitions S_{c+1} = S_c M_c + D_c.
        bk_end = (right4 * e["ref_to_end"]).view(Z, 2 * L, N)  # [b; k] e^{g_L - g_t}
        M = torch.bmm(W.transpose(1, 2), bk_end[:, :L])
        M.diagonal(dim1=1, dim2=2).add_(e["decay_L"].reshape(Z, N))
        D = torch.bmm(UV.transpose(1, 2), bk_end)
        M4, D4 = M.view(BH, nC, N, N), D.view(BH, nC, N, N)
        S_starts = torch.empty(BH, nC, N, N, dtype=dt, device=dev)
        S = S0
        for c in range(nC):
            S_starts[:, c] = S
            S = torch.baddbmm(D4[:, c], S, M4[:, c])

        Y.baddbmm_(RQp, S_starts.view(Z, N, N).transpose(1, 2))
        ctx.save_for_backward(left, right, A, P, WU, UV, RQp, rq_e, a_e, bk_end, M, S_starts, *e.values())
        ctx.dims = (BH, nC, L, N, nR, m)
        return Y.view(BH, nC, nR * L, N), S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY, dS_final):
        left, right, A, P, WU, UV, RQp, rq_e, a_e, bk_end, M, S_starts, *e_vals = ctx.saved_tensors
        e = dict(zip(("e_r", "e_b", "e_a", "start_to_ref", "ref_to_end", "decay_L"), e_vals))
        BH, nC, L, N, nR, m = ctx.dims
        Z = BH * nC
        dt = left.dtype
        dY = dY.reshape(Z, nR * L, N)
        S3 = S_starts.view(Z, N, N)
        W = WU[..., :N]
        A_ab, A_ak, A_rq = A[:, :L, :L], A[:, :L, L:], A[:, L:, :]

        # Y = RQ' S_c^T + Y_in
        dRQp = torch.bmm(dY, S3)
        dS_from_y = torch.bmm(dY.transpose(1, 2), RQp).view(BH, nC, N, N)

        # Reverse over chunks: dS_c = dS_from_y_c + dS_{c+1} M_c^T; keep dS_{c+1} for dM, dD.
        M4 = M.view(BH, nC, N, N)
        G = dS_final.to(dt)
        G_next = torch.empty(BH, nC, N, N, dtype=dt, device=dY.device)
        for c in range(nC - 1, -1, -1):
            G_next[:, c] = G
            G = torch.baddbmm(dS_from_y[:, c], G, M4[:, c].transpose(1, 2))
        dS0 = G
        dD = G_next.view(Z, N, N)
        dM = torch.bmm(S3.transpose(1, 2), dD)

        # D = [U; V]^T [B'; K'],  M = W^T B' + diag(e^{g_L})
        dUV = torch.bmm(bk_end, dD.transpose(1, 2))
        dbk_end = torch.bmm(UV, dD)
        dW = torch.bmm(bk_end[:, :L], dM.transpose(1, 2))
        dbk_end[:, :L] += torch.bmm(W, dM)
        d_decay_L = dM.diagonal(dim1=1, dim2=2).reshape(BH, nC, 1, N)

        # Y_in = A_rq [U; V],  RQ' = rq_e + A_rq[:, :, :L] W
        dA = dY.new_empty(Z, (1 + nR) * L, 2 * L)  # gradient of the intra-chunk matrices A
        dA_rq = dA[:, L:]
        torch.bmm(dY, UV.transpose(1, 2), out=dA_rq)
        dA_rq[:, :, :L].baddbmm_(dRQp, W.transpose(1, 2))
        dUV.baddbmm_(A_rq.transpose(1, 2), dY)
        dW.baddbmm_(A_rq[:, :, :L].transpose(1, 2), dRQp)

        # [W | U] = P X, X = [a_e | A_ak V]:  dX = P^T d[W | U],  dA_ab = dX [W | U]^T
        dWU = dW.new_empty(Z, L, 2 * N)
        dWU[..., :N] = dW
        dWU[..., N:] = dUV[:, :L]
        dX = torch.bmm(P.transpose(1, 2), dWU)
        torch.bmm(dX, WU.transpose(1, 2), out=dA[:, :L, :L])  # dA_ab
        da_e, dXu = dX[..., :N], dX[..., N:]
        v3 = UV[:, L:]
        torch.bmm(dXu, v3.transpose(1, 2), out=dA[:, :L, L:])  # dA_ak
        dv = dUV[:, L:] + torch.bmm(A_ak.transpose(1, 2), dXu)

        mask = _intra_masks(L, 1 + nR, dt, dY.device)
        dA.mul_(mask)
        d_left = torch.bmm(dA, right)
        d_right = torch.bmm(dA.transpose(1, 2), left)

        # Back to the chunked [BH, C, rows, N] layout for the elementwise parts.
        shape = (BH, nC, -1, N)
        d_left, d_right, left, right = (x.view(shape) for x in (d_left, d_right, left, right))
        drq_e, rq_e, a_e, da_e = dRQp.view(shape), rq_e.view(shape), a_e.reshape(shape), da_e.reshape(shape)
        dbk_end, bk_end = dbk_end.view(shape), bk_end.view(shape)
        # Total gradients of the factored operands (they also feed a_e, rq_e and bk_end).
        d_left[:, :, :L].addcmul_(da_e, e["start_to_ref"])
        d_left[:, :, L:].addcmul_(drq_e, e["start_to_ref"])
        d_right.addcmul_(dbk_end, e["ref_to_end"])
        da = d_left[:, :, :L] * e["e_a"]
        dqs = [d_left[:, :, (1 + i) * L : (2 + i) * L] * e["e_r"] for i in range(nR)]
        db = d_right[:, :, :L] * e["e_b"]
        dk = d_right[:, :, L:] * e["e_b"]

        # Gradients of the exponents (d exp(x) / dx = exp(x)), gathered onto g_t, g_{t-1}, g_m and g_L.
        prod_left = (d_left * left).view(BH, nC, 1 + nR, L, N)
        d_excl_ref = prod_left[:, :, 0]  # d/d(g_{t-1} - g_m)
        d_to_ref = prod_left[:, :, 1:].sum(2) - (d_right * right).view(BH, nC, 2, L, N).sum(2)  # d/d(g_t - g_m)
        d_end_direct = (dbk_end * bk_end).sum(2)  # d/d(g_L - g_m)
        d_ref_direct = (drq_e * rq_e).sum(2) + (da_e * a_e).sum(2) - d_end_direct  # d/d g_m (the [.., 1, N] factors)
        d_g = d_to_ref + d_excl_ref
        d_g[:, :, m] += d_ref_direct - d_g.sum(2)
        d_g[:, :, L - 1] += d_end_direct + (d_decay_L * e["decay_L"]).squeeze(2)
        # g = cumsum(log_w), g_{t-1} = g_t - log_w_t
        dlog_w = d_g.flip(2).cumsum(2).flip(2) - d_excl_ref

        dr = dqs[0]
        dq = dqs[1] if nR > 1 else None
        return dr, dlog_w, dk, dv.view(BH, nC, L, N), da, db, dS0, dq


def wkv7_chunked(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    *,
    extra_query: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """WKV-7 over a sequence, parallel within chunks of ``chunk_size`` tokens.

    Args:
        r, log_w, k, v, a, b: [B, T, H, N]; ``log_w`` is the log of the decay (<= 0, finite). Any T.
        initial_state: [B, H, N, N] (S[i, j]: value i, key j) or None (zeros).
        extra_query: optional [B, T, H, N]; a second read-out ``S_t q_t`` of the same new state.
        chunk_size: tokens per chunk (>= 1). Shortened automatically when ``chunk_size * max|log_w|``
            exceeds the safe exponent range (never for RWKV-7 decays at chunk_size <= 128).

    Returns:
        ``(y, final_state)``, or ``(y, final_state, y_extra)`` when ``extra_query`` is given;
        y [B, T, H, N] in r's dtype, final_state [B, H, N, N] float32 (float64 for float64 inputs).
    """
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), initial_state, extra_query)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"wkv7_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, N = r.shape
    sdt = state_dtype(r.dtype)
    S0 = r.new_zeros(B, H, N, N, dtype=sdt) if initial_state is None else initial_state.to(sdt)
    if T == 0:
        y = r.new_zeros(B, 0, H, N)
        return (y, S0) if extra_query is None else (y, S0, y.clone())

    L = effective_chunk_size(log_w, min(chunk_size, T), sdt)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    # Padding tokens have w = 1 and zero r, k, v, a, b: they leave the state unchanged.
    chunked = [_to_chunks(t.to(sdt), n_chunks, L, pad) for t in (r, log_w, k, v, a, b)]
    q = None if extra_query is None else _to_chunks(extra_query.to(sdt), n_chunks, L, pad)
    Y, S = _ChunkedWKV7.apply(*chunked, S0.reshape(B * H, N, N), q)
    Y = Y.view(B, H, n_chunks, -1, N)
    y = _from_chunks(Y[:, :, :, :L], T).to(r.dtype)
    S = S.view(B, H, N, N)
    if extra_query is None:
        return y, S
    return y, S, _from_chunks(Y[:, :, :, L:], T).to(r.dtype)
