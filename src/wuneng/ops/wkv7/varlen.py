"""Packed rows of several documents (``cu_seqlens``): the recurrent state restarts at every boundary.

fla's convention (``chunk_rwkv7(..., cu_seqlens=...)``): the documents are concatenated along T in a batch of
one row, ``cu_seqlens`` [n_docs + 1] holds the cumulative offsets ``[0, l_1, l_1 + l_2, ..., T]``, the initial
state is [n_docs, H, N, N] (one per document, zeros when None) and the returned final state is
[n_docs, H, N, N], each document's state after its last token.

:func:`run_per_document` is the simplest correct method: it runs a form on each document's slice and
concatenates the outputs. Gradients flow through the slices (autograd of ``cat``/indexing). It costs one form
call per document. When the documents are of similar lengths (``n_docs * longest <= _MAX_PADDING * T``) the
forms that batch well (chunked, cpu: ``batch_documents=True``) instead run once on a batch of the documents,
each padded at its end to the longest with tokens that leave the state unchanged (w = 1 and r, k, v, a, b, q
= 0, the chunked form's own padding), so the final state of each row is the document's.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import SEQ_NAMES, check_wkv7_inputs, document_offsets, state_dtype

#: batch the documents (padded to the longest) when that computes at most this many times the T tokens
_MAX_PADDING = 2.0


def run_per_document(
    form: Callable,
    seq: tuple,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    extra_query: Optional[torch.Tensor],
    *,
    batch_documents: bool = False,
    **form_kwargs,
):
    """``form(r, log_w, k, v, a, b, state, extra_query=..., **form_kwargs)`` on each document of a packed row.

    Args:
        form: a WKV-7 form without ``cu_seqlens`` (reference, chunked, cpu).
        seq: (r, log_w, k, v, a, b), each [1, T, H, N].
        initial_state: [n_docs, H, N, N] or None (zeros for every document).
        cu_seqlens: int32/int64 [n_docs + 1], see the module docstring.
        extra_query: optional [1, T, H, N].
        batch_documents: run one call on the padded batch of documents when the padding is small (see the
            module docstring), else one call per document.

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
    lengths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    longest = max(lengths)
    if batch_documents and n_docs > 1 and 0 < n_docs * longest <= _MAX_PADDING * T:
        return _run_padded(form, seq, initial_state, offsets, longest, extra_query, form_kwargs)
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


def _run_padded(form, seq, initial_state, offsets, longest, extra_query, form_kwargs):
    """One ``form`` call on the documents as a batch [n_docs, longest, H, N], each padded at its end with
    state-preserving tokens (log w = 0, every other input 0); the outputs are gathered back into the row.

    Token t of document d goes to row ``d * longest + (t - start_d)`` of the flattened batch (``index_copy``,
    whose backward is a gather; ``index_select`` back, whose backward is a scatter of distinct rows)."""
    r = seq[0]
    T, H, N = r.shape[1:]
    n_docs = len(offsets) - 1
    lengths = torch.tensor([hi - lo for lo, hi in zip(offsets, offsets[1:])])
    doc_of_token = torch.repeat_interleave(torch.arange(n_docs), lengths)
    starts = torch.tensor(offsets[:-1])
    rows = (doc_of_token * longest + torch.arange(T) - starts[doc_of_token]).to(r.device)

    def padded(x):  # [1, T, H, N] -> [n_docs, longest, H, N], zeros past each document's end
        return x.new_zeros(n_docs * longest, H, N).index_copy(0, rows, x[0]).view(n_docs, longest, H, N)

    def unpadded(y):
        return y.reshape(n_docs * longest, H, N).index_select(0, rows).unsqueeze(0)

    ins = [padded(x) for x in seq]
    q = None if extra_query is None else padded(extra_query)
    out = form(*ins, initial_state, extra_query=q, **form_kwargs)
    y, S = unpadded(out[0]), out[1].to(state_dtype(r.dtype))
    return (y, S) if extra_query is None else (y, S, unpadded(out[2]))
