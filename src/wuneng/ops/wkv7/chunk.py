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
triangular system (the WY / UT transform of DeltaNet-style kernels). With ``P = (I - A_ab)^{-1}`` its
solution splits into a part linear in S_0 and a state-free part:  SA = W S_0^T + Q V  with
``W = P (a e^{g_-})`` and ``Q = P A_ak`` [L, L]. Then, with A_rb, A_rk the inclusive (s <= t) matrices
built from r instead of a and e^{g_t - g_s}::

    Y       = R' S_0^T + A_eff V,       R' = r e^{g} + A_rb W,   A_eff = A_rk + A_rb Q
    S_L     = S_0 M + D,                M  = diag(e^{g_L}) + W^T B',   D = V^T K_eff,  K_eff = K' + Q^T B'
                                        B' = b e^{g_L - g},  K' = k e^{g_L - g}

(Folding Q into A_eff and K_eff means the state-free part of SA, Q V, is never formed: 16 L^2 N + 4 L^3
+ 6 L N^2 + 2 N^3 matmul FLOPs per chunk forward instead of 20 L^2 N + 8 L N^2 + 2 N^3.)
Everything except ``S_{c+1} = S_c M_c + D_c`` is independent of the state and is computed with batched
matmuls; the only sequential part is one N x N matmul per chunk. The extra query (``extra_query``, a
second read-out S_t q_t of the same state) reuses W, Q and the chunk-start states: its rows are stacked
under r's in R', A_eff and Y.

Numerics. Decays are only ever applied as ``exp`` of a difference of cumulative log decays. The
products ``a_t e^{g_{t-1}}`` x ``b_s e^{-g_s}`` that turn A_ab into a matmul are factored around a
reference point m in the middle of the chunk (e^{g_{t-1} - g_m} and e^{g_m - g_s}), so neither factor
exceeds e^{|g_0 - g_L| / 2}; the chunk length is capped so that ``L * max|log w|`` stays below 80
(float32; 600 in float64), far inside the exponent range. For RWKV-7 decays (log w >= -0.6065) this
allows L <= 131 without capping. A causal entry (s <= t; s < t for the a rows) multiplies one factor
<= 1 by one <= e^40, so it stays finite; a non-causal entry (g_t > g_s) multiplies two large factors and
overflows to inf once r and k carry channels of a few hundred (e^39 x 400 each at L = 128). Those
entries are set to 0 by a bitwise AND on their float bits (``_causal_bits``), never multiplied by a 0/1
mask (inf x 0 = NaN). Tested at chunk lengths 16-256 with +-400 outlier channels in r and k and every
decay at the lower bound or near 1: float32 values within 1e-5, gradients within 1e-4 of the float64
reference (relative norms). The cumulative sums are taken in the state dtype: summing them in float64
is more accurate but slower, and the state dtype is accurate enough (measurements: benchmarks/README.md).
The state is float32 whatever the input dtype (float64 inputs stay float64).

Layout, passes and cache. Chunk tensors are chunk-major, [chunks, B, H, rows, N]: the operand scalings
read the [B, T, H, N] inputs through a strided view and write the chunk buffers (the layout change costs
no separate copy), and the sequential loops over chunks read and write contiguous [B*H, N, N] slices in
place (D_c is computed straight into the slot of S_{c+1}). All decay factors come from one exp pass over
[L + 1] rows of ``g_t - g_m`` (t = -1 .. L-1): e^{g_t - g_m}, e^{g_{t-1} - g_m} (the same rows shifted by
one) and e^{g_L - g_m} are views of it; the b, k side divides by e^{g_t - g_m}. The chunks are processed
in groups of consecutive chunks (about ``_GROUP_MATRICES`` = 96 (chunk, batch, head) matrices, ~20 MB of
intermediates at N = 64): forward runs a group's state-free part, its stretch of the recurrence and its
read-out before the next group, backward the same in reverse, so the dozens of elementwise passes and
small matmuls of a group find their operands in cache (faster than one pass over all chunks; measurements:
benchmarks/README.md). Every batched matmul writes a fresh contiguous tensor or a contiguous slab: ``bmm``
into a strided slice falls back to a per-matrix loop, several times slower.

Gradients: a hand-written ``autograd.Function`` backward (``_ChunkedWKV7``) that reuses the forward's
matrices (A, P = (I - A_ab)^{-1}, W, Q, A_eff, K_eff, the chunk-start states) and runs the chunk recurrence in
reverse (dS_c = dY_c^T R'_c + dS_{c+1} M_c^T). Gradients to log_w and initial_state always, to r, k,
v, a, b and extra_query only when needed (``ctx.needs_input_grad``); the sequence gradients are written
straight into the [B, T, H, N] layout. Not twice differentiable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype
from .varlen import run_per_document

DEFAULT_CHUNK_SIZE = 32

# Largest total |log decay| over one chunk: the factored exponents stay within +-half of it.
_MAX_CHUNK_LOG_DECAY = {torch.float32: 80.0, torch.float64: 600.0}

# Chunks are processed in groups of about this many (chunk, batch, head) matrices, so that the dozens of
# steps of a group run on operands that are still in cache (see the module docstring).
_GROUP_MATRICES = 96


def effective_chunk_size(log_w: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> int:
    """The chunk length actually used: ``chunk_size``, shortened if ``L * max|log_w|`` would leave the safe range."""
    if log_w.numel() == 0:
        return chunk_size
    lo, hi = torch.aminmax(log_w.detach())  # one pass, no |log_w| temporary
    max_abs = max(-float(lo), float(hi))
    limit = _MAX_CHUNK_LOG_DECAY[dtype]
    if max_abs * chunk_size <= limit:
        return chunk_size
    return max(1, int(limit // max_abs)) if math.isfinite(max_abs) else 1


def _chunk_view(x: torch.Tensor, n_chunks: int, L: int) -> torch.Tensor:
    """[B, n_chunks * L, H, N] -> [n_chunks, B, H, L, N], a strided view (chunk-major, no copy).

    The elementwise ops that scale the operands read through this view and write contiguous chunk
    buffers, so the layout change costs no separate pass; gradients are written back through it.
    """
    B, _, H, N = x.shape
    return x.reshape(B, n_chunks, L, H, N).permute(1, 0, 3, 2, 4)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _causal_bits(L: int, n_left: int, dtype, device) -> torch.Tensor:
    """[n_left * L, 2L] integer mask of the float ``dtype``'s width: all bits set where an intra-chunk entry is
    causal (s < t for the ``a`` rows, which read the old state; s <= t for the r and q rows), 0 elsewhere.

    Applied with :func:`_keep_causal` as a bitwise AND on the float bits, which leaves causal entries exactly
    as they are and turns every other entry into +0.0 whatever it held: the factored products
    e^{g_t - g_m} e^{g_m - g_s} of non-causal pairs (g_t > g_s) can overflow to inf, and multiplying by a 0/1
    mask would turn those into NaN (inf * 0). (As fast as that multiply; ``masked_fill_`` was 4x slower.)"""
    strict = torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    rows = [torch.cat([strict, strict], dim=1)] + [torch.cat([incl, incl], dim=1)] * (n_left - 1)
    keep = torch.cat(rows, dim=0)
    return torch.zeros(keep.shape, dtype=_SAME_WIDTH_INT[dtype], device=device).masked_fill_(keep, -1)


def _keep_causal(A: torch.Tensor, bits: torch.Tensor) -> None:
    """Zero the non-causal entries of the contiguous [Z, rows, 2L] ``A`` in place (see :func:`_causal_bits`)."""
    A.view(bits.dtype).bitwise_and_(bits)


def _chunk_groups(n_chunks: int, BH: int) -> list[tuple[int, int]]:
    """Consecutive chunk ranges [c0, c1) of about ``_GROUP_MATRICES`` (chunk, batch, head) matrices each."""
    step = max(1, _GROUP_MATRICES // BH)
    return [(c0, min(c0 + step, n_chunks)) for c0 in range(0, n_chunks, step)]


class _ChunkedWKV7(torch.autograd.Function):
    """The chunked computation with a hand-written backward (see the module docstring for the algebra).

    Inputs r, log_w, k, v, a, b, q: [B, n_chunks * L, H, N] in the state dtype (q may be None);
    S0 [B * H, N, N]. Chunk tensors are chunk-major, [chunks, B, H, rows, N], and are computed one group
    of consecutive chunks at a time (``_chunk_groups``): forward runs each group's state-free part, its
    stretch of the state recurrence and its read-out before moving on; backward does the same in reverse.
    Outputs: Y [nR, B, n_chunks * L, H, N] (the r read-out, then the q read-out if any) and S_final.
    """

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, S0, q, L):
        B, Tp, H, N = r.shape
        nC, BH = Tp // L, B * H
        dt, dev = r.dtype, r.device
        m = (L - 1) // 2  # reference point in the middle of the chunk
        queries = [r] if q is None else [r, q]
        nR = len(queries)
        R = (1 + nR) * L  # rows of the left operand: a, then each query
        causal = _causal_bits(L, 1 + nR, dt, dev)
        eye = torch.eye(L, dtype=dt, device=dev)
        # [L + 1, L]: row t + 1 sums log w_s over the chunk into g_t - g_m (row 0: g_{-1} - g_m = -g_m), so that
        # one small matmul gives every exponent E needs (faster than cumsum, then subtract, on the strided view).
        tril = torch.ones(L, L, dtype=dt, device=dev).tril_()
        to_exponents = torch.cat([tril.new_zeros(1, L), tril]) - tril[m]

        def cv(x):
            return _chunk_view(x, nC, L)

        log_w_c, a_c, b_c, k_c, v_c = cv(log_w), cv(a), cv(b), cv(k), cv(v)
        queries_c = [cv(x) for x in queries]
        Y_seq = r.new_empty(nR, B, Tp, H, N)  # the read-outs, written group by group in sequence layout
        Y_c = [cv(y) for y in Y_seq]
        # Chunk-start states, one slab per group: S_slab[i] = S_{c0 + i} for i = 0 .. G (the last is the next
        # group's first). ~1.5 MB slabs come back from the heap; one [n_chunks + 1, B*H, N, N] buffer (34 MB at
        # T 4096, B*H 16, N 64) would be a fresh mmap whose pages fault in at every call.
        S_next = S0  # the state at the start of the group being processed
        groups = []
        for c0, c1 in _chunk_groups(nC, BH):
            G, sl = c1 - c0, slice(c0, c1)
            Z = G * BH
            # Decay factors, each exp of a difference of cumulative log decays g_t = sum_{s<=t} log w_s.
            # One exp pass: E[..., t + 1, :] = e^{g_t - g_m} for t = -1 .. L-1 (g_{-1} = 0), so that
            # e_r = e^{g_t - g_m} (r, q side), e_a = e^{g_{t-1} - g_m} (a side; the same rows shifted by
            # one) and e^{g_L - g_m} (the last row) are views of it; the b, k side divides by e_r.
            E = torch.matmul(to_exponents, log_w_c[sl]).exp_()  # [G, B, H, L + 1, N]
            start_to_ref = torch.reciprocal(E[..., :1, :])  # e^{g_m}
            decay_L = E[..., L:, :] * start_to_ref  # e^{g_L}
            e_a, e_r, ref_to_end = E[..., :L, :], E[..., 1:, :], E[..., L:, :]

            # Factored operands: rows [a; r; (q)] x columns [b; k]; intra-chunk matrices in one matmul,
            # A = [[A_ab A_ak]; [A_rb A_rk]; ([A_qb A_qk])].
            left = r.new_empty(G, B, H, R, N)
            torch.mul(a_c[sl], e_a, out=left[..., :L, :])
            for i, x in enumerate(queries_c):
                torch.mul(x[sl], e_r, out=left[..., (1 + i) * L : (2 + i) * L, :])
            right = r.new_empty(G, B, H, 2 * L, N)
            torch.div(b_c[sl], e_r, out=right[..., :L, :])
            torch.div(k_c[sl], e_r, out=right[..., L:, :])
            A = torch.bmm(left.view(Z, R, N), right.view(Z, 2 * L, N).transpose(1, 2))
            _keep_causal(A, causal)  # (not a multiply: the other entries may be inf, see _causal_bits)
            A_ab, A_ak, A_rqb, A_rqk = A[:, :L, :L], A[:, :L, L:], A[:, L:, :L], A[:, L:, L:]

            # P = (I - A_ab)^{-1} (unit lower triangular); W = P (a e^{g_-}) (the state-dependent part
            # of sa); Q = P A_ak, so that the state-free part of sa is U = Q V (never formed).
            P = torch.linalg.solve_triangular(-A_ab, eye.expand(Z, L, L), upper=False, unitriangular=True)
            V = r.new_empty(G, B, H, L, N)
            V.copy_(v_c[sl])
            V = V.view(Z, L, N)
            a_e = torch.mul(left[..., :L, :], start_to_ref).view(Z, L, N)  # a e^{g_{t-1}}
            W = torch.bmm(P, a_e)
            Q = torch.bmm(P, A_ak)

            # Read-outs: X' = x e^{g} + A_xb W (state part),  Y_in = A_xb U + A_xk V = (A_xk + A_xb Q) V.
            RQp = torch.mul(left[..., L:, :], start_to_ref).view(Z, nR * L, N)
            RQp.baddbmm_(A_rqb, W)
            A_eff = torch.baddbmm(A_rqk, A_rqb, Q)
            Y_g = torch.bmm(A_eff, V)

            # Chunk transitions S_{c+1} = S_c M_c + D_c:  M = diag(e^{g_L}) + W^T B',
            # D = U^T B' + V^T K' = V^T K_eff with K_eff = K' + Q^T B'.
            bk_end = torch.mul(right, ref_to_end).view(Z, 2 * L, N)  # [B'; K'] = [b; k] e^{g_L - g_t}
            B_end, K_end = bk_end[:, :L], bk_end[:, L:]
            M = torch.bmm(W.transpose(1, 2), B_end)
            M.diagonal(dim1=1, dim2=2).add_(decay_L.reshape(Z, N))
            K_eff = torch.baddbmm(K_end, Q.transpose(1, 2), B_end)
            # D_c is written straight into the slot of S_{c+1}, which then accumulates S_c M_c in place.
            S_slab = r.new_empty(G + 1, BH, N, N)
            S_slab[0] = S_next
            S_list = S_slab.unbind(0)
            torch.bmm(V.transpose(1, 2), K_eff, out=S_slab[1:].view(Z, N, N))
            for i, M_c in enumerate(M.view(G, BH, N, N).unbind(0)):
                S_list[i + 1].baddbmm_(S_list[i], M_c)
            S_next = S_list[G]
            S_start = S_slab[:G].view(Z, N, N)  # S_c for the group's chunks
            Y_g.baddbmm_(RQp, S_start.transpose(1, 2))
            Y_g5 = Y_g.view(G, B, H, nR * L, N)
            for i, y in enumerate(Y_c):  # into the [B, T, H, N] output while the group is in cache
                y[sl].copy_(Y_g5[..., i * L : (i + 1) * L, :])
            # Intermediates that are neither inputs nor outputs may live on ctx (no reference cycle).
            groups.append(
                (left, right, A, P, W, Q, A_eff, K_eff, V, RQp, a_e, bk_end, M, E, start_to_ref, decay_L, S_start)
            )
        ctx.groups = groups
        ctx.dims = (B, H, nC, L, N, nR, m)
        return Y_seq, S_next.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY, dS_final):
        state_like = ctx.groups[0][-1]  # (dtype and device of the state)
        B, H, nC, L, N, nR, m = ctx.dims
        BH = B * H
        dt, dev = state_like.dtype, state_like.device
        need = ctx.needs_input_grad
        causal = _causal_bits(L, 1 + nR, dt, dev)
        # Reverse cumulative sum over the chunk as one batched matmul with an upper-triangular ones matrix.
        rev_cumsum = torch.ones(L, L, dtype=dt, device=dev).triu_()

        # Sequence gradients, written group by group through chunk-major views.
        def out_like():
            return state_like.new_empty(B, nC * L, H, N)

        grads = {"log_w": out_like()}
        for name, i in (("r", 0), ("k", 2), ("v", 3), ("a", 4), ("b", 5)):
            if need[i]:
                grads[name] = out_like()
        if need[7] and nR > 1:
            grads["q"] = out_like()
        grads_c = {name: _chunk_view(x, nC, L) for name, x in grads.items()}
        dY_c = [_chunk_view(dy, nC, L) for dy in dY]  # dY [nR, B, T, H, N], any strides (expanded too)

        # Reverse over chunks: dS_c = dS_from_y_c + dS_{c+1} M_c^T. Each group's state gradients live in a slab
        # of its own, G_slab[c - c0] = dS_c for c0 <= c <= c1 (so G_slab[1:] = dD of the group's chunks), whose
        # first slot is the next (earlier) group's last: a ~1.5 MB slab per group comes back from the heap,
        # where one [n_chunks + 1, B*H, N, N] buffer (34 MB at T 4096, B*H 16, N 64) is a fresh mmap whose
        # pages fault in (~8k faults) at every backward.
        dS_next = dS_final  # dS_{c1} of the group being processed
        for (c0, c1), saved in zip(reversed(_chunk_groups(nC, BH)), reversed(ctx.groups)):
            left, right, A, P, W, Q, A_eff, K_eff, V, RQp, a_e, bk_end, M, E, start_to_ref, decay_L, S3 = saved
            G, sl = c1 - c0, slice(c0, c1)
            Z = G * BH
            G_slab = state_like.new_empty(G + 1, BH, N, N)
            G_slab[G] = dS_next
            G_list = G_slab.unbind(0)
            e_a, e_r, ref_to_end = E[..., :L, :], E[..., 1:, :], E[..., L:, :]
            # the group's output gradient, gathered into one contiguous chunk-major block (any input strides,
            # an expanded y.sum() gradient too: strided matmul operands would take a per-matrix loop)
            dY_g = state_like.new_empty(G, B, H, nR * L, N)
            for i, dy in enumerate(dY_c):
                dY_g[..., i * L : (i + 1) * L, :].copy_(dy[sl])
            dY_g = dY_g.view(Z, nR * L, N)
            A_rqb = A[:, L:, :L]
            B_end = bk_end[:, :L]
            # (Every matmul below writes a fresh contiguous tensor: bmm into a strided slice falls back
            # to a per-matrix loop, ~5x slower; blocks are copied into place afterwards.)

            # Y = RQ' S_c^T + A_eff V.  dS_from_y_c = dY_c^T RQ'_c is written straight into the slot
            # of dS_c, which then accumulates dS_{c+1} M_c^T.
            dRQp = torch.bmm(dY_g, S3)
            torch.bmm(dY_g.transpose(1, 2), RQp, out=G_slab[:G].view(Z, N, N))
            M_list = M.view(G, BH, N, N).unbind(0)
            for i in range(G - 1, -1, -1):
                G_list[i].baddbmm_(G_list[i + 1], M_list[i].transpose(1, 2))
            dD = G_slab[1:].view(Z, N, N)
            dS_next = G_list[0]

            # D = V^T K_eff, K_eff = K' + Q^T B',  Y_in = A_eff V
            dK_end = torch.bmm(V, dD)  # = dK_eff
            dV = torch.bmm(K_eff, dD.transpose(1, 2)).baddbmm_(A_eff.transpose(1, 2), dY_g)
            dA_eff = torch.bmm(dY_g, V.transpose(1, 2))  # = dA_rqk
            # M = W^T B' + diag(e^{g_L}), dM = S_c^T dD:  dB' = W dM + Q dK_eff,  dW = B' dM^T,
            # d e^{g_L} = diag(dM).
            dM = torch.bmm(S3.transpose(1, 2), dD)
            dB_end = torch.bmm(W, dM).baddbmm_(Q, dK_end)
            dW = torch.bmm(B_end, dM.transpose(1, 2))
            d_decay_L = dM.diagonal(dim1=1, dim2=2).reshape(G, B, H, 1, N)
            # RQ' = rq_e + A_rqb W,  A_eff = A_rqk + A_rqb Q,  K_eff = K' + Q^T B'
            dW.baddbmm_(A_rqb.transpose(1, 2), dRQp)
            dQ = torch.bmm(B_end, dK_end.transpose(1, 2)).baddbmm_(A_rqb.transpose(1, 2), dA_eff)
            dA = state_like.new_empty(Z, (1 + nR) * L, 2 * L)  # gradient of the intra-chunk matrices A
            dA[:, L:, :L] = torch.bmm(dA_eff, Q.transpose(1, 2)).baddbmm_(dRQp, W.transpose(1, 2))
            dA[:, L:, L:] = dA_eff
            # W = P a_e, Q = P A_ak, P = (I - A_ab)^{-1}:  d a_e = P^T dW,  dA_ak = P^T dQ,
            # dA_ab = P^T (dW a_e^T + dQ A_ak^T) P^T = d a_e W^T + dA_ak Q^T
            Pt = P.transpose(1, 2)
            da_e = torch.bmm(Pt, dW)
            dA_ak = torch.bmm(Pt, dQ)
            dA[:, :L, L:] = dA_ak
            dA[:, :L, :L] = torch.bmm(dA_ak, Q.transpose(1, 2)).baddbmm_(da_e, W.transpose(1, 2))
            _keep_causal(dA, causal)
            d_left = torch.bmm(dA, right.view(Z, 2 * L, N))
            d_right = torch.bmm(dA.transpose(1, 2), left.view(Z, -1, N))

            # Elementwise parts in the chunk-major [G, B, H, rows, N] layout.
            shape = (G, B, H, -1, N)
            d_left, d_right, drq_e, da_e5, db_end, dk_end, bk5, a_e5 = (
                x.view(shape) for x in (d_left, d_right, dRQp, da_e, dB_end, dK_end, bk_end, a_e)
            )
            # Exponent gradients of the [.., 1, N] factors, taken before the operand gradients absorb them.
            d_end_direct = (  # d/d(g_L - g_m)
                (db_end * bk5[..., :L, :]).sum(-2, keepdim=True) + (dk_end * bk5[..., L:, :]).sum(-2, keepdim=True)
            )
            d_ref_direct = (  # d/d g_m through e^{g_m} (rq_e = r_hat e^{g_m}, a_e = a_hat e^{g_m})
                (drq_e * left[..., L:, :]).sum(-2, keepdim=True) * start_to_ref
                + (da_e5 * a_e5).sum(-2, keepdim=True)
                - d_end_direct
            )
            # Total gradients of the factored operands (they also feed a_e, rq_e and bk_end).
            d_left[..., :L, :].addcmul_(da_e5, start_to_ref)
            d_left[..., L:, :].addcmul_(drq_e, start_to_ref)
            d_right[..., :L, :].addcmul_(db_end, ref_to_end)
            d_right[..., L:, :].addcmul_(dk_end, ref_to_end)

            # Gradients of the exponents (d exp(x) / dx = exp(x)), gathered onto g_t, g_{t-1}, g_m and g_L.
            # (addcmul chains: no full-size product temporaries)
            d_excl_ref = d_left[..., :L, :] * left[..., :L, :]  # d/d(g_{t-1} - g_m)
            d_g = d_left[..., L : 2 * L, :] * left[..., L : 2 * L, :]  # d/d(g_t - g_m), then + d_excl_ref
            for i in range(1, nR):
                d_g.addcmul_(d_left[..., (1 + i) * L : (2 + i) * L, :], left[..., (1 + i) * L : (2 + i) * L, :])
            d_g.addcmul_(d_right[..., :L, :], right[..., :L, :], value=-1.0)
            d_g.addcmul_(d_right[..., L:, :], right[..., L:, :], value=-1.0)
            d_g += d_excl_ref
            d_g[..., m : m + 1, :] += d_ref_direct - d_g.sum(-2, keepdim=True)
            d_g[..., L - 1 :, :] += d_end_direct + d_decay_L * decay_L
            # g = cumsum(log_w), g_{t-1} = g_t - log_w_t
            torch.sub(torch.matmul(rev_cumsum, d_g), d_excl_ref, out=grads_c["log_w"][sl])
            if "r" in grads:
                torch.mul(d_left[..., L : 2 * L, :], e_r, out=grads_c["r"][sl])
            if "q" in grads:
                torch.mul(d_left[..., 2 * L :, :], e_r, out=grads_c["q"][sl])
            if "a" in grads:
                torch.mul(d_left[..., :L, :], e_a, out=grads_c["a"][sl])
            if "b" in grads:
                torch.div(d_right[..., :L, :], e_r, out=grads_c["b"][sl])
            if "k" in grads:
                torch.div(d_right[..., L:, :], e_r, out=grads_c["k"][sl])
            if "v" in grads:
                grads_c["v"][sl].copy_(dV.view(shape))
        g_ = grads.get
        return g_("r"), grads["log_w"], g_("k"), g_("v"), g_("a"), g_("b"), dS_next.clone(), g_("q"), None


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
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """WKV-7 over a sequence, parallel within chunks of ``chunk_size`` tokens.

    Args:
        r, log_w, k, v, a, b: [B, T, H, N]; ``log_w`` is the log of the decay (<= 0, finite). Any T.
        initial_state: [B, H, N, N] (S[i, j]: value i, key j) or None (zeros).
        extra_query: optional [B, T, H, N]; a second read-out ``S_t q_t`` of the same new state.
        chunk_size: tokens per chunk (>= 1). Shortened automatically when ``chunk_size * max|log_w|``
            exceeds the safe exponent range (never for RWKV-7 decays at chunk_size <= 128).
        cu_seqlens: optional int32/int64 [n_docs + 1] document offsets of a packed row (B = 1, fla's
            convention): the state restarts at every boundary; initial_state and final_state are then
            [n_docs, H, N, N], one per document (one chunked call per document, :mod:`.varlen`).

    Returns:
        ``(y, final_state)``, or ``(y, final_state, y_extra)`` when ``extra_query`` is given;
        y [B, T, H, N] in r's dtype, final_state [B, H, N, N] float32 (float64 for float64 inputs).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"wkv7_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    if cu_seqlens is not None:
        seq = (r, log_w, k, v, a, b)
        return run_per_document(
            wkv7_chunked, seq, initial_state, cu_seqlens, extra_query, chunk_size=chunk_size, batch_documents=True
        )
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), initial_state, extra_query)
    B, T, H, N = r.shape
    sdt = state_dtype(r.dtype)
    S0 = r.new_zeros(B, H, N, N, dtype=sdt) if initial_state is None else initial_state.to(sdt)
    if T == 0:
        y = r.new_zeros(B, 0, H, N)
        return (y, S0) if extra_query is None else (y, S0, y.clone())

    L = effective_chunk_size(log_w, min(chunk_size, T), sdt)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T

    def prepare(x):
        # Padding tokens have w = 1 and zero r, k, v, a, b: they leave the state unchanged.
        x = x.to(sdt)
        return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x

    q = None if extra_query is None else prepare(extra_query)
    ins = [prepare(t) for t in (r, log_w, k, v, a, b)]
    Y, S = _ChunkedWKV7.apply(*ins, S0.reshape(B * H, N, N), q, L)  # Y [nR, B, n_chunks * L, H, N]

    def to_sequence(y):
        # [B, n_chunks * L, H, N] -> [B, T, H, N], dropping the padding; no-op slices are skipped (their
        # backward would allocate and fill a full-size gradient).
        return (y[:, :T] if pad else y).to(r.dtype)

    S = S.view(B, H, N, N)
    if extra_query is None:
        return to_sequence(Y[0]), S
    return to_sequence(Y[0]), S, to_sequence(Y[1])
