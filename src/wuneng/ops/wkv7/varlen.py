"""Packed rows of several documents (``cu_seqlens``): the recurrent state restarts at every boundary.

fla's convention (``chunk_rwkv7(..., cu_seqlens=...)``): the documents are concatenated along T in a batch of
one row, ``cu_seqlens`` [n_docs + 1] holds the cumulative offsets ``[0, l_1, l_1 + l_2, ..., T]``, the initial
state is [n_docs, H, N, N] (one per document, zeros when None) and the returned final state is
[n_docs, H, N, N], each document's state after its last token.

:func:`run_per_document` is the simplest correct method: it runs a form on each document's slice and
concatenates the outputs. Gradients flow through the slices (autograd of ``cat``/indexing). It costs one form
call per document; a masked in-chunk restart would be faster for many short documents.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, document_offsets, state_dtype


def run_per_document(
    form: Callable,
    seq: tuple,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    extra_query: Optional[torch.Tensor],
    **form_kwargs,
):
    """``form(r, log_w, k, v, a, b, state, extra_query=..., **form_kwargs)`` on each document of a packed row.

    Args:
        form: a WKV-7 form without ``cu_seqlens`` (reference, chunked, cpu).
        seq: (r, log_w, k, v, a, b), each [1, T, H, N].
        initial_state: [n_docs, H, N, N] or None (zeros for every document).
        cu_seqlens: int32/int64 [n_docs + 1], see the module docstring.
        extra_query: optional [1, T, H, N].

    Returns:
        ``(y, final_states)`` or ``(y, final_states, y_extra)``; y [1, T, H, N], final_states [n_docs, H, N, N]
        in the state dtype.
    """
    r = seq[0]
    check_wkv7_inputs(dict(zip(SEQ_NAMES, seq)), None, extra_query)
    B, T, H, N = r.shape
    offsets = document_offsets(cu_seqlens, B, T)
    n_docs = len(offsets) - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (n_docs, H, N, N):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(
                f"wkv7: with cu_seqlens, initial_state must have shape [n_docs, H, N, N] = {(n_docs, H, N, N)} "
                f"(one state per document), got {got}"
            )
    ys, ys_extra, states = [], [], []
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        state = None if initial_state is None else initial_state[i : i + 1]
        q = None if extra_query is None else extra_query[:, start:end]
        out = form(*(x[:, start:end] for x in seq), state, extra_query=q, **form_kwargs)
        ys.append(out[0])
        states.append(out[1].to(state_dtype(r.dtype)))
        if extra_query is not None:
            ys_extra.append(out[2])
    y = torch.cat(ys, dim=1)
    S = torch.cat(states, dim=0)
    return (y, S) if extra_query is None else (y, S, torch.cat(ys_extra, dim=1))
