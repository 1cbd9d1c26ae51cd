"""The RWKV-7 time-mix for one token (decoding), as one fused operation (SPEC section 2).

At one token per step a time-mix is ~60 small tensor ops (token shift, three projections, four LoRAs, the
key normalisation, the WKV step, the read-out, the gate, the output projection) whose fixed per-op cost
outweighs their arithmetic at the widths of small models. :func:`time_mix_one_token` computes the same
thing:

- ``impl="reference"``: :func:`time_mix_one_token_reference`, the obvious tensor ops (any dtype/device);
- ``impl="cpu"``: one call of ``csrc/time_mix_impl.h`` (in the library of :mod:`.cpu`), float32/float64
  CPU tensors, no autograd, single-threaded (a decoding step streams its weights from memory once; the
  matrix-vector products are bandwidth-bound and as fast as the BLAS's on one core).

Per token, with x the input [B, C], shift the previous token [B, C] (zeros at the start), mask [B] (1 = token,
0 = padding) and the weights of :class:`TimeMixWeights`::

    x    = x mask;  xx = shift - x;  x_q = x + xx mix_q      (q = r, w, k, v, a, g: the rows of ``mix``)
    r, k, v = x_r W_r^T, x_k W_k^T, x_v W_v^T
    log w = -e^{-1/2} sigmoid(w0 + tanh(x_w w1) w2);   alpha = sigmoid(a0 + x_a a1 a2)
    v    = v + (v_first - v) sigmoid(v0 + x_v v1 v2)     (value residual; otherwise v_first := v)
    g    = sigmoid(x_g g1) g2
    kk   = normalize_per_head(k k_k);  k = k ((1 - k_a) + alpha k_a);  a = -kk;  b = kk alpha
    (padding: log w = 0, k = v = b = 0: the state is left as it was)
    y, S = WKV-7 step (:func:`~wuneng.ops.wkv7.step.wkv7_step`)
    out  = ((GroupNorm_h(y) gamma + beta + (sum r k r_k) v) g) W_o^T

Returns (out [B, C], new shift [B, C] = the masked x, new state [B, H, N, N], v_first [B, A]). The input
state is not modified. Tests hold the two forms equal in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu import _SUFFIX, _library, _ptr
from .readout import group_norm_bonus_reference
from .step import wkv7_step

__all__ = [
    "TimeMixWeights", "time_mix_one_token", "time_mix_one_token_reference", "time_mix_kernel_fits", "TIME_MIX_IMPLS",
    "MIX_ROWS",
]

TIME_MIX_IMPLS = ("auto", "cpu", "reference")
#: the order of the token-shift mixes in :attr:`TimeMixWeights.mix`
MIX_ROWS = ("r", "w", "k", "v", "a", "g")
_DECAY_SCALE = math.exp(-0.5)


class TimeMixWeights(NamedTuple):
    """The weights of one RWKV-7 time-mix (C the input width, A = H N the state width, D_* LoRA ranks).

    mix [6, C] (rows r, w, k, v, a, g); W_r, W_k, W_v [A, C] and W_o [C, A] (nn.Linear layout); w1 [C, D_w],
    w2 [D_w, A], w0 [A] (decay); a1, a2, a0 (in-context rate); v1, v2, v0 (value residual; None without it);
    g1 [C, D_g], g2 [D_g, A] (gate); k_k, k_a [A]; r_k [H, N]; ln_w, ln_b [A] (GroupNorm affine);
    eps the GroupNorm epsilon."""

    mix: torch.Tensor
    W_r: torch.Tensor
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_o: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: Optional[torch.Tensor]
    v1: Optional[torch.Tensor]
    v2: Optional[torch.Tensor]
    g1: torch.Tensor
    g2: torch.Tensor
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float

    @property
    def value_residual(self) -> bool:
        return self.v1 is not None


def _check(x, shift, state, v_first, wt: TimeMixWeights, mask) -> Tuple[int, int, int, int]:
    """Validate shapes; returns (B, C, H, N)."""
    if x.dim() != 2:
        raise ValueError(f"time_mix_one_token: x must be [B, C] (one token), got shape {tuple(x.shape)}")
    B, C = x.shape
    if wt.r_k.dim() != 2:
        raise ValueError(f"time_mix_one_token: r_k must be [H, N], got shape {tuple(wt.r_k.shape)}")
    H, N = wt.r_k.shape
    A = H * N
    expected = {
        "mix": (len(MIX_ROWS), C), "W_r": (A, C), "W_k": (A, C), "W_v": (A, C), "W_o": (C, A),
        "w0": (A,), "a0": (A,), "k_k": (A,), "k_a": (A,), "ln_w": (A,), "ln_b": (A,),
    }
    for name, shape in expected.items():
        if tuple(getattr(wt, name).shape) != shape:
            raise ValueError(f"time_mix_one_token: {name} must have shape {shape}, got {tuple(getattr(wt, name).shape)}")
    pairs = [("w1", "w2"), ("a1", "a2"), ("g1", "g2")] + ([("v1", "v2")] if wt.value_residual else [])
    for first, second in pairs:
        f, s = getattr(wt, first), getattr(wt, second)
        if f.dim() != 2 or s.dim() != 2 or f.shape[0] != C or s.shape != (f.shape[1], A):
            raise ValueError(
                f"time_mix_one_token: {first}, {second} must be [C, D] and [D, A] with C = {C}, A = {A}; got "
                f"{tuple(f.shape)} and {tuple(s.shape)}"
            )
    if wt.value_residual and (wt.v2 is None or wt.v0 is None or tuple(wt.v0.shape) != (A,)):
        raise ValueError("time_mix_one_token: value residual needs v0 [A], v1 [C, D_v] and v2 [D_v, A]")
    if tuple(shift.shape) != (B, C):
        raise ValueError(f"time_mix_one_token: shift must be [B, C] = {(B, C)}, got {tuple(shift.shape)}")
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"time_mix_one_token: state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    if wt.value_residual:
        if v_first is None or tuple(v_first.shape) != (B, A):
            got = None if v_first is None else tuple(v_first.shape)
            raise ValueError(f"time_mix_one_token: a value-residual time-mix needs v_first [B, A] = {(B, A)}, got {got}")
    if mask is not None and tuple(mask.shape) != (B,):
        raise ValueError(f"time_mix_one_token: mask must be [B] = ({B},), got {tuple(mask.shape)}")
    return B, C, H, N


def time_mix_one_token_reference(x, shift, state, v_first, weights: TimeMixWeights, mask=None):
    """The tensor-op form (differentiable, any dtype and device); arguments as :func:`time_mix_one_token`."""
    wt = weights
    B, C, H, N = _check(x, shift, state, v_first, wt, mask)
    if mask is not None:
        x = x * mask.to(x.dtype).unsqueeze(-1)
    xx = shift.to(x.dtype) - x
    x_r, x_w, x_k, x_v, x_a, x_g = (x + xx * mu for mu in wt.mix)
    r, k, v = x_r @ wt.W_r.t(), x_k @ wt.W_k.t(), x_v @ wt.W_v.t()
    log_w = -_DECAY_SCALE * torch.sigmoid(wt.w0 + torch.tanh(x_w @ wt.w1) @ wt.w2)
    alpha = torch.sigmoid(wt.a0 + x_a @ wt.a1 @ wt.a2)
    if wt.value_residual:
        v = v + (v_first - v) * torch.sigmoid(wt.v0 + x_v @ wt.v1 @ wt.v2)
    else:
        v_first = v
    g = torch.sigmoid(x_g @ wt.g1) @ wt.g2
    kk = F.normalize((k * wt.k_k).view(B, H, N), dim=-1, eps=1e-12).view(B, -1)
    k = k * ((1 - wt.k_a) + alpha * wt.k_a)
    a, b = -kk, kk * alpha
    if mask is not None:
        m = mask.to(x.dtype).unsqueeze(-1)
        log_w, k, v, b = log_w * m, k * m, v * m, b * m
    heads = (B, H, N)
    y, new_state = wkv7_step(*(t.reshape(heads) for t in (r, log_w, k, v, a, b)), state, impl="torch")
    y = group_norm_bonus_reference(y, r.view(heads), k.view(heads), v.view(heads), wt.r_k, wt.ln_w, wt.ln_b, wt.eps)
    out = (y.reshape(B, -1) * g) @ wt.W_o.t()
    return out, x, new_state, v_first


def time_mix_kernel_fits(x: torch.Tensor, weights: TimeMixWeights) -> bool:
    """Whether ``impl="cpu"`` can serve x and these weights: float32/float64 CPU tensors of one dtype,
    contiguous weights, and the C library built (autograd aside)."""
    wt = weights
    if x.device.type != "cpu" or x.dtype not in _SUFFIX:
        return False
    tensors = [t for t in wt[:-1] if t is not None]
    if any(t.dtype != x.dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return _library() is not None


def time_mix_one_token(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    v_first: Optional[torch.Tensor],
    weights: TimeMixWeights,
    mask: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
):
    """One token through an RWKV-7 time-mix (see the module docstring for the equations).

    Args:
        x: [B, C] the token (the time-mix input, after the layer norm).
        shift: [B, C] the previous token (None: zeros, the start of a sequence).
        state: [B, H, N, N] the WKV state (None: zeros); not modified.
        v_first: [B, A] the first layer's values (value-residual time-mixes), else None.
        weights: :class:`TimeMixWeights`.
        mask: [B] 1 = token, 0 = padding (padding leaves the state unchanged), or None.
        impl: "auto" (the C kernel for float32/float64 CPU tensors without autograd, else the reference),
            "cpu" or "reference".

    Returns:
        (out [B, C], new shift [B, C], new state [B, H, N, N], v_first [B, A]).
    """
    if impl not in TIME_MIX_IMPLS:
        raise ValueError(f"time_mix_one_token: impl must be one of {TIME_MIX_IMPLS}, got {impl!r}")
    if shift is None:
        shift = torch.zeros_like(x)
    if impl == "reference":
        return time_mix_one_token_reference(x, shift, state, v_first, weights, mask)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, shift, state, v_first, *weights[:-1])
    )  # (short-circuits in decoding, which runs without grad)
    fits = not needs_grad and time_mix_kernel_fits(x, weights)
    if impl == "auto" and not fits:
        return time_mix_one_token_reference(x, shift, state, v_first, weights, mask)
    if not fits:
        raise ValueError(
            "time_mix_one_token: impl='cpu' needs float32/float64 CPU tensors of one dtype, contiguous weights, "
            "no autograd and the C kernel (see wuneng.ops.wkv7.cpu.cpu_kernel_error())"
        )
    wt = weights
    B, C, H, N = _check(x, shift, state, v_first, wt, mask)
    A = H * N
    dw, da, dg = wt.w1.shape[1], wt.a1.shape[1], wt.g1.shape[1]
    dv = wt.v1.shape[1] if wt.value_residual else 0
    dt = x.dtype
    x, shift = x.contiguous(), shift.to(dt).contiguous()
    state = None if state is None else state.to(dt).contiguous()
    v_in = v_first.to(dt).contiguous() if wt.value_residual else None
    m = None if mask is None else mask.to(dt).contiguous()
    out, shift_out = x.new_empty(B, C), x.new_empty(B, C)
    state_out = x.new_empty(B, H, N, N)
    v_out = None if wt.value_residual else x.new_empty(B, A)
    work = x.new_empty(7 * B * C + 10 * B * A + B * (dw + da + dv + dg) + 2 * B * H)
    fn = getattr(_library(), f"time_mix_one_token_{_SUFFIX[dt]}")
    fn(
        B, C, H, N, dw, da, dv, dg, int(wt.value_residual), float(wt.eps),
        *(_ptr(t) for t in (x, m, shift, state, v_in)),
        *(_ptr(t) for t in wt[:-1]),
        *(_ptr(t) for t in (work, out, shift_out, state_out, v_out)),
    )
    return out, shift_out, state_out, (v_first if wt.value_residual else v_out)
