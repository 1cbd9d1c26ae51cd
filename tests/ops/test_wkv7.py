"""WKV-7 operator: the chunked, one-step and dispatched forms against the float64 sequential oracle.

Inputs are built the way RWKV-7 builds them (SPEC section 2): a = -kk, b = kk * alpha with kk
L2-normalised per head, alpha in (0, 1), log w = -0.6065 * sigmoid(z) (w in [0.5452, 1)).
Every comparison is a relative error ||x - ref|| / ||ref|| with the threshold written in the assert.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wuneng.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step
from wuneng.ops.wkv7.chunk import effective_chunk_size
from wuneng.ops.wkv7.dispatch import fla_available

from _helpers import rel_err

LOG_W_MIN = -0.6065306597126334  # log of the smallest RWKV-7 decay, exp(-e^{-1/2})
NAMES = ("r", "log_w", "k", "v", "a", "b")


def make_inputs(B, T, H, N, *, seed=0, decay=(0.0, 1.0), dtype=torch.float64, state=True, extra=False):
    """RWKV-7-shaped inputs [B, T, H, N]; ``decay=(lo, hi)``: log w = LOG_W_MIN * u, u in (lo, hi)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r = randn(B, T, H, N) * 0.5
    k = randn(B, T, H, N) * 0.5
    v = randn(B, T, H, N)
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    lo, hi = decay
    u = lo + (hi - lo) * torch.sigmoid(randn(B, T, H, N))
    log_w = LOG_W_MIN * u
    seq = {"r": r, "log_w": log_w, "k": k, "v": v, "a": -kk, "b": kk * alpha}
    seq = {n: t.to(dtype) for n, t in seq.items()}
    s0 = (randn(B, H, N, N) * 0.3).to(dtype) if state else None
    q = (randn(B, T, H, N) * 0.5).to(dtype) if extra else None
    return seq, s0, q


def args_of(seq):
    return [seq[n] for n in NAMES]


# ----------------------------------------------------------------------------------------------
# forward accuracy


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("T", [1, 7, 37, 64], ids=lambda t: f"T{t}")
def test_chunked_forward_matches_float64_reference(T, chunk_size):
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(2, T, 2, 8, seed=T + chunk_size)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    # float64 chunked: the algebra is exact up to round-off
    y64, s64 = wkv7_chunked(*args_of(seq), s0, chunk_size=chunk_size)
    assert rel_err(y64, y_ref) <= 1e-12 and rel_err(s64, s_ref) <= 1e-12
    assert y64.dtype == torch.float64 and s64.dtype == torch.float64
    # float32 chunked against the float64 oracle
    y32, s32 = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float(), chunk_size=chunk_size)
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel_err(y32, y_ref) <= 1e-5, rel_err(y32, y_ref)
    assert rel_err(s32, s_ref) <= 1e-5, rel_err(s32, s_ref)


DECAYS = {"full-range": (0.0, 1.0), "w-to-1": (0.0, 1e-4), "w-to-0.5452": (0.9999, 1.0)}


@pytest.mark.parametrize("decay", list(DECAYS.values()), ids=list(DECAYS))
@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"chunk{c}")
def test_chunked_decay_extremes(decay, chunk_size):
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 256, 2, 16, seed=1, decay=decay)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float(), chunk_size=chunk_size)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) <= 1e-5, rel_err(y, y_ref)
    assert rel_err(s, s_ref) <= 1e-5, rel_err(s, s_ref)


@pytest.mark.parametrize("decay", ["w=0.5452", "w-to-1"])
@pytest.mark.parametrize("chunk_size", [16, 64, 128, 256], ids=lambda c: f"chunk{c}")
def test_chunked_outlier_channels_at_any_chunk_length(chunk_size, decay):
    """SPEC section 1: any chunk length is safe. r and k carry an outlier channel of +-400 (real query/key
    activations do), the extra query one of 300; decays at the lower bound (every log w = -0.6065, the largest
    in-chunk factors) or near 1. At chunk 128 the non-causal intra-chunk products overflowed float32 and the
    causal mask turned them into NaN (inf * 0). Float32 chunked against the float64 oracle: values <= 1e-5,
    gradients of every input <= 1e-4 (measured 2e-7 .. 3e-6)."""
    B, T, H, N = 1, 260, 2, 16  # T covers two chunks of 128 and a padded tail
    seq, s0, q = make_inputs(B, T, H, N, seed=21, extra=True)
    seq["log_w"] = torch.full_like(seq["log_w"], LOG_W_MIN if decay == "w=0.5452" else 1e-4 * LOG_W_MIN)
    g = torch.Generator().manual_seed(22)
    for name in ("r", "k"):
        seq[name][..., 3] = 400.0 * torch.randn(B, T, H, generator=g, dtype=torch.float64).sign()
    q[..., 5] = 300.0
    cot = [
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        torch.randn(B, H, N, N, generator=g, dtype=torch.float64),
    ]
    cot.append(torch.randn(B, T, H, N, generator=g, dtype=torch.float64))
    ref_grads, ref_out = _grads(wkv7_reference, seq, s0, q, cot)

    def chunked(*args, extra_query=None):
        return wkv7_chunked(*args, extra_query=extra_query, chunk_size=chunk_size)

    grads, out = _grads(chunked, {n: t.float() for n, t in seq.items()}, s0.float(), q.float(), cot)
    for name, o, o_ref in zip(("y", "final_state", "y_extra"), out, ref_out):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, o_ref) <= 1e-5, (name, rel_err(o, o_ref))
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], ref) <= 1e-4, (name, rel_err(grads[name], ref))


@pytest.mark.slow
@pytest.mark.parametrize("decay", list(DECAYS.values()), ids=list(DECAYS))
def test_chunked_long_sequence_T4096(decay):
    """Error must not grow along the sequence: T = 4096, float32 chunked vs float64 oracle."""
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 4096, 1, 16, seed=2, decay=decay)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float())
    assert rel_err(y, y_ref) <= 1e-5, rel_err(y, y_ref)
    assert rel_err(s, s_ref) <= 1e-5, rel_err(s, s_ref)
    # and the last 64 outputs on their own (not hidden by a large early norm)
    assert rel_err(y[:, -64:], y_ref[:, -64:]) <= 1e-5


@pytest.mark.slow
def test_chunked_T16k_stays_finite_and_accurate():
    """SPEC section 1: long sequences (T = 16k), float32 chunked vs float64 oracle."""
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 16384, 1, 8, seed=4)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float(), chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


def test_chunked_accepts_non_contiguous_inputs():
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(2, 20, 3, 4, seed=18)
    # [B, H, T, N] storage seen as [B, T, H, N]: every input is a non-contiguous view
    strided = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in seq.items()}
    assert not strided["r"].is_contiguous()
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*args_of(strided), s0.transpose(-1, -2).contiguous().transpose(-1, -2), chunk_size=8)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(s, s_ref) <= 1e-12


def test_chunked_strong_decay_outside_rwkv_range_shortens_chunk():
    """log w = -6 (outside RWKV-7's range): a 64-token chunk would overflow float32 exponents."""
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 100, 1, 8, seed=3)
    seq["log_w"] = seq["log_w"] * 10.0  # down to about -6
    assert effective_chunk_size(seq["log_w"].float(), 64, torch.float32) < 64
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float(), chunk_size=64)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


def test_effective_chunk_size_keeps_rwkv_decays_unchanged():
    log_w = torch.full((1, 10, 1, 4), LOG_W_MIN)
    assert effective_chunk_size(log_w, 128, torch.float32) == 128
    assert effective_chunk_size(log_w * 100, 64, torch.float32) == 1  # 60 per step: one token per chunk
    assert effective_chunk_size(log_w * 10, 64, torch.float64) == 64


def test_empty_sequence_returns_initial_state():
    seq, s0, q = make_inputs(2, 0, 2, 4, extra=True)
    y, s, y2 = wkv7_chunked(*args_of(seq), s0, extra_query=q)
    assert y.shape == (2, 0, 2, 4) and y2.shape == (2, 0, 2, 4)
    assert torch.equal(s, s0)


def test_zero_initial_state_equals_none():
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 20, 2, 4)
    y1, s1 = wkv7_chunked(*args_of(seq), None, chunk_size=8)
    y2, s2 = wkv7_chunked(*args_of(seq), torch.zeros_like(s0), chunk_size=8)
    assert rel_err(y1, y2) == 0.0 and rel_err(s1, s2) == 0.0


# ----------------------------------------------------------------------------------------------
# gradients


def _grads(fn, seq, s0, q, cotangents):
    """Gradients of <y, gy> + <S, gS> (+ <y2, gy2>) with respect to every input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in seq.items()}
    leaves["initial_state"] = s0.detach().clone().requires_grad_()
    if q is not None:
        leaves["extra_query"] = q.detach().clone().requires_grad_()
    out = fn(*[leaves[n] for n in NAMES], leaves["initial_state"], extra_query=leaves.get("extra_query"))
    loss = sum((o.to(torch.float64) * c).sum() for o, c in zip(out, cotangents))
    loss.backward()
    return {n: t.grad for n, t in leaves.items()}, out


@pytest.mark.parametrize("extra", [False, True], ids=["y", "y+extra"])
@pytest.mark.parametrize("chunk_size,T", [(4, 13), (8, 16), (16, 45)], ids=lambda x: str(x))
def test_chunked_gradients_match_reference(chunk_size, T, extra):
    torch.manual_seed(0)
    seq, s0, q = make_inputs(2, T, 2, 8, seed=5, extra=extra)
    g = torch.Generator().manual_seed(6)
    B, H, N = 2, 2, 8
    cot = [
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        torch.randn(B, H, N, N, generator=g, dtype=torch.float64),
    ]
    if extra:
        cot.append(torch.randn(B, T, H, N, generator=g, dtype=torch.float64))
    ref_grads, _ = _grads(wkv7_reference, seq, s0, q, cot)

    def chunked(*args, extra_query=None):
        return wkv7_chunked(*args, extra_query=extra_query, chunk_size=chunk_size)

    grads64, _ = _grads(chunked, seq, s0, q, cot)
    seq32 = {n: t.float() for n, t in seq.items()}
    grads32, _ = _grads(chunked, seq32, s0.float(), None if q is None else q.float(), cot)
    assert set(ref_grads) == set(grads64) == set(grads32)
    for name, ref in ref_grads.items():
        assert rel_err(grads64[name], ref) <= 1e-10, (name, rel_err(grads64[name], ref))
        assert rel_err(grads32[name], ref) <= 1e-4, (name, rel_err(grads32[name], ref))


@pytest.mark.parametrize("group_matrices", [2, 6, 10], ids=lambda g: f"group{g}")
def test_chunked_gradients_across_chunk_groups(monkeypatch, group_matrices):
    """Chunks run in groups (``_GROUP_MATRICES`` (chunk, batch, head) matrices each) whose chunk-start states and
    state gradients are handed from group to group; with 1, 3 and 5 chunks per group (12 chunks, the last group
    partial) values, final state and the gradients of every input incl. the initial state and the extra query
    stay within 1e-10 of the float64 oracle."""
    from wuneng.ops.wkv7 import chunk

    monkeypatch.setattr(chunk, "_GROUP_MATRICES", group_matrices)
    B, T, H, N = 1, 45, 2, 8  # chunk 4: 12 chunks, B * H = 2 matrices per chunk
    seq, s0, q = make_inputs(B, T, H, N, seed=11, extra=True)
    g = torch.Generator().manual_seed(12)
    cot = [
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        torch.randn(B, H, N, N, generator=g, dtype=torch.float64),
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
    ]
    ref_grads, ref_out = _grads(wkv7_reference, seq, s0, q, cot)
    grads, out = _grads(
        lambda *a, extra_query=None: wkv7_chunked(*a, extra_query=extra_query, chunk_size=4), seq, s0, q, cot
    )
    for o, o_ref in zip(out, ref_out):
        assert rel_err(o, o_ref) <= 1e-10, rel_err(o, o_ref)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= 1e-10, (name, rel_err(grads[name], ref))


def test_chunked_gradcheck_float64():
    torch.manual_seed(0)
    seq, s0, q = make_inputs(1, 6, 1, 3, seed=7, extra=True)
    inputs = [t.clone().requires_grad_() for t in (*args_of(seq), s0, q)]

    def fn(r, log_w, k, v, a, b, s, q):
        return wkv7_chunked(r, log_w, k, v, a, b, s, extra_query=q, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_chunked_gradients_decay_extremes():
    """Near w = 0.5452 the in-chunk factors are largest; float32 gradients stay accurate at chunk 64."""
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(1, 128, 1, 8, seed=8, decay=(0.999, 1.0))
    g = torch.Generator().manual_seed(9)
    cot = [
        torch.randn(1, 128, 1, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64),
    ]
    ref_grads, _ = _grads(wkv7_reference, seq, s0, None, cot)
    seq32 = {n: t.float() for n, t in seq.items()}
    grads, _ = _grads(lambda *a, extra_query=None: wkv7_chunked(*a, chunk_size=64), seq32, s0.float(), None, cot)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= 1e-4, (name, rel_err(grads[name], ref))


# ----------------------------------------------------------------------------------------------
# state carry, one-step form, extra query


@pytest.mark.parametrize("split", [1, 16, 21], ids=lambda s: f"split{s}")
def test_two_pieces_with_carried_state_equal_whole(split):
    torch.manual_seed(0)
    seq, s0, q = make_inputs(2, 40, 2, 8, seed=10, extra=True)
    seq32 = {n: t.float() for n, t in seq.items()}
    y, s, y2 = wkv7_chunked(*args_of(seq32), s0.float(), extra_query=q.float(), chunk_size=16)
    first = {n: t[:, :split] for n, t in seq32.items()}
    rest = {n: t[:, split:] for n, t in seq32.items()}
    ya, sa, y2a = wkv7_chunked(*args_of(first), s0.float(), extra_query=q.float()[:, :split], chunk_size=16)
    yb, sb, y2b = wkv7_chunked(*args_of(rest), sa, extra_query=q.float()[:, split:], chunk_size=16)
    assert rel_err(torch.cat([ya, yb], 1), y) <= 1e-6
    assert rel_err(torch.cat([y2a, y2b], 1), y2) <= 1e-6
    assert rel_err(sb, s) <= 1e-6


def test_step_token_by_token_equals_sequence():
    torch.manual_seed(0)
    seq, s0, q = make_inputs(2, 12, 2, 8, seed=11, extra=True)
    y_ref, s_ref, y2_ref = wkv7_reference(*args_of(seq), s0, extra_query=q)
    state, ys, y2s = s0, [], []
    for t in range(12):
        y_t, state, y2_t = wkv7_step(*[x[:, t] for x in args_of(seq)], state, extra_query=q[:, t])
        ys.append(y_t)
        y2s.append(y2_t)
    assert rel_err(torch.stack(ys, 1), y_ref) <= 1e-13
    assert rel_err(torch.stack(y2s, 1), y2_ref) <= 1e-13
    assert rel_err(state, s_ref) <= 1e-13
    # and the chunked form continued by steps
    seq32 = {n: t.float() for n, t in seq.items()}
    yc, sc = wkv7_chunked(*[x[:, :8] for x in args_of(seq32)], s0.float(), chunk_size=4)
    for t in range(8, 12):
        _, sc = wkv7_step(*[x[:, t] for x in args_of(seq32)], sc)
    assert rel_err(yc, y_ref[:, :8]) <= 1e-5 and rel_err(sc, s_ref) <= 1e-5


@pytest.mark.parametrize("chunk_size", [4, 16], ids=lambda c: f"chunk{c}")
def test_extra_query_reference_chunked_step_agree(chunk_size):
    torch.manual_seed(0)
    seq, s0, q = make_inputs(2, 30, 2, 8, seed=12, extra=True)
    y_ref, s_ref, y2_ref = wkv7_reference(*args_of(seq), s0, extra_query=q)
    # the extra read-out is the same state read with q: equal to running the reference with r := q
    y_q, _ = wkv7_reference(*[q if n == "r" else seq[n] for n in NAMES], s0)
    assert rel_err(y2_ref, y_q) <= 1e-14
    seq32 = {n: t.float() for n, t in seq.items()}
    y, s, y2 = wkv7_chunked(*args_of(seq32), s0.float(), extra_query=q.float(), chunk_size=chunk_size)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(y2, y2_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    state, y2s = s0, []
    for t in range(30):
        _, state, y2_t = wkv7_step(*[x[:, t] for x in args_of(seq)], state, extra_query=q[:, t])
        y2s.append(y2_t)
    assert rel_err(torch.stack(y2s, 1), y2_ref) <= 1e-13


# ----------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_low_precision_inputs_keep_float32_state(dtype):
    torch.manual_seed(0)
    seq, s0, q = make_inputs(1, 24, 2, 8, seed=13, extra=True)
    low = {n: t.to(dtype) for n, t in seq.items()}
    low["log_w"] = seq["log_w"].float()  # the decay stays float32 (SPEC section 1)
    y, s, y2 = wkv7_chunked(*args_of(low), s0.float(), extra_query=q.to(dtype), chunk_size=8)
    assert y.dtype == dtype and y2.dtype == dtype and s.dtype == torch.float32
    # oracle on the same (rounded) inputs in float64
    y_ref, s_ref, y2_ref = wkv7_reference(*[t.double() for t in args_of(low)], s0, extra_query=q.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: only the output rounding remains
    assert rel_err(y, y_ref) <= tol and rel_err(y2, y2_ref) <= tol
    assert rel_err(s, s_ref) <= 1e-5  # the state itself is float32 in both cases
    for form in (wkv7_reference, wkv7_step):
        args = args_of(low) if form is wkv7_reference else [x[:, 0] for x in args_of(low)]
        assert form(*args, s0.float())[1].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# bad input


def _good(dtype=torch.float32):
    seq, s0, q = make_inputs(1, 5, 2, 4, dtype=dtype, extra=True)
    return seq, s0, q


@pytest.mark.parametrize("form", ["chunked", "reference", "auto"])
def test_bad_inputs_raise_naming_the_argument(form):
    def call(seq, s0=None, q=None):
        return wkv7(*args_of(seq), s0, extra_query=q, impl=form)

    seq, s0, q = _good()
    with pytest.raises(ValueError, match="r must have rank 4"):
        call({**seq, "r": seq["r"][0]})
    with pytest.raises(ValueError, match="k must have the shape"):
        call({**seq, "k": seq["k"][:, :3]})
    with pytest.raises(TypeError, match="v has dtype"):
        call({**seq, "v": seq["v"].double()})
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        call({**seq, "a": seq["a"].tolist()})
    with pytest.raises(TypeError, match="r must be a floating-point"):
        call({n: (t.long() if n == "r" else t) for n, t in seq.items()})
    with pytest.raises(ValueError, match="b is on meta"):
        call({**seq, "b": seq["b"].to("meta")})
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, N, N\]"):
        call(seq, s0[:, :1])
    with pytest.raises(ValueError, match="initial_state is on meta"):
        call(seq, s0.to("meta"))
    with pytest.raises(ValueError, match="extra_query must have the shape"):
        call(seq, s0, q[:, :2])


def test_bad_chunk_size_and_impl():
    seq, s0, _ = _good()
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        wkv7_chunked(*args_of(seq), s0, chunk_size=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        wkv7(*args_of(seq), s0, impl="triton")


# ----------------------------------------------------------------------------------------------
# dispatcher


def test_dispatch_cpu_forms_agree():
    torch.manual_seed(0)
    seq, s0, q = make_inputs(1, 20, 2, 8, seed=14, extra=True, dtype=torch.float32)
    y_ref, s_ref, y2_ref = wkv7(*args_of(seq), s0, extra_query=q, impl="reference")
    for impl in ("auto", "chunked"):
        y, s, y2 = wkv7(*args_of(seq), s0, extra_query=q, impl=impl, chunk_size=8)
        assert rel_err(y, y_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5 and rel_err(y2, y2_ref) <= 1e-5
    assert len(wkv7(*args_of(seq), s0)) == 2


def test_dispatch_fla_explicit_on_cpu_raises_clearly():
    seq, s0, q = _good()
    with pytest.raises((ValueError, RuntimeError), match="impl='fla'"):
        wkv7(*args_of(seq), s0, impl="fla")
    with pytest.raises(ValueError, match="extra_query"):
        wkv7(*args_of(seq), s0, extra_query=q, impl="fla")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fla_receives_the_log_decay_in_float32(monkeypatch, dtype):
    """SPEC section 1: the decay stays float32 whatever the activation dtype. fla's function is replaced by a
    stand-in that records its arguments (the conversions run on CPU; the CUDA call itself is the test below)."""
    from wuneng.ops.wkv7 import dispatch

    seen = {}

    def fake_chunk_rwkv7(**kwargs):
        seen.update(kwargs)
        B, T, H, N = kwargs["r"].shape
        return torch.zeros_like(kwargs["r"]), torch.zeros(B, H, N, N)

    monkeypatch.setattr(dispatch, "_fla_chunk_rwkv7", lambda: fake_chunk_rwkv7)
    seq, s0, _ = make_inputs(1, 6, 2, 4, seed=23)
    low = {n: t.to(dtype) for n, t in seq.items()}
    low["log_w"] = seq["log_w"].float() * 1e-3  # near w = 1, where bfloat16 rounding matters most
    y, s = dispatch._call_fla(*args_of(low), s0.float())
    assert seen["w"].dtype == torch.float32 and torch.equal(seen["w"], low["log_w"])
    assert seen["r"].dtype == dtype and seen["scale"] == 1.0
    assert torch.equal(seen["initial_state"], s0.float().transpose(-1, -2))  # fla's [K, V] layout
    low["log_w"] = low["log_w"].to(dtype)  # a half-precision log decay is widened, not kept
    dispatch._call_fla(*args_of(low), None)
    assert seen["w"].dtype == torch.float32 and torch.equal(seen["w"], low["log_w"].float())


needs_cuda_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention"
)


@needs_cuda_fla
@pytest.mark.parametrize("T", [64, 100], ids=lambda t: f"T{t}")
def test_cuda_fla_matches_reference(T):
    torch.manual_seed(0)
    seq, s0, _ = make_inputs(2, T, 2, 64, seed=15)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    cuda = {n: t.float().cuda() for n, t in seq.items()}
    y, s = wkv7(*args_of(cuda), s0.float().cuda(), impl="fla")
    assert s.dtype == torch.float32 and s.shape == s0.shape
    assert rel_err(y, y_ref) <= 2e-3 and rel_err(s, s_ref) <= 2e-3  # fla's float32 kernels (TF32 dots)
    y_auto, s_auto = wkv7(*args_of(cuda), s0.float().cuda())  # auto -> fla
    assert rel_err(y_auto, y) <= 1e-6 and rel_err(s_auto, s) <= 1e-6
    # gradients against the chunked form on the same device
    g = torch.Generator().manual_seed(16)
    cot = [
        torch.randn(y.shape, generator=g, dtype=torch.float64),
        torch.randn(s.shape, generator=g, dtype=torch.float64),
    ]
    cot = [c.cuda() for c in cot]
    fla_grads, _ = _grads(lambda *a, extra_query=None: wkv7(*a, impl="fla"), cuda, s0.float().cuda(), None, cot)
    chk_grads, _ = _grads(lambda *a, extra_query=None: wkv7(*a, impl="chunked"), cuda, s0.float().cuda(), None, cot)
    for name in chk_grads:
        assert rel_err(fla_grads[name], chk_grads[name]) <= 1e-2, name
    # extra_query in auto mode falls back to the chunked form on CUDA
    q = torch.randn_like(cuda["r"])
    assert len(wkv7(*args_of(cuda), s0.float().cuda(), extra_query=q)) == 3


# ----------------------------------------------------------------------------------------------
# fla's pure-torch references (CPU)


def _import_dplr():
    try:
        from fla.ops.generalized_delta_rule.dplr.naive import dplr_chunkwise, dplr_recurrence
    except Exception as exc:  # noqa: BLE001 - fla or triton missing
        pytest.skip(f"flash-linear-attention not importable: {exc}")
    return dplr_recurrence, dplr_chunkwise


@pytest.mark.filterwarnings("ignore")
def test_agrees_with_fla_dplr_recurrence_and_chunkwise():
    dplr_recurrence, dplr_chunkwise = _import_dplr()
    torch.manual_seed(0)
    B, T, H, N = 2, 32, 3, 16
    seq, s0, _ = make_inputs(B, T, H, N, seed=17)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_chunked(*[t.float() for t in args_of(seq)], s0.float(), chunk_size=16)

    def bhtd(x):  # [B, T, H, N] -> fla's naive layout [B, H, T, N], float32
        return x.float().transpose(1, 2).contiguous()

    # fla: S[k, v] <- S exp(gk) + k v^T + beta (alpha^T S); o = (q N^-1/2)^T S
    fla_args = dict(
        q=bhtd(seq["r"]) * math.sqrt(N),
        k=bhtd(seq["k"]),
        v=bhtd(seq["v"]),
        alpha=bhtd(seq["a"]),
        beta=bhtd(seq["b"]),
        gk=bhtd(seq["log_w"]),
        initial_state=s0.float().transpose(-1, -2).contiguous(),
        output_final_state=True,
    )
    o_rec, S_rec = dplr_recurrence(**fla_args)
    o_chk, S_chk = dplr_chunkwise(**fla_args, chunk_size=16)
    for o, S in ((o_rec, S_rec), (o_chk, S_chk)):
        assert rel_err(o.transpose(1, 2), y_ref) <= 1e-5
        assert rel_err(S.transpose(-1, -2), s_ref) <= 1e-5
        assert rel_err(y, o.transpose(1, 2)) <= 1e-5 and rel_err(s, S.transpose(-1, -2)) <= 1e-5
