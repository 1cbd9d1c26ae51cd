"""The fused one-token RWKV-7 mixers (decoding): the time-mix and the WuNeng hybrid mixer's state side, each C
kernel against its tensor-op reference, and the time-mix reference against the TimeMix layer's own (training)
path (the hybrid layer's fused path against its tensor path is in tests/layers/test_hybrid.py).

Relative errors ||x - ref|| / ||ref||: 1e-12 in float64 (same arithmetic, another order), 1e-5 for float32
against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from wuneng.fused import one_token as one_token_mod
from wuneng.fused.cpu import fused_kernel_available, fused_kernel_error
from wuneng.fused.one_token import (
    HybridStateWeights,
    TimeMixWeights,
    hybrid_state_one_token,
    hybrid_state_one_token_reference,
    one_token_kernel_preferred,
    time_mix_one_token,
    time_mix_one_token_reference,
)
from wuneng.layers.rwkv7 import TimeMix

from _helpers import perturb_, rel_err

needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason=f"C kernel unavailable: {fused_kernel_error()}")


def make_weights(C, H, N, value_residual, dtype=torch.float64, seed=0, ranks=(16, 16, 8, 24)):
    """Random weights of every kind (the LoRAs too, so that each path matters)."""
    g = torch.Generator().manual_seed(seed)
    A = H * N
    dw, da, dv, dg = ranks

    def rnd(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    return TimeMixWeights(
        mix=torch.rand(6, C, generator=g, dtype=torch.float64).to(dtype),
        W_r=rnd(A, C), W_k=rnd(A, C), W_v=rnd(A, C), W_o=rnd(C, A),
        w0=rnd(A, scale=1.0), w1=rnd(C, dw), w2=rnd(dw, A),
        a0=rnd(A), a1=rnd(C, da), a2=rnd(da, A),
        v0=rnd(A) if value_residual else None, v1=rnd(C, dv) if value_residual else None,
        v2=rnd(dv, A) if value_residual else None,
        g1=rnd(C, dg), g2=rnd(dg, A), k_k=1 + rnd(A), k_a=1 + rnd(A), r_k=rnd(H, N),
        ln_w=1 + rnd(A), ln_b=rnd(A), eps=64e-5,
    )  # fmt: skip


def make_inputs(B, C, H, N, dtype=torch.float64, seed=1, state=True, value_residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    S = 0.3 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(dtype) if state else None
    v_first = torch.randn(B, H * N, generator=g, dtype=torch.float64).to(dtype) if value_residual else None
    return x, shift, S, v_first


@needs_kernel
@pytest.mark.parametrize("value_residual", [False, True], ids=["first-layer", "value-residual"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("B,C,H,N,state", [(1, 64, 4, 16, True), (3, 38, 3, 16, True), (2, 40, 2, 32, False)], ids=str)
def test_kernel_matches_reference_float64(value_residual, masked, B, C, H, N, state):
    # C = 38: neither the input width nor the output projection's rows a multiple of the kernel's blocks
    wt = make_weights(C, H, N, value_residual, seed=C)
    x, shift, S, v_first = make_inputs(B, C, H, N, state=state, value_residual=value_residual)
    mask = torch.tensor([1.0, 0.0, 1.0][:B], dtype=torch.float64) if masked else None
    S_before = None if S is None else S.clone()
    ref = time_mix_one_token_reference(x, shift, S, v_first, wt, mask)
    out = time_mix_one_token(x, shift, S, v_first, wt, mask, impl="cpu")
    for name, got, want in zip(("out", "shift", "state", "v_first"), out, ref):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-12, name
    assert S is None or torch.equal(S, S_before)  # the input state is not modified


@needs_kernel
def test_kernel_float32_against_float64_reference_and_auto_dispatch():
    wt64 = make_weights(48, 3, 16, True, seed=5)
    ins64 = make_inputs(2, 48, 3, 16, seed=6)
    ref = time_mix_one_token_reference(*ins64, wt64)
    wt32 = TimeMixWeights(*(t.float() if isinstance(t, torch.Tensor) else t for t in wt64))
    with torch.no_grad():
        out = time_mix_one_token(*(t.float() for t in ins64), wt32)  # auto: the kernel
    assert all(o.dtype == torch.float32 for o in out)
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(out, ref))


@needs_kernel
def test_padding_leaves_the_state_and_shift_alone():
    wt = make_weights(32, 2, 16, False, seed=7)
    x, shift, S, _ = make_inputs(2, 32, 2, 16, value_residual=False, seed=8)
    out, new_shift, new_S, _ = time_mix_one_token(x, shift, S, None, wt, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(new_S[0], S[0]) and not torch.allclose(new_S[1], S[1])
    assert torch.all(new_shift[0] == 0) and torch.equal(new_shift[1], x[1])


@needs_kernel
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_reference_and_kernel_equal_the_time_mix_layer(layer_idx):
    """The layer's tensor path (training and prefill) at T = 1 is the same function as the fused step."""
    torch.manual_seed(layer_idx)
    C, H, N, B = 48, 4, 16, 3
    tm = perturb_(TimeMix(C, H, N, layer_idx, 4).double(), 0.2)
    x, shift, S, v_first = make_inputs(B, C, H, N, value_residual=tm.value_residual, seed=9)
    mask = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
    vf3 = None if v_first is None else v_first.unsqueeze(1)
    tm.wkv_impl = "chunked"  # the tensor path
    out, vf, (new_shift, new_S) = tm(x.unsqueeze(1), vf3, (shift, S), mask)  # with autograd: no fused path
    assert out.requires_grad
    wt = tm.one_token_weights()
    for impl in ("reference", "cpu"):
        with torch.no_grad():
            got = time_mix_one_token(x, shift, S, v_first, wt, mask.view(B), impl=impl)
        for name, g, want in zip(("out", "shift", "state", "v_first"), got, (out[:, 0], new_shift, new_S, vf[:, 0])):
            assert rel_err(g, want) <= 1e-12, (impl, name)
    with torch.no_grad():  # and the layer's own decoding path (auto) takes the kernel and agrees
        tm.wkv_impl = "auto"
        fused, vf_fused, (s_fused, S_fused) = tm(x.unsqueeze(1), vf3, (shift, S), mask)
    for g, want in ((fused, out), (vf_fused, vf), (s_fused, new_shift), (S_fused, new_S)):
        assert rel_err(g, want) <= 1e-12


@needs_kernel
def test_time_mix_decoding_calls_the_kernel_once(monkeypatch):
    import wuneng.layers.rwkv7 as rwkv7_layers

    calls = []
    real = rwkv7_layers.time_mix_one_token_planned
    monkeypatch.setattr(rwkv7_layers, "time_mix_one_token_planned", lambda *a: calls.append(a[-1]) or real(*a))
    tm = TimeMix(32, 2, 16, 1, 3)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        tm(x, torch.randn(2, 1, 32))  # decoding: fused
        tm(torch.randn(2, 3, 32), torch.randn(2, 3, 32))  # several tokens: the tensor path
    tm(x, torch.randn(2, 1, 32))  # autograd: the tensor path
    assert calls == [False]  # one call, without the self-state query
    # a batch above TIME_MIX_MAX_BATCH: the tensor path
    monkeypatch.setattr(one_token_mod, "TIME_MIX_MAX_BATCH", 1)
    with torch.no_grad():
        tm(x, torch.randn(2, 1, 32))
    assert len(calls) == 1


def test_time_mix_preference_follows_the_batch_alone(monkeypatch):
    """The time-mix kernel uses every torch thread: fused while batch <= TIME_MIX_MAX_BATCH, whatever the size and
    thread count (the single-threaded hybrid kernel keeps its work limit, below)."""
    wt = make_weights(32, 2, 16, True)
    monkeypatch.setattr(one_token_mod, "FUSED_WORK_LIMIT", 0)
    monkeypatch.setattr(one_token_mod, "TIME_MIX_MAX_BATCH", 4)
    assert one_token_kernel_preferred(wt, 4) and not one_token_kernel_preferred(wt, 5)


def test_kernel_preference_counts_weights_batch_and_threads(monkeypatch):
    """The hybrid kernel: fused while weights x batch x threads <= FUSED_WORK_LIMIT and batch <= FUSED_MAX_BATCH."""
    wt = make_hybrid_weights(32, 2, 16, True, True, 8)
    params = sum(t.numel() for t in wt[:-1] if t is not None)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            monkeypatch.setattr(one_token_mod, "FUSED_WORK_LIMIT", params * 4 * n)
            assert one_token_kernel_preferred(wt, 4) and not one_token_kernel_preferred(wt, 5)
        monkeypatch.setattr(one_token_mod, "FUSED_WORK_LIMIT", 1 << 62)
        monkeypatch.setattr(one_token_mod, "FUSED_MAX_BATCH", 3)
        assert one_token_kernel_preferred(wt, 3) and not one_token_kernel_preferred(wt, 4)
    finally:
        torch.set_num_threads(threads)


def test_reference_is_differentiable_and_auto_falls_back_under_autograd():
    wt = make_weights(32, 2, 16, True, seed=3)
    wt = TimeMixWeights(*(t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in wt))
    x, shift, S, v_first = make_inputs(2, 32, 2, 16, seed=4)
    out = time_mix_one_token(x, shift, S, v_first, wt)  # auto under autograd: the reference
    out[0].square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in wt[:-1] if isinstance(t, torch.Tensor))


def test_bad_input_names_the_problem():
    wt = make_weights(32, 2, 16, True)
    x, shift, S, v_first = make_inputs(2, 32, 2, 16)
    with pytest.raises(ValueError, match="impl must be one of"):
        time_mix_one_token(x, shift, S, v_first, wt, impl="fast")
    with pytest.raises(ValueError, match=r"input must be \[B, C\] \(one token\)"):
        time_mix_one_token(x.unsqueeze(1), shift, S, v_first, wt)
    with pytest.raises(ValueError, match="value residual needs v_first"):
        time_mix_one_token(x, shift, S, None, wt)
    with pytest.raises(ValueError, match=r"state must be \[B, H, N, N\]"):
        time_mix_one_token(x, shift, S[:, :1], v_first, wt)
    with pytest.raises(ValueError, match="W_o must have shape"):
        time_mix_one_token(x, shift, S, v_first, wt._replace(W_o=wt.W_o[:, :-1]))
    with pytest.raises(ValueError, match=r"w1, w2 must be \[C, D\] and \[D, A = 32\]"):
        time_mix_one_token(x, shift, S, v_first, wt._replace(w2=wt.w2[:, :-1]))
    with pytest.raises(ValueError, match="impl='cpu' needs"):
        time_mix_one_token(x, shift, S, v_first, wt._replace(W_r=wt.W_r.float()), impl="cpu")


# -- the state side of a WuNeng hybrid mixer ------------------------------------------------------------------


def make_hybrid_weights(C, H, N, value_residual, gate, middle_width, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = H * N

    def rnd(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    return HybridStateWeights(
        mix=torch.rand(3 if value_residual else 2, C, generator=g, dtype=torch.float64).to(dtype),
        w0=rnd(A, scale=1.0), w1=rnd(C, 16), w2=rnd(16, A), a0=rnd(A), a1=rnd(C, 16), a2=rnd(16, A),
        v0=rnd(A) if value_residual else None, v1=rnd(C, 8) if value_residual else None,
        v2=rnd(8, A) if value_residual else None,
        R1=rnd(C, 12), R2=rnd(12, A),
        G1=rnd(C, 8) if gate else None, G2=rnd(8, A) if gate else None, gate_bias=rnd(A) if gate else None,
        P1=rnd(C, 8) if middle_width else None, P2=rnd(8, middle_width) if middle_width else None,
        k_k=1 + rnd(A), k_a=1 + rnd(A), r_k=rnd(H, N), ln_w=1 + rnd(A), ln_b=rnd(A), eps=64e-5,
    )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("value_residual", [False, True], ids=["first-layer", "value-residual"])
@pytest.mark.parametrize("gate,middle_width", [(True, 32), (False, 0)], ids=["gate+middle", "plain"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("H_kv,state", [(2, True), (4, False), (1, True)], ids=["gqa", "mha-no-state", "mqa"])
def test_hybrid_kernel_matches_reference_float64(value_residual, gate, middle_width, masked, H_kv, state):
    B, C, H, N = 3, 38, 4, 16
    wt = make_hybrid_weights(C, H, N, value_residual, gate, middle_width, seed=H_kv)
    u, shift, S, v_first = make_inputs(B, C, H, N, state=state, value_residual=value_residual, seed=2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, n, generator=g, dtype=torch.float64) for n in (H * N, H_kv * N, H_kv * N))
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) if masked else None
    ref = hybrid_state_one_token_reference(u, shift, S, v_first, q, k, v, wt, mask)
    out = hybrid_state_one_token(u, shift, S, v_first, q, k, v, wt, mask, impl="cpu")
    for name, got, want in zip(("y", "shift", "state", "v_first", "gamma", "middle"), out, ref):
        if want is None:
            assert got is None, name
        else:
            assert got.shape == want.shape and rel_err(got, want) <= 1e-12, name


def test_hybrid_bad_input_names_the_problem():
    wt = make_hybrid_weights(32, 2, 16, True, True, 16)
    u, shift, S, v_first = make_inputs(2, 32, 2, 16)
    q, k, v = (
        torch.randn(2, 32, dtype=torch.float64),
        torch.randn(2, 16, dtype=torch.float64),
        torch.randn(2, 16, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"q must be \[B, A\]"):
        hybrid_state_one_token(u, shift, S, v_first, q[:, :-1], k, v, wt)
    for width in (8, 0):  # part of a head; no head at all
        with pytest.raises(ValueError, match="H_kv dividing H"):
            hybrid_state_one_token(u, shift, S, v_first, q, k[:, :width], v[:, :width], wt)
    with pytest.raises(ValueError, match="value residual needs v_first"):
        hybrid_state_one_token(u, shift, S, None, q, k, v, wt)
    with pytest.raises(ValueError, match="gate needs gate_bias"):
        hybrid_state_one_token(u, shift, S, v_first, q, k, v, wt._replace(gate_bias=None))


# -- Meta-State's self-state query ---------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("H", [2, 5], ids=["A=C", "grown A>C"])
def test_self_state_query_kernel_matches_reference(H):
    # C = 32 holds two blocks of N = 16: with H = 5 heads (a grown state) heads 2-4 reuse the blocks
    C, N, B = 32, 16, 3
    wt = make_weights(C, H, N, True, seed=H)
    x, shift, S, v_first = make_inputs(B, C, H, N, seed=H + 1)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ref = time_mix_one_token_reference(x, shift, S, v_first, wt, mask, self_state_query=True)
    out = time_mix_one_token(x, shift, S, v_first, wt, mask, self_state_query=True, impl="cpu")
    assert len(out) == len(ref) == 5 and out[4].shape == (B, H, N)
    for name, got, want in zip(("out", "shift", "state", "v_first", "readout"), out, ref):
        assert rel_err(got, want) <= 1e-12, name
    with pytest.raises(ValueError, match="not a multiple"):
        time_mix_one_token(x[:, :30], shift[:, :30], S, v_first, make_weights(30, H, N, True), self_state_query=True)


@needs_kernel
@pytest.mark.parametrize("num_heads", [2, 3])
def test_meta_state_time_mix_decoding_equals_its_tensor_path(num_heads, monkeypatch):
    import wuneng.layers.rwkv7 as rwkv7_layers
    from wuneng.layers.metastate import MetaStateTimeMix

    calls = []
    real = rwkv7_layers.time_mix_one_token_planned
    monkeypatch.setattr(rwkv7_layers, "time_mix_one_token_planned", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(num_heads)
    C, N, B = 32, 16, 2
    tm = perturb_(MetaStateTimeMix(C, num_heads, N, 1, 3).double(), 0.2)
    x = torch.randn(B, 1, C, dtype=torch.float64)
    v_first = torch.randn(B, 1, num_heads * N, dtype=torch.float64)
    state = (torch.randn(B, C, dtype=torch.float64), 0.3 * torch.randn(B, num_heads, N, N, dtype=torch.float64))
    results = []
    with torch.no_grad():
        for impl in ("auto", "chunked"):  # auto: the fused kernel; chunked: the tensor path
            tm.wkv_impl = impl
            results.append(tm(x, v_first, state))
    assert calls == [True]  # one kernel call, with the self-state query
    (out, vf, (s, S), ro), (out_t, vf_t, (s_t, S_t), ro_t) = results
    assert ro.shape == ro_t.shape == (B, 1, num_heads, N)
    for got, want in ((out, out_t), (vf, vf_t), (s, s_t), (S, S_t), (ro, ro_t)):
        assert rel_err(got, want) <= 1e-12


def test_without_the_kernel_the_layers_decode_by_tensor_ops(monkeypatch):
    """WUNENG_CPU_KERNEL=0 (or no compiler): TimeMix and HybridMixer decode through their tensor paths, and
    impl='cpu' says why it cannot run."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

    import wuneng.layers.hybrid as hybrid_mod
    from wuneng.fused import cpu as fused_cpu
    from wuneng.layers.hybrid import HybridContext, wrap_attention
    from wuneng.ops.wkv7 import cpu as cpu_mod

    torch.manual_seed(0)
    tm = perturb_(TimeMix(32, 2, 16, 0, 2).double(), 0.2)
    # a tiny Qwen2 attention (2 query heads, 1 kv head, head size 16) wrapped into a hybrid mixer
    config = Qwen2Config(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_hidden_layers=2,
        intermediate_size=64, vocab_size=64, attn_implementation="sdpa",
    )  # fmt: skip
    hm = perturb_(wrap_attention(Qwen2Attention(config, 0), 32, 0, 2, middle_heads=1).double(), 0.2)
    x = torch.randn(2, 1, 32, dtype=torch.float64)
    # one token: the teacher's attention needs no mask; position 0 (cos 1, sin 0)
    pe = Qwen2RotaryEmbedding(config)(x, torch.zeros(2, 1, dtype=torch.long))

    def hybrid(x):
        return hm(hidden_states=x, position_embeddings=pe, attention_mask=None, wuneng_context=HybridContext())[0]

    fused = []
    real_fused = hybrid_mod.hybrid_state_one_token_planned
    monkeypatch.setattr(
        hybrid_mod, "hybrid_state_one_token_planned", lambda *a, **k: fused.append(1) or real_fused(*a, **k)
    )
    with torch.no_grad():
        want_tm, want_hm = tm(x)[0], hybrid(x)
    calls_with_kernel = 1 if fused_kernel_available() else 0
    assert len(fused) == calls_with_kernel  # with the kernel, the hybrid mixer's state side is the one C call
    monkeypatch.setenv("WUNENG_CPU_KERNEL", "0")
    fused_cpu._library.cache_clear()
    cpu_mod._library.cache_clear()
    try:
        with torch.no_grad():
            assert rel_err(tm(x)[0], want_tm) <= 1e-12 and rel_err(hybrid(x), want_hm) <= 1e-12
        assert len(fused) == calls_with_kernel  # without it, the tensor path
        wt = make_weights(32, 2, 16, False)
        x2, shift, S, _ = make_inputs(2, 32, 2, 16, value_residual=False)
        with pytest.raises(ValueError, match="impl='cpu' needs"):
            time_mix_one_token(x2, shift, S, None, wt, impl="cpu")
    finally:
        monkeypatch.delenv("WUNENG_CPU_KERNEL")
        fused_cpu._library.cache_clear()
        cpu_mod._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("C,sse", [(200, False), (192, True)], ids=["C200", "C192-self-state-query"])
def test_kernel_result_does_not_depend_on_the_thread_count(dtype, tol, C, sse):
    """The kernel splits rows, columns and heads across torch's threads; every element is computed by one thread in
    the same order, so 1 and 2 threads agree exactly, and both agree with the float64 reference (relative error
    <= tol). C = 200: blocks of 16 rows that do not divide the input width, a ragged tail; C = 192 with
    Meta-State's self-state query (which needs C a multiple of N)."""
    H, N, B = 3, 64, 3
    wt64 = make_weights(C, H, N, True, seed=11, ranks=(32, 32, 16, 48))
    ins64 = make_inputs(B, C, H, N, seed=12)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ref = time_mix_one_token_reference(*ins64, wt64, mask, self_state_query=sse)
    wt = TimeMixWeights(*(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in wt64))
    ins = [t.to(dtype) for t in ins64]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(time_mix_one_token(*ins, wt, mask.to(dtype), self_state_query=sse, impl="cpu"))
    finally:
        torch.set_num_threads(threads)
    for name, one, two, want in zip(("out", "shift", "state", "v_first", "readout"), *results, ref):
        assert torch.equal(one, two), name
        assert rel_err(one, want) <= tol, name


@needs_kernel
def test_layer_decoding_follows_a_weight_changed_within_a_session():
    """The layer keeps its kernel plan (weights checked, pointers read) for a decoding session; a weight changed in
    place, or replaced by another tensor, is seen at the next step."""
    from wuneng.layers.low_rank import derived_weights_session

    torch.manual_seed(3)
    tm = perturb_(TimeMix(32, 2, 16, 1, 3).double(), 0.2)
    x, v_first = torch.randn(2, 1, 32, dtype=torch.float64), torch.randn(2, 1, 32, dtype=torch.float64)
    with torch.no_grad(), derived_weights_session():
        tm(x, v_first)
        tm.receptance.weight.mul_(2.0)
        fused_inplace = tm(x, v_first)[0]
        tm.w1.data = tm.w1.data + 0.5
        fused_replaced = tm(x, v_first)[0]
        tm.wkv_impl = "chunked"
        tensor_replaced = tm(x, v_first)[0]
        tm.w1.data = tm.w1.data - 0.5
        tensor_inplace = tm(x, v_first)[0]
    assert rel_err(fused_inplace, tensor_inplace) <= 1e-12
    assert rel_err(fused_replaced, tensor_replaced) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_weight_kernel_matches_the_float64_reference(threads):
    """bfloat16 weight matrices, widened to float32 as the kernel reads them (activations and state float32): against
    the float64 reference of the same rounded weights and inputs, the state within 1e-5 (float32 arithmetic) and
    out within 1e-2 (out is rounded to bfloat16 at the end, as the layer's tensor path returns it)."""
    from wuneng.fused.one_token import time_mix_one_token_planned, time_mix_plan

    C, H, N, B = 200, 3, 64, 2
    wt64 = make_weights(C, H, N, True, seed=13, ranks=(32, 32, 16, 48))
    wt64 = TimeMixWeights(*(t.to(torch.bfloat16).double() if isinstance(t, torch.Tensor) else t for t in wt64))
    x, shift, S, v_first = make_inputs(B, C, H, N, seed=14)
    x, shift, v_first = (t.to(torch.bfloat16).double() for t in (x, shift, v_first))
    ref = time_mix_one_token_reference(x, shift, S, v_first, wt64)
    wt = TimeMixWeights(*(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t for t in wt64))
    plan = time_mix_plan(wt)
    assert plan is not None and plan.suffix == "bf16" and plan.compute_dtype == torch.float32
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, new_shift, new_S, vf = time_mix_one_token_planned(
            x.to(torch.bfloat16), shift.to(torch.bfloat16), S.float(), v_first.to(torch.bfloat16), plan
        )
    finally:
        torch.set_num_threads(before)
    assert out.dtype == new_shift.dtype == torch.bfloat16 and new_S.dtype == torch.float32
    assert rel_err(new_S.double(), ref[2]) <= 1e-5
    assert rel_err(out.double(), ref[0]) <= 1e-2
    assert torch.equal(new_shift.double(), ref[1])


@needs_kernel
def test_bfloat16_time_mix_layer_decodes_through_the_kernel(monkeypatch):
    """A bfloat16 TimeMix decoding step takes the bfloat16 kernel and lands nearer the float64 layer than the
    bfloat16 tensor path does (which rounds every intermediate to bfloat16), both within 3e-2."""
    import wuneng.layers.rwkv7 as rwkv7_layers
    from wuneng.layers.low_rank import derived_weights_session

    torch.manual_seed(5)
    tm64 = perturb_(TimeMix(128, 2, 64, 1, 3).double(), 0.2)
    with torch.no_grad():
        for p in tm64.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    tm = TimeMix(128, 2, 64, 1, 3)
    tm.load_state_dict(tm64.state_dict())
    tm = tm.to(torch.bfloat16)
    x, v_first = torch.randn(1, 1, 128).to(torch.bfloat16), torch.randn(1, 1, 128).to(torch.bfloat16)
    state = (torch.randn(1, 128).to(torch.bfloat16), 0.3 * torch.randn(1, 2, 64, 64))
    calls = []
    real = rwkv7_layers.time_mix_one_token_planned
    monkeypatch.setattr(rwkv7_layers, "time_mix_one_token_planned", lambda *a: calls.append(a[4].suffix) or real(*a))
    tm64.wkv_impl = "chunked"  # the float64 tensor path
    with torch.no_grad(), derived_weights_session():
        want = tm64(x.double(), v_first.double(), (state[0].double(), state[1].double()))
        fused = tm(x, v_first, state)
        tm.wkv_impl = "chunked"
        tensor = tm(x, v_first, state)
    assert calls == ["bf16"]
    assert fused[0].dtype == torch.bfloat16 and fused[2][1].dtype == torch.float32
    err_fused, err_tensor = rel_err(fused[0].double(), want[0]), rel_err(tensor[0].double(), want[0])
    assert err_fused <= err_tensor and err_tensor <= 3e-2, (err_fused, err_tensor)
    assert rel_err(fused[2][1].double(), want[2][1]) <= 1e-5


def _hybrid_case(C, H, N, B, H_kv, seed, dtype=torch.float64):
    """Weights, inputs (u, shift, S, v_first, q, k, v) and a mask with a padded row, for the hybrid kernel."""
    wt = make_hybrid_weights(C, H, N, True, True, 2 * N, seed=seed)
    u, shift, S, v_first = make_inputs(B, C, H, N, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    q, k, v = (torch.randn(B, n, generator=g, dtype=torch.float64) for n in (H * N, H_kv * N, H_kv * N))
    mask = torch.ones(B, dtype=torch.float64)
    mask[1] = 0.0
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return HybridStateWeights(*map(cast, wt)), [cast(t) for t in (u, shift, S, v_first, q, k, v)], cast(mask)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_hybrid_kernel_result_does_not_depend_on_the_thread_count(dtype, tol):
    """The hybrid state kernel splits columns and heads across torch's threads; every element is computed by one
    thread in the same order, so 1 and 2 threads agree exactly, and both agree with the float64 reference (relative
    error <= tol). C = 200 (blocks of 16 columns with a ragged tail), A = 192, grouped kv heads, a padded row."""
    wt64, ins64, mask64 = _hybrid_case(200, 3, 64, 3, 1, seed=21)
    ref = hybrid_state_one_token_reference(*ins64, wt64, mask64)
    wt, ins, mask = _hybrid_case(200, 3, 64, 3, 1, seed=21, dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(hybrid_state_one_token(*ins, wt, mask, impl="cpu"))
    finally:
        torch.set_num_threads(threads)
    for name, one, two, want in zip(("y", "shift", "state", "v_first", "gamma", "middle"), *results, ref):
        assert torch.equal(one, two), name
        assert rel_err(one, want) <= tol, name


@needs_kernel
def test_hybrid_kernel_is_given_torch_thread_count(monkeypatch):
    """The hybrid kernel's argument struct carries ``threads`` = torch.get_num_threads() (the OpenMP region's size)."""
    from wuneng.fused._abi import HybridStateArgs

    assert "threads" in HybridStateArgs.field_names
    lib, seen = one_token_mod._library(), []

    class Recording:  # the library, recording the struct each hybrid kernel call receives
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if not name.startswith("hybrid_state_one_token_"):
                return fn
            return lambda args: (seen.append(HybridStateArgs.packer.unpack(args)), fn(args))[1]

    monkeypatch.setattr(one_token_mod, "_library", lambda: Recording())
    wt, ins, mask = _hybrid_case(32, 2, 16, 2, 2, seed=5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            hybrid_state_one_token(*ins, wt, mask, impl="cpu")
    finally:
        torch.set_num_threads(threads)
    at = HybridStateArgs.order.index("threads")
    assert [row[at] for row in seen] == [1, 2]
