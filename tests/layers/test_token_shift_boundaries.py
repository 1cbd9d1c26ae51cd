"""The document-aware token shift (``token_shift_documents``): in a packed row, each document's first token
shifts in ``prev`` (zeros when None), never the previous document's last token. Compared with
:func:`token_shift` run on each document separately (float64; the operation is exact, so values and gradients
are compared with ``torch.equal`` / within 1e-15)."""

import pytest
import torch

from wuneng.layers.rwkv7 import token_shift, token_shift_documents

from _helpers import rel_err

LENGTHS = (1, 7, 0, 4, 9)  # a length-1 document and an empty one included
C = 5


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    x = torch.randn(1, T, C, generator=g, dtype=torch.float64)
    prev = torch.randn(len(LENGTHS), C, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return x, prev, cu


def _one_by_one(x, prev, cu):
    offsets = cu.tolist()
    outs = []
    for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        if hi > lo:
            outs.append(token_shift(x[:, lo:hi], None if prev is None else prev[i : i + 1]))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("with_prev", [False, True], ids=["zeros", "prev"])
def test_cu_seqlens_equals_documents_one_by_one(with_prev):
    x, prev, cu = _packed()
    prev = prev if with_prev else None
    x1 = x.clone().requires_grad_()
    p1 = None if prev is None else prev.clone().requires_grad_()
    out = token_shift_documents(x1, p1, cu_seqlens=cu)
    x2 = x.clone().requires_grad_()
    p2 = None if prev is None else prev.clone().requires_grad_()
    ref = _one_by_one(x2, p2, cu)
    assert torch.equal(out, ref)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert rel_err(x1.grad, x2.grad) <= 1e-15
    if with_prev:
        assert rel_err(p1.grad, p2.grad) <= 1e-15
    # and it differs from the plain shift exactly at the starts of documents after the first
    plain = token_shift(x)
    differs = (out != plain).any(-1)[0].nonzero().flatten().tolist()
    starts = sorted({lo for lo, hi in zip(cu.tolist(), cu.tolist()[1:]) if hi > lo})
    assert differs == (starts if with_prev else starts[1:])


def test_doc_start_mask_equals_cu_seqlens():
    x, _, cu = _packed()
    doc_start = torch.zeros(1, x.shape[1], dtype=torch.bool)
    doc_start[0, cu[:-1].long().clamp(max=x.shape[1] - 1)] = True
    assert torch.equal(token_shift_documents(x, doc_start=doc_start), token_shift_documents(x, cu_seqlens=cu))


def test_doc_start_rows_with_prev():
    """Two rows [B = 2]: row 0 continues a document (prev used at t = 0), row 1 starts one at t = 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, C, generator=g, dtype=torch.float64)
    prev = torch.randn(2, C, generator=g, dtype=torch.float64)
    doc_start = torch.zeros(2, 6, dtype=torch.bool)
    doc_start[0, 3] = True
    doc_start[1, 0] = doc_start[1, 4] = True
    out = token_shift_documents(x, prev, doc_start=doc_start)
    expected0 = torch.cat([token_shift(x[:1, :3], prev[:1]), token_shift(x[:1, 3:])], dim=1)
    expected1 = torch.cat([token_shift(x[1:, :4]), token_shift(x[1:, 4:])], dim=1)
    assert torch.equal(out, torch.cat([expected0, expected1], dim=0))


def test_bad_arguments_get_one_clear_error():
    x, prev, cu = _packed()
    with pytest.raises(ValueError, match="exactly one of cu_seqlens and doc_start"):
        token_shift_documents(x)
    with pytest.raises(ValueError, match="doc_start must be a bool"):
        token_shift_documents(x, doc_start=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        token_shift_documents(x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"prev must be \[n_docs, C\]"):
        token_shift_documents(x, prev[:2], cu_seqlens=cu)
