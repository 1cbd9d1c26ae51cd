"""The RWKV-7 read-out: per-head GroupNorm of the WKV output plus the bonus term (SPEC section 2).

Per token and head h, with y the WKV output, rho = r_k[h] and the GroupNorm affine (gamma, beta)::

    out = GroupNorm_h(y) * gamma + beta + (sum_n r_n k_n rho_n) v

:func:`group_norm_bonus_reference` is the obvious tensor-op form (the reference, differentiable by autograd,
any dtype and device). :func:`group_norm_bonus` dispatches: float32/float64 CPU tensors go to one C pass
forward and one backward (``csrc/readout_impl.h``, in the library of :mod:`.cpu`), which replace ~6
elementwise passes forward and ~12 backward over [B, T, A] tensors (several of them broadcast along the
channels, the slow case of PyTorch's elementwise kernels); everything else takes the reference. Tests
hold the two equal in float64, values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import _SUFFIX, _library, _ptr, _run_ranges, _split

READOUT_IMPLS = ("auto", "cpu", "reference")


def group_norm_bonus_reference(y, r, k, v, rho, weight, bias, eps: float):
    """y, r, k, v: [..., H, N]; rho: [H, N]; weight, bias: [H * N]. Returns [..., H, N]."""
    H, N = y.shape[-2:]
    lead = y.shape[:-2]
    yn = F.group_norm(y.reshape(-1, H * N), H, weight, bias, eps).view(*lead, H, N)
    return yn + ((r * k) * rho).sum(-1, keepdim=True) * v


class _ReadOutCPU(torch.autograd.Function):
    """Contiguous [rows = tokens * H, N] views of y, r, k, v; rho, weight, bias [H, N]."""

    @staticmethod
    def forward(ctx, y, r, k, v, rho, weight, bias, eps):
        H, N = rho.shape
        rows = y.numel() // N
        out = torch.empty_like(y)
        stats = y.new_empty(rows, 2)
        fn = getattr(_library(), f"readout_forward_{_SUFFIX[y.dtype]}")
        args = (
            (H, N) + tuple(_ptr(t) for t in (y, r, k, v, rho, weight, bias)) + (float(eps),) + (_ptr(out), _ptr(stats))
        )
        _run_ranges(fn, _split(rows, 8 * N), lambda i: args)
        ctx.save_for_backward(y, r, k, v, rho, weight, stats)
        return out

    @staticmethod
    def backward(ctx, g):
        y, r, k, v, rho, weight, stats = ctx.saved_tensors
        H, N = rho.shape
        rows = y.numel() // N
        g = g.contiguous()
        dy, dr, dk, dv = (torch.empty_like(y) for _ in range(4))
        bounds = _split(rows, 16 * N)
        params = y.new_zeros(len(bounds) - 1, 3, H, N)  # d rho, d weight, d bias per thread
        fn = getattr(_library(), f"readout_backward_{_SUFFIX[y.dtype]}")
        args = (H, N) + tuple(_ptr(t) for t in (g, y, r, k, v, rho, weight, stats, dy, dr, dk, dv))
        _run_ranges(fn, bounds, lambda i: args + tuple(params[i, j].data_ptr() for j in range(3)))
        d_rho, d_weight, d_bias = params.sum(0).unbind(0)
        return dy, dr, dk, dv, d_rho, d_weight, d_bias, None


def group_norm_bonus(y, r, k, v, rho, weight, bias, eps: float, impl: str = "auto"):
    """The read-out ``GroupNorm_h(y) gamma + beta + (sum_n r k rho) v``.

    Args:
        y, r, k, v: [..., H, N] (one dtype); rho: [H, N]; weight, bias: [H * N] (the GroupNorm affine).
        eps: the GroupNorm epsilon.
        impl: "auto" (the C kernel for float32/float64 CPU tensors when it is built, else the reference),
            "cpu" (the C kernel; raises when it cannot serve the inputs) or "reference".
    Returns: [..., H, N] in y's dtype.
    """
    if impl not in READOUT_IMPLS:
        raise ValueError(f"group_norm_bonus: impl must be one of {READOUT_IMPLS}, got {impl!r}")
    H, N = y.shape[-2:]
    if tuple(rho.shape) != (H, N) or weight.numel() != H * N or bias.numel() != H * N:
        raise ValueError(
            f"group_norm_bonus: expected rho [H, N] = {(H, N)} and weight, bias [{H * N}], got "
            f"{tuple(rho.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    for name, t in (("r", r), ("k", k), ("v", v)):
        if t.shape != y.shape:
            raise ValueError(
                f"group_norm_bonus: {name} must have the shape of y {tuple(y.shape)}, got {tuple(t.shape)}"
            )
    tensors = (y, r, k, v, rho, weight, bias)
    fits = all(t.device.type == "cpu" and t.dtype == y.dtype for t in tensors) and y.dtype in _SUFFIX
    if impl == "reference" or (impl == "auto" and not (fits and _library() is not None)):
        return group_norm_bonus_reference(y, r, k, v, rho, weight, bias, eps)
    if not fits:
        raise ValueError("group_norm_bonus: impl='cpu' needs CPU tensors, all float32 or all float64")
    if _library() is None:
        raise RuntimeError(
            "group_norm_bonus: impl='cpu' needs the C kernel, which is unavailable; use impl='reference'"
        )
    args = [t.contiguous() for t in (y, r, k, v)] + [
        rho.contiguous(),
        weight.reshape(H, N).contiguous(),
        bias.reshape(H, N).contiguous(),
    ]
    return _ReadOutCPU.apply(*args, eps)
