"""Packed rows with document boundaries (``cu_seqlens``, fla's convention): every WKV-7 form restarts the state
at each boundary, so a packed row equals its documents run one by one.

The oracle runs each document separately through :func:`wkv7_reference` in float64 (separate calls, no
``cu_seqlens``). Documents have unequal lengths: 1, 7 (not a multiple of the chunk of 4), 0 (an empty document),
4 and 9. Values, final states and the gradients of r, log_w, k, v, a, b, the extra query and the per-document
initial states are compared as relative errors ||x - ref|| / ||ref|| with the threshold in each assert.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wuneng.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference
from wuneng.ops.wkv7.cpu import cpu_kernel_available, wkv7_cpu

from _helpers import rel_err

LOG_W_MIN = -0.6065306597126334
LENGTHS = (1, 7, 0, 4, 9)
H, N = 2, 4
NAMES = ("r", "log_w", "k", "v", "a", "b")


def packed_inputs(lengths=LENGTHS, seed=0):
    """RWKV-7-shaped float64 inputs [1, T, H, N] for documents of ``lengths`` packed into one row, the
    per-document initial states [n_docs, H, N, N], an extra query, and cu_seqlens (int32)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kk = F.normalize(randn(1, T, H, N), dim=-1)
    alpha = torch.rand(1, T, H, N, generator=g, dtype=torch.float64)
    seq = {
        "r": randn(1, T, H, N) * 0.5,
        "log_w": LOG_W_MIN * torch.sigmoid(randn(1, T, H, N)),
        "k": randn(1, T, H, N) * 0.5,
        "v": randn(1, T, H, N),
        "a": -kk,
        "b": kk * alpha,
    }
    s0 = randn(len(lengths), H, N, N) * 0.3
    q = randn(1, T, H, N) * 0.5
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seq, s0, q, cu


def one_by_one(seq, s0, q, cu):
    """The oracle: each document through wkv7_reference on its own. Returns (y, states, y2)."""
    offsets = cu.tolist()
    ys, states, ys2 = [], [], []
    for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        y, s, y2 = wkv7_reference(*(seq[n][:, lo:hi] for n in NAMES), s0[i : i + 1], extra_query=q[:, lo:hi])
        ys.append(y)
        states.append(s)
        ys2.append(y2)
    return torch.cat(ys, 1), torch.cat(states, 0), torch.cat(ys2, 1)


def _leaves(seq, s0, q, dtype):
    """Fresh leaf copies in ``dtype`` (the log decay too: float32 is what the layers pass, SPEC section 1)."""

    def leaf(t):
        return t.detach().to(dtype).clone().requires_grad_()

    return {n: leaf(t) for n, t in seq.items()}, leaf(s0), leaf(q)


def _loss(y, s, y2, seed=1):
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(s.shape, generator=g, dtype=torch.float64)
    w2 = torch.randn(y2.shape, generator=g, dtype=torch.float64)
    return (y.double() * wy).sum() + (s.double() * ws).sum() + (y2.double() * w2).sum()


def _forms():
    forms = {
        "reference": lambda *a, **kw: wkv7_reference(*a, **kw),
        "chunked": lambda *a, **kw: wkv7_chunked(*a, chunk_size=4, **kw),
        "dispatch-chunked": lambda *a, **kw: wkv7(*a, impl="chunked", chunk_size=4, **kw),
        "dispatch-auto": lambda *a, **kw: wkv7(*a, impl="auto", chunk_size=4, **kw),
    }
    if cpu_kernel_available():
        forms["cpu"] = lambda *a, **kw: wkv7_cpu(*a, checkpoint_len=3, **kw)
        forms["dispatch-cpu"] = lambda *a, **kw: wkv7(*a, impl="cpu", **kw)
    return forms


FORMS = _forms()


def _compare(form, dtype, tol_value, tol_grad):
    seq, s0, q, cu = packed_inputs()
    ref_leaves, ref_s0, ref_q = _leaves(seq, s0, q, torch.float64)
    y_ref, s_ref, y2_ref = one_by_one(ref_leaves, ref_s0, ref_q, cu)
    _loss(y_ref, s_ref, y2_ref).backward()

    leaves, s0_, q_ = _leaves(seq, s0, q, dtype)
    y, s, y2 = form(*(leaves[n] for n in NAMES), s0_, extra_query=q_, cu_seqlens=cu)
    assert y.shape == y_ref.shape and s.shape == (len(LENGTHS), H, N, N)
    assert rel_err(y, y_ref) <= tol_value, rel_err(y, y_ref)
    assert rel_err(s, s_ref) <= tol_value, rel_err(s, s_ref)
    assert rel_err(y2, y2_ref) <= tol_value, rel_err(y2, y2_ref)
    _loss(y, s, y2).backward()
    for name in NAMES:
        err = rel_err(leaves[name].grad, ref_leaves[name].grad)
        assert err <= tol_grad, (name, err)
    assert rel_err(s0_.grad, ref_s0.grad) <= tol_grad, rel_err(s0_.grad, ref_s0.grad)
    assert rel_err(q_.grad, ref_q.grad) <= tol_grad, rel_err(q_.grad, ref_q.grad)


@pytest.fixture(params=["per-document", "padded-batch"])
def grouping(request, monkeypatch):
    """The chunked and cpu forms run one call per document, or one call on the padded batch of documents
    (``varlen._MAX_PADDING``: 0 never batches, inf always does); the reference always runs per document."""
    from wuneng.ops.wkv7 import varlen

    monkeypatch.setattr(varlen, "_MAX_PADDING", 0.0 if request.param == "per-document" else float("inf"))
    return request.param


@pytest.mark.parametrize("form", sorted(FORMS), ids=str)
def test_packed_row_equals_documents_one_by_one_float64(form, grouping):
    """float64: values, states and gradients within 1e-10 of the oracle."""
    _compare(FORMS[form], torch.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("form", [f for f in sorted(FORMS) if f != "reference"], ids=str)
def test_packed_row_float32_against_float64_oracle(form, grouping):
    """float32 inputs: values and states within 1e-5, gradients within 1e-4 of the float64 oracle."""
    _compare(FORMS[form], torch.float32, 1e-5, 1e-4)


def test_similar_lengths_take_one_padded_call(monkeypatch):
    """With the default padding limit, documents of similar lengths are one call of the form (not one per
    document); a long document beside short ones makes the padding too costly: one call per document."""
    from wuneng.ops.wkv7 import chunk

    calls = []
    original = chunk._ChunkedWKV7.apply

    def counting(*args):
        calls.append(args[0].shape[0])  # the batch of the call
        return original(*args)

    monkeypatch.setattr(chunk._ChunkedWKV7, "apply", counting)
    seq, _, _, _ = packed_inputs(lengths=(5, 6, 4))
    wkv7_chunked(*(seq[n] for n in NAMES), cu_seqlens=torch.tensor([0, 5, 11, 15]), chunk_size=4)
    assert calls == [3]
    calls.clear()
    seq, _, _, _ = packed_inputs(lengths=(20, 1, 2))
    wkv7_chunked(*(seq[n] for n in NAMES), cu_seqlens=torch.tensor([0, 20, 21, 23]), chunk_size=4)
    assert calls == [1, 1, 1]


def test_boundary_restarts_the_state():
    """Without cu_seqlens the second document would see the first one's state: the outputs differ there."""
    seq, _, _, _ = packed_inputs(lengths=(5, 6), seed=3)
    cu = torch.tensor([0, 5, 11])
    y_packed, s_packed = wkv7_reference(*(seq[n] for n in NAMES), cu_seqlens=cu)
    y_flow, s_flow = wkv7_reference(*(seq[n] for n in NAMES))
    assert torch.equal(y_packed[:, :5], y_flow[:, :5])
    assert rel_err(y_packed[:, 5:], y_flow[:, 5:]) > 1e-2
    y2, s2 = wkv7_reference(*(seq[n][:, 5:] for n in NAMES))  # zeros state for the second document
    assert torch.equal(y_packed[:, 5:], y2) and torch.equal(s_packed[1:], s2)


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([1, 5, 11]), "start at 0"),
        (torch.tensor([0, 6, 5, 11]), "never decrease"),
        (torch.tensor([0, 5, 10]), "end at T = 11"),
        (torch.tensor([0.0, 11.0]), "int32/int64"),
        (torch.tensor([11]), "int32/int64"),
    ],
)
def test_bad_cu_seqlens_gets_one_clear_error(cu, match):
    seq, _, _, _ = packed_inputs(lengths=(5, 6))
    for form in (wkv7_reference, wkv7_chunked, wkv7):
        with pytest.raises(ValueError, match="cu_seqlens must be") as info:
            form(*(seq[n] for n in NAMES), cu_seqlens=cu)
        assert match in str(info.value)


def test_cu_seqlens_needs_batch_one_and_a_state_per_document():
    seq, s0, _, _ = packed_inputs(lengths=(5, 6))
    two_rows = {n: t.expand(2, -1, -1, -1) for n, t in seq.items()}
    with pytest.raises(ValueError, match="B = 1"):
        wkv7_reference(*(two_rows[n] for n in NAMES), cu_seqlens=torch.tensor([0, 5, 11]))
    with pytest.raises(ValueError, match=r"\[n_docs, H, N, N\] = \(3, 2, 4, 4\)"):
        wkv7_chunked(*(seq[n] for n in NAMES), s0, cu_seqlens=torch.tensor([0, 5, 5, 11]))


def test_fla_receives_cu_seqlens(monkeypatch):
    """The fla path passes cu_seqlens (int64, r's device) and the per-document states in fla's [K, V] layout; the
    per-document final states come back in this package's layout. fla's function is a stand-in (CPU)."""
    from wuneng.ops.wkv7 import dispatch

    seen = {}

    def fake_chunk_rwkv7(**kwargs):
        seen.update(kwargs)
        cu_ = kwargs["cu_seqlens"]
        n_docs = kwargs["r"].shape[0] if cu_ is None else cu_.numel() - 1
        _, _, H_, N_ = kwargs["r"].shape
        final = torch.arange(n_docs * H_ * N_ * N_, dtype=torch.float32).view(n_docs, H_, N_, N_)
        return torch.zeros_like(kwargs["r"]), final

    monkeypatch.setattr(dispatch, "_fla_chunk_rwkv7", lambda: fake_chunk_rwkv7)
    seq, s0, _, cu = packed_inputs()
    low = {n: t.float() for n, t in seq.items()}
    y, s = dispatch._call_fla(*(low[n] for n in NAMES), s0.float(), cu)
    assert seen["cu_seqlens"].dtype == torch.int64 and seen["cu_seqlens"].tolist() == cu.tolist()
    assert torch.equal(seen["initial_state"], s0.float().transpose(-1, -2))
    n_docs = len(LENGTHS)
    expected = torch.arange(n_docs * H * N * N, dtype=torch.float32).view(n_docs, H, N, N).transpose(-1, -2)
    assert torch.equal(s, expected)
    dispatch._call_fla(*(low[n] for n in NAMES), None)  # no boundaries: fla gets cu_seqlens=None
    assert seen["cu_seqlens"] is None
    # the dispatcher validates the packed inputs before the device check
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        wkv7(*(low[n] for n in NAMES), impl="fla", cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[n_docs, H, N, N\]"):
        wkv7(*(low[n] for n in NAMES), s0[:2].float(), impl="fla", cu_seqlens=cu)
