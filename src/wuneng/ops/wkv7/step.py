"""One WKV-7 step: the decoding form (one token per call, constant memory)."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype
from .cpu import cpu_kernel_available, cpu_kernel_error, wkv7_cpu_one_token

STEP_IMPLS = ("auto", "cpu", "torch")


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
    impl: str = "auto",
):
    """Advance the state by one token.

    Args:
        r, log_w, k, v, a, b: [B, H, N] (one token). ``log_w`` is the log decay.
        state: [B, H, N, N] or None (zeros).
        extra_query: optional [B, H, N], a second read-out of the new state.
        impl: "torch" (the tensor ops below, differentiable), "cpu" (one call of the C kernel of
            :mod:`.cpu`; no autograd) or "auto" (the C kernel for CPU tensors when it is built and no
            gradient is needed, else "torch").

    Returns:
        ``(y, new_state)`` or ``(y, new_state, y_extra)``; y: [B, H, N] in r's dtype, state float32 (float64 for float64).
    """
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), state, extra_query, step=True)
    B, H, N = r.shape
    sdt = state_dtype(r.dtype)
    if impl not in STEP_IMPLS:
        raise ValueError(f"wkv7_step: impl must be one of {STEP_IMPLS}, got {impl!r}")
    if impl == "auto":
        use_kernel = (
            r.device.type == "cpu"
            and not _needs_autograd(r, log_w, k, v, a, b, state, extra_query)
            and cpu_kernel_available()
        )
        impl = "cpu" if use_kernel else "torch"
    if impl == "cpu":
        # one C call instead of ~8 small ops (the C kernel's forward with T = 1; tested equal to the ops below)
        if r.device.type != "cpu":
            raise ValueError(f"wkv7_step: impl='cpu' runs on CPU tensors, got device {r.device}")
        if _needs_autograd(r, log_w, k, v, a, b, state, extra_query):
            raise ValueError("wkv7_step: impl='cpu' has no autograd; use impl='torch' (or 'auto') for gradients")
        if not cpu_kernel_available():
            raise RuntimeError(f"wkv7_step: impl='cpu' needs the C kernel, which is unavailable ({cpu_kernel_error()})")
        r_, k_, v_, a_, b_ = (t.to(sdt).contiguous() for t in (r, k, v, a, b))
        q = None if extra_query is None else extra_query.to(sdt).contiguous()
        S0 = None if state is None else state.to(sdt).contiguous()
        y, S, y2 = wkv7_cpu_one_token(r_, torch.exp(log_w.to(sdt)), k_, v_, a_, b_, S0, q)
        return (y.to(r.dtype), S) if q is None else (y.to(r.dtype), S, y2.to(r.dtype))
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


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Below this many state entries a matrix-vector product is faster as multiply + row sum than as a batched
# matmul (whose per-call cost dominates at one sequence: ~40 us vs ~20 us at B = 1, H = 6, N = 64 on CPU).
_SMALL_STATE = 1 << 16


def _state_times(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S x per head: S [B,H,N,N], x [B,H,N] -> [B,H,N,1]."""
    if S.numel() <= _SMALL_STATE:
        return (S * x.unsqueeze(-2)).sum(-1, keepdim=True)
    return torch.matmul(S, x.unsqueeze(-1))
