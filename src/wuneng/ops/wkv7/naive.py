"""The sequential WKV-7 reference: the oracle every fast form is tested against.

Per head, with state S in R^{N x N} (S[i, j]: value index i, key index j)::

    sa = S a                              # the OLD state
    S  = S diag(w) + sa b^T + v k^T       # w = exp(log_w)
    y  = S r                              # the NEW state

One Python step per token: slow, obvious, any float dtype (float64 in tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype
from .varlen import run_per_document


def wkv7_reference(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    *,
    extra_query: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Run the WKV-7 recurrence token by token.

    Args:
        r, log_w, k, v, a, b: [B, T, H, N]. ``log_w`` is the log of the decay (<= 0).
        initial_state: [B, H, N, N] or None (zeros).
        extra_query: optional [B, T, H, N]; a second read-out ``S_t q_t`` of the same new state.
        cu_seqlens: optional int32/int64 [n_docs + 1] document offsets of a packed row (B = 1, fla's
            convention): the state restarts at every boundary; initial_state and final_state are then
            [n_docs, H, N, N], one per document (see :mod:`.varlen`).

    Returns:
        ``(y, final_state)``, or ``(y, final_state, y_extra)`` when ``extra_query`` is given.
        y (and y_extra): [B, T, H, N] in r's dtype; final_state: [B, H, N, N] float32 (float64 for float64 inputs).
    """
    if cu_seqlens is not None:  # the oracle: each document run separately
        return run_per_document(wkv7_reference, (r, log_w, k, v, a, b), initial_state, cu_seqlens, extra_query)
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), initial_state, extra_query)
    B, T, H, N = r.shape
    sdt = state_dtype(r.dtype)
    S = r.new_zeros(B, H, N, N, dtype=sdt) if initial_state is None else initial_state.to(sdt)
    r_, k_, v_, a_, b_ = (t.to(sdt) for t in (r, k, v, a, b))
    w_ = torch.exp(log_w.to(sdt))
    q_ = None if extra_query is None else extra_query.to(sdt)
    ys, ys2 = [], []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a_[:, t])
        S = (
            S * w_[:, t, :, None, :]
            + sa[..., :, None] * b_[:, t, :, None, :]
            + v_[:, t, :, :, None] * k_[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhij,bhj->bhi", S, r_[:, t]))
        if q_ is not None:
            ys2.append(torch.einsum("bhij,bhj->bhi", S, q_[:, t]))
    y = torch.stack(ys, dim=1).to(r.dtype) if T > 0 else r.new_zeros(B, 0, H, N)
    if q_ is None:
        return y, S
    y2 = torch.stack(ys2, dim=1).to(r.dtype) if T > 0 else r.new_zeros(B, 0, H, N)
    return y, S, y2
