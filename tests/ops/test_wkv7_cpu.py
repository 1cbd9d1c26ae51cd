"""The C kernel form of WKV-7 (wuneng.ops.wkv7.cpu) against the float64 sequential oracle.

Values and gradients (to r, log_w, k, v, a, b, the initial state and the extra query) are compared as
relative errors ||x - ref|| / ||ref|| with the threshold in each assert: 1e-12 in float64 (the same
arithmetic in another order), 1e-5 for float32 against the float64 oracle.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_wkv7 import NAMES, args_of, make_inputs

from wuneng.ops.wkv7 import cpu as cpu_mod
from wuneng.ops.wkv7 import wkv7, wkv7_reference, wkv7_step
from wuneng.ops.wkv7.cpu import cpu_kernel_available, cpu_kernel_error, wkv7_cpu

from _helpers import rel_err

needs_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason=f"C kernel unavailable: {cpu_kernel_error()}")


def test_kernel_builds_wherever_a_compiler_is_found():
    """The tests below skip without the kernel; that must not hide a broken build on a machine with a compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc").split()[0])
    if compiler is None or os.environ.get("WUNENG_CPU_KERNEL", "1") == "0":
        pytest.skip("no C compiler (or the kernel is switched off): the chunked form serves")
    assert cpu_kernel_available(), cpu_kernel_error()


def _with_grads(fn, seq, s0, q, seed=0):
    """Outputs of fn and the gradients of a random linear function of them to every input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in seq.items()}
    s0_ = None if s0 is None else s0.detach().clone().requires_grad_()
    q_ = None if q is None else q.detach().clone().requires_grad_()
    outs = fn(*args_of(leaves), s0_, extra_query=q_)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    inputs = [leaves[n] for n in NAMES] + [t for t in (s0_, q_) if t is not None]
    return outs, torch.autograd.grad(loss, inputs)


@needs_kernel
@pytest.mark.parametrize("checkpoint_len", [1, 4, 16], ids=lambda c: f"ckpt{c}")
@pytest.mark.parametrize("T,N", [(1, 16), (7, 16), (16, 5), (37, 16), (40, 7), (1, 64), (37, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("extra", [False, True], ids=["y", "y+extra"])
def test_cpu_kernel_matches_float64_reference_values_and_grads(T, N, checkpoint_len, extra):
    seq, s0, q = make_inputs(2, T, 3, N, seed=T * 7 + N, extra=extra)
    ref, ref_grads = _with_grads(wkv7_reference, seq, s0, q)
    out, grads = _with_grads(lambda *a, **kw: wkv7_cpu(*a, checkpoint_len=checkpoint_len, **kw), seq, s0, q)
    assert len(out) == len(ref) and all(o.dtype == torch.float64 for o in out)
    for o, o_ref in zip(out, ref):
        assert rel_err(o, o_ref) <= 1e-12, rel_err(o, o_ref)
    for name, g, g_ref in zip(NAMES + ("initial_state", "extra_query"), grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-12, (name, rel_err(g, g_ref))


@needs_kernel
def test_cpu_kernel_float32_and_zero_initial_state():
    seq, _, q = make_inputs(2, 50, 2, 32, seed=3, extra=True)
    ref, ref_grads = _with_grads(wkv7_reference, seq, None, q)
    low = {n: t.float() for n, t in seq.items()}
    out, grads = _with_grads(wkv7_cpu, low, None, q.float())
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    for o, o_ref in zip(out, ref):
        assert rel_err(o, o_ref) <= 1e-5, rel_err(o, o_ref)
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-5, rel_err(g, g_ref)


@needs_kernel
@pytest.mark.parametrize("extra", [False, True], ids=["y", "y+extra"])
def test_cpu_kernel_head_size_64_float32(extra):
    """N = 64 takes the kernel's own vector path (register-held rows, value-major checkpoints): float32 values and
    gradients within 1e-5 of the float64 oracle (relative norms), with and without an initial state, a partial
    last checkpoint chunk (T = 45, L = 16)."""
    for s0_given in (True, False):
        seq, s0, q = make_inputs(2, 45, 2, 64, seed=11, extra=extra, state=s0_given)
        ref, ref_grads = _with_grads(wkv7_reference, seq, s0, q)
        low = {n: t.float() for n, t in seq.items()}
        out, grads = _with_grads(wkv7_cpu, low, None if s0 is None else s0.float(), None if q is None else q.float())
        assert all(o.dtype == torch.float32 for o in out)
        for o, o_ref in zip(out, ref):
            assert rel_err(o, o_ref) <= 1e-5, rel_err(o, o_ref)
        for g, g_ref in zip(grads, ref_grads):
            assert rel_err(g, g_ref) <= 1e-5, rel_err(g, g_ref)


@needs_kernel
def test_cpu_kernel_bfloat16_inputs_keep_a_float32_state():
    seq, s0, _ = make_inputs(1, 12, 2, 16, seed=5)
    low = {n: t.to(torch.bfloat16) for n, t in seq.items()}
    low["log_w"] = seq["log_w"].float()
    y, s = wkv7_cpu(*args_of(low), s0.float())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = wkv7_reference(*[t.double() for t in args_of(low)], s0)
    assert rel_err(y, y_ref) <= 1e-2 and rel_err(s, s_ref) <= 1e-5  # bf16: only the output rounding


@needs_kernel
def test_cpu_kernel_gradient_of_the_final_state_alone_and_of_y_alone():
    seq, s0, _ = make_inputs(1, 20, 2, 8, seed=6)
    for pick in (0, 1):  # y only (no state gradient reaches the kernel), final state only (no dy)
        grads = []
        for fn in (wkv7_reference, wkv7_cpu):
            leaves = [t.detach().clone().requires_grad_() for t in args_of(seq)]
            s0_ = s0.clone().requires_grad_()
            out = fn(*leaves, s0_)[pick]
            inputs = leaves + [s0_]
            got = torch.autograd.grad((out * out).sum(), inputs, allow_unused=True)
            grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)])
        for g, g_ref in zip(grads[1], grads[0]):
            assert torch.equal(g, g_ref) if not g_ref.any() else rel_err(g, g_ref) <= 1e-12


@needs_kernel
def test_cpu_kernel_threads_split_heads(monkeypatch):
    """Heads split across Python threads (ctypes drops the GIL) give the single-thread result exactly."""
    seq, s0, q = make_inputs(3, 9, 3, 8, seed=8, extra=True)
    one = _with_grads(wkv7_cpu, seq, s0, q)
    monkeypatch.setattr(cpu_mod, "_MIN_PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        many = _with_grads(wkv7_cpu, seq, s0, q)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one[0] + one[1], many[0] + many[1]):
        assert torch.equal(x, y)


@needs_kernel
def test_cpu_kernel_empty_sequence_and_non_contiguous_inputs():
    seq, s0, q = make_inputs(2, 0, 2, 8, seed=9, extra=True)
    y, s, y2 = wkv7_cpu(*args_of(seq), s0, extra_query=q)
    assert y.shape == (2, 0, 2, 8) and y2.shape == y.shape and torch.equal(s, s0)
    seq, s0, _ = make_inputs(2, 11, 3, 8, seed=10)
    strided = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in seq.items()}
    assert not strided["r"].is_contiguous()
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    y, s = wkv7_cpu(*args_of(strided), s0.transpose(-1, -2).contiguous().transpose(-1, -2))
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(s, s_ref) <= 1e-12


@needs_kernel
def test_dispatch_auto_uses_the_kernel_on_cpu_and_step_forms_agree():
    seq, s0, q = make_inputs(2, 1, 3, 16, seed=11, extra=True)
    f32 = {n: t.float() for n, t in seq.items()}
    y_c, s_c, y2_c = wkv7(*args_of(f32), s0.float(), extra_query=q.float(), impl="cpu")
    y_a, s_a, y2_a = wkv7(*args_of(f32), s0.float(), extra_query=q.float(), impl="auto")
    assert torch.equal(y_c, y_a) and torch.equal(s_c, s_a) and torch.equal(y2_c, y2_a)
    # the one-token form: C kernel vs tensor ops, float64
    step_args = [t[:, 0] for t in args_of(seq)]
    kern = wkv7_step(*step_args, s0, extra_query=q[:, 0], impl="cpu")
    ops = wkv7_step(*step_args, s0, extra_query=q[:, 0], impl="torch")
    for x, y in zip(kern, ops):
        assert rel_err(x, y) <= 1e-12
    for x, y in zip(wkv7_step(*step_args, None, impl="cpu"), wkv7_step(*step_args, None, impl="torch")):
        assert rel_err(x, y) <= 1e-12  # no state: zeros
    assert torch.equal(s0, make_inputs(2, 1, 3, 16, seed=11, extra=True)[1])  # the input state is not modified
    # with autograd, "auto" takes the differentiable ops
    r = step_args[0].clone().requires_grad_()
    y, _ = wkv7_step(r, *step_args[1:], s0)
    assert y.requires_grad
    with pytest.raises(ValueError, match="impl='cpu' has no autograd"):
        wkv7_step(r, *step_args[1:], s0, impl="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        wkv7_step(*step_args, s0, impl="cuda")


@needs_kernel
def test_bad_checkpoint_len_and_device():
    seq, s0, _ = make_inputs(1, 4, 2, 4, seed=12)
    with pytest.raises(ValueError, match="checkpoint_len must be a positive int"):
        wkv7_cpu(*args_of(seq), s0, checkpoint_len=0)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        wkv7_cpu(*[t.to("meta") for t in args_of(seq)], s0.to("meta"))


@needs_kernel
def test_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(tmp_path))
    first = cpu_mod.LIBRARY.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_mod.LIBRARY.build() == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    stem = first.name[: -len(".so")]  # the library, its build record and its lock file; no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, stem + ".json", stem + ".lock"])


@needs_kernel
def test_without_the_kernel_auto_falls_back_and_cpu_says_why(monkeypatch):
    seq, s0, _ = make_inputs(1, 9, 2, 8, seed=13)
    y_ref, s_ref = wkv7_reference(*args_of(seq), s0)
    for env, value, reason in (("WUNENG_CPU_KERNEL", "0", "disabled"), ("CC", "/nonexistent/cc", "nonexistent")):
        monkeypatch.setenv(env, value)
        monkeypatch.setenv("WUNENG_KERNEL_CACHE", "/nonexistent-cache-dir-for-test")
        cpu_mod._library.cache_clear()
        try:
            assert not cpu_kernel_available() and reason in cpu_kernel_error()
            y, s = wkv7(*args_of(seq), s0, impl="auto")  # the chunked form
            assert rel_err(y, y_ref) <= 1e-12 and rel_err(s, s_ref) <= 1e-12
            y1, _ = wkv7_step(*[t[:, 0] for t in args_of(seq)], s0)  # the tensor-op step
            assert rel_err(y1, y_ref[:, 0]) <= 1e-12
            with pytest.raises(RuntimeError, match="C kernel, which is unavailable"):
                wkv7(*args_of(seq), s0, impl="cpu")
        finally:
            monkeypatch.delenv(env)
            cpu_mod._library.cache_clear()
    monkeypatch.undo()
    assert cpu_kernel_available()


def _op_args(seed, q=True, s0=True, checkpoint_len=4):
    seq, S0, Q = make_inputs(2, 9, 2, 4, seed=seed, extra=q)
    r, log_w, k, v, a, b = args_of(seq)
    return (r, log_w.exp(), k, v, a, b, S0 if s0 else None, Q, checkpoint_len)


@needs_kernel
@pytest.mark.parametrize("q,s0,checkpoint_len", [(True, True, 4), (False, False, 0), (False, True, 9)], ids=str)
def test_custom_ops_pass_torch_opcheck(q, s0, checkpoint_len):
    """The kernels are torch custom ops (wuneng::wkv7_cpu_forward / _backward): schema, fake (meta) shapes and
    AOT dispatch checked by torch.library.opcheck."""
    args = _op_args(30, q, s0, max(checkpoint_len, 1))
    forward = torch.ops.wuneng.wkv7_cpu_forward.default
    assert all(v == "SUCCESS" for v in torch.library.opcheck(forward, args[:-1] + (checkpoint_len,)).values())
    y, S, y2, ckpt = forward(*args)
    r, w, k, v, a, b, _, Q, L = args
    g = torch.Generator().manual_seed(31)
    dy, dS = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(S.shape, generator=g, dtype=S.dtype)
    dy2 = torch.randn(y.shape, generator=g, dtype=y.dtype) if q else None
    backward = torch.ops.wuneng.wkv7_cpu_backward.default
    bargs = (r, w, k, v, a, b, Q, ckpt, dy, dy2, dS, L)
    assert all(v == "SUCCESS" for v in torch.library.opcheck(backward, bargs).values())


@needs_kernel
def test_custom_op_boundary_checks_dtypes_and_layout():
    r, w, k, v, a, b, S0, q, L = _op_args(32)
    forward = torch.ops.wuneng.wkv7_cpu_forward.default
    with pytest.raises(TypeError, match="all float32 or all float64"):
        forward(r, w.float(), k, v, a, b, S0, q, L)
    with pytest.raises(TypeError, match="all float32 or all float64"):
        forward(*(t.half() for t in (r, w, k, v, a, b)), None, None, L)
    with pytest.raises(ValueError, match="k must be a contiguous CPU tensor"):
        forward(r, w, k.transpose(1, 2).contiguous().transpose(1, 2), v, a, b, S0, q, L)


@needs_kernel
def test_wkv7_cpu_compiles_in_one_graph_and_matches_eager():
    """torch.compile sees the kernels as opaque custom ops: no graph break (fullgraph=True), same values and
    gradients as eager (float64, 1e-12)."""
    seq, s0, _ = make_inputs(1, 9, 2, 4, seed=33)

    def loss(r, log_w, k, v, a, b, s0):
        y, S = wkv7_cpu(r, log_w, k, v, a, b, s0)
        return (y * y).sum() + S.sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in args_of(seq)] + [s0.clone().requires_grad_()]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out, leaves)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert rel_err(compiled, eager) <= 1e-12
    for g, g_ref in zip(compiled_grads, eager_grads):
        assert rel_err(g, g_ref) <= 1e-12
