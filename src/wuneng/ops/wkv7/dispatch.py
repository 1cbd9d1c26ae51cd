"""``wkv7(..., impl="auto")``: one entry point over the forms of the WKV-7 operator.

impl:
    "auto"      CUDA tensors, no ``extra_query``, float16/bfloat16/float32 inputs and
                flash-linear-attention importable -> fla's Triton ``chunk_rwkv7``; CPU tensors with the C
                kernel built (:func:`~wuneng.ops.wkv7.cpu.cpu_kernel_available`) -> "cpu"; otherwise "chunked".
    "cpu"       :func:`wkv7_cpu`, the sequential recurrence compiled from C (CPU tensors only).
    "chunked"   :func:`wkv7_chunked` (any device, pure PyTorch).
    "reference" :func:`wkv7_reference` (token-by-token loop; the oracle).
    "fla"       fla's ``chunk_rwkv7``; raises if fla (or CUDA) is unavailable or ``extra_query`` is given.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, document_offsets
from .chunk import DEFAULT_CHUNK_SIZE, wkv7_chunked
from .cpu import cpu_kernel_available, wkv7_cpu
from .naive import wkv7_reference

IMPLS = ("auto", "cpu", "chunked", "reference", "fla")
_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _fla_chunk_rwkv7():
    """fla's ``chunk_rwkv7``, or None when flash-linear-attention / triton cannot be imported."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:  # ImportError, or triton failing at import time on a machine without a driver
        return None
    return chunk_rwkv7


def fla_available() -> bool:
    """True when fla's Triton WKV-7 kernel can be imported (it still needs CUDA tensors to run)."""
    return _fla_chunk_rwkv7() is not None


def wkv7_fla(
    r,
    log_w,
    k,
    v,
    a,
    b,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """WKV-7 through fla's ``chunk_rwkv7`` (CUDA only), in this package's conventions.

    fla takes the log decay as ``w``, keeps the state transposed ([B, H, K, V], key index first) and
    scales the query by K^-1/2 unless ``scale=1.0``. The log decay reaches fla in float32 whatever the
    input dtype (SPEC section 1: the decay stays float32; a bfloat16 log decay keeps 3 significant digits).
    Returns ``(y, final_state)`` with the final state [B, H, N, N] float32 in the S[i, j] = (value i,
    key j) layout. ``cu_seqlens`` (int32/int64 [n_docs + 1], B = 1) goes to fla as int64 on r's device; the
    initial and final states are then [n_docs, H, N, N], one per document.
    """
    if r.device.type != "cuda":
        raise ValueError(f"wkv7: impl='fla' runs on CUDA tensors only, got device {r.device}")
    return _call_fla(r, log_w, k, v, a, b, initial_state, cu_seqlens)


def _call_fla(r, log_w, k, v, a, b, initial_state, cu_seqlens=None):
    """:func:`wkv7_fla` past its device check: the argument conversions and the call (tested on CPU with
    a stand-in for fla's function)."""
    if r.dtype not in _FLA_DTYPES:
        raise TypeError(f"wkv7: impl='fla' supports {_FLA_DTYPES}, got {r.dtype}; use impl='chunked'")
    chunk_rwkv7 = _fla_chunk_rwkv7()
    if chunk_rwkv7 is None:
        raise RuntimeError(
            "wkv7: impl='fla' needs flash-linear-attention and triton (pip install 'wuneng[gpu]'); import failed"
        )
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(torch.float32).transpose(-1, -2).contiguous()
    y, final_kv = chunk_rwkv7(
        r=r,
        w=log_w.to(torch.float32),
        k=k,
        v=v,
        a=a,
        b=b,
        scale=1.0,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device=r.device, dtype=torch.int64),
    )
    return y, final_kv.to(torch.float32).transpose(-1, -2)


def _check_packed_state(seq: dict, initial_state: Optional[torch.Tensor], cu_seqlens: torch.Tensor) -> None:
    """The inputs of a packed fla call: sequences [1, T, H, N], valid offsets, a state per document."""
    check_wkv7_inputs(seq, None, None)
    _, T, H, N = seq["r"].shape
    n_docs = len(document_offsets(cu_seqlens, seq["r"].shape[0], T)) - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_docs, H, N, N):
        raise ValueError(
            f"wkv7: with cu_seqlens, initial_state must have shape [n_docs, H, N, N] = {(n_docs, H, N, N)} "
            f"(one state per document), got {tuple(initial_state.shape)}"
        )


def _auto_uses_fla(r: torch.Tensor, extra_query: Optional[torch.Tensor]) -> bool:
    return extra_query is None and r.device.type == "cuda" and r.dtype in _FLA_DTYPES and fla_available()


def wkv7(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    *,
    extra_query: Optional[torch.Tensor] = None,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """WKV-7 over a sequence through the chosen form (SPEC section 1).

    Args:
        r, log_w, k, v, a, b: [B, T, H, N]; ``log_w`` is the log decay (<= 0).
        initial_state: [B, H, N, N] (S[i, j]: value i, key j) or None.
        extra_query: optional [B, T, H, N], a second read-out of the same state (not served by fla).
        impl: "auto", "cpu", "chunked", "reference" or "fla" (see the module docstring).
        chunk_size: chunk length of the chunked form.
        cu_seqlens: optional int32/int64 [n_docs + 1] document offsets of a packed row (B = 1, fla's
            convention): the state restarts at every boundary; initial_state and final_state are then
            [n_docs, H, N, N], one per document. Every form accepts it (fla natively).

    Returns:
        ``(y, final_state)`` or ``(y, final_state, y_extra)``; final_state float32 (float64 for float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"wkv7: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return wkv7_reference(r, log_w, k, v, a, b, initial_state, extra_query=extra_query, cu_seqlens=cu_seqlens)
    if impl == "fla" or (impl == "auto" and _auto_uses_fla(r, extra_query)):
        if extra_query is not None:
            raise ValueError("wkv7: impl='fla' has no extra_query read-out; use impl='chunked' or 'auto'")
        seq = dict(zip(SEQ_NAMES, (r, log_w, k, v, a, b)))
        if cu_seqlens is None:
            check_wkv7_inputs(seq, initial_state, None)
        else:
            _check_packed_state(seq, initial_state, cu_seqlens)
        return wkv7_fla(r, log_w, k, v, a, b, initial_state, cu_seqlens)
    if impl == "cpu" or (impl == "auto" and r.device.type == "cpu" and cpu_kernel_available()):
        return wkv7_cpu(r, log_w, k, v, a, b, initial_state, extra_query=extra_query, cu_seqlens=cu_seqlens)
    return wkv7_chunked(
        r, log_w, k, v, a, b, initial_state, extra_query=extra_query, chunk_size=chunk_size, cu_seqlens=cu_seqlens
    )
