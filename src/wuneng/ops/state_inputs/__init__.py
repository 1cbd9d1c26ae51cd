"""The RWKV-7 state heads' inputs from the low-rank maps' pre-activations, fused for training on the CPU.

Per token and head (N channels), with zw, za, zv the pre-activations of the decay, in-context-rate and value-gate
maps, k, v the keys and values, vf the first layer's values and k_k, k_a [H N] parameters (SPEC section 2)::

    log_w = -e^{-1/2} sigmoid(zw)                alpha = sigmoid(za)
    v'    = v + (vf - v) sigmoid(zv)             (value residual; else v' = v)
    kk    = (k k_k) / max(||k k_k||, 1e-12)      k' = k (1 + (alpha - 1) k_a)
    a     = -kk                                  b  = kk alpha

and, with a padding mask m [B, T], log_w, k', v', b multiplied by m (padding leaves the state untouched).

:func:`state_inputs_reference` is that chain as PyTorch ops (autograd's backward; any dtype and device; the
expressions of :meth:`~wuneng.layers.rwkv7.RWKV7StateHeads.wkv_inputs`). :func:`state_inputs` sends float32/float64
CPU tensors to one C pass forward and one backward (``csrc/state_inputs_impl.h``) that read only the inputs (the
backward recomputes the sigmoids and the norm), in place of ~15 elementwise passes forward and ~25 backward over
[B, T, A] tensors; everything else takes the reference. Tests hold the two equal in float64, values and gradients
(tests/ops/test_state_inputs.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..c_library import DTYPE_SUFFIX, CLibrary, data_ptr
from ..wkv7.cpu import _run_ranges, _split

logger = logging.getLogger(__name__)

__all__ = [
    "state_inputs",
    "state_inputs_reference",
    "state_inputs_grouped",
    "gate_fusion",
    "gate_fusion_reference",
    "state_inputs_kernel_available",
    "DECAY_SCALE",
]

#: log w = -DECAY_SCALE sigmoid(z) (as wuneng.layers.rwkv7)
DECAY_SCALE = math.exp(-0.5)
#: must equal WUNENG_KERNEL_ABI in csrc/state_inputs.c
KERNEL_ABI = 3
STATE_INPUTS_IMPLS = ("auto", "cpu", "reference")
_CSRC = Path(__file__).with_name("csrc")


def _configure(lib) -> None:
    import ctypes

    i64, ptr, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    for suffix in DTYPE_SUFFIX.values():
        fwd = getattr(lib, f"state_inputs_forward_{suffix}")
        fwd.argtypes = [i64] * 4 + [dbl] + [ptr] * 14
        fwd.restype = None
        bwd = getattr(lib, f"state_inputs_backward_{suffix}")
        bwd.argtypes = [i64] * 4 + [dbl] + [ptr] * 22
        bwd.restype = None
        grouped = getattr(lib, f"state_inputs_forward_grouped_{suffix}")
        grouped.argtypes = [i64] * 5 + [dbl] + [ptr] * 14
        grouped.restype = None
        gf = getattr(lib, f"gate_fusion_forward_{suffix}")
        gf.argtypes = [i64] * 4 + [ptr] * 5
        gf.restype = None
        gb = getattr(lib, f"gate_fusion_backward_{suffix}")
        gb.argtypes = [i64] * 4 + [ptr] * 9
        gb.restype = None


LIBRARY = CLibrary(
    "state_inputs",
    _CSRC / "state_inputs.c",
    [_CSRC / name for name in ("state_inputs.c", "state_inputs_impl.h")],
    abi=KERNEL_ABI,
    logger=logger,
    fallback="the state heads' inputs take their PyTorch path",
    configure=_configure,
)
_library = LIBRARY.load


def state_inputs_kernel_available() -> bool:
    """True when the C kernel is built (or builds now) and loads."""
    return _library() is not None


def state_inputs_reference(zw, za, zv, k, v, vf, k_k, k_a, num_heads: int, mask: Optional[torch.Tensor] = None):
    """The chain as PyTorch ops. zw, za, zv, k, v, vf: [B, T, A] (zv, vf None without value residual); k_k, k_a:
    [A]; mask: [B, T] or None. Returns (log_w, k', v', a, b), [B, T, A]; log_w in float32 (float64 stays float64),
    the rest in the dtype the expressions promote to (the caller casts, :func:`~wuneng.layers.rwkv7.wkv_dtypes`)."""
    B, T, A = k.shape
    N = A // num_heads
    log_w = -DECAY_SCALE * torch.sigmoid(zw if zw.dtype == torch.float64 else zw.float())
    alpha = torch.sigmoid(za)
    if zv is not None:
        v = torch.lerp(v, vf.to(v.dtype), torch.sigmoid(zv).to(v.dtype))
    kk = F.normalize((k * k_k).view(B, T, num_heads, N), dim=-1, p=2.0, eps=1e-12).view(B, T, -1)
    k = k * torch.addcmul(1 - k_a, alpha, k_a)
    a, b = -kk, kk * alpha
    if mask is not None:
        m = mask.to(k.dtype).unsqueeze(-1)
        log_w, k, v, b = log_w * m.to(log_w.dtype), k * m, v * m, b * m
    return log_w, k, v, a, b


class _StateInputsCPU(torch.autograd.Function):
    """Contiguous [rows = tokens * H, N] data of one dtype; mask one value per token (or None)."""

    @staticmethod
    def forward(ctx, zw, za, zv, k, v, vf, k_k, k_a, mask, num_heads):
        H, N = num_heads, k_k.numel() // num_heads
        rows = k.numel() // N
        log_w, k2, a, b = (torch.empty_like(k) for _ in range(4))
        v2 = torch.empty_like(k) if zv is not None else None
        fn = getattr(_library(), f"state_inputs_forward_{DTYPE_SUFFIX[k.dtype]}")
        ptrs = tuple(data_ptr(t) for t in (zw, za, zv, k, v, vf, k_k, k_a, mask, log_w, k2, v2, a, b))
        _run_ranges(fn, _split(rows, 16 * N), lambda i: (H, N, DECAY_SCALE) + ptrs)
        ctx.save_for_backward(zw, za, zv, k, v, vf, k_k, k_a, mask)
        ctx.num_heads = H
        if v2 is None:
            return log_w, k2, a, b
        return log_w, k2, v2, a, b

    @staticmethod
    def backward(ctx, *grads):
        zw, za, zv, k, v, vf, k_k, k_a, mask = ctx.saved_tensors
        vr = zv is not None
        if vr:
            g_logw, g_k, g_v, g_a, g_b = (g.contiguous() for g in grads)
        else:
            (g_logw, g_k, g_a, g_b), g_v = (g.contiguous() for g in grads), None
        H, N = ctx.num_heads, k_k.numel() // ctx.num_heads
        rows = k.numel() // N
        d_zw, d_za, d_k = (torch.empty_like(k) for _ in range(3))
        d_zv, d_v, d_vf = (torch.empty_like(k) for _ in range(3)) if vr else (None, None, None)
        bounds = _split(rows, 32 * N)
        params = k.new_zeros(len(bounds) - 1, 2, H * N)  # d k_k, d k_a per range
        fn = getattr(_library(), f"state_inputs_backward_{DTYPE_SUFFIX[k.dtype]}")
        ptrs = tuple(
            data_ptr(t)
            for t in (
                zw,
                za,
                zv,
                k,
                v,
                vf,
                k_k,
                k_a,
                mask,
                g_logw,
                g_k,
                g_v,
                g_a,
                g_b,
                d_zw,
                d_za,
                d_zv,
                d_k,
                d_v,
                d_vf,
            )
        )
        _run_ranges(
            fn, bounds, lambda i: (H, N, DECAY_SCALE) + ptrs + (params[i, 0].data_ptr(), params[i, 1].data_ptr())
        )
        d_kk, d_ka = params.sum(0).unbind(0)
        if not vr:
            d_v = None  # v does not enter the outputs without value residual (the caller uses it as v')
        return d_zw, d_za, d_zv, d_k, d_v, d_vf, d_kk, d_ka, None, None


def _kernel_serves(tensors, impl: str) -> bool:
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    ok = (
        dtype in DTYPE_SUFFIX
        and all(t.dtype == dtype and t.device.type == "cpu" for t in present)
        and not torch.is_autocast_enabled("cpu")
    )
    if impl == "cpu" and not ok:
        raise ValueError("state_inputs(impl='cpu'): the C kernel takes CPU tensors, all float32 or all float64")
    if impl == "cpu" and not state_inputs_kernel_available():
        raise RuntimeError(f"state_inputs(impl='cpu'): the C kernel is unavailable ({LIBRARY.error})")
    return ok and state_inputs_kernel_available()


def state_inputs(
    zw: torch.Tensor,
    za: torch.Tensor,
    zv: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    vf: Optional[torch.Tensor],
    k_k: torch.Tensor,
    k_a: torch.Tensor,
    num_heads: int,
    mask: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, ...]:
    """(log_w, k', v', a, b) [B, T, A] from the pre-activations zw, za (, zv) [B, T, A], k, v [B, T, A], the first
    layer's values vf [B, T, A] (None, with zv None, without value residual), k_k, k_a [A], ``num_heads`` H (A = H N)
    and the padding mask [B, T] (or None). impl: "auto" (the C kernel for float32/float64 CPU tensors outside
    autocast when it is built, else the reference), "cpu" (the kernel; raises when it cannot serve), "reference"."""
    if impl not in STATE_INPUTS_IMPLS:
        raise ValueError(f"state_inputs: impl must be one of {STATE_INPUTS_IMPLS}, got {impl!r}")
    if (zv is None) != (vf is None):
        raise ValueError("state_inputs: zv and vf go together (value residual) or are both None")
    A = k.shape[-1]
    if A % num_heads != 0 or k_k.numel() != A or k_a.numel() != A:
        raise ValueError(f"state_inputs: width {A} with {num_heads} heads and k_k, k_a of {k_k.numel()}, {k_a.numel()}")
    if impl == "reference" or not _kernel_serves((zw, za, zv, k, v, vf, k_k, k_a), impl):
        return state_inputs_reference(zw, za, zv, k, v, vf, k_k, k_a, num_heads, mask)
    m = None if mask is None else mask.to(k.dtype).contiguous()
    args = [None if t is None else t.contiguous() for t in (zw, za, zv, k, v, vf)]
    out = _StateInputsCPU.apply(*args, k_k.contiguous(), k_a.contiguous(), m, num_heads)
    if zv is not None:
        return out
    log_w, k2, a, b = out
    return log_w, k2, v if mask is None else v * m.unsqueeze(-1), a, b


def state_inputs_grouped(
    zw: torch.Tensor,
    za: torch.Tensor,
    zv: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    vf: Optional[torch.Tensor],
    k_k: torch.Tensor,
    k_a: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    mask: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, ...]:
    """:func:`state_inputs` without autograd (the no-grad prefill) for grouped keys and values: k, v [B, T, G N]
    with G = ``kv_heads`` key/value heads, each shared by H / G consecutive state heads (head h reads group
    h // (H / G), as ``repeat_interleave`` over the heads), read in place of a repeated [B, T, H N] copy. zw, za
    (, zv, vf) [B, T, H N], k_k, k_a [H N], mask [B, T] or None. Returns (log_w, k', v', a, b) [B, T, H N]; v' is
    ``v * mask`` without value residual (a tensor of its own). The C kernel serves float32/float64 CPU tensors
    outside autocast (one pass); else the reference on repeated k, v. Raises where autograd would record."""
    if impl not in STATE_INPUTS_IMPLS:
        raise ValueError(f"state_inputs_grouped: impl must be one of {STATE_INPUTS_IMPLS}, got {impl!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (zw, za, zv, k, v, vf, k_k, k_a)):
        raise RuntimeError("state_inputs_grouped: no backward; use state_inputs on repeated keys and values")
    if (zv is None) != (vf is None):
        raise ValueError("state_inputs_grouped: zv and vf go together (value residual) or are both None")
    B, T, A = zw.shape
    if num_heads % kv_heads != 0 or A % num_heads != 0 or k.shape[-1] * num_heads != A * kv_heads:
        raise ValueError(
            f"state_inputs_grouped: {num_heads} heads of width {A} with {kv_heads} key/value heads, k of width "
            f"{k.shape[-1]}"
        )
    if impl == "reference" or not _kernel_serves((zw, za, zv, k, v, vf, k_k, k_a), impl):
        rep, N = num_heads // kv_heads, A // num_heads
        k, v = (t.view(B, T, kv_heads, N).repeat_interleave(rep, dim=2).view(B, T, A) for t in (k, v))
        return state_inputs_reference(zw, za, zv, k, v, vf, k_k, k_a, num_heads, mask)
    H, N = num_heads, A // num_heads
    rows = B * T * H
    args = [None if t is None else t.contiguous() for t in (zw, za, zv, k, v, vf, k_k, k_a)]
    m = None if mask is None else mask.to(k.dtype).contiguous()
    log_w, k2, v2, a, b = (torch.empty_like(args[0]) for _ in range(5))
    fn = getattr(_library(), f"state_inputs_forward_grouped_{DTYPE_SUFFIX[k.dtype]}")
    ptrs = tuple(data_ptr(t) for t in args + [m, log_w, k2, v2, a, b])
    _run_ranges(fn, _split(rows, 16 * N), lambda i: (H, kv_heads, N, DECAY_SCALE) + ptrs)
    return log_w, k2, v2, a, b


def gate_fusion_reference(a: torch.Tensor, y: torch.Tensor, zg: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """The WuNeng gate fusion ``a + sigmoid(zg) rho (y - a)`` as PyTorch ops (SPEC section 3, ``gate``): a, y, zg
    [B, T, H, d], rho [H, d]; the result in a's dtype (under autocast the gate is computed in float32)."""
    return torch.lerp(a, y, (torch.sigmoid(zg) * rho).to(a.dtype))


class _GateFusionCPU(torch.autograd.Function):
    """Contiguous [B, T, H, d] a, y, zg of one dtype; rho [H, d]."""

    @staticmethod
    def forward(ctx, a, y, zg, rho):
        H, N = rho.shape
        rows = a.numel() // N
        z = torch.empty_like(a)
        fn = getattr(_library(), f"gate_fusion_forward_{DTYPE_SUFFIX[a.dtype]}")
        ptrs = tuple(data_ptr(t) for t in (a, y, zg, rho, z))
        _run_ranges(fn, _split(rows, 8 * N), lambda i: (H, N) + ptrs)
        ctx.save_for_backward(a, y, zg, rho)
        return z

    @staticmethod
    def backward(ctx, g):
        a, y, zg, rho = ctx.saved_tensors
        H, N = rho.shape
        rows = a.numel() // N
        g = g.contiguous()
        d_a, d_y, d_zg = (torch.empty_like(a) for _ in range(3))
        bounds = _split(rows, 16 * N)
        d_rho = a.new_zeros(len(bounds) - 1, H * N)
        fn = getattr(_library(), f"gate_fusion_backward_{DTYPE_SUFFIX[a.dtype]}")
        ptrs = tuple(data_ptr(t) for t in (a, y, zg, rho, g, d_a, d_y, d_zg))
        _run_ranges(fn, bounds, lambda i: (H, N) + ptrs + (d_rho[i].data_ptr(),))
        return d_a, d_y, d_zg, d_rho.sum(0).view(H, N)


def gate_fusion(a: torch.Tensor, y: torch.Tensor, zg: torch.Tensor, rho: torch.Tensor, impl: str = "auto"):
    """``a + sigmoid(zg) rho (y - a)``: a, y, zg [B, T, H, d] (the attention output, the state heads' output, the
    gate's pre-activation), rho [H, d]. impl as :func:`state_inputs` (the C kernel: one pass forward, one backward,
    reading only the inputs; the reference: :func:`gate_fusion_reference`)."""
    if impl not in STATE_INPUTS_IMPLS:
        raise ValueError(f"gate_fusion: impl must be one of {STATE_INPUTS_IMPLS}, got {impl!r}")
    if a.shape != y.shape or a.shape != zg.shape or tuple(rho.shape) != tuple(a.shape[-2:]):
        raise ValueError(
            f"gate_fusion: a, y, zg must share one shape [..., H, d] and rho be [H, d], got {tuple(a.shape)}, "
            f"{tuple(y.shape)}, {tuple(zg.shape)}, {tuple(rho.shape)}"
        )
    if impl == "reference" or not _kernel_serves((a, y, zg, rho), impl):
        return gate_fusion_reference(a, y, zg, rho)
    return _GateFusionCPU.apply(a.contiguous(), y.contiguous(), zg.contiguous(), rho.contiguous())
