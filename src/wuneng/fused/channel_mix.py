"""The RWKV-7 channel-mix for one token and a bias-free linear map of a few rows (the language-model head), each as
one multi-threaded C call (``csrc/channel_mix_impl.h``) beside its tensor-op reference.

At batch 1 a decoding step is memory-bound: every weight is read once per token. These kernels stream their weight
matrices once, split by rows across ``torch.get_num_threads()`` threads in one OpenMP region (torch's own runtime),
each output element computed by one thread in a fixed order: the result does not depend on the thread count.

Channel-mix (SPEC section 2; :class:`~wuneng.layers.rwkv7.ChannelMix` at one token), x [B, C], shift [B, C] the
previous (masked) token, mask [B] (1 = token, 0 = padding) or None, mix [C], W_key [F, C], W_value [C, F]::

    x = x mask;  x_k = x + (shift - x) mix;  out = W_value relu(W_key x_k)^2;  new shift = x

Linear: y = x W^T for x [B, I], W [O, I] (nn.Linear's layout, no bias).

Weights in float32 or float64 (activations of the same dtype), or bfloat16 (activations given in bfloat16 or
float32, computed in float32: the weights are widened as they are read, never rounded further; the hidden
activations of the channel-mix stay float32). Tests hold each kernel against the float64 reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..ops.c_library import DTYPE_SUFFIX as _SUFFIX
from ..ops.c_library import data_ptr as _ptr
from ._abi import ChannelMixArgs, LinearArgs
from .cpu import _library

__all__ = [
    "channel_mix_one_token",
    "channel_mix_one_token_reference",
    "linear_one_token",
    "linear_one_token_reference",
    "ChannelMixPlan",
    "channel_mix_plan",
    "channel_mix_one_token_planned",
    "LinearPlan",
    "linear_plan",
    "linear_one_token_planned",
    "ROW_KERNEL_IMPLS",
    "CHANNEL_MIX_MAX_BATCH",
    "HEAD_MAX_ROWS",
    "BF16_MAX_ROWS",
    "row_kernel_fits",
]

ROW_KERNEL_IMPLS = ("auto", "cpu", "reference")

#: A decoding step's channel-mix (:class:`~wuneng.layers.rwkv7.ChannelMix`) takes the kernel while the batch is at
#: most CHANNEL_MIX_MAX_BATCH, and the language-model head (:func:`~wuneng.layers.rwkv7.head_logits`) while it has at
#: most HEAD_MAX_ROWS rows; with bfloat16 weights both also at most BF16_MAX_ROWS (:func:`row_kernel_fits`). Beyond,
#: torch.mv at one row and the BLAS's matrix products above. Measured on the 2-core development machine, 1 thread,
#: under a load average of 3-3.6 (other programs running; one process, the variants alternating step by step, medians
#: of 10-24 steps each): kernel / BLAS time of the pieces of a whole RWKV-7 step (benchmarks/decode_step.py's timers;
#: channel-mix, head):
#:
#:     float32, 0.1b: batch 2 0.94, 0.92; 4 0.73, 0.60; 8 0.70, 0.46;  the grid: 16 1.24, 1.18; 32 1.66, 1.42
#:     float32, 0.4b: batch 2 0.98, 0.99; 4 0.66, 0.66; 8 0.65, 0.58; 16 1.26, 1.44
#:     bfloat16, 0.1b: batch 2 0.70, 0.70; 4 0.91, 0.97; 8 1.28, 1.60; 16 2.50, 2.73
#:
#: (the BLAS's bfloat16 products, oneDNN with this CPU's bfloat16 instructions, gain on the kernel, which widens the
#: weights to float32, as the batch grows). At batch 1 (session 9, same machine loaded, against torch.mv): head 0.94
#: (fp32) and 0.93 (bf16), 12 channel-mixes 0.91 and 0.60.
CHANNEL_MIX_MAX_BATCH = 8
HEAD_MAX_ROWS = 8
BF16_MAX_ROWS = 4


def row_kernel_fits(rows: int, limit: int, weight_dtype: torch.dtype) -> bool:
    """Whether ``rows`` rows of a decoding step take a row kernel whose batch limit is ``limit``
    (CHANNEL_MIX_MAX_BATCH or HEAD_MAX_ROWS) with weights of ``weight_dtype`` (bfloat16: at most BF16_MAX_ROWS too)."""
    if weight_dtype == torch.bfloat16:
        limit = min(limit, BF16_MAX_ROWS)
    return 0 < rows <= limit


def channel_mix_one_token_reference(x, shift, mix, W_key, W_value, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tensor-op form (differentiable, any dtype and device): returns (out [B, C], new shift [B, C])."""
    if mask is not None:
        x = x * mask.to(x.dtype).unsqueeze(-1)
    x_k = x + (shift.to(x.dtype) - x) * mix
    return (torch.relu(x_k @ W_key.t()) ** 2) @ W_value.t(), x


def linear_one_token_reference(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """y = x W^T, x [B, I], W [O, I] -> [B, O]."""
    return x @ W.t()


def _kernel_dtypes(weights) -> Optional[Tuple[torch.dtype, str]]:
    """(compute dtype, kernel suffix) for these weight matrices, or None where no kernel serves them: CPU,
    contiguous, one dtype among float32, float64 (computed in it) and bfloat16 (computed in float32), the library
    loaded."""
    dtype = weights[0].dtype
    if any(w.device.type != "cpu" or w.dtype != dtype or not w.is_contiguous() or w.dim() != 2 for w in weights):
        return None
    if dtype == torch.bfloat16:
        found = (torch.float32, "bf16")
    elif dtype in _SUFFIX:
        found = (dtype, _SUFFIX[dtype])
    else:
        return None
    return found if _library() is not None else None


class ChannelMixPlan(NamedTuple):
    """A channel-mix's weights prepared for repeated kernel calls (:func:`channel_mix_plan`): checked once, their
    pointers read once. Valid while the weights keep their storage (a layer keeps it in a
    :func:`~wuneng.layers.low_rank.derived_weight`, rebuilt when a weight changes)."""

    mix: torch.Tensor  # [C] in the compute dtype
    W_key: torch.Tensor  # [F, C]
    W_value: torch.Tensor  # [C, F]
    dtype: torch.dtype  # the weights' dtype (a layer's activations)
    compute_dtype: torch.dtype  # the kernel's activations: the dtype, float32 for bfloat16 weights
    suffix: str  # f32, f64 or bf16
    C: int
    F: int
    pointers: Tuple[int, int, int]  # mix, W_key, W_value


def channel_mix_plan(mix: torch.Tensor, W_key: torch.Tensor, W_value: torch.Tensor) -> Optional[ChannelMixPlan]:
    """The plan of these weights for :func:`channel_mix_one_token_planned`, or None where the kernel cannot serve
    them (see the module docstring). Raises ValueError for inconsistent shapes."""
    F_, C = W_key.shape if W_key.dim() == 2 else (0, 0)
    if W_key.dim() != 2 or tuple(W_value.shape) != (C, F_) or tuple(mix.shape) != (C,):
        raise ValueError(
            "channel_mix_one_token: W_key must be [F, C], W_value [C, F] and mix [C]; got "
            f"{tuple(W_key.shape)}, {tuple(W_value.shape)} and {tuple(mix.shape)}"
        )
    found = _kernel_dtypes((W_key, W_value))
    if found is None or mix.device.type != "cpu" or not mix.is_floating_point():
        return None
    compute, suffix = found
    mix = mix.detach().to(compute).contiguous()
    return ChannelMixPlan(
        mix, W_key, W_value, W_key.dtype, compute, suffix, C, F_, (mix.data_ptr(), W_key.data_ptr(), W_value.data_ptr())
    )


def channel_mix_one_token_planned(
    x: torch.Tensor, shift: Optional[torch.Tensor], plan: ChannelMixPlan, mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The channel-mix of one token through the C kernel, for callers that have checked the shapes: x [B, C] on the
    CPU (the plan's dtype, or float32 with bfloat16 weights), shift [B, C] or None (zeros), mask [B] or None; no
    autograd. Returns (out [B, C], new shift [B, C]) in x's dtype."""
    B, C, F_ = x.shape[0], plan.C, plan.F
    dt = plan.compute_dtype
    xc = x.to(dt).contiguous()
    sc = xc.new_zeros(B, C) if shift is None else shift.to(dt).contiguous()
    m = None if mask is None else mask.to(dt).contiguous()
    out, shift_out, work = xc.new_empty(B, C), xc.new_empty(B, C), xc.new_empty(B * (C + F_))
    args = ChannelMixArgs.packer.pack(
        B, C, F_, torch.get_num_threads(), _ptr(xc), _ptr(m), _ptr(sc), *plan.pointers,
        _ptr(work), _ptr(out), _ptr(shift_out),
    )  # fmt: skip
    getattr(_library(), f"channel_mix_one_token_{plan.suffix}")(args)
    return out.to(x.dtype), shift_out.to(x.dtype)


class LinearPlan(NamedTuple):
    """A weight matrix W [O, I] prepared for :func:`linear_one_token_planned` (:func:`linear_plan`)."""

    W: torch.Tensor
    dtype: torch.dtype
    compute_dtype: torch.dtype
    suffix: str
    O: int  # noqa: E741
    I: int  # noqa: E741
    pointer: int


def linear_plan(W: torch.Tensor) -> Optional[LinearPlan]:
    """The plan of W [O, I] for :func:`linear_one_token_planned`, or None where the kernel cannot serve it."""
    if W.dim() != 2:
        raise ValueError(f"linear_one_token: W must be [O, I], got shape {tuple(W.shape)}")
    found = _kernel_dtypes((W,))
    if found is None:
        return None
    return LinearPlan(W, W.dtype, found[0], found[1], W.shape[0], W.shape[1], W.data_ptr())


def linear_one_token_planned(x: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    """y = x W^T through the C kernel: x [B, I] on the CPU (the plan's dtype, or float32 with bfloat16 weights), no
    autograd. Returns y [B, O] in the plan's compute dtype (float32 for bfloat16 weights: the products are not
    rounded to bfloat16)."""
    B = x.shape[0]
    xc = x.to(plan.compute_dtype).contiguous()
    y = xc.new_empty(B, plan.O)
    args = LinearArgs.packer.pack(B, plan.O, plan.I, torch.get_num_threads(), _ptr(xc), plan.pointer, _ptr(y))
    getattr(_library(), f"linear_one_token_{plan.suffix}")(args)
    return y


def _chosen(fn: str, impl: str, x: torch.Tensor, plan, tensors) -> bool:
    if impl not in ROW_KERNEL_IMPLS:
        raise ValueError(f"{fn}: impl must be one of {ROW_KERNEL_IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    fits = (
        plan is not None and not needs_grad and x.device.type == "cpu" and x.dtype in (plan.dtype, plan.compute_dtype)
    )
    if impl == "cpu" and not fits:
        raise ValueError(
            f"{fn}: impl='cpu' needs CPU float32/float64 (or bfloat16-weight) contiguous weights, activations of their "
            "dtype, no autograd and the C kernel (see wuneng.fused.cpu.fused_kernel_error())"
        )
    return fits


def channel_mix_one_token(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    mix: torch.Tensor,
    W_key: torch.Tensor,
    W_value: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token through an RWKV-7 channel-mix (module docstring): x [B, C], shift [B, C] or None (zeros), mix [C],
    W_key [F, C], W_value [C, F], mask [B] or None; impl "auto" (the kernel where it serves, else the reference),
    "cpu" (the kernel or ValueError) or "reference". Returns (out [B, C], new shift [B, C])."""
    if x.dim() != 2 or x.shape[1] != W_key.shape[-1]:
        raise ValueError(f"channel_mix_one_token: x must be [B, C] with C = {W_key.shape[-1]}, got {tuple(x.shape)}")
    if shift is not None and shift.shape != x.shape:
        raise ValueError(f"channel_mix_one_token: shift must be [B, C] = {tuple(x.shape)}, got {tuple(shift.shape)}")
    if mask is not None and tuple(mask.shape) != (x.shape[0],):
        raise ValueError(f"channel_mix_one_token: mask must be [B] = ({x.shape[0]},), got {tuple(mask.shape)}")
    plan = channel_mix_plan(mix, W_key, W_value) if impl != "reference" else None
    if not _chosen("channel_mix_one_token", impl, x, plan, (x, shift, mix, W_key, W_value)):
        return channel_mix_one_token_reference(
            x, torch.zeros_like(x) if shift is None else shift, mix, W_key, W_value, mask
        )
    return channel_mix_one_token_planned(x, shift, plan, mask)


def linear_one_token(x: torch.Tensor, W: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """y = x W^T for x [B, I], W [O, I]; impl as :func:`channel_mix_one_token`. The kernel returns float32 for
    bfloat16 weights (:func:`linear_one_token_planned`), the reference x's dtype."""
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"linear_one_token: x must be [B, I] and W [O, I]; got {tuple(x.shape)} and {tuple(W.shape)}")
    plan = linear_plan(W) if impl != "reference" else None
    if not _chosen("linear_one_token", impl, x, plan, (x, W)):
        return linear_one_token_reference(x, W)
    return linear_one_token_planned(x, plan)
