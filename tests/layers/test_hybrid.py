"""HybridMixer (a teacher's transformers attention wrapped in place by ``wrap_attention``) and ARWKVMixer
(wuneng.layers.hybrid) against a slow float64 reference written from SPEC section 3, plus cache, padding,
initialisation and error behaviour.

The mixer under test is a tiny Qwen2 attention (``Qwen2Attention``: hidden 32, 2 query heads, 1 kv head, head
size 16, q/k/v biases) made a hybrid mixer by :func:`~wuneng.layers.hybrid.wrap_attention`; it is called as its
teacher's decoder layer calls it, with the position embeddings of ``Qwen2RotaryEmbedding`` and the 4-D mask of
transformers' ``create_causal_mask`` (:func:`teacher_arguments`), plus the :class:`HybridContext` a WuNeng model
adds (the 2-D padding mask and v_first).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

import wuneng.layers.hybrid as hybrid_mod
from wuneng.cache import DummyLayer, RecurrentStateCache  # transformers 5.17 has no DummyLayer of its own
from wuneng.fused import one_token as one_token_mod
from wuneng.layers.hybrid import (
    FUSIONS,
    ARWKVMixer,
    HybridContext,
    HybridMixer,
    middle_head_indices,
    wrap_attention,
)
from wuneng.layers.low_rank import derived_weights_session
from wuneng.ops.wkv7.cpu import cpu_kernel_available

from _helpers import perturb_

C, H, HKV, D = 32, 2, 1, 16  # width, query heads, kv heads, head size
TEACHER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def qwen2_config(attn_implementation: str = "sdpa", **shapes) -> Qwen2Config:
    """A tiny Qwen2 teacher config (3 layers, so that layer indices 0-2 exist)."""
    kw = dict(hidden_size=C, num_attention_heads=H, num_key_value_heads=HKV, head_dim=D)
    kw.update(shapes)
    return Qwen2Config(
        **kw, num_hidden_layers=3, intermediate_size=64, vocab_size=64, attn_implementation=attn_implementation
    )


def make_mixer(seed=0, dtype=torch.float64, perturb=True, attn_implementation="sdpa", **kw):
    """A Qwen2Attention (layer ``layer_idx``, default 1) wrapped in place into a HybridMixer; its new parameters
    perturbed (``perturb``) so that every path of the mixer matters."""
    torch.manual_seed(seed)
    layer_idx, num_layers = kw.pop("layer_idx", 1), kw.pop("num_layers", 3)
    kw.setdefault("middle_heads", 2)
    attn = Qwen2Attention(qwen2_config(attn_implementation), layer_idx)
    m = wrap_attention(attn, C, layer_idx, num_layers, **kw).to(dtype)
    assert isinstance(m, HybridMixer) and isinstance(m, Qwen2Attention) and m is attn
    if perturb:
        perturb_new_(m)
    return m


def perturb_new_(module, scale=0.2):
    """Noise on every parameter that is not the teacher's attention, so that every path of the mixer matters."""
    return perturb_(module, scale, only=lambda name: name.split(".")[0] not in TEACHER_NAMES)


def teacher_arguments(m, u, mask=None, cache=None):
    """What the teacher's decoder layer passes its attention: ``position_embeddings`` (cos, sin) [B,T,d] from
    Qwen2RotaryEmbedding, the 4-D ``attention_mask`` of create_causal_mask (None where the attention
    implementation needs none), ``past_key_values``. Positions continue the cache's; with a 2-D padding mask
    [B, past + T] they count the real tokens (as generate() derives them: padding at 0)."""
    config = getattr(m, "config", None) or qwen2_config()
    B, T, _ = u.shape
    if mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        position_ids = torch.arange(past, past + T).expand(B, T)
    else:
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
    mask4d = create_causal_mask(
        config=config, inputs_embeds=u, attention_mask=mask, past_key_values=cache, position_ids=position_ids
    )
    cos_sin = Qwen2RotaryEmbedding(config)(u, position_ids)
    return dict(position_embeddings=cos_sin, attention_mask=mask4d, past_key_values=cache)


def context(m, mask=None, v_first=None) -> HybridContext:
    """The WuNeng model's side of the call: the 2-D padding mask and v_first of the first layer of m's kind."""
    return HybridContext(mask, None if v_first is None else {m.kind: v_first})


def call(m, u, mask=None, cache=None, v_first=None):
    """m called as the teacher's decoder layer calls its attention inside a WuNeng model -> (out, attn weights)."""
    return m(hidden_states=u, wuneng_context=context(m, mask, v_first), **teacher_arguments(m, u, mask, cache))


# ---------------------------------------------------------------------------------------------------------
# The reference: SPEC section 3 written out token by token, float64.
# ---------------------------------------------------------------------------------------------------------
def rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_state_heads(m: HybridMixer, u, q, k, v, v_first=None):
    """Y [B,T,H,d] by the literal RWKV-7 recurrence (SPEC section 2) on r = q + u R1 R2, k_s, v_s = repeat_kv."""
    st = m.state
    B, T, _ = u.shape
    Hq, d = m.num_heads, m.head_dim
    rep = m.num_kv_groups
    prev = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], 1)
    xx = prev - u
    r = q.reshape(B, T, -1) + u @ m.receptance_lora_a @ m.receptance_lora_b
    ks = k.repeat_interleave(rep, dim=2).reshape(B, T, -1)
    vs = v.repeat_interleave(rep, dim=2).reshape(B, T, -1)
    xw, xa, xv = u + xx * st.x_w, u + xx * st.x_a, u + xx * st.x_v
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(st.w0 + torch.tanh(xw @ st.w1) @ st.w2))
    if st.value_residual:
        vs = vs + (v_first - vs) * torch.sigmoid(st.v0 + (xv @ st.v1) @ st.v2)
    alpha = torch.sigmoid(st.a0 + (xa @ st.a1) @ st.a2)
    kk = F.normalize((ks * st.k_k).view(B, T, Hq, d), dim=-1, eps=1e-12).view(B, T, -1)
    ks = ks * (1 + (alpha - 1) * st.k_a)
    a, b = -kk, kk * alpha
    view = lambda t: t.view(B, T, Hq, d)  # noqa: E731
    r4, w4, k4, v4, a4, b4 = map(view, (r, w, ks, vs, a, b))
    S = torch.zeros(B, Hq, d, d, dtype=u.dtype)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a4[:, t])
        S = (
            S * w4[:, t, :, None, :]
            + sa[..., None] * b4[:, t, :, None, :]
            + v4[:, t, :, :, None] * k4[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhij,bhj->bhi", S, r4[:, t]))
    y = torch.stack(ys, 1)  # [B,T,H,d]
    mu = y.mean(-1, keepdim=True)
    var = y.var(-1, unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + st.ln_x.eps) * st.ln_x.weight.view(Hq, d) + st.ln_x.bias.view(Hq, d)
    bonus = (r4 * k4 * st.r_k).sum(-1, keepdim=True) * v4
    return y + bonus, vs


def reference_attention(m, q, k, v, cos, sin):
    """Causal softmax attention by plain matmuls, RoPE in the rotate-half convention (Qwen2's), repeat_kv.
    q [B,T,H,d], k, v [B,T,H_kv,d], cos, sin [B,T,d]; returns [B,T,H,d]."""
    T = q.shape[1]

    def rot(x):  # [B,T,h,d]
        half = x.shape[-1] // 2
        return x * cos[:, :, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, :, None]

    qr, kr = rot(q), rot(k).repeat_interleave(m.num_kv_groups, 2)
    vr = v.repeat_interleave(m.num_kv_groups, 2)
    scores = torch.einsum("bthd,bshd->bhts", qr, kr) / math.sqrt(m.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)


def reference_hybrid(m: HybridMixer, u, cos, sin, v_first=None):
    """out [B,T,C] and Y [B,T,H,d] of SPEC section 3."""
    B, T, _ = u.shape
    Hq, d = m.num_heads, m.head_dim
    q = (u @ m.q_proj.weight.T + m.q_proj.bias).view(B, T, Hq, d)
    k = (u @ m.k_proj.weight.T + m.k_proj.bias).view(B, T, -1, d)
    v = (u @ m.v_proj.weight.T + m.v_proj.bias).view(B, T, -1, d)
    y, _ = reference_state_heads(m, u, q, k, v, v_first)
    if m.state_query:
        q = q + m.state_query_scale.view(1, 1, Hq, 1) * torch.einsum("bthd,de->bthe", y, m.state_query_proj)
    a = reference_attention(m, q, k, v, cos, sin)
    wo = m.o_proj.weight.T
    if m.fusion == "gate":
        gamma = torch.sigmoid((u @ m.gate_lora_a @ m.gate_lora_b).view(B, T, Hq, d) + m.gate_bias) * m.gate_scale
        z = a + gamma * (y - a)
    elif m.fusion == "add":
        z = a + m.fusion_beta * y
    elif m.fusion == "hymba":
        eps = m.norm_attn.variance_epsilon
        z = (rms(a.reshape(B, T, -1), m.norm_attn.weight, eps) + rms(y.reshape(B, T, -1), m.norm_state.weight, eps)) / 2
    else:
        z = a
    out = z.reshape(B, T, -1) @ wo
    if m.fusion == "concat":
        out = out + y.reshape(B, T, -1) @ m.o_state.weight.T
    if m.num_middle_heads:
        s = torch.sigmoid(u @ m.middle_lora_a @ m.middle_lora_b).view(B, T, -1, d)
        idx = middle_head_indices(Hq, m.num_middle_heads)
        mid = s * a[:, :, idx] + (1 - s) * y[:, :, idx]
        out = out + mid.reshape(B, T, -1) @ m.o_middle.weight.T
    return out, y


# ---------------------------------------------------------------------------------------------------------
CONFIGS = [dict(fusion=f, middle_heads=2, state_query=True) for f in FUSIONS] + [
    dict(fusion="gate", middle_heads=0, state_query=False),
    dict(fusion="concat", middle_heads=1, state_query=False),
]


def _config_id(kw):
    return f"{kw['fusion']}-m{kw['middle_heads']}-sq{int(kw['state_query'])}"


@pytest.mark.parametrize(
    "kw",
    CONFIGS + [dict(fusion="gate", middle_heads=2, state_query=True, value_residual=True)],
    ids=lambda kw: _config_id(kw) + ("-vr" if kw.get("value_residual") else ""),
)
def test_hybrid_matches_float64_reference(kw):
    """Forward and gradients of the mixer (every parameter, the teacher's included, and the input) equal the
    token-by-token reference (float64, rel. error < 1e-9 forward, < 1e-8 gradients). The teacher runs SDPA:
    transformers' eager attention takes its softmax in float32 even for float64 inputs."""
    m = make_mixer(**kw)
    torch.manual_seed(1)
    B, T = 2, 13
    u = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    v_first = torch.randn(B, T, H * D, dtype=torch.float64)
    args = teacher_arguments(m, u)
    out, _ = m(hidden_states=u, wuneng_context=context(m, None, v_first), **args)
    cos, sin = args["position_embeddings"]
    ref, _ = reference_hybrid(m, u, cos, sin, v_first)
    assert (out - ref).abs().max() <= 1e-9 * ref.abs().max()
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad((out * g).sum(), [u] + params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), [u] + params, allow_unused=True)
    for (name, _), ga, gb in zip([("u", None)] + list(m.named_parameters()), grads, ref_grads):
        if gb is None:
            assert ga is None or ga.abs().max() == 0, name
            continue
        assert (ga - gb).abs().max() <= 1e-8 * (gb.abs().max() + 1e-30), name


@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=_config_id)
def test_inference_path_equals_autograd_path(kw, value_residual, monkeypatch):
    """Without autograd every low-rank map runs in one batched pair of matmuls (low_rank_bank); it must equal the
    per-map path used in training (float64, rel. error < 1e-12), for prefill with left padding and for the
    following decode steps through the cache (on CPU one C call for the state side,
    :func:`~wuneng.fused.one_token.hybrid_state_one_token`), outputs and cached states alike."""
    m = make_mixer(value_residual=value_residual, layer_idx=0, num_layers=2, **kw)
    fused_calls = _count_calls(monkeypatch, hybrid_mod, "hybrid_state_one_token_planned")
    torch.manual_seed(2)
    B, P, T = 2, 3, 6
    u = torch.randn(B, T + 2, C, dtype=torch.float64)
    v_first = torch.randn(B, T + 2, H * D, dtype=torch.float64)
    mask = torch.ones(B, T + 2, dtype=torch.long)
    mask[1, :P] = 0  # row 1 left-padded
    results = []
    for grad in (True, False):
        cache, outs = _cache("hybrid"), []
        with torch.set_grad_enabled(grad), derived_weights_session(cache.derived_weights):  # as the model does
            for start, stop in ((0, T), (T, T + 1), (T + 1, T + 2)):
                out, _ = call(m, u[:, start:stop], mask[:, :stop], cache, v_first[:, start:stop])
                cache.advance(stop - start)
                outs.append(out.detach())
        results.append((torch.cat(outs, 1), cache))
    (out_g, cache_g), (out_n, cache_n) = results
    real = mask.bool()
    scale = out_g[real].abs().max()
    assert (out_n[real] - out_g[real]).abs().max() <= 1e-12 * scale
    for name in ("time_shift", "wkv"):
        ref = cache_g.get_state(0, name).detach()
        assert (cache_n.get_state(0, name) - ref).abs().max() <= 1e-12 * ref.abs().max(), name
    assert cache_n.derived_weights.holds(m, "low_rank_bank")  # the inference path did run (prefill)
    assert len(fused_calls) == (2 if cpu_kernel_available() else 0)  # and the two decode steps took the fused kernel


@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=_config_id)
def test_prefill_low_rank_maps_as_plain_matmuls_equal_the_bank_and_the_autograd_path(kw, value_residual, monkeypatch):
    """From WIDE_LOW_RANK_MIN_TOKENS tokens on the no-grad low-rank maps run as plain matmuls on the flattened
    tokens (HybridMixer._low_rank_outputs_wide: the token-shift mixes by linearity, the biases as rows of the second
    factors): every map's output equals low_rank_bank's (float64, rel. error < 1e-12 per map), with and without
    left padding (where x differs from u), and the whole mixer's prefill equals the autograd path."""
    m = make_mixer(value_residual=value_residual, layer_idx=0, num_layers=2, **kw)
    torch.manual_seed(3)
    B, T = 2, 40  # 80 tokens >= WIDE_LOW_RANK_MIN_TOKENS
    assert B * T >= hybrid_mod.WIDE_LOW_RANK_MIN_TOKENS
    u = torch.randn(B, T, C, dtype=torch.float64)
    v_first = torch.randn(B, T, H * D, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0
    for token_mask in (None, mask):
        with torch.no_grad():
            x, xx = m.shifted(u, token_mask, None)
            with derived_weights_session() as store:
                wide = m.low_rank_outputs(u, x, xx)
            assert store.holds(m, "wide_low_rank") and not store.holds(m, "low_rank_bank")
            monkeypatch.setattr(hybrid_mod, "WIDE_LOW_RANK_MIN_TOKENS", 10**9)
            bank = m.low_rank_outputs(u, x, xx)
            monkeypatch.undo()
        # the fused prefill (PREFILL_FUSED_CHAIN) hands the state heads' maps and the gate over before their sigmoids
        # and the receptance correction as its first factor u R1 (state_heads adds q in its addmm)
        logits = {name: key for name, key in hybrid_mod._PREFILL_LOGIT_NAMES.items() if key in wide}
        assert {logits.get(name, "r" if name == "receptance" else name) for name in bank} == set(wide)
        for name in bank:
            if name == "receptance":
                got = wide["r"] @ m.receptance_lora_b
            else:
                got = torch.sigmoid(wide[logits[name]]) if name in logits else wide[name]
            assert got.shape == bank[name].shape, name
            assert (got - bank[name]).abs().max() <= 1e-12 * bank[name].abs().max(), name
    outs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, _ = call(m, u, mask, None, v_first)
        outs.append(out.detach())
    real = mask.bool()
    assert (outs[1][real] - outs[0][real]).abs().max() <= 1e-12 * outs[0][real].abs().max()


def test_prefill_token_shift_in_one_pass_equals_token_shift(monkeypatch):
    """Without autograd and with PREFILL_FUSED_CHAIN, HybridMixer.shifted writes xx = shift(x) - x in one pass
    (no concatenation): equal to rwkv7.token_shift (float64, exactly: the same subtractions), with and without the
    previous token, with padding; with autograd it is token_shift itself."""
    from wuneng.layers.rwkv7 import token_shift

    calls = _count_calls(monkeypatch, hybrid_mod, "token_shift")
    torch.manual_seed(5)
    u = torch.randn(2, 9, C, dtype=torch.float64)
    mask = torch.ones(2, 9)
    mask[1, :3] = 0
    for prev in (None, torch.randn(2, C, dtype=torch.float64)):
        for token_mask in (None, mask):
            with torch.no_grad():
                x, xx = HybridMixer.shifted(u, token_mask, prev)
            assert torch.equal(xx, token_shift(x, prev))
    assert calls == []  # the one-pass form served every no-grad call
    HybridMixer.shifted(u.requires_grad_(), None, None)
    assert len(calls) == 1


@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=_config_id)
def test_prefill_fused_chain_equals_the_unfused_prefill_and_the_autograd_path(kw, value_residual, monkeypatch):
    """With PREFILL_FUSED_CHAIN the no-grad prefill hands the state heads' maps and the fusion gate over before
    their sigmoids and runs the state heads' input chain (ops.state_inputs: state_inputs_grouped on the grouped
    keys and values, state_inputs on repeated ones where v_first must stay unmasked) and, with gate fusion, the
    gate (gate_fusion) as fused passes: the mixer's output and v_first equal the unfused prefill's and the
    autograd path's (float64, rel. error < 1e-12 on real tokens), with and without left padding."""
    import wuneng.layers.rwkv7 as rwkv7_mod

    m = make_mixer(value_residual=value_residual, layer_idx=1, num_layers=2, **kw)
    torch.manual_seed(4)
    B, T = 2, 40  # 80 tokens >= WIDE_LOW_RANK_MIN_TOKENS
    u = torch.randn(B, T, C, dtype=torch.float64)
    v_first = torch.randn(B, T, H * D, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0
    for token_mask in (None, mask):
        runs = {}
        for name, grad, fused in (("autograd", True, True), ("unfused", False, False), ("fused", False, True)):
            monkeypatch.setattr(hybrid_mod, "PREFILL_FUSED_CHAIN", fused)
            chain = _count_calls(monkeypatch, rwkv7_mod, "state_inputs")
            grouped = _count_calls(monkeypatch, rwkv7_mod, "state_inputs_grouped")
            gates = _count_calls(monkeypatch, hybrid_mod, "gate_fusion")
            ctx = context(m, token_mask, v_first)
            with torch.set_grad_enabled(grad):
                out, _ = m(hidden_states=u, wuneng_context=ctx, **teacher_arguments(m, u, token_mask, None))
            runs[name] = (out.detach(), len(chain), len(grouped), len(gates))
            monkeypatch.undo()
        # the fused passes did run; the grouped keys and values read in place except where v_first must stay
        # unmasked (no value residual, padding)
        assert m.num_kv_groups > 1
        in_place = int(value_residual or token_mask is None)
        assert runs["fused"][1:] == (1 - in_place, in_place, int(kw["fusion"] == "gate"))
        assert runs["unfused"][1:] == (0, 0, 0)
        real = slice(None) if token_mask is None else token_mask.bool()
        ref = runs["autograd"][0][real]
        for name in ("fused", "unfused"):
            assert (runs[name][0][real] - ref).abs().max() <= 1e-12 * ref.abs().max(), name


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends its keyword arguments to the returned list."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.skipif(not cpu_kernel_available(), reason="C kernel unavailable")
def test_fused_decoding_only_where_preferred(monkeypatch):
    """More work than one core should take (weights x batch x threads > FUSED_WORK_LIMIT) keeps the tensor path."""
    m = make_mixer(layer_idx=0, num_layers=1, value_residual=False)
    calls = _count_calls(monkeypatch, hybrid_mod, "hybrid_state_one_token_planned")
    u = torch.randn(1, 1, C, dtype=torch.float64)
    with torch.no_grad():
        call(m, u)
        assert len(calls) == 1
        monkeypatch.setattr(one_token_mod, "FUSED_WORK_LIMIT", 0)
        call(m, u)
        assert len(calls) == 1


def test_align_forward_views():
    """align_forward (the teacher attention's own arguments): output = forward(u); state = o_proj(Y) with Y from
    the reference; v_first = the first layer's values."""
    m = make_mixer(fusion="gate", layer_idx=0, value_residual=False)
    torch.manual_seed(2)
    u = torch.randn(2, 9, C, dtype=torch.float64)
    args = teacher_arguments(m, u)
    res = m.align_forward(u, wuneng_context=HybridContext(), **args)
    out, _ = m(hidden_states=u, wuneng_context=HybridContext(), **args)
    _, y = reference_hybrid(m, u, *args["position_embeddings"])
    assert torch.allclose(res["output"], out, rtol=0, atol=1e-12)
    assert torch.allclose(res["state"], m.o_proj(y.reshape(2, 9, -1)), rtol=0, atol=1e-9)
    v = u @ m.v_proj.weight.T + m.v_proj.bias  # [B,T,H_kv d]; the first layer's v_first is repeat_kv(v)
    assert torch.allclose(res["v_first"], v.view(2, 9, HKV, D).repeat_interleave(H // HKV, 2).reshape(2, 9, -1))


def test_align_forward_value_residual_store():
    """A value-residual layer called alone takes v_first from the first layer's align_forward through the
    HybridContext shared by the layers of a batch; without it, one clear error."""
    first = make_mixer(seed=0, layer_idx=0, value_residual=False)
    later = make_mixer(seed=1, layer_idx=1, value_residual=True)
    u = torch.randn(2, 7, C, dtype=torch.float64)
    args = teacher_arguments(first, u)
    with pytest.raises(ValueError, match="v_first of the first hybrid layer, which has not run"):
        later.align_forward(u, wuneng_context=HybridContext(), **args)
    ctx = HybridContext()
    vf = first.align_forward(u, wuneng_context=ctx, **args)["v_first"]
    assert ctx.v_first["hybrid"] is vf
    aligned = later.align_forward(u, wuneng_context=ctx, **args)["output"]
    assert torch.equal(aligned, later(hidden_states=u, wuneng_context=context(later, None, vf), **args)[0])
    ref, _ = reference_hybrid(later, u, *args["position_embeddings"], vf)
    assert (aligned - ref).abs().max() <= 1e-9 * ref.abs().max()


def _teacher_and_wrapped(fusion, attn_implementation="sdpa", **kw):
    """A Qwen2Attention (float32) and a deep copy of it wrapped into a hybrid mixer, unperturbed."""
    torch.manual_seed(3)
    teacher = Qwen2Attention(qwen2_config(attn_implementation), 1)
    m = wrap_attention(copy.deepcopy(teacher), C, 1, 3, fusion=fusion, middle_heads=2, **kw)
    return teacher, m


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "hymba"])
def test_function_preserving_init(fusion, attn_implementation):
    """Unperturbed, the hybrid mixer computes exactly its teacher's attention (with padding too), and keeps the
    teacher's parameters under the teacher's names."""
    teacher, m = _teacher_and_wrapped(fusion, attn_implementation, value_residual=True)
    teacher_state = teacher.state_dict()
    mixer_state = m.state_dict()
    assert set(teacher_state) < set(mixer_state)
    assert all(torch.equal(mixer_state[k], v) for k, v in teacher_state.items())
    u = torch.randn(2, 10, C)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    args = teacher_arguments(teacher, u, mask)
    out, _ = m(hidden_states=u, wuneng_context=context(m, mask, torch.randn(2, 10, H * D)), **args)
    ref, _ = teacher(u, **args)
    assert torch.equal(out, ref)


def test_hymba_is_not_function_preserving():
    teacher, m = _teacher_and_wrapped("hymba")
    u = torch.randn(1, 6, C)
    args = teacher_arguments(teacher, u)
    assert not torch.allclose(m(hidden_states=u, **args)[0], teacher(u, **args)[0], atol=1e-3)


def _cache(kind):
    return RecurrentStateCache(1, layers=[DummyLayer() if kind == "arwkv" else DynamicLayer()])


def _make(kind, attn_implementation="sdpa"):
    if kind == "hybrid":
        m = make_mixer(layer_idx=0, num_layers=1, value_residual=False, attn_implementation=attn_implementation)
    else:
        torch.manual_seed(0)
        m = ARWKVMixer(C, 2, 16, 0, 1).to(torch.float64)
        perturb_new_(m)
    return m


def _run_chunks(m, u, mask, sizes):
    """Calls of m on consecutive chunks of u through one cache (advanced after each call, as the model does)."""
    cache = _cache(m.kind)
    outs, start = [], 0
    for n in sizes:
        m_now = None if mask is None else mask[:, : start + n]
        outs.append(call(m, u[:, start : start + n], m_now, cache)[0])
        cache.advance(n)
        start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("kind", ["hybrid", "arwkv"])
def test_chunked_and_token_by_token_equal_full(kind):
    """Prefill in chunks / one token at a time with the cache equals one pass over the sequence."""
    m = _make(kind)
    torch.manual_seed(5)
    u = torch.randn(2, 14, C, dtype=torch.float64)
    full, _ = call(m, u)
    for sizes in ([14], [5, 1, 1, 7], [1] * 14):
        out, cache = _run_chunks(m, u, None, sizes)
        assert (out - full).abs().max() <= 1e-10, sizes
        if kind == "hybrid":  # the teacher's key/value layer holds every position
            assert cache.layers[0].keys.shape == (2, HKV, 14, D)


@pytest.mark.parametrize(
    "kind, attn_implementation", [("hybrid", "sdpa"), ("hybrid", "eager"), ("arwkv", None)], ids=str
)
def test_padding_never_enters_the_state(kind, attn_implementation):
    """Left padding with garbage at the padded positions: the real tokens' outputs and the cached state equal
    those of the unpadded sequence."""
    m = _make(kind, attn_implementation)
    torch.manual_seed(6)
    P, T = 4, 9
    u = torch.randn(1, T, C, dtype=torch.float64)
    garbage = 100 * torch.randn(1, P, C, dtype=torch.float64)
    padded = torch.cat([garbage, u], 1)
    mask = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.ones(1, T, dtype=torch.long)], 1)
    c_pad, c_ref = _cache(kind), _cache(kind)
    out_pad, _ = call(m, padded, mask, c_pad)  # positions: padding at 0, the tokens at 0..T-1
    out_ref, _ = call(m, u, None, c_ref)
    # transformers' eager attention takes the softmax of a float64 score in float32, where the mask's
    # finfo(float64).min is -inf: a padded query (no key to see) gets NaN from the teacher itself
    checked = out_pad[:, P:] if attn_implementation == "eager" else out_pad
    assert torch.isfinite(checked).all()
    assert (out_pad[:, P:] - out_ref).abs().max() <= 1e-10
    for name in ("time_shift", "wkv"):
        assert (c_pad.get_state(0, name) - c_ref.get_state(0, name)).abs().max() <= 1e-10, name


def test_middle_head_indices_evenly_spaced():
    assert middle_head_indices(28, 4) == [3, 10, 17, 24]
    assert middle_head_indices(4, 4) == [0, 1, 2, 3]
    assert middle_head_indices(8, 1) == [4]


def test_new_parameters_get_gradients_after_perturbation():
    """Every parameter of the mixer receives a non-zero gradient once the zero inits are perturbed."""
    m = make_mixer(fusion="gate", middle_heads=2, state_query=True, value_residual=True)
    u = torch.randn(2, 8, C, dtype=torch.float64)
    out, _ = call(m, u, v_first=torch.randn(2, 8, H * D, dtype=torch.float64))
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fusion="mean", middle_heads=2), "unknown fusion 'mean'"),
        (dict(middle_heads=3), "middle_heads"),
        (dict(gate_rank=0, middle_heads=2), "gate_rank"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wrap_attention(Qwen2Attention(qwen2_config(), 1), C, 1, 3, **kwargs)


@pytest.mark.parametrize("head_dim", [4, 12, 20])
def test_head_size_the_state_heads_cannot_use(head_dim):
    """State heads take any positive multiple of 8 (the CPU forms agree at 8, 24, 40); other sizes are refused."""
    config = qwen2_config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    with pytest.raises(ValueError, match=f"head size {head_dim} cannot be used by RWKV-7 heads"):
        wrap_attention(Qwen2Attention(config, 0), 4 * head_dim, 0, 1)


def test_stand_ins_are_made_once_and_hold_nothing_between_calls():
    """The projections' stand-ins of a teacher-attention call are made at the first call and reused (not
    submodules: the module tree and the parameters are the same before and after), and after a call, one that
    raised included, they hold no tensor of it (the attention input and the projections would otherwise stay alive
    until the next call) and the teacher's projections are back in place."""
    m = make_mixer(layer_idx=0, num_layers=1, value_residual=False)
    before = [n for n, _ in m.named_modules()]
    q_proj = m.q_proj
    torch.manual_seed(0)
    u = torch.randn(1, 3, C, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = call(m, u)
        stand_ins = m._stand_ins()
        out, _ = call(m, u)
    assert m._stand_ins() is stand_ins and torch.equal(out, ref)
    assert [n for n, _ in m.named_modules()] == before and m.q_proj is q_proj
    assert all(getattr(s, "armed", None) is None and getattr(s, "fn", None) is None for s in stand_ins.values())
    copied = copy.deepcopy(m)  # a copy makes (or copies) its own, empty ones
    with torch.no_grad():
        assert torch.equal(call(copied, u)[0], ref)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        m.fuse = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # fails inside the teacher's call
        try:
            call(m, u)
        finally:
            del m.fuse
    assert all(getattr(s, "armed", None) is None and getattr(s, "fn", None) is None for s in stand_ins.values())
    assert m.q_proj is q_proj and m.o_proj is not stand_ins["o_proj"]


def test_attention_the_wrapper_cannot_serve():
    """An attention without the projections, one wrapped twice, and one whose forward feeds its projections
    something other than its input: one clear error each."""
    attn = Qwen2Attention(qwen2_config(), 0)
    del attn.o_proj
    with pytest.raises(ValueError, match="Qwen2Attention cannot be wrapped: it has no o_proj"):
        wrap_attention(attn, C, 0, 1)
    m = make_mixer(layer_idx=0, num_layers=1)
    with pytest.raises(ValueError, match="already a WuNeng hybrid mixer"):
        wrap_attention(m, C, 0, 1)

    class ScaledInputAttention(Qwen2Attention):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(2 * hidden_states, *args, **kwargs)

    torch.manual_seed(0)
    odd = wrap_attention(ScaledInputAttention(qwen2_config(), 0), C, 0, 1, middle_heads=2).double()
    u = torch.randn(1, 3, C, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="called q_proj on something other than its input"):
        call(odd, u)


def test_joined_low_rank_weights_follow_in_place_updates():
    """Without autograd the joined [R1 | G1 | P1] copy is reused between calls; an in-place change of any
    factor (an optimizer step, a weight load) must be seen by the next call."""
    m = make_mixer(dtype=torch.float32, middle_heads=2)
    u = torch.randn(2, 3, m.hidden_size)
    with torch.no_grad():
        before = m.low_rank_inputs(u)
        assert torch.equal(m.low_rank_inputs(u)["gate"], before["gate"])  # cached copy, same result
        m.gate_lora_a.add_(1.0)
        after = m.low_rank_inputs(u)
    expected = u @ m.gate_lora_a
    assert torch.allclose(after["gate"], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after["gate"], before["gate"])
    # with autograd the gradient reaches every factor through the join
    m.low_rank_inputs(u)["middle"].sum().backward()
    assert m.middle_lora_a.grad is not None and m.middle_lora_a.grad.abs().sum() > 0


@pytest.mark.skipif(not cpu_kernel_available(), reason="C kernel unavailable")
def test_decoding_plan_is_kept_per_session_and_follows_weight_changes(monkeypatch):
    """The fused decoding step's weights and checks are made once per decoding session (the cache's derived
    weights), and a weight changed in place, or a dtype change, in the middle of decoding is seen at the next
    step: each step equals the tensor path (float64, rel. error < 1e-12) with the weights as they are then."""
    m = make_mixer(layer_idx=0, num_layers=1, value_residual=False)
    torch.manual_seed(4)
    u = torch.randn(1, 4, C, dtype=torch.float64)

    def decode(model, use_kernel, change):
        cache, outs = _cache("hybrid"), []
        if not use_kernel:
            monkeypatch.setattr(hybrid_mod, "kernel_preferred_for", lambda *a: False)
        with torch.no_grad(), derived_weights_session(cache.derived_weights):
            for t in range(4):
                if t == 2:
                    change(model)
                outs.append(call(model, u[:, t : t + 1], None, cache)[0])
                cache.advance(1)
        monkeypatch.undo()
        return torch.cat(outs, 1), cache

    def bump(model):
        model.state.w1.add_(0.3)
        model.gate_lora_b.mul_(2.0)

    fused, cache = decode(copy.deepcopy(m), True, bump)
    tensor, _ = decode(copy.deepcopy(m), False, bump)
    assert cache.derived_weights.builds >= 2  # built at the first step and again after the change
    assert (fused - tensor).abs().max() <= 1e-12 * tensor.abs().max()
    unchanged, _ = decode(copy.deepcopy(m), True, lambda model: None)
    assert (unchanged[:, 2:] - fused[:, 2:]).abs().max() > 1e-6  # the change did reach the kernel
    calls = _count_calls(monkeypatch, hybrid_mod, "hybrid_state_one_token_planned")
    with torch.no_grad():
        call(m.float(), u[:, :1].float())  # float32 weights: a new plan of that dtype, still the kernel
    assert len(calls) == 1


@pytest.mark.parametrize("fusion", ["gate", "concat", "hymba"])
def test_middle_heads_output_in_one_addmm_equals_the_module_calls_and_respects_hooks(fusion):
    """Without autograd the middle heads' output product and its sum with the output projection are one addmm
    (into o_proj's output when nobody else holds it): equal (float64, rel. error < 1e-12) to the autograd form,
    which calls o_middle and adds; a forward hook on o_proj keeps the output it saw (the sum goes to a new tensor
    then), and a hook on o_middle still runs (the module is called)."""
    m = make_mixer(fusion=fusion, middle_heads=2)
    torch.manual_seed(4)
    B, T = 2, 5
    u = torch.randn(B, T, C, dtype=torch.float64)
    a = torch.randn(B, T, H, D, dtype=torch.float64)
    y = torch.randn(B, T, H, D, dtype=torch.float64)
    low = m.low_rank_inputs(u)
    low = {k: v.detach() for k, v in low.items()}
    with torch.enable_grad():
        ref = m.fuse(u, a, y, low).detach()
    with torch.no_grad():
        out = m.fuse(u, a, y, low)
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    seen, middle_calls = [], []
    handles = [
        m.o_proj.register_forward_hook(lambda _m, _i, o: seen.append((o, o.clone()))),
        m.o_middle.register_forward_hook(lambda *_: middle_calls.append(1)),
    ]
    with torch.no_grad():
        hooked = m.fuse(u, a, y, low)
    assert (hooked - ref).abs().max() <= 1e-12 * ref.abs().max()
    ((held, at_call),) = seen
    assert torch.equal(held, at_call)  # o_proj's output, as its hook got it, was not written into
    assert middle_calls == [1]
    handles[1].remove()  # o_proj still hooked: the product is one addmm into a new tensor
    seen.clear()
    with torch.no_grad():
        hooked = m.fuse(u, a, y, low)
    assert (hooked - ref).abs().max() <= 1e-12 * ref.abs().max()
    ((held, at_call),) = seen
    assert torch.equal(held, at_call)
    handles[0].remove()
