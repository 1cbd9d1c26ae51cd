"""WKV-7 on the CPU through a small C kernel: the sequential recurrence, one state row at a time.

The chunked form (:mod:`.chunk`) turns the recurrence into batched matmuls, which is what GPUs want; on a
CPU the plain recurrence is cheaper when it runs as compiled code: per head and token it is 4 N^2 fused
multiply-adds on a state of N^2 floats that stays in the L1 cache (16 KB at N = 64), with nothing else
materialised. Python cannot run it fast; ``csrc/wkv7_cpu.c`` does, for float32 and float64.

- Forward: writes y (and the extra read-out), the final state and, when a backward will follow, the
  state at the start of every chunk of ``L`` tokens (``CHECKPOINT_LEN``): T / L states per head instead of
  the chunked form's dozens of [L, L] / [L, N] intermediates.
- Backward: from the last chunk to the first, recompute the chunk's states from its checkpoint (one
  state row at a time: rows evolve independently) and run the row backward through the chunk.
- Head size 64 has its own code (``wkv64_forward`` / ``wkv64_backward`` in ``csrc/wkv7_cpu_impl.h``): the row
  length is a compile-time constant, so a row is a few 64-byte vectors held in registers; the forward makes one
  pass over the state per token (the next token's ``S a`` is accumulated with the update) and the backward runs
  value-major, one pass per token with two horizontal sums per row. Other head sizes take the generic loops.
- Threads: heads are split across ``torch.get_num_threads()`` Python threads (a pool created on first use,
  per process); ctypes releases the GIL for the duration of a C call, so they run in parallel.

Build and load: :class:`~wuneng.ops.c_library.CLibrary` (cache folder, lock, ownership checks, ABI and key
check; tests in ``tests/ops/test_kernel_build.py``) builds ``csrc/wkv7_cpu.c`` into ``wkv7_cpu_<key>.so``.
When it is unavailable (no compiler, build failed, refused, ``WUNENG_CPU_KERNEL=0``) one warning says why;
:func:`cpu_kernel_available` is False, ``wkv7(impl="auto")`` and the other dispatchers take their PyTorch paths,
and ``impl="cpu"`` raises with the reason (:func:`cpu_kernel_error`).

- Fork: the thread pool and the lock are replaced in a forked child (``os.register_at_fork``), so a
  DataLoader worker or a ``multiprocessing`` fork child can call every kernel.
- torch.compile: the sequence kernels are torch custom ops, ``torch.ops.wuneng.wkv7_cpu_forward`` and
  ``wkv7_cpu_backward`` (fake implementations give their output shapes; the op boundary checks devices,
  dtypes and contiguity), so :func:`wkv7_cpu` compiles into one graph (tested with ``fullgraph=True``,
  values and gradients equal to eager) and passes ``torch.library.opcheck``.

Tested against :func:`~wuneng.ops.wkv7.naive.wkv7_reference` in float64, values and gradients.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..c_library import DTYPE_SUFFIX, CLibrary, data_ptr
from ._checks import SEQ_NAMES, check_wkv7_inputs, state_dtype
from .varlen import run_per_document

logger = logging.getLogger(__name__)

#: tokens between two stored states (the backward recomputes at most this many steps per row)
CHECKPOINT_LEN = 16
#: must equal WUNENG_KERNEL_ABI in csrc/wkv7_cpu.c (bumped whenever a function's arguments change)
KERNEL_ABI = 3

_CSRC = Path(__file__).with_name("csrc")
_SUFFIX = DTYPE_SUFFIX
_ptr = data_ptr
_lock = threading.Lock()


def _configure(lib) -> None:
    """The ctypes signatures of the library's functions (positional; their order is csrc's)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"wkv7_forward_{suffix}")
        fwd.argtypes = [i64] * 6 + [ptr] * 13
        fwd.restype = None
        bwd = getattr(lib, f"wkv7_backward_{suffix}")
        bwd.argtypes = [i64] * 6 + [ptr] * 20
        bwd.restype = None
        one = getattr(lib, f"wkv7_one_token_{suffix}")
        one.argtypes = [i64] * 3 + [ptr] * 11
        one.restype = None
        ro_f = getattr(lib, f"readout_forward_{suffix}")
        ro_f.argtypes = [i64] * 4 + [ptr] * 7 + [ctypes.c_double] + [ptr] * 2
        ro_f.restype = None
        ro_b = getattr(lib, f"readout_backward_{suffix}")
        ro_b.argtypes = [i64] * 4 + [ptr] * 15
        ro_b.restype = None


#: the operators' C library: WKV-7 forward/backward/one token and the read-out
LIBRARY = CLibrary(
    "wkv7_cpu",
    _CSRC / "wkv7_cpu.c",
    [_CSRC / name for name in ("wkv7_cpu.c", "wkv7_cpu_impl.h", "readout_impl.h")],
    abi=KERNEL_ABI,
    logger=logger,
    fallback="the WKV-7 and read-out ops take their slower PyTorch paths",
    configure=_configure,
)
#: the loaded library or None (``_library.cache_clear()`` forgets it)
_library = LIBRARY.load


@torch.compiler.assume_constant_result  # torch.compile: evaluated once, not traced (it takes a lock, loads a library)
def cpu_kernel_available() -> bool:
    """True when the C kernel is built (or builds now) and loads."""
    return _library() is not None


def cpu_kernel_error() -> Optional[str]:
    """Why :func:`cpu_kernel_available` is False (None when it is True or was not tried yet)."""
    _library()
    return LIBRARY.error


_thread_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads that run ranges of heads (created on first use; a forked child makes its own)."""
    global _thread_pool
    if _thread_pool is None:
        with _lock:
            if _thread_pool is None:
                workers = max(1, os.cpu_count() or 1)
                _thread_pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wkv7")
    return _thread_pool


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: the parent's pool threads are gone (work queued to them would
    wait forever) and a lock held by another parent thread would never be released. Start both afresh."""
    global _thread_pool, _lock
    _thread_pool = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Below this many multiply-adds per call the kernel runs on the calling thread: handing work to a pool
# costs tens of microseconds, more than a decoding step's whole recurrence.
_MIN_PARALLEL_WORK = 1 << 22


def _split(n_items: int, work_per_item: int) -> list:
    """[i0, i1, ..., n_items]: ranges for torch's intra-op thread count, one range when the call is small."""
    n = max(1, min(torch.get_num_threads(), n_items))
    if n_items * work_per_item < _MIN_PARALLEL_WORK:
        n = 1
    return [n_items * i // n for i in range(n + 1)]


def _run_ranges(fn, bounds: list, args_of) -> None:
    """``fn(bounds[i], bounds[i + 1], *args_of(i))`` for every range, on the pool when there are several."""
    if len(bounds) == 2:
        fn(bounds[0], bounds[1], *args_of(0))
        return
    futures = [_pool().submit(fn, bounds[i], bounds[i + 1], *args_of(i)) for i in range(len(bounds) - 1)]
    for f in futures:
        f.result()


def _over_heads(fn, n_heads: int, work_per_head: int, args: tuple, work_row: int, like: torch.Tensor) -> None:
    """Run ``fn(bh0, bh1, *args, work)`` over ranges of the ``n_heads`` heads, split across torch's intra-op
    thread count when the call is large enough; each range gets its own ``work_row`` scratch reals."""
    bounds = _split(n_heads, work_per_head)
    work = like.new_empty(len(bounds) - 1, work_row)
    _run_ranges(fn, bounds, lambda i: args + (work[i].data_ptr(),))


def wkv7_cpu_forward(r, w, k, v, a, b, S0=None, q=None, checkpoint_len: Optional[int] = None):
    """The forward kernel on contiguous [B, T, H, N] tensors of one dtype (float32/float64), w = exp(log_w).

    Returns (y, final state [B, H, N, N], y2 or None, checkpoints or None); checkpoints (the key-major
    chunk-start states the backward needs) are stored when ``checkpoint_len`` is given."""
    B, T, H, N = r.shape
    y = torch.empty_like(r)
    y2 = torch.empty_like(r) if q is not None else None
    S = r.new_empty(B, H, N, N)
    L = checkpoint_len or T
    ckpt = r.new_empty(B * H, -(-T // L), N, N) if checkpoint_len else None
    fn = getattr(_library(), f"wkv7_forward_{_SUFFIX[r.dtype]}")
    args = (T, H, N, L) + tuple(_ptr(t) for t in (r, w, k, v, a, b, q, S0, y, y2, S, ckpt))
    _over_heads(fn, B * H, T * N * N, args, N * N + 3 * N, r)
    return y, S, y2, ckpt


def wkv7_cpu_one_token(r, w, k, v, a, b, S0=None, q=None):
    """One token by the kernel, in the state's own layout (decoding; no autograd): contiguous [B, H, N] inputs
    of one dtype (float32/float64), w = exp(log_w), S0 [B, H, N, N] or None. Returns (y, new state, y2 or None);
    S0 is not modified."""
    B, H, N = r.shape
    y = torch.empty_like(r)
    y2 = torch.empty_like(r) if q is not None else None
    S = r.new_empty(B, H, N, N)
    fn = getattr(_library(), f"wkv7_one_token_{_SUFFIX[r.dtype]}")
    fn(0, B * H, N, *(_ptr(t) for t in (r, w, k, v, a, b, q, S0, y, y2, S)))
    return y, S, y2


def _check_op_inputs(op: str, tensors: dict) -> None:
    """The boundary of the custom ops: contiguous CPU tensors, all float32 or all float64 (None: absent)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SUFFIX:
        raise TypeError(
            f"{op}: needs tensors all float32 or all float64, got { ({n: t.dtype for n, t in present.items()}) }"
        )
    for name, t in present.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous CPU tensor (device {t.device}, strides {t.stride()})")


# The kernels as torch custom ops (torch.library): opaque to torch.compile, with the shapes of their results
# given by fake implementations, and one boundary that checks devices, dtypes and contiguity. Absent outputs
# (no extra query, no checkpoints, no initial state) are returned as empty tensors. Eager calls from
# ``wkv7_cpu`` (whose inputs are prepared to fit) skip the dispatcher and the boundary check
# (``_op_or_impl``): their cost, ~150 us per forward+backward, was 17% of one at T = 64.
def _forward_impl(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    S0: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    checkpoint_len: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, final state, y2 or empty, checkpoints or empty); checkpoint_len 0: no checkpoints."""
    y, S, y2, ckpt = wkv7_cpu_forward(r, w, k, v, a, b, S0, q, checkpoint_len or None)
    return y, S, r.new_empty(0) if y2 is None else y2, r.new_empty(0) if ckpt is None else ckpt


def _forward_checked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    S0: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    checkpoint_len: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_inputs("wuneng::wkv7_cpu_forward", dict(r=r, w=w, k=k, v=v, a=a, b=b, S0=S0, q=q))
    return _forward_impl(r, w, k, v, a, b, S0, q, checkpoint_len)


_forward_op = torch.library.custom_op("wuneng::wkv7_cpu_forward", _forward_checked, mutates_args=(), device_types="cpu")


@_forward_op.register_fake
def _forward_fake(r, w, k, v, a, b, S0, q, checkpoint_len):
    B, T, H, N = r.shape
    y2 = torch.empty_like(r) if q is not None else r.new_empty(0)
    ckpt = r.new_empty(B * H, -(-T // checkpoint_len), N, N) if checkpoint_len else r.new_empty(0)
    return torch.empty_like(r), r.new_empty(B, H, N, N), y2, ckpt


def _backward_impl(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    q: Optional[torch.Tensor],
    ckpt: torch.Tensor,
    dy: torch.Tensor,
    dy2: Optional[torch.Tensor],
    dS: Optional[torch.Tensor],
    checkpoint_len: int,
) -> Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Gradients (dr, dw (to w itself), dk, dv, da, db, dS0, dq or empty) from the forward's checkpoints."""
    B, T, H, N = r.shape
    L = checkpoint_len
    dr, dw, dk, dv, da, db = (torch.empty_like(r) for _ in range(6))
    dq = torch.empty_like(r) if q is not None else None
    dS0 = r.new_empty(B, H, N, N)
    fn = getattr(_library(), f"wkv7_backward_{_SUFFIX[r.dtype]}")
    args = (T, H, N, L) + tuple(
        _ptr(t) for t in (r, w, k, v, a, b, q, ckpt, dy, dy2, dS, dr, dw, dk, dv, da, db, dq, dS0)
    )
    _over_heads(fn, B * H, 3 * T * N * N, args, (L + 2) * N * N + (L + 2) * N, r)
    return dr, dw, dk, dv, da, db, dS0, r.new_empty(0) if dq is None else dq


def _backward_checked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    q: Optional[torch.Tensor],
    ckpt: torch.Tensor,
    dy: torch.Tensor,
    dy2: Optional[torch.Tensor],
    dS: Optional[torch.Tensor],
    checkpoint_len: int,
) -> Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    tensors = dict(r=r, w=w, k=k, v=v, a=a, b=b, q=q, ckpt=ckpt, dy=dy, dy2=dy2, dS=dS)
    _check_op_inputs("wuneng::wkv7_cpu_backward", tensors)
    return _backward_impl(r, w, k, v, a, b, q, ckpt, dy, dy2, dS, checkpoint_len)


_backward_op = torch.library.custom_op(
    "wuneng::wkv7_cpu_backward", _backward_checked, mutates_args=(), device_types="cpu"
)


@_backward_op.register_fake
def _backward_fake(r, w, k, v, a, b, q, ckpt, dy, dy2, dS, checkpoint_len):
    B, T, H, N = r.shape
    grads = [torch.empty_like(r) for _ in range(6)]
    return (*grads, r.new_empty(B, H, N, N), torch.empty_like(r) if q is not None else r.new_empty(0))


def _op_or_impl(op, impl):
    """The custom op while torch.compile traces, the plain function in eager mode (same computation)."""
    return op if torch.compiler.is_compiling() else impl


class _CpuWKV7(torch.autograd.Function):
    """Inputs r, log_w, k, v, a, b (, q): contiguous [B, T, H, N] in the state dtype; S0 contiguous
    [B, H, N, N] or None. Returns (y, final state, y2 or an empty tensor). Forward and backward are the custom
    ops ``wuneng::wkv7_cpu_forward`` / ``wuneng::wkv7_cpu_backward``."""

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, S0, q, L):
        w = torch.exp(log_w)
        needs_grad = any(ctx.needs_input_grad[:8])
        y, S, y2, ckpt = _op_or_impl(_forward_op, _forward_impl)(r, w, k, v, a, b, S0, q, L if needs_grad else 0)
        if needs_grad:
            ctx.save_for_backward(r, w, k, v, a, b, q, ckpt)
            ctx.L = L
            ctx.has_s0 = S0 is not None
        if q is None:
            ctx.mark_non_differentiable(y2)
        return y, S, y2

    @staticmethod
    def backward(ctx, dy, dS, dy2):
        r, w, k, v, a, b, q, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dS = None if dS is None else dS.contiguous()
        if q is not None:
            dy2 = torch.zeros_like(r) if dy2 is None else dy2.contiguous()
        else:
            dy2 = None
        backward = _op_or_impl(_backward_op, _backward_impl)
        dr, dw, dk, dv, da, db, dS0, dq = backward(r, w, k, v, a, b, q, ckpt, dy, dy2, dS, ctx.L)
        dlog_w = dw.mul_(w)  # d/dlog_w = d/dw * w
        return dr, dlog_w, dk, dv, da, db, (dS0 if ctx.has_s0 else None), (dq if q is not None else None), None


def wkv7_cpu(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    *,
    extra_query: Optional[torch.Tensor] = None,
    checkpoint_len: int = CHECKPOINT_LEN,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """WKV-7 over a sequence by the C kernel (CPU tensors).

    Args:
        r, log_w, k, v, a, b: [B, T, H, N] on the CPU; ``log_w`` is the log decay (<= 0). Any T.
        initial_state: [B, H, N, N] (S[i, j]: value i, key j) or None (zeros).
        extra_query: optional [B, T, H, N]; a second read-out ``S_t q_t`` of the same new state.
        checkpoint_len: tokens between the states stored for the backward.
        cu_seqlens: optional int32/int64 [n_docs + 1] document offsets of a packed row (B = 1, fla's
            convention): the state restarts at every boundary; initial_state and final_state are then
            [n_docs, H, N, N], one per document (one kernel call per document, :mod:`.varlen`).

    Returns:
        ``(y, final_state)`` or ``(y, final_state, y_extra)``; y in r's dtype, final_state float32
        (float64 for float64 inputs). Computed in the state dtype (float32 for half/bfloat16 inputs).
    """
    if cu_seqlens is not None:
        seq = (r, log_w, k, v, a, b)
        return run_per_document(
            wkv7_cpu, seq, initial_state, cu_seqlens, extra_query, checkpoint_len=checkpoint_len, batch_documents=True
        )
    check_wkv7_inputs(dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b))), initial_state, extra_query)
    if r.device.type != "cpu":
        raise ValueError(f"wkv7: impl='cpu' runs on CPU tensors, got device {r.device}")
    if not isinstance(checkpoint_len, int) or isinstance(checkpoint_len, bool) or checkpoint_len < 1:
        raise ValueError(f"wkv7_cpu: checkpoint_len must be a positive int, got {checkpoint_len!r}")
    if not cpu_kernel_available():
        raise RuntimeError(
            f"wkv7: impl='cpu' needs the C kernel, which is unavailable ({LIBRARY.error}); use impl='chunked'"
        )
    B, T, H, N = r.shape
    sdt = state_dtype(r.dtype)
    S0 = None if initial_state is None else initial_state.to(sdt).contiguous()
    if T == 0:
        S = r.new_zeros(B, H, N, N, dtype=sdt) if S0 is None else S0.clone()
        y = r.new_zeros(B, 0, H, N)
        return (y, S) if extra_query is None else (y, S, y.clone())
    ins = [t.to(sdt).contiguous() for t in (r, log_w, k, v, a, b)]
    q = None if extra_query is None else extra_query.to(sdt).contiguous()
    y, S, y2 = _CpuWKV7.apply(*ins, S0, q, min(checkpoint_len, T))
    if extra_query is None:
        return y.to(r.dtype), S
    return y.to(r.dtype), S, y2.to(r.dtype)
