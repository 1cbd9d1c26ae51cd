"""Chunked WKV-7 (placeholder: delegates to the reference until the parallel form lands)."""

from __future__ import annotations

from .naive import wkv7_reference


def wkv7_chunked(r, log_w, k, v, a, b, initial_state=None, *, extra_query=None, chunk_size: int = 32):
    return wkv7_reference(r, log_w, k, v, a, b, initial_state, extra_query=extra_query)
