"""One WKV-7 step: the decoding form (one token per call, constant memory)."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype


def wkv7_step(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    *,
    extra_query: Optional[torch.Tensor] = None,
):
    """Advance the state by one token.

    Args:
        r, log_w, k, v, a, b: [B, H, N] (one token). ``log_w`` is the log decay.
        state: [B, H, N, N] or None (zeros).
        extra_query: optional [B, H, N], a second read-out of the new state.

    Returns:
        ``(y, new_state)`` or ``(y, new_state, y_extra)``; y: [B, H, N] in r's dtype, state float32 (float64 for float64).
    """
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), state, extra_query, step=True)
    B, H, N = r.shape
    sdt = state_dtype(r.dtype)
    S = r.new_zeros(B, H, N, N, dtype=sdt) if state is None else state.to(sdt)
    r_, k_, v_, a_, b_ = (t.to(sdt) for t in (r, k, v, a, b))
    w_ = torch.exp(log_w.to(sdt))
    # matmul/addcmul rather than einsum: at one token the per-op overhead is the cost
    sa = _state_times(S, a_)  # [B,H,N,1], the OLD state
    S = S * w_.unsqueeze(-2)  # a fresh tensor: the rank-1 updates go into it in place (the input state is kept)
    S.addcmul_(sa, b_.unsqueeze(-2)).addcmul_(v_.unsqueeze(-1), k_.unsqueeze(-2))
    y = _state_times(S, r_).squeeze(-1).to(r.dtype)
    if extra_query is None:
        return y, S
    y2 = _state_times(S, extra_query.to(sdt)).squeeze(-1).to(r.dtype)
    return y, S, y2


# Below this many state entries a matrix-vector product is faster as multiply + row sum than as a batched
# matmul (whose per-call cost dominates at one sequence: ~40 us vs ~20 us at B = 1, H = 6, N = 64 on CPU).
_SMALL_STATE = 1 << 16


def _state_times(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S x per head: S [B,H,N,N], x [B,H,N] -> [B,H,N,1]."""
    if S.numel() <= _SMALL_STATE:
        return (S * x.unsqueeze(-2)).sum(-1, keepdim=True)
    return torch.matmul(S, x.unsqueeze(-1))
