"""The fused state-head inputs (wuneng.ops.state_inputs): the C kernel equals the PyTorch reference, values and
gradients, in float64 (rel. error < 1e-12), with and without value residual and padding mask; float32 within 1e-5
of the float64 reference."""

from __future__ import annotations

import pytest
import torch

from wuneng.ops.state_inputs import state_inputs, state_inputs_kernel_available, state_inputs_reference

needs_kernel = pytest.mark.skipif(not state_inputs_kernel_available(), reason="no C compiler: the kernel is not built")


def _inputs(B, T, H, N, vr, dtype=torch.float64, seed=0, masked=False, zero_key=True):
    g = torch.Generator().manual_seed(seed)
    A = H * N
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    zw, za, k, v = (2 * rnd(B, T, A) for _ in range(4))
    zv, vf = (rnd(B, T, A), rnd(B, T, A)) if vr else (None, None)
    k_k, k_a = 1 + 0.3 * rnd(A), 1 + 0.3 * rnd(A)
    if zero_key:
        k[0, 1, :N] = 0  # a zero key: the norm's eps branch
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, :2] = 0
    leaves = [t if t is None else t.to(dtype).requires_grad_() for t in (zw, za, zv, k, v, vf, k_k, k_a)]
    return leaves, mask


def _rel(a, b):
    return ((a - b).abs().max() / (b.abs().max() + 1e-300)).item()


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("vr", [False, True])
@pytest.mark.parametrize("N", [16, 64])
def test_kernel_equals_reference_float64(N, vr, masked):
    H = 3
    leaves, mask = _inputs(2, 5, H, N, vr, masked=masked)
    outs = state_inputs(*leaves, H, mask, impl="cpu")
    refs = state_inputs_reference(*leaves, H, mask)
    g = torch.Generator().manual_seed(9)
    cot = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert _rel(o, r) < 1e-12
    wrt = [t for t in leaves if t is not None]
    got = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), wrt, allow_unused=True)
    want = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cot)), wrt, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or a.abs().max() == 0, i
            continue
        assert _rel(a, b) < 1e-12, i


@needs_kernel
def test_kernel_gradcheck():
    """Finite differences (float64) against the kernel's backward (no zero key: the norm has a kink there)."""
    leaves, mask = _inputs(1, 3, 2, 8, True, masked=True, zero_key=False)
    fn = lambda *t: state_inputs(*t, 2, mask, impl="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-8)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_float32_and_threads(threads):
    """float32 within 1e-5 (relative to the largest entry) of the float64 reference, on 1 and 2 threads (rows
    split into ranges, the parameter gradients summed over the ranges)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        H, N = 4, 64
        leaves64, _ = _inputs(2, 512, H, N, True, seed=3)
        leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
        outs = state_inputs(*leaves32, H, impl="cpu")
        refs = state_inputs_reference(*leaves64, H)
        for o, r in zip(outs, refs):
            assert o.dtype == torch.float32 and _rel(o.double(), r) < 1e-5
        got = torch.autograd.grad(sum(o.sum() for o in outs), leaves32)
        want = torch.autograd.grad(sum(r.sum() for r in refs), leaves64)
        for a, b in zip(got, want):
            assert _rel(a.double(), b) < 1e-5
    finally:
        torch.set_num_threads(old)


def test_bad_arguments():
    leaves, _ = _inputs(1, 2, 2, 8, True)
    with pytest.raises(ValueError, match="impl must be one of"):
        state_inputs(*leaves, 2, impl="fast")
    with pytest.raises(ValueError, match="go together"):
        state_inputs(*leaves[:2], None, *leaves[3:], 2)
    with pytest.raises(ValueError, match="width 16 with 3 heads"):
        state_inputs(*leaves, 3)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gate_fusion_kernel_equals_reference(dtype, threads):
    """a + sigmoid(zg) rho (y - a): the kernel against the reference computed in float64, values and gradients
    (a, y, zg, rho); float64 rel. error < 1e-12, float32 < 1e-5; 2 threads split the rows (rho's gradient summed)."""
    from wuneng.ops.state_inputs import gate_fusion, gate_fusion_reference

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        B, T, H, N = 2, 600, 4, 64
        leaves64 = [torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3)]
        leaves64.append(torch.randn(H, N, generator=g, dtype=torch.float64))
        leaves64 = [t.requires_grad_() for t in leaves64]
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        out = gate_fusion(*leaves, impl="cpu")
        ref = gate_fusion_reference(*leaves64)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert out.dtype == dtype and _rel(out.double(), ref) < tol
        cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad((out * cot.to(dtype)).sum(), leaves)
        want = torch.autograd.grad((ref * cot).sum(), leaves64)
        for a, b in zip(got, want):
            assert _rel(a.double(), b) < tol
    finally:
        torch.set_num_threads(old)


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("vr", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_kernel_equals_reference_on_repeated_keys_and_values(dtype, vr, masked):
    """state_inputs_grouped (the no-grad prefill: k, v of G key/value heads, each shared by H / G state heads, read
    in place) equals the reference on k, v repeated over the heads (repeat_interleave): float64 rel. error
    < 1e-12, float32 < 1e-5 against the float64 reference; v' = v * mask without value residual; the
    reference impl gives the same; it refuses inputs that need a gradient."""
    from wuneng.ops.state_inputs import state_inputs_grouped

    B, T, H, G, N = 2, 5, 6, 2, 16
    leaves, mask = _inputs(B, T, H, N, vr, masked=masked)
    zw, za, zv, _, _, vf, k_k, k_a = (None if t is None else t.detach() for t in leaves)
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(B, T, G * N, generator=g, dtype=torch.float64) for _ in range(2))
    k[0, 2, :N] = 0  # a zero key group: the norm's eps branch
    rep = lambda t: t.view(B, T, G, N).repeat_interleave(H // G, dim=2).reshape(B, T, H * N)  # noqa: E731
    refs = list(state_inputs_reference(zw, za, zv, rep(k), rep(v), vf, k_k, k_a, H, mask))
    if not vr and mask is not None:
        refs[2] = rep(v) * mask.to(v.dtype).unsqueeze(-1)
    cast = [None if t is None else t.to(dtype) for t in (zw, za, zv, k, v, vf, k_k, k_a)]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for impl in ("cpu", "reference"):
        outs = state_inputs_grouped(*cast, H, G, mask, impl=impl)
        for i, (o, r) in enumerate(zip(outs, refs)):
            assert o.shape == r.shape, (impl, i)
            assert _rel(o.double(), r.double()) < tol, (impl, i)
    with pytest.raises(RuntimeError, match="no backward"):
        state_inputs_grouped(cast[0].requires_grad_(), *cast[1:], H, G, mask)
