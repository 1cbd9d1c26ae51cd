"""WKV-7 on CUDA: fla's ``chunk_rwkv7`` reached through ``wkv7(impl="auto")`` against the float64 oracle, forward
and gradients of every input (the initial state included), the initial state in both memory layouts, float32 and
bfloat16 inputs, long sequences; and the chunked form that ``auto`` takes on CUDA when an extra query is given.

Run by scripts/gpu_check.sh (issue 19); skipped without CUDA. The oracle is ``wkv7_reference`` in float64 on the
CPU for short sequences and ``wkv7_chunked`` in float64 on the GPU for long ones (equal to the oracle to 1e-12,
tests/ops/test_wkv7.py), always on the inputs as rounded to the tested dtype. Relative errors
``||x - ref|| / ||ref||``; the thresholds were set before any GPU run of this project (no machine was lent to the
session that wrote them): float32 outputs 2e-3 as tests/ops/test_wkv7.py (fla's float32 dots may use TF32),
gradients 1e-2; bfloat16 3e-2 / 8e-2. scripts/gpu_check.sh also records the measured errors (section
fla_accuracy), so they can be tightened after the first run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wuneng.ops.wkv7 import dispatch, wkv7, wkv7_chunked, wkv7_reference
from wuneng.ops.wkv7.dispatch import fla_available

from _helpers import rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_fla = pytest.mark.skipif(not fla_available(), reason="flash-linear-attention is not importable")

NAMES = ("r", "log_w", "k", "v", "a", "b")
LOG_W_MIN = -0.6065306597126334
TOL = {torch.float32: (2e-3, 1e-2), torch.bfloat16: (3e-2, 8e-2)}  # (outputs and states, gradients)


def make_inputs(B, T, H, N, seed):
    """RWKV-7-shaped inputs in float64 on the CPU (as tests/ops/test_wkv7.py builds them) and a random initial
    state [B, H, N, N] in the S[i, j] = (value i, key j) layout."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    seq = {"r": randn(B, T, H, N) * 0.5, "log_w": LOG_W_MIN * torch.sigmoid(randn(B, T, H, N)),
           "k": randn(B, T, H, N) * 0.5, "v": randn(B, T, H, N), "a": -kk, "b": kk * alpha}  # fmt: skip
    return seq, randn(B, H, N, N) * 0.3


def on_cuda(seq, s0, dtype, layout):
    """The inputs in ``dtype`` on CUDA (the log decay float32, as the layers pass it) and the initial state as a
    float32 CUDA tensor holding the same values in ``layout``: "value-major" (this package's, contiguous) or
    "key-major" (fla's memory layout, passed as a transposed, non-contiguous view)."""
    low = {n: (t.float() if n == "log_w" else t.to(dtype)).cuda() for n, t in seq.items()}
    if layout == "value-major":
        state = s0.float().cuda()
    else:
        state = s0.float().transpose(-1, -2).contiguous().cuda().transpose(-1, -2)
        assert not state.is_contiguous()
    return low, state


def cotangents(y_shape, s_shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y_shape, generator=g, dtype=torch.float64), torch.randn(
        s_shape, generator=g, dtype=torch.float64
    )


def outputs_and_grads(fn, seq, state, gy, gs):
    """(y, final state, {name: gradient}) of <y, gy> + <S, gS> with respect to every input and the initial state."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in seq.items()}
    leaves["initial_state"] = state.detach().clone().requires_grad_()
    y, s = fn(*[leaves[n] for n in NAMES], leaves["initial_state"])
    loss = (y.double() * gy.to(y.device)).sum() + (s.double() * gs.to(s.device)).sum()
    loss.backward()
    return y, s, {n: t.grad for n, t in leaves.items()}


def count_fla_calls(monkeypatch) -> list:
    calls = []
    real = dispatch.wkv7_fla
    monkeypatch.setattr(dispatch, "wkv7_fla", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


@needs_fla
@pytest.mark.parametrize("layout", ["value-major", "key-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("T", [64, 300], ids=lambda t: f"T{t}")
def test_auto_takes_fla_and_matches_the_float64_oracle(T, dtype, layout, monkeypatch):
    """Forward and gradients of every input; T = 300 is no multiple of fla's chunk. The final state comes back in
    this package's layout and float32 whatever the input dtype."""
    calls = count_fla_calls(monkeypatch)
    seq, s0 = make_inputs(2, T, 2, 64, seed=T)
    low, state = on_cuda(seq, s0, dtype, layout)
    gy, gs = cotangents((2, T, 2, 64), (2, 2, 64, 64))
    rounded = {n: t.double().cpu() for n, t in low.items()}
    y_ref, s_ref, g_ref = outputs_and_grads(wkv7_reference, rounded, s0, gy, gs)
    y, s, grads = outputs_and_grads(wkv7, low, state, gy, gs)  # impl="auto"
    assert len(calls) == 1, "wkv7(impl='auto') did not take fla on CUDA"
    assert y.dtype == dtype and y.device.type == "cuda"
    assert s.dtype == torch.float32 and s.shape == s0.shape
    tol, tol_grad = TOL[dtype]
    assert rel_err(y, y_ref) <= tol, rel_err(y, y_ref)
    assert rel_err(s, s_ref) <= tol, rel_err(s, s_ref)
    # the state's layout: its transpose is far from the oracle (a swapped layout would fail above)
    assert rel_err(s.transpose(-1, -2), s_ref) > 0.1
    for name, ref in g_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], ref) <= tol_grad, (name, rel_err(grads[name], ref))


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fla_long_sequence_T4096_forward_and_gradients(dtype, monkeypatch):
    """T = 4096: the error must not grow along the sequence (the last 64 outputs on their own too)."""
    calls = count_fla_calls(monkeypatch)
    seq, s0 = make_inputs(1, 4096, 2, 64, seed=3)
    low, state = on_cuda(seq, s0, dtype, "value-major")
    gy, gs = cotangents((1, 4096, 2, 64), (1, 2, 64, 64), seed=4)
    rounded = {n: t.double() for n, t in low.items()}  # float64 oracle on the GPU
    y_ref, s_ref, g_ref = outputs_and_grads(wkv7_chunked, rounded, s0.cuda(), gy, gs)
    y, s, grads = outputs_and_grads(wkv7, low, state, gy, gs)
    assert len(calls) == 1
    tol, tol_grad = TOL[dtype]
    assert rel_err(y, y_ref) <= tol and rel_err(y[:, -64:], y_ref[:, -64:]) <= tol
    assert rel_err(s, s_ref) <= tol
    for name, ref in g_ref.items():
        assert rel_err(grads[name], ref) <= tol_grad, (name, rel_err(grads[name], ref))


@needs_fla
def test_fla_T16384_forward_stays_finite_and_accurate():
    seq, s0 = make_inputs(1, 16384, 2, 64, seed=5)
    low, state = on_cuda(seq, s0, torch.float32, "key-major")
    with torch.no_grad():
        y_ref, s_ref = wkv7_chunked(*[low[n].double() for n in NAMES], s0.cuda())
        y, s = wkv7(*[low[n] for n in NAMES], state)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) <= 2e-3 and rel_err(y[:, -64:], y_ref[:, -64:]) <= 2e-3
    assert rel_err(s, s_ref) <= 2e-3


def test_auto_with_an_extra_query_takes_the_chunked_form_on_cuda(monkeypatch):
    """fla has no second read-out: auto runs the chunked form on the GPU (float32 matmuls, no TF32 by default)."""
    calls = count_fla_calls(monkeypatch)
    seq, s0 = make_inputs(2, 100, 2, 32, seed=6)
    q = torch.randn(2, 100, 2, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y_ref, s_ref, y2_ref = wkv7_reference(*[seq[n] for n in NAMES], s0, extra_query=q)
    low, state = on_cuda(seq, s0, torch.float32, "value-major")
    y, s, y2 = wkv7(*[low[n] for n in NAMES], state, extra_query=q.float().cuda())
    assert calls == [] and y.device.type == "cuda"
    for got, want in ((y, y_ref), (s, s_ref), (y2, y2_ref)):
        assert rel_err(got, want) <= 1e-4, rel_err(got, want)


def test_cpu_kernel_refuses_cuda_tensors():
    """impl='cpu' on CUDA tensors raises (it never copies to the host behind the caller's back)."""
    seq, s0 = make_inputs(1, 8, 1, 16, seed=8)
    low, state = on_cuda(seq, s0, torch.float32, "value-major")
    with pytest.raises(ValueError, match="impl='cpu' runs on CPU tensors"):
        wkv7(*[low[n] for n in NAMES], state, impl="cpu")
