"""The fused RWKV-7 read-out (GroupNorm per head + bonus): C kernel against the tensor-op reference.

Relative errors ||x - ref|| / ||ref||: 1e-12 in float64 (same arithmetic, another order), 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

from wuneng.ops.wkv7 import cpu as cpu_mod
from wuneng.ops.wkv7.cpu import cpu_kernel_available
from wuneng.ops.wkv7.readout import group_norm_bonus, group_norm_bonus_reference

from _helpers import rel_err

needs_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason="C kernel unavailable")


def make(shape, H, N, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = [torch.randn(*shape, H, N, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    seq[0] = seq[0] * 3 + 1  # a mean and a scale for the GroupNorm to remove
    par = [torch.randn(H, N, generator=g, dtype=torch.float64).to(dtype)]
    par += [torch.randn(H * N, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    return [t.requires_grad_() for t in seq + par]


def run(impl, xs, eps=64e-5, seed=1):
    out = group_norm_bonus(*xs, eps, impl=impl)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad((out * g).sum(), xs)


@needs_kernel
@pytest.mark.parametrize("shape,H,N", [((2, 5), 3, 16), ((1, 1), 1, 64), ((7,), 4, 5)], ids=str)
def test_kernel_matches_reference_values_and_grads_float64(shape, H, N):
    xs = make(shape, H, N, seed=N)
    ref, ref_grads = run("reference", xs)
    out, grads = run("cpu", xs)
    assert rel_err(out, ref) <= 1e-12
    for name, g, g_ref in zip(("y", "r", "k", "v", "rho", "weight", "bias"), grads, ref_grads):
        assert g.shape == g_ref.shape and rel_err(g, g_ref) <= 1e-12, name


@needs_kernel
def test_kernel_float32_and_auto_dispatch():
    xs = make((3, 8), 2, 32, seed=2)
    ref, ref_grads = run("reference", xs)
    xs32 = [t.detach().float().requires_grad_() for t in xs]
    out, grads = run("auto", xs32)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    assert all(rel_err(g, g_ref) <= 1e-5 for g, g_ref in zip(grads, ref_grads))


@needs_kernel
def test_kernel_threads_split_rows_and_sum_parameter_grads(monkeypatch):
    xs = make((4, 6), 3, 8, seed=3)
    one = run("cpu", xs)
    monkeypatch.setattr(cpu_mod, "_MIN_PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        many = run("cpu", xs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    for g1, g2 in zip(one[1], many[1]):
        assert rel_err(g2, g1) <= 1e-14  # parameter grads: per-thread partial sums, added in another order


def test_other_dtypes_take_the_reference_and_bad_input_is_named():
    xs = [t.detach().to(torch.bfloat16) for t in make((2, 3), 2, 8, seed=4)]
    assert torch.equal(group_norm_bonus(*xs, 1e-5), group_norm_bonus_reference(*xs, 1e-5))
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        group_norm_bonus(*xs, 1e-5, impl="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        group_norm_bonus(*xs, 1e-5, impl="fused")
    y, r, k, v, rho, w, b = make((2, 3), 2, 8)
    with pytest.raises(ValueError, match=r"expected rho \[H, N\]"):
        group_norm_bonus(y, r, k, v, rho[:1], w, b, 1e-5)
    with pytest.raises(ValueError, match="k must have the shape of y"):
        group_norm_bonus(y, r, k[:1], v, rho, w, b, 1e-5)
