"""RWKV-7 layers: the initialisation of SPEC section 2, a float64 per-token oracle of the time-mix and
channel-mix (values and gradients), state carry, and left padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from wuneng.layers.low_rank import derived_weights_session
from wuneng.layers.rwkv7 import ChannelMix, TimeMix, lora_ranks

from _helpers import perturb_, rel_err

C, N, L = 32, 8, 3  # width, head size, layers of the tiny layers under test
H = C // N


# -- initialisation (SPEC section 2), formulas written out independently of the layer code -------------------


@pytest.mark.parametrize("layer_idx", [0, 1, 2])
def test_time_mix_init_matches_spec_formulas(layer_idx):
    torch.manual_seed(0)
    tm = TimeMix(C, H, N, layer_idx, L)
    r01, r1 = layer_idx / (L - 1), 1 - layer_idx / L
    for n in range(C):
        ddd = n / C
        lin = n / (C - 1) - 0.5
        zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zig = zz * abs(zz)
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        expect = {
            "x_r": 1 - ddd ** (0.2 * r1), "x_w": 1 - ddd ** (0.9 * r1), "x_k": 1 - ddd ** (0.7 * r1),
            "x_v": 1 - ddd ** (0.7 * r1), "x_a": 1 - ddd ** (0.9 * r1), "x_g": 1 - ddd ** (0.2 * r1),
            "w0": www + 0.5 + 2.5 * zig, "a0": -0.19 + 0.3 * zig + 0.4 * lin, "v0": 0.73 - 0.4 * lin,
            "k_k": 0.71 - 0.1 * lin, "k_a": 1.02,
        }  # fmt: skip
        for name, value in expect.items():
            got = getattr(tm, name)[n].item()
            assert got == pytest.approx(value, rel=1e-5, abs=1e-6), (name, n, got, value)
    assert torch.all(tm.r_k == -0.04)
    assert torch.allclose(tm.ln_x.weight, torch.full((C,), ((layer_idx + 1) / L) ** 0.7))
    assert torch.all(tm.ln_x.bias == 0)
    assert tm.ln_x.eps == pytest.approx(64e-5)
    for name in ("w1", "a1", "v1", "g1"):
        assert torch.all(getattr(tm, name) == 0), name
    assert torch.all(tm.output.weight == 0)
    eye = torch.eye(C)
    # orthogonal with gain g: W W^T = g^2 I when rows <= cols
    for name, gain in (("w2", 0.1), ("a2", 0.1), ("v2", 0.1), ("g2", 0.1)):
        w = getattr(tm, name)  # [D, C], D <= C
        assert torch.allclose(w @ w.T, gain**2 * torch.eye(w.shape[0]), atol=1e-5), name
    assert torch.allclose(tm.receptance.weight @ tm.receptance.weight.T, eye, atol=1e-5)
    assert torch.allclose(tm.value.weight @ tm.value.weight.T, eye, atol=1e-5)
    assert torch.allclose(tm.key.weight @ tm.key.weight.T, 0.01 * eye, atol=1e-6)


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_channel_mix_init_matches_spec_formulas(layer_idx):
    torch.manual_seed(0)
    cm = ChannelMix(C, None, layer_idx, L)
    r1 = 1 - layer_idx / L
    expect = torch.tensor([1 - (n / C) ** (r1**4) for n in range(C)])
    assert torch.allclose(cm.x_k, expect, atol=1e-6)
    assert cm.key.weight.shape == (4 * C, C) and cm.value.weight.shape == (C, 4 * C)
    # key [4C, C] has more rows than columns: gain 1 * sqrt(4C / C) = 2, so W^T W = 4 I
    assert torch.allclose(cm.key.weight.T @ cm.key.weight, 4 * torch.eye(C), atol=1e-4)
    assert torch.all(cm.value.weight == 0)


def test_lora_ranks_formula():
    assert lora_ranks(768, 64) == {"w": 64, "a": 64, "v": 32, "g": 128}
    assert lora_ranks(2048, 64) == {"w": 128, "a": 128, "v": 64, "g": 224}
    assert lora_ranks(64, 16) == {"w": 32, "a": 32, "v": 32, "g": 32}  # floors at 32
    tm = TimeMix(768, 12, 64, 0, 1)
    assert tuple(tm.w1.shape) == (768, 64) and tuple(tm.a1.shape) == (768, 64)
    assert tuple(tm.v1.shape) == (768, 32) and tuple(tm.g1.shape) == (768, 128)
    assert tuple(tm.r_k.shape) == (12, 64)


# -- a float64 per-token oracle of SPEC section 2 -------------------------------------------------------------


def time_mix_oracle(tm: TimeMix, x: torch.Tensor, v_first=None):
    """SPEC section 2 token by token with an explicit state matrix per head. x [B,T,C] -> (out, v_first, S)."""
    B, T, _ = x.shape
    S = x.new_zeros(B, H, N, N)
    prev = x.new_zeros(B, C)
    outs, v_firsts = [], []
    for t in range(T):
        xt = x[:, t]
        xx = prev - xt
        prev = xt
        mix = {n: xt + xx * getattr(tm, "x_" + n) for n in "rwkvag"}
        r = mix["r"] @ tm.receptance.weight.T
        k = mix["k"] @ tm.key.weight.T
        v = mix["v"] @ tm.value.weight.T
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(tm.w0 + torch.tanh(mix["w"] @ tm.w1) @ tm.w2))
        if tm.layer_idx == 0:
            v_firsts.append(v)
        else:
            v = v + (v_first[:, t] - v) * torch.sigmoid(tm.v0 + (mix["v"] @ tm.v1) @ tm.v2)
        alpha = torch.sigmoid(tm.a0 + (mix["a"] @ tm.a1) @ tm.a2)
        g = torch.sigmoid(mix["g"] @ tm.g1) @ tm.g2
        kk = F.normalize((k * tm.k_k).view(B, H, N), dim=-1, eps=1e-12)
        k = k * (1 + (alpha - 1) * tm.k_a)
        rh, kh, vh, wh, ah = (z.view(B, H, N) for z in (r, k, v, w, alpha))
        a, b = -kk, kk * ah
        sa = torch.einsum("bhij,bhj->bhi", S, a)
        S = S * wh[:, :, None, :] + sa[..., None] * b[:, :, None, :] + vh[..., None] * kh[:, :, None, :]
        y = torch.einsum("bhij,bhj->bhi", S, rh)
        mean = y.mean(-1, keepdim=True)
        var = y.var(-1, unbiased=False, keepdim=True)
        y = ((y - mean) / torch.sqrt(var + 64e-5)).reshape(B, C) * tm.ln_x.weight + tm.ln_x.bias
        bonus = (rh * kh * tm.r_k).sum(-1, keepdim=True) * vh
        y = y + bonus.reshape(B, C)
        outs.append((y * g) @ tm.output.weight.T)
    vf = torch.stack(v_firsts, 1) if tm.layer_idx == 0 else v_first
    return torch.stack(outs, 1), vf, prev, S


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_time_mix_matches_float64_oracle_values_and_gradients(layer_idx):
    torch.manual_seed(1)
    tm = perturb_(TimeMix(C, H, N, layer_idx, L)).double()
    B, T = 2, 11
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    v_first = None if layer_idx == 0 else torch.randn(B, T, C, dtype=torch.float64)
    out, vf, (shift, S) = tm(x, v_first)
    ref, vf_ref, shift_ref, S_ref = time_mix_oracle(tm, x, v_first)
    assert rel_err(out, ref) <= 1e-12
    assert rel_err(vf, vf_ref) <= 1e-12
    assert rel_err(S, S_ref) <= 1e-12 and torch.equal(shift, shift_ref)
    # gradients w.r.t. the input and every parameter agree with the oracle's autograd
    cot = torch.randn_like(out)
    params = [x] + list(tm.parameters())
    g = torch.autograd.grad((out * cot).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * cot).sum(), params, allow_unused=True)
    for (name, _), a, b in zip([("x", None)] + list(tm.named_parameters()), g, g_ref):
        if b is None:  # v0/v1/v2 in layer 0 are unused by both
            assert a is None or torch.all(a == 0), name
            continue
        assert rel_err(a, b) <= 1e-10, name


def test_channel_mix_matches_oracle():
    torch.manual_seed(2)
    cm = perturb_(ChannelMix(C, None, 1, L)).double()
    x = torch.randn(2, 7, C, dtype=torch.float64)
    out, shift = cm(x)
    prev = torch.cat([torch.zeros(2, 1, C, dtype=torch.float64), x[:, :-1]], 1)
    xk = x + (prev - x) * cm.x_k
    ref = torch.relu(xk @ cm.key.weight.T) ** 2 @ cm.value.weight.T
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12) and torch.equal(shift, x[:, -1])


def test_state_carry_equals_whole_sequence():
    """Processing [0:5] then [5:13] (and then one token at a time) with the carried state equals the whole."""
    torch.manual_seed(3)
    tm = perturb_(TimeMix(C, H, N, 0, L))
    cm = perturb_(ChannelMix(C, None, 0, L))
    x = torch.randn(2, 16, C)
    out, _, state = tm(x)
    cout, cshift = cm(x)
    o1, _, s1 = tm(x[:, :5])
    o2, _, s2 = tm(x[:, 5:13], state=s1)
    pieces, s = [o1, o2], s2
    for t in range(13, 16):
        o, _, s = tm(x[:, t : t + 1], state=s)
        pieces.append(o)
    assert rel_err(torch.cat(pieces, 1), out) <= 1e-5
    assert rel_err(s[1], state[1]) <= 1e-5 and torch.equal(s[0], state[0])
    c1, sh = cm(x[:, :9])
    c2, sh = cm(x[:, 9:], sh)
    assert torch.allclose(torch.cat([c1, c2], 1), cout, atol=1e-6) and torch.equal(sh, cshift)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_left_padding_never_enters_the_state(layer_idx):
    torch.manual_seed(4)
    tm = perturb_(TimeMix(C, H, N, layer_idx, L)).double()
    cm = perturb_(ChannelMix(C, None, layer_idx, L)).double()
    T, P = 9, 4
    x = torch.randn(1, T, C, dtype=torch.float64)
    vf = None if layer_idx == 0 else torch.randn(1, T, C, dtype=torch.float64)
    garbage = torch.randn(1, P, C, dtype=torch.float64) * 5
    xp = torch.cat([garbage, x], 1)
    vfp = None if vf is None else torch.cat([torch.randn(1, P, C, dtype=torch.float64), vf], 1)
    mask = torch.cat([torch.zeros(1, P), torch.ones(1, T)], 1).long()
    out, v1, (sh, S) = tm(x, vf)
    outp, v1p, (shp, Sp) = tm(xp, vfp, mask=mask)
    assert torch.allclose(outp[:, P:], out, rtol=1e-10, atol=1e-12)
    assert torch.allclose(v1p[:, P:], v1, rtol=1e-10, atol=1e-12)
    assert torch.allclose(Sp, S, rtol=1e-10, atol=1e-12) and torch.equal(shp, sh)
    cout, csh = cm(x)
    coutp, cshp = cm(xp, mask=mask)
    assert torch.allclose(coutp[:, P:], cout, rtol=1e-10, atol=1e-12) and torch.equal(cshp, csh)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_inference_path_equals_autograd_path(layer_idx):
    """Without autograd the time-mix evaluates its LoRAs (decay, alpha, value gate, gate) in one
    low_rank_bank; outputs, v_first and the carried state equal the autograd path (float64, rel. error < 1e-12),
    for a left-padded prefill and a decode step after it."""
    torch.manual_seed(7)
    tm = perturb_(TimeMix(C, H, N, layer_idx, L)).double()
    x = torch.randn(2, 7, C, dtype=torch.float64)
    vf = None if layer_idx == 0 else torch.randn(2, 7, C, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    results = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), derived_weights_session() as store:
            o1, v1, state = tm(x[:, :6], None if vf is None else vf[:, :6], mask=mask)
            o2, v2, state = tm(x[:, 6:], None if vf is None else vf[:, 6:], state=state)
        results.append([t.detach() for t in (o1, v1, o2, v2, state[0], state[1])])
    assert store.holds(tm, "low_rank_bank")  # the no-grad pass did take the batched path
    for i, (a, b) in enumerate(zip(*results)):
        if i < 2:  # the prefill: the real tokens
            a, b = a[mask.bool()], b[mask.bool()]
        assert (b - a).abs().max() <= 1e-12 * a.abs().max(), i


def test_layer_bad_inputs():
    tm = TimeMix(C, H, N, 0, L)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        tm(torch.randn(2, 5, C + 1))
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        tm(torch.randn(5, C))
    with pytest.raises(ValueError, match="layer_idx"):
        TimeMix(C, H, N, 3, 3)
    with pytest.raises(ValueError, match="positive"):
        TimeMix(C, 0, N, 0, 1)
    tm1 = TimeMix(C, H, N, 1, L)
    with pytest.raises(ValueError, match="v_first"):
        tm1(torch.randn(1, 3, C))


# -- one row (batch-1 decoding): the matrix-vector product ---------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_one_row_linear_is_a_matrix_vector_product_equal_to_the_module(dtype, tol, monkeypatch):
    """At one row without autograd linear_one_row takes torch.mv, with the module's result (relative error <= tol
    against the float64 product: the dtype's rounding); several rows, autograd, a bias or a hook call the module."""
    from wuneng.layers import rwkv7 as rwkv7_layers

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=False).to(dtype)
    x = torch.randn(1, 1, 48).to(dtype)
    want = F.linear(x.double(), lin.weight.double())
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(rwkv7_layers.torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
    with torch.no_grad():
        got = rwkv7_layers.linear_one_row(lin, x)
        assert got.shape == (1, 1, 40) and got.dtype == dtype and rel_err(got.double(), want) <= tol
        assert len(calls) == 1
        rwkv7_layers.linear_one_row(lin, torch.randn(2, 1, 48).to(dtype))  # two rows: the module
        handle = lin.register_forward_hook(lambda *a: None)
        rwkv7_layers.linear_one_row(lin, x)  # a hook: the module (so that the hook runs)
        handle.remove()
    out = rwkv7_layers.linear_one_row(lin, x)  # autograd: the module
    assert out.requires_grad and len(calls) == 1


def test_channel_mix_one_row_equals_its_batched_rows():
    """A batch-1 channel-mix step (matrix-vector products) equals the same row inside a batch (matrix products)."""
    torch.manual_seed(1)
    cm = perturb_(ChannelMix(C, 4 * C, 1, L).double(), 0.3)
    x, shift = torch.randn(3, 1, C, dtype=torch.float64), torch.randn(3, C, dtype=torch.float64)
    with torch.no_grad():
        batched, _ = cm(x, shift)
        one, new_shift = cm(x[1:2], shift[1:2])
    assert rel_err(one, batched[1:2]) <= 1e-12 and torch.equal(new_shift, x[1:2, 0])
