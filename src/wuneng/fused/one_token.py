"""RWKV-7 mixers for one token (decoding), each as one fused operation: the time-mix (SPEC section 2) and the
state side of a WuNeng hybrid mixer (SPEC section 3).

At one token per step a time-mix is ~60 small tensor ops (token shift, three projections, four LoRAs, the
key normalisation, the WKV step, the read-out, the gate, the output projection) whose fixed per-op cost
outweighs their arithmetic at the widths of small models. :func:`time_mix_one_token` computes the same
thing:

- ``impl="reference"``: :func:`time_mix_one_token_reference`, the obvious tensor ops (any dtype/device);
- ``impl="cpu"``: one call of ``csrc/one_token_impl.h`` (in the fused library of :mod:`.cpu`), float32/float64
  CPU tensors, no autograd, one OpenMP region of ``torch.get_num_threads()`` threads (rows, columns and heads
  split across them; the result does not depend on the thread count). Its arguments travel in
  one struct filled by field name (:mod:`._abi`; the weights' NamedTuple field names are the C field names),
  and the C layout is checked against the Python one when the library loads.

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

:func:`hybrid_state_one_token` does the same for a hybrid mixer's state heads, whose r, k, v come from the
teacher's attention projections: everything but the attention and the fusion (see its docstring).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.c_library import DTYPE_SUFFIX as _SUFFIX
from ..ops.c_library import data_ptr as _ptr
from ..ops.wkv7.readout import group_norm_bonus_reference
from ..ops.wkv7.step import wkv7_step
from ._abi import HybridStateArgs, TimeMixArgs
from .cpu import _library

__all__ = [
    "TimeMixWeights",
    "time_mix_one_token",
    "time_mix_one_token_reference",
    "TimeMixPlan",
    "time_mix_plan",
    "time_mix_one_token_planned",
    "one_token_kernel_fits",
    "one_token_kernel_preferred",
    "FUSED_WORK_LIMIT",
    "FUSED_MAX_BATCH",
    "TIME_MIX_MAX_BATCH",
    "time_mix_kernel_preferred",
    "TIME_MIX_IMPLS",
    "MIX_ROWS",
    "HybridStateWeights",
    "hybrid_state_one_token",
    "hybrid_state_one_token_reference",
    "HybridStatePlan",
    "hybrid_state_plan",
    "hybrid_state_one_token_planned",
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


def _check_weights(fn: str, wt, C: int, expected: dict, pairs: list) -> None:
    """Weights of exactly the ``expected`` shapes, and LoRA pairs (first, second, width) of shapes [C, D] and
    [D, width] (any width when None)."""
    for name, shape in expected.items():
        if tuple(getattr(wt, name).shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(getattr(wt, name).shape)}")
    for first, second, width in pairs:
        f, s = getattr(wt, first), getattr(wt, second)
        if (
            s is None
            or f.dim() != 2
            or s.dim() != 2
            or f.shape[0] != C
            or s.shape[0] != f.shape[1]
            or (width is not None and s.shape[1] != width)
        ):
            raise ValueError(
                f"{fn}: {first}, {second} must be [C, D] and [D, {'W' if width is None else f'A = {width}'}] with C = {C}; "
                f"got {tuple(f.shape)} and {None if s is None else tuple(s.shape)}"
            )
    if wt.value_residual and (wt.v0 is None or tuple(wt.v0.shape) != (wt.r_k.numel(),)):
        raise ValueError(f"{fn}: value residual needs v0 [A], v1 [C, D_v] and v2 [D_v, A]")


def _check_token(fn: str, x, shift, state, v_first, mask, value_residual: bool, r_k) -> Tuple[int, int, int, int]:
    """The per-call inputs of a one-token op: x [B, C], shift [B, C], state [B, H, N, N] or None, v_first [B, A]
    (value residual), mask [B] or None; H, N from r_k [H, N]. Returns (B, C, H, N)."""
    if x.dim() != 2:
        raise ValueError(f"{fn}: the input must be [B, C] (one token), got shape {tuple(x.shape)}")
    if r_k.dim() != 2:
        raise ValueError(f"{fn}: r_k must be [H, N], got shape {tuple(r_k.shape)}")
    (B, C), (H, N) = x.shape, r_k.shape
    if tuple(shift.shape) != (B, C):
        raise ValueError(f"{fn}: shift must be [B, C] = {(B, C)}, got {tuple(shift.shape)}")
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"{fn}: state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    if value_residual and (v_first is None or tuple(v_first.shape) != (B, H * N)):
        got = None if v_first is None else tuple(v_first.shape)
        raise ValueError(f"{fn}: value residual needs v_first [B, A] = {(B, H * N)}, got {got}")
    if mask is not None and tuple(mask.shape) != (B,):
        raise ValueError(f"{fn}: mask must be [B] = ({B},), got {tuple(mask.shape)}")
    return B, C, H, N


def _check(x, shift, state, v_first, wt: TimeMixWeights, mask, self_state_query=False) -> Tuple[int, int, int, int]:
    """Validate a time-mix step's inputs; returns (B, C, H, N)."""
    fn = "time_mix_one_token"
    B, C, H, N = _check_token(fn, x, shift, state, v_first, mask, wt.value_residual, wt.r_k)
    if self_state_query and C % N:
        raise ValueError(f"{fn}: the self-state query reads blocks of N = {N} channels; C = {C} is not a multiple")
    A = H * N
    expected = {
        "mix": (len(MIX_ROWS), C),
        "W_r": (A, C),
        "W_k": (A, C),
        "W_v": (A, C),
        "W_o": (C, A),
        "w0": (A,),
        "a0": (A,),
        "k_k": (A,),
        "k_a": (A,),
        "ln_w": (A,),
        "ln_b": (A,),
    }
    pairs = [("w1", "w2", A), ("a1", "a2", A), ("g1", "g2", A)] + ([("v1", "v2", A)] if wt.value_residual else [])
    _check_weights(fn, wt, C, expected, pairs)
    return B, C, H, N


def _state_heads_reference(r, k, v, log_w, alpha, value_gate, v_first, state, wt, mask, extra_query=None):
    """The state heads from r, k, v, log w, alpha (and the value gate) [B, A]: value residual, key normalisation,
    a and b, padding, the WKV step and the read-out. Returns (y [B, A], new state, v_first), and the raw
    read-out S q [B, H, N] of ``extra_query`` [B, H, N] when given."""
    B = r.shape[0]
    H, N = wt.r_k.shape
    if value_gate is not None:
        v = v + (v_first - v) * value_gate
    else:
        v_first = v
    kk = F.normalize((k * wt.k_k).view(B, H, N), dim=-1, eps=1e-12).view(B, H * N)
    k = k * ((1 - wt.k_a) + alpha * wt.k_a)
    a, b = -kk, kk * alpha
    if mask is not None:
        m = mask.to(r.dtype).unsqueeze(-1)
        log_w, k, v, b = log_w * m, k * m, v * m, b * m
    heads = (B, H, N)
    y, new_state, *extra = wkv7_step(
        *(t.reshape(heads) for t in (r, log_w, k, v, a, b)), state, extra_query=extra_query, impl="torch"
    )
    y = group_norm_bonus_reference(y, r.view(heads), k.view(heads), v.view(heads), wt.r_k, wt.ln_w, wt.ln_b, wt.eps)
    return (y.reshape(B, H * N), new_state, v_first, *extra)


def _kernel_chosen(fn: str, impl: str, x, weights, inputs: tuple, same_dtype: tuple = ()) -> bool:
    """True to run the C kernel, False for the reference; raises for impl="cpu" where the kernel cannot serve
    (autograd needed by any of ``inputs`` or the weights; ``same_dtype`` tensors not of x's dtype and device;
    not :func:`one_token_kernel_fits`)."""
    if impl not in TIME_MIX_IMPLS:
        raise ValueError(f"{fn}: impl must be one of {TIME_MIX_IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, *weights[:-1])
    )  # (short-circuits in decoding, which runs without grad)
    fits = not needs_grad and all(t.dtype == x.dtype and t.device == x.device for t in same_dtype)
    fits = fits and one_token_kernel_fits(x, weights)
    if impl == "cpu" and not fits:
        raise ValueError(
            f"{fn}: impl='cpu' needs float32/float64 CPU tensors of one dtype, contiguous weights, no autograd and "
            "the C kernel (see wuneng.fused.cpu.fused_kernel_error())"
        )
    return fits


def time_mix_one_token_reference(x, shift, state, v_first, weights: TimeMixWeights, mask=None, self_state_query=False):
    """The tensor-op form (differentiable, any dtype and device); arguments as :func:`time_mix_one_token`."""
    wt = weights
    B, C, H, N = _check(x, shift, state, v_first, wt, mask, self_state_query)
    if mask is not None:
        x = x * mask.to(x.dtype).unsqueeze(-1)
    xx = shift.to(x.dtype) - x
    x_r, x_w, x_k, x_v, x_a, x_g = (x + xx * mu for mu in wt.mix)
    r, k, v = x_r @ wt.W_r.t(), x_k @ wt.W_k.t(), x_v @ wt.W_v.t()
    log_w = -_DECAY_SCALE * torch.sigmoid(wt.w0 + torch.tanh(x_w @ wt.w1) @ wt.w2)
    alpha = torch.sigmoid(wt.a0 + x_a @ wt.a1 @ wt.a2)
    value_gate = torch.sigmoid(wt.v0 + x_v @ wt.v1 @ wt.v2) if wt.value_residual else None
    query = None
    if self_state_query:  # head h: the unit-norm block h mod (C / N) of x_k
        blocks = F.normalize(x_k.view(B, C // N, N), dim=-1, eps=1e-12)
        query = blocks[:, torch.arange(H, device=x.device) % (C // N)]
    y, new_state, v_first, *readout = _state_heads_reference(
        r, k, v, log_w, alpha, value_gate, v_first, state, wt, mask, query
    )
    out = (y * (torch.sigmoid(x_g @ wt.g1) @ wt.g2)) @ wt.W_o.t()
    return (out, x, new_state, v_first, *readout)


def one_token_kernel_fits(x: torch.Tensor, weights) -> bool:
    """Whether ``impl="cpu"`` can serve x and these weights: float32/float64 CPU tensors of one dtype,
    contiguous weights, and the C library built (autograd aside)."""
    wt = weights
    if x.device.type != "cpu" or x.dtype not in _SUFFIX or x.numel() == 0:
        return False
    tensors = [t for t in wt[:-1] if t is not None]
    if any(t.dtype != x.dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return _library() is not None


#: A hybrid decoding step takes the hybrid state kernel while the batch is at most FUSED_MAX_BATCH and (weight
#: parameters in the call) x batch x torch threads is at most FUSED_WORK_LIMIT. Chosen when the kernels were
#: single-threaded, from `python benchmarks/one_token.py` on the 2-core development machine (single-threaded TimeMix
#: kernel, fused / tensor time; benchmarks/README.md): 0.36-0.91 up to B 16 at C 384 and 1024 with 1 and 2 threads,
#: 0.98-1.64 at B 64. The hybrid kernel now splits its work across torch's threads as the time-mix kernel does. One
#: check since, at Qwen2.5-0.5B shapes (0.66 M kernel parameters per layer: the work limit does not bind up to B 16;
#: 6 layers, 2 threads, 256-token prompt, whole decoding step, kernel / tensor path, one run on a lightly loaded
#: 2-core machine): 0.99 at B 1, 0.95 at B 8, 0.96 at B 16, 1.04 at B 32, which FUSED_MAX_BATCH = 16 matches.
FUSED_MAX_BATCH = 16
FUSED_WORK_LIMIT = 1 << 27

#: The time-mix kernel splits its work across torch's threads (one OpenMP region), so only the batch decides: a
#: time-mix decoding step takes the kernel while the batch is at most TIME_MIX_MAX_BATCH. Chosen from
#: `python benchmarks/decode_step.py --grid` (whole-model step, fused / tensor, RWKV-7 at 20M, 0.1B and 0.4B, 1 thread,
#: a loaded 2-core machine): 0.77-0.96 at B 1-8 at every size, 1.05-1.17 at B 16, 0.99-1.37 at B 32.
TIME_MIX_MAX_BATCH = 8


def one_token_kernel_preferred(weights, batch: int) -> bool:
    """Whether a decoding step of ``batch`` sequences should take a fused kernel (``weights``:
    :class:`TimeMixWeights`: batch <= TIME_MIX_MAX_BATCH; :class:`HybridStateWeights`: see FUSED_WORK_LIMIT)
    rather than tensor ops."""
    if isinstance(weights, TimeMixWeights):
        return time_mix_kernel_preferred(batch)
    params = sum(t.numel() for t in weights[:-1] if t is not None)
    return kernel_preferred_for(params, batch)


def time_mix_kernel_preferred(batch: int) -> bool:
    """Whether a time-mix decoding step of ``batch`` sequences should take the (multi-threaded) fused kernel."""
    return batch <= TIME_MIX_MAX_BATCH


def kernel_preferred_for(params: int, batch: int) -> bool:
    """Whether the hybrid state kernel reading ``params`` weight parameters should serve a decoding step of
    ``batch`` sequences (see FUSED_WORK_LIMIT)."""
    return batch <= FUSED_MAX_BATCH and params * batch * torch.get_num_threads() <= FUSED_WORK_LIMIT


def time_mix_one_token(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    v_first: Optional[torch.Tensor],
    weights: TimeMixWeights,
    mask: Optional[torch.Tensor] = None,
    *,
    self_state_query: bool = False,
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
        self_state_query: also read the new state with Meta-State's self-state query (head h: the unit-norm block
            h mod (C / N) of x_k; C must be a multiple of N) and return that raw read-out S q [B, H, N].
        impl: "auto" (the C kernel for float32/float64 CPU tensors without autograd, else the reference),
            "cpu" or "reference".

    Returns:
        (out [B, C], new shift [B, C], new state [B, H, N, N], v_first [B, A][, read-out [B, H, N]]).
    """
    if shift is None:
        shift = torch.zeros_like(x)
    if not _kernel_chosen("time_mix_one_token", impl, x, weights, (x, shift, state, v_first)):
        return time_mix_one_token_reference(x, shift, state, v_first, weights, mask, self_state_query)
    B, C, H, N = _check(x, shift, state, v_first, weights, mask, self_state_query)
    return time_mix_one_token_planned(x, shift, state, v_first, time_mix_plan(weights), mask, self_state_query)


#: TimeMixArgs: the per-call fields, then the weights in TimeMixWeights order, then the outputs
_TIME_MIX_CALL_FIELDS = (
    "B C H N Dw Da Dv Dg value_residual sse_blocks threads eps x mask shift state v_first".split(),
    "work out shift_out state_out v_first_out readout_out".split(),
)
assert TimeMixArgs.order == (*_TIME_MIX_CALL_FIELDS[0], *TimeMixWeights._fields[:-1], *_TIME_MIX_CALL_FIELDS[1]), (
    "TimeMixArgs and TimeMixWeights disagree on the order of the weight fields"
)


class TimeMixPlan(NamedTuple):
    """A time-mix's weights prepared for repeated kernel calls (:func:`time_mix_plan`): checked once, their sizes
    and data pointers read once. Valid while the weights keep their storage (a layer keeps its plan in a
    :func:`~wuneng.layers.low_rank.derived_weight`, rebuilt when a weight changes)."""

    weights: TimeMixWeights  # as the kernel reads them (bfloat16 kernel: the vectors as float32 copies)
    dtype: torch.dtype  # of the weights and of the layer's input and output
    compute_dtype: torch.dtype  # of the kernel's activations and state (float32 for bfloat16 weights)
    suffix: str  # the kernel's name suffix: f32, f64, bf16
    C: int
    H: int
    N: int
    ranks: Tuple[int, int, int, int]  # D_w, D_a, D_v (0 without value residual), D_g
    params: int  # weight parameters read per token (what one_token_kernel_preferred counts)
    pointers: dict  # weight field name -> data pointer (0: NULL), in TimeMixWeights order


#: the weight matrices of a time-mix: what the bfloat16 kernel reads as bfloat16 (the rest: float32 copies)
_MATRICES = ("W_r", "W_k", "W_v", "W_o", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def time_mix_plan(weights: TimeMixWeights) -> Optional[TimeMixPlan]:
    """The plan of ``weights`` for :func:`time_mix_one_token_planned`, or None where the kernel cannot serve them
    (not CPU tensors, not contiguous, no C library; float32/float64 weights all of one dtype, or bfloat16 weight
    matrices, whose vectors are then copied to float32 for the bfloat16 kernel). Raises ValueError for weights of
    inconsistent shapes."""
    wt = weights
    tensors = [t for t in wt[:-1] if t is not None]
    dtype, compute = wt.W_r.dtype, wt.W_r.dtype
    if dtype == torch.bfloat16:
        matrices = [getattr(wt, n) for n in _MATRICES if getattr(wt, n) is not None]
        if any(t.dtype != dtype or not t.is_contiguous() for t in matrices) or _library() is None:
            return None
        if any(t.device.type != "cpu" or not t.is_floating_point() for t in tensors):
            return None
        compute = torch.float32
        wt = wt._replace(
            **{
                n: t.to(compute).contiguous()
                for n, t in wt._asdict().items()
                if n not in _MATRICES and n != "eps" and t is not None
            }
        )
    elif not one_token_kernel_fits(wt.mix, wt):
        return None
    H, N = wt.r_k.shape
    C = wt.mix.shape[1]
    expected = {
        "mix": (len(MIX_ROWS), C),
        **{name: (H * N, C) for name in ("W_r", "W_k", "W_v")},
        "W_o": (C, H * N),
        **{name: (H * N,) for name in ("w0", "a0", "k_k", "k_a", "ln_w", "ln_b")},
    }
    pairs = [("w1", "w2", H * N), ("a1", "a2", H * N), ("g1", "g2", H * N)]
    _check_weights("time_mix_one_token", wt, C, expected, pairs + ([("v1", "v2", H * N)] if wt.value_residual else []))
    ranks = (wt.w1.shape[1], wt.a1.shape[1], wt.v1.shape[1] if wt.value_residual else 0, wt.g1.shape[1])
    pointers = {name: _ptr(t) for name, t in zip(wt._fields[:-1], wt[:-1])}
    suffix = "bf16" if dtype == torch.bfloat16 else _SUFFIX[dtype]
    return TimeMixPlan(wt, dtype, compute, suffix, C, H, N, ranks, sum(t.numel() for t in tensors), pointers)


def time_mix_one_token_planned(
    x: torch.Tensor,
    shift: torch.Tensor,
    state: Optional[torch.Tensor],
    v_first: Optional[torch.Tensor],
    plan: TimeMixPlan,
    mask: Optional[torch.Tensor] = None,
    self_state_query: bool = False,
):
    """:func:`time_mix_one_token` through the C kernel with weights already prepared (:func:`time_mix_plan`), for
    callers that have checked the shapes (a layer's decoding step): x [B, C] of the plan's dtype on the CPU,
    shift [B, C], state [B, H, N, N] or None, v_first [B, A] with value residual, mask [B] or None; no autograd.
    The kernel splits its work across ``torch.get_num_threads()`` threads. Returns as :func:`time_mix_one_token`;
    with bfloat16 weights the kernel computes in float32 and returns out, shift and v_first in bfloat16, the state
    in float32 (the dtypes of the layer's tensor path)."""
    wt = plan.weights
    B, C, H, N = x.shape[0], plan.C, plan.H, plan.N
    A = H * N
    dw, da, dv, dg = plan.ranks
    dt = plan.compute_dtype
    x, shift = x.to(dt).contiguous(), shift.to(dt).contiguous()
    state = None if state is None else state.to(dt).contiguous()
    v_in = v_first.to(dt).contiguous() if wt.value_residual else None
    m = None if mask is None else mask.to(dt).contiguous()
    out, shift_out = x.new_empty(B, C), x.new_empty(B, C)
    state_out = x.new_empty(B, H, N, N)
    v_out = None if wt.value_residual else x.new_empty(B, A)
    readout = x.new_empty(B, H, N) if self_state_query else None
    work = x.new_empty(7 * B * C + 11 * B * A + B * (dw + da + dv + dg) + 2 * B * H)
    fn = getattr(_library(), f"time_mix_one_token_{plan.suffix}")
    # the struct's bytes in one pack: the fields in TimeMixArgs order, the weights' pointers from the plan (their
    # place in that order is checked at import, _TIME_MIX_CALL_FIELDS; kernel_args would check every name per call)
    args = TimeMixArgs.packer.pack(
        B, C, H, N, dw, da, dv, dg, int(wt.value_residual), C // N if self_state_query else 0,
        torch.get_num_threads(), float(wt.eps),
        _ptr(x), _ptr(m), _ptr(shift), _ptr(state), _ptr(v_in),
        *plan.pointers.values(),
        _ptr(work), _ptr(out), _ptr(shift_out), _ptr(state_out), _ptr(v_out), _ptr(readout),
    )  # fmt: skip
    fn(args)
    if plan.dtype != dt:  # bfloat16 weights: the layer's tensors in its dtype, the state in float32
        out, shift_out = out.to(plan.dtype), shift_out.to(plan.dtype)
        v_out = None if v_out is None else v_out.to(plan.dtype)
        readout = None if readout is None else readout.to(plan.dtype)
    result = (out, shift_out, state_out, v_first if wt.value_residual else v_out)
    return result + ((readout,) if self_state_query else ())


# -- the state side of a WuNeng hybrid mixer ---------------------------------------------------------------


class HybridStateWeights(NamedTuple):
    """The state-side weights of a WuNeng hybrid mixer (C the width, H query heads of size N, A = H N).

    mix [2 or 3, C]: the token-shift mixes of the decay, in-context rate (and value-residual) LoRAs, in that
    order; w0/w1/w2, a0/a1/a2, v0/v1/v2 (None without value residual) as :class:`TimeMixWeights`; R1 [C, D_r],
    R2 [D_r, A] the receptance correction; G1 [C, D_g], G2 [D_g, A], gate_bias [A] the fusion gate (None when
    the fusion is not ``gate``); P1 [C, D_m], P2 [D_m, W_m] the middle-head mix (None without middle heads);
    k_k, k_a [A]; r_k [H, N]; ln_w, ln_b [A]; eps the GroupNorm epsilon."""

    mix: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: Optional[torch.Tensor]
    v1: Optional[torch.Tensor]
    v2: Optional[torch.Tensor]
    R1: torch.Tensor
    R2: torch.Tensor
    G1: Optional[torch.Tensor]
    G2: Optional[torch.Tensor]
    gate_bias: Optional[torch.Tensor]
    P1: Optional[torch.Tensor]
    P2: Optional[torch.Tensor]
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float

    @property
    def value_residual(self) -> bool:
        return self.v1 is not None


def _check_hybrid(u, shift, state, v_first, q, k, v, wt: HybridStateWeights, mask) -> Tuple[int, int, int, int, int]:
    """Validate a hybrid state step's inputs; returns (B, C, H, H_kv, N)."""
    fn = "hybrid_state_one_token"
    B, C, H, N = _check_token(fn, u, shift, state, v_first, mask, wt.value_residual, wt.r_k)
    A = H * N
    if tuple(q.shape) != (B, A):
        raise ValueError(f"{fn}: q must be [B, A] = {(B, A)}, got {tuple(q.shape)}")
    H_kv = k.shape[1] // N if k.dim() == 2 else 0
    if k.dim() != 2 or k.shape[0] != B or k.shape[1] != H_kv * N or H_kv == 0 or H % H_kv or k.shape != v.shape:
        raise ValueError(
            f"{fn}: k, v must be [B, H_kv N] with H_kv dividing H = {H} (N = {N}), got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    rows = 3 if wt.value_residual else 2
    expected = {"mix": (rows, C), "w0": (A,), "a0": (A,), "k_k": (A,), "k_a": (A,), "ln_w": (A,), "ln_b": (A,)}
    pairs = [("w1", "w2", A), ("a1", "a2", A), ("R1", "R2", A)]
    pairs += [("v1", "v2", A)] if wt.value_residual else []
    pairs += [("G1", "G2", A)] if wt.G1 is not None else []
    pairs += [("P1", "P2", None)] if wt.P1 is not None else []
    _check_weights(fn, wt, C, expected, pairs)
    if wt.G1 is not None and (wt.gate_bias is None or tuple(wt.gate_bias.shape) != (A,)):
        raise ValueError(f"{fn}: the gate needs gate_bias [A] = ({A},)")
    return B, C, H, H_kv, N


def hybrid_state_one_token_reference(u, shift, state, v_first, q, k, v, weights: HybridStateWeights, mask=None):
    """The tensor-op form of :func:`hybrid_state_one_token` (differentiable, any dtype and device)."""
    wt = weights
    B, C, H, H_kv, N = _check_hybrid(u, shift, state, v_first, q, k, v, wt, mask)
    x = u if mask is None else u * mask.to(u.dtype).unsqueeze(-1)
    xx = shift.to(u.dtype) - x
    x_w, x_a, *x_v = (x + xx * mu for mu in wt.mix)
    r = q + u @ wt.R1 @ wt.R2
    k = k.view(B, H_kv, 1, N).expand(B, H_kv, H // H_kv, N).reshape(B, H * N)
    v = v.view(B, H_kv, 1, N).expand(B, H_kv, H // H_kv, N).reshape(B, H * N)
    log_w = -_DECAY_SCALE * torch.sigmoid(wt.w0 + torch.tanh(x_w @ wt.w1) @ wt.w2)
    alpha = torch.sigmoid(wt.a0 + x_a @ wt.a1 @ wt.a2)
    value_gate = torch.sigmoid(wt.v0 + x_v[0] @ wt.v1 @ wt.v2) if wt.value_residual else None
    y, new_state, v_first = _state_heads_reference(r, k, v, log_w, alpha, value_gate, v_first, state, wt, mask)
    gamma = None if wt.G1 is None else torch.sigmoid(u @ wt.G1 @ wt.G2 + wt.gate_bias)
    middle = None if wt.P1 is None else torch.sigmoid(u @ wt.P1 @ wt.P2)
    return y, x, new_state, v_first, gamma, middle


def hybrid_state_one_token(
    u: torch.Tensor,
    shift: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    v_first: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: HybridStateWeights,
    mask: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
):
    """The state side of a WuNeng hybrid mixer (SPEC section 3) for one token::

        x = u mask;  x_q = x + (shift - x) mix_q            (q = w, a(, v))
        r = q + u R1 R2;   k_s, v_s = k, v repeated over the H / H_kv query heads of each kv head
        y = the RWKV-7 state heads on (r, k_s, v_s), as :func:`time_mix_one_token` computes them from r, k, v
        gamma = sigmoid(u G1 G2 + gate_bias);   middle = sigmoid(u P1 P2)

    Args:
        u: [B, C] the mixer input; shift [B, C] the previous (masked) input or None (zeros);
        state: [B, H, N, N] or None (zeros), not modified; v_first: [B, A] (value residual) or None;
        q: [B, A] the teacher's query projection (before RoPE); k, v: [B, H_kv N] its key/value projections;
        weights: :class:`HybridStateWeights`; mask: [B] (1 = token, 0 = padding) or None;
        impl: "auto" | "cpu" | "reference", as :func:`time_mix_one_token`.

    Returns:
        (y [B, A] the state heads' output after the read-out, new shift [B, C], new state [B, H, N, N],
        v_first [B, A], gamma [B, A] or None, middle [B, W_m] or None).
    """
    if shift is None:
        shift = torch.zeros_like(u)
    if not _kernel_chosen("hybrid_state_one_token", impl, u, weights, (u, shift, state, v_first, q, k, v), (q, k, v)):
        return hybrid_state_one_token_reference(u, shift, state, v_first, q, k, v, weights, mask)
    B, C, H, H_kv, N = _check_hybrid(u, shift, state, v_first, q, k, v, weights, mask)
    return hybrid_state_one_token_planned(u, shift, state, v_first, q, k, v, hybrid_state_plan(weights), mask)


class HybridStatePlan(NamedTuple):
    """A hybrid mixer's state-side weights prepared for repeated kernel calls (:func:`hybrid_state_plan`): checked
    once, their sizes and data pointers read once. Valid while the weights keep their storage (the layer keeps its
    plan in a :func:`~wuneng.layers.low_rank.derived_weight`, rebuilt when a weight changes)."""

    weights: HybridStateWeights
    suffix: str  # the kernel's name suffix: f32, f64
    C: int
    H: int
    N: int
    ranks: Tuple[int, int, int, int, int, int]  # D_w, D_a, D_v, D_r, D_g, D_m (0 where absent)
    width_m: int  # W_m, the middle-head width (0 without middle heads)
    params: int  # weight parameters read per token (what one_token_kernel_preferred counts)
    pointers: tuple  # the weights' data pointers (0: NULL), in HybridStateWeights order


def hybrid_state_plan(weights: HybridStateWeights) -> Optional[HybridStatePlan]:
    """The plan of ``weights`` for :func:`hybrid_state_one_token_planned`, or None where the kernel cannot serve them
    (:func:`one_token_kernel_fits`). Raises ValueError for weights of inconsistent shapes."""
    wt = weights
    if not one_token_kernel_fits(wt.k_k, wt):  # k_k: a weight of the weights' dtype and device
        return None
    H, N = wt.r_k.shape
    C = wt.mix.shape[1]
    one = wt.mix.new_zeros(1, C)  # a one-row token: _check_hybrid then checks the weights alone
    kv = wt.mix.new_zeros(1, N)
    vf = wt.mix.new_zeros(1, H * N) if wt.value_residual else None
    _check_hybrid(one, one, None, vf, wt.mix.new_zeros(1, H * N), kv, kv, wt, None)
    rank = lambda t: 0 if t is None else t.shape[1]  # noqa: E731
    ranks = (rank(wt.w1), rank(wt.a1), rank(wt.v1), rank(wt.R1), rank(wt.G1), rank(wt.P1))
    width_m = 0 if wt.P2 is None else wt.P2.shape[1]
    params = sum(t.numel() for t in wt[:-1] if t is not None)
    pointers = tuple(_ptr(t) for t in wt[:-1])
    return HybridStatePlan(wt, _SUFFIX[wt.k_k.dtype], C, H, N, ranks, width_m, params, pointers)


#: HybridStateArgs: the per-call fields, then the weights in HybridStateWeights order, then the outputs
_HYBRID_CALL_FIELDS = (
    "B C H Hkv N Dw Da Dv Dr Dg Dm Wm value_residual threads eps u mask shift state v_first q k v".split(),
    "work y_out shift_out state_out v_first_out gamma_out middle_out".split(),
)
assert HybridStateArgs.order == (
    *_HYBRID_CALL_FIELDS[0],
    *HybridStateWeights._fields[:-1],
    *_HYBRID_CALL_FIELDS[1],
), "HybridStateArgs and HybridStateWeights disagree on the order of the weight fields"


def hybrid_state_one_token_planned(
    u: torch.Tensor,
    shift: torch.Tensor,
    state: Optional[torch.Tensor],
    v_first: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridStatePlan,
    mask: Optional[torch.Tensor] = None,
):
    """:func:`hybrid_state_one_token` through the C kernel with weights already prepared (:func:`hybrid_state_plan`),
    for callers that have checked the shapes (a layer's decoding step): u [B, C] of the plan's dtype on the CPU,
    shift [B, C], state [B, H, N, N] or None, v_first [B, A] with value residual, q [B, A], k, v [B, H_kv N] of u's
    dtype, mask [B] or None; no autograd. The kernel splits its work across ``torch.get_num_threads()`` threads.
    Returns as :func:`hybrid_state_one_token`."""
    wt = plan.weights
    B, C, H, N = u.shape[0], plan.C, plan.H, plan.N
    A, H_kv = H * N, k.shape[1] // N
    dw, da, dv, dr, dg, dm = plan.ranks
    dt = u.dtype
    u, q, k, v = (t.contiguous() for t in (u, q, k, v))
    shift = shift.to(dt).contiguous()
    state = None if state is None else state.to(dt).contiguous()
    v_in = v_first.to(dt).contiguous() if wt.value_residual else None
    m = None if mask is None else mask.to(dt).contiguous()
    y, shift_out, state_out = u.new_empty(B, A), u.new_empty(B, C), u.new_empty(B, H, N, N)
    v_out = None if wt.value_residual else u.new_empty(B, A)
    gamma = None if wt.G1 is None else u.new_empty(B, A)
    middle = None if wt.P1 is None else u.new_empty(B, plan.width_m)
    work = u.new_empty(4 * B * C + 8 * B * A + B * (dw + da + dv + dr + dg + dm) + 2 * B * H)
    fn = getattr(_library(), f"hybrid_state_one_token_{plan.suffix}")
    # the struct's bytes in one pack: the fields in HybridStateArgs order (checked at import, _HYBRID_CALL_FIELDS)
    args = HybridStateArgs.packer.pack(
        B, C, H, H_kv, N, dw, da, dv, dr, dg, dm, plan.width_m, int(wt.value_residual), torch.get_num_threads(),
        float(wt.eps),
        _ptr(u), _ptr(m), _ptr(shift), _ptr(state), _ptr(v_in), _ptr(q), _ptr(k), _ptr(v),
        *plan.pointers,
        _ptr(work), _ptr(y), _ptr(shift_out), _ptr(state_out), _ptr(v_out), _ptr(gamma), _ptr(middle),
    )  # fmt: skip
    fn(args)
    return y, shift_out, state_out, (v_first if wt.value_residual else v_out), gamma, middle
