"""Meta-State layers (SPEC section 4): the Self-State Encoder, the Meta-State layer and the time-mix read-out.

Oracles: RWKV-7's ChannelMix (eta = 0), explicit per-head loops over materialised states S_t (the read-out and
the encoder), the sequential WKV reference in float64 (chunked read-out, forward and gradients), and token
by token decoding. Thresholds: float64 comparisons 1e-10 relative; float32 ones 1e-5 relative.
"""

import pytest
import torch

from wuneng.layers.metastate import (
    MetaStateLayer,
    MetaStateTimeMix,
    SelfStateEncoder,
    resolve_sse_heads,
    self_state_query,
    sparse_route_scores,
)
from wuneng.layers.rwkv7 import ChannelMix, token_shift

from _helpers import perturb_, rel_err


def randomise_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised pieces (eta, W_o, V_P, LoRAs) take part."""
    return perturb_(module, scale)


# -- eta = 0: the channel-mix ------------------------------------------------------------------------------
def test_zero_eta_equals_rwkv7_channel_mix():
    torch.manual_seed(0)
    C, H, N = 32, 2, 16
    cm = ChannelMix(C, layer_idx=1, num_layers=3)
    with torch.no_grad():
        cm.value.weight.normal_()  # init is zero; make the output non-trivial
        cm.x_k.uniform_()
    ms = MetaStateLayer(C, H, N, 4 * C, layer_idx=1, num_layers=3)
    with torch.no_grad():
        ms.x_k.copy_(cm.x_k)
        ms.param_keys.copy_(cm.key.weight)  # K_P = W_key
        ms.param_values.copy_(cm.value.weight.t())  # V_P = W_value^T
    assert torch.count_nonzero(ms.sse.eta) == 0  # eta init 0
    x, shift = torch.randn(2, 9, C), torch.randn(2, C)
    readout = torch.randn(2, 9, H, N)  # a non-zero state read-out must not matter while eta = 0
    out, new_shift = ms(x, readout, shift)
    ref, ref_shift = cm(x, shift)
    assert rel_err(out, ref) < 1e-6
    assert torch.equal(new_shift, ref_shift)


def test_default_init_matches_channel_mix_init():
    torch.manual_seed(0)
    ms = MetaStateLayer(32, 2, 16, layer_idx=2, num_layers=4)
    cm = ChannelMix(32, layer_idx=2, num_layers=4)
    assert ms.num_param_tokens == 4 * 32
    assert torch.allclose(ms.x_k, cm.x_k)
    assert torch.count_nonzero(ms.param_values) == 0
    # orthogonal, gain 1 scaled by sqrt(M / C) (RWKV-LM): K_P^T K_P = (M / C) I
    gram = ms.param_keys.t() @ ms.param_keys
    assert torch.allclose(gram, 4.0 * torch.eye(32), atol=1e-4)


# -- the Self-State Encoder against explicit loops ------------------------------------------------------------
@pytest.mark.parametrize("num_heads,sse_heads", [(4, None), (4, 2), (7, None), (7, 5), (4, 0)], ids=lambda v: str(v))
def test_self_state_encoder_matches_loop(num_heads, sse_heads):
    torch.manual_seed(1)
    C, N = 64, 16  # C / N = 4 blocks: 7 heads wrap around the blocks (a grown layer)
    sse = SelfStateEncoder(C, num_heads, N, sse_heads).double()
    with torch.no_grad():
        sse.eta.normal_()
    z = torch.randn(2, 5, num_heads, N, dtype=torch.float64)
    e = sse(z)
    P = num_heads if sse_heads is None else sse_heads
    ref = torch.zeros(2, 5, C, dtype=torch.float64)
    for h in range(P):
        c = h % (C // N)
        ref[:, :, c * N : (c + 1) * N] += sse.eta[h] * z[:, :, h]
    assert torch.allclose(e, ref, rtol=0, atol=1e-12)


def test_self_state_query_blocks():
    torch.manual_seed(2)
    C, N, H = 48, 16, 5
    x = torch.randn(2, 3, C)
    x[0, 0, 16:32] = 0  # a zero block must give a zero query, not NaN
    q = self_state_query(x, H, N)
    assert q.shape == (2, 3, H, N)
    for h in range(H):
        c = h % 3
        blk = x[..., c * N : (c + 1) * N]
        expect = blk / blk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assert torch.allclose(q[:, :, h], expect, atol=1e-6)
    assert torch.isfinite(q).all()


def test_resolve_sse_heads():
    assert resolve_sse_heads(None, 8) == 8
    assert resolve_sse_heads(3, 8) == 3
    assert resolve_sse_heads(0.5, 8) == 4
    with pytest.raises(ValueError, match="sse_heads"):
        resolve_sse_heads(9, 8)
    with pytest.raises(ValueError, match="fraction"):
        resolve_sse_heads(1.5, 8)
    with pytest.raises(TypeError, match="sse_heads"):
        resolve_sse_heads("all", 8)


# -- the time-mix read-out: S_t q_t ---------------------------------------------------------------------------
def _pair(C=32, H=2, N=16, layer_idx=0, num_layers=2, impl="chunked", dtype=torch.float64, **kw):
    tm = MetaStateTimeMix(C, H, N, layer_idx, num_layers, wkv_impl=impl)
    ml = MetaStateLayer(C, H, N, 3 * C, layer_idx, num_layers, **kw)
    return randomise_(tm).to(dtype), randomise_(ml).to(dtype)


def test_readout_is_state_times_query_token_by_token():
    """Decoding one token at a time: the read-out equals the materialised S_t times q_t, and every output
    equals the full (chunked) forward."""
    torch.manual_seed(3)
    C, H, N, T = 32, 3, 16, 21  # H = 3 > C / N = 2: head 2 reuses block 0
    tm, _ = _pair(C, H, N)
    x = torch.randn(2, T, C, dtype=torch.float64)
    out_full, _, (shift_full, S_full), z_full = tm(x)
    state, outs, zs = None, [], []
    for t in range(T):
        o, _, state, z = tm(x[:, t : t + 1], state=state)
        # oracle: the state after token t, read with the query of token t
        xx = token_shift(x[:, t : t + 1], None if t == 0 else x[:, t - 1])
        q = self_state_query(x[:, t : t + 1] + xx * tm.x_k, H, N)[:, 0]
        assert torch.allclose(z[:, 0], torch.einsum("bhij,bhj->bhi", state[1], q), rtol=0, atol=1e-12)
        outs.append(o)
        zs.append(z)
    assert rel_err(torch.cat(outs, 1), out_full) < 1e-10
    assert rel_err(torch.cat(zs, 1), z_full) < 1e-10
    assert rel_err(state[1], S_full) < 1e-10 and torch.equal(state[0], shift_full)


@pytest.mark.parametrize("T", [1, 17, 64], ids=lambda t: f"T{t}")
def test_chunked_readout_matches_reference_forward_and_backward(T):
    """Layer level: the chunked WKV call's second read-out against the sequential reference, float64, with
    gradients of every parameter (eta included) and of the input."""
    torch.manual_seed(4)
    C, H, N = 32, 3, 16
    tm_c, ml_c = _pair(C, H, N, layer_idx=0, impl="chunked")
    tm_r, ml_r = _pair(C, H, N, layer_idx=0, impl="reference")
    tm_r.load_state_dict(tm_c.state_dict())
    ml_r.load_state_dict(ml_c.state_dict())
    x = torch.randn(2, T, C, dtype=torch.float64)
    state = (torch.randn(2, C, dtype=torch.float64), 0.1 * torch.randn(2, H, N, N, dtype=torch.float64))
    results = []
    for tm, ml in ((tm_c, ml_c), (tm_r, ml_r)):
        xi = x.clone().requires_grad_(True)
        o, _, (_, S), z = tm(xi, state=state)
        out, _ = ml(xi + o, z)
        (out.square().sum() + S.square().sum()).backward()
        grads = {f"tm.{n}": p.grad for n, p in tm.named_parameters()}
        grads.update({f"ml.{n}": p.grad for n, p in ml.named_parameters()})
        results.append((out.detach(), z.detach(), S.detach(), xi.grad, grads))
    (out_c, z_c, S_c, gx_c, g_c), (out_r, z_r, S_r, gx_r, g_r) = results
    assert rel_err(z_c, z_r) < 1e-10
    assert rel_err(out_c, out_r) < 1e-10
    assert rel_err(S_c, S_r) < 1e-10
    assert rel_err(gx_c, gx_r) < 1e-9
    assert g_c["ml.sse.eta"].abs().sum() > 0  # eta learns from the state read-out
    for name in g_r:
        if g_r[name] is None:  # layer 0 has no value residual: v0/v1/v2 are unused
            assert name.split(".")[-1] in ("v0", "v1", "v2") and g_c[name] is None, name
            continue
        assert rel_err(g_c[name], g_r[name]) < 1e-9, name


def test_meta_state_layer_is_causal():
    torch.manual_seed(5)
    tm, ml = _pair(dtype=torch.float32)
    x = torch.randn(1, 12, 32)

    def run(inp):
        o, _, _, z = tm(inp)
        return ml(inp + o, z)[0]

    base = run(x)
    x2 = x.clone()
    x2[:, 7] += 1.0
    moved = run(x2)
    assert torch.equal(moved[:, :7], base[:, :7])
    assert (moved[:, 7:] - base[:, 7:]).abs().max() > 1e-4


def test_no_sse_heads_skips_the_second_query():
    torch.manual_seed(6)
    tm = MetaStateTimeMix(32, 2, 16, state_readout=False)
    out, _, _, z = tm(torch.randn(1, 4, 32))
    assert z is None and out.shape == (1, 4, 32)


# -- sparse routing ---------------------------------------------------------------------------------------------
def test_sparse_routing_matches_loop_and_dense_when_all_groups():
    torch.manual_seed(7)
    scores = torch.relu(torch.randn(2, 5, 24)) ** 2
    routed = sparse_route_scores(scores, num_groups=4, top_k=2)
    for b in range(2):
        for t in range(5):
            means = [scores[b, t, 6 * g : 6 * g + 6].mean().item() for g in range(4)]
            top = sorted(range(4), key=lambda g: -means[g])[:2]
            for g in range(4):
                expect = scores[b, t, 6 * g : 6 * g + 6] if g in top else torch.zeros(6)
                assert torch.equal(routed[b, t, 6 * g : 6 * g + 6], expect)
    assert torch.equal(sparse_route_scores(scores, 4, 4), scores)


def test_sparse_layer_uses_only_top_groups():
    torch.manual_seed(8)
    C = 32
    dense = MetaStateLayer(C, 2, 16, 64)
    sparse = MetaStateLayer(C, 2, 16, 64, moe_groups=4, moe_top_k=1)
    assert sparse.sparse and not dense.sparse
    randomise_(dense)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 6, C)
    d, _ = dense(x)
    s, _ = sparse(x)
    assert not torch.allclose(d, s)
    # the sparse output is the dense one restricted to the chosen group's tokens
    key = x + token_shift(x) * dense.x_k
    scores = torch.relu(key @ dense.param_keys.t()) ** 2
    assert torch.allclose(s, sparse_route_scores(scores, 4, 1) @ dense.param_values, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of head_size"):
        MetaStateLayer(40, 2, 16)
    with pytest.raises(ValueError, match="moe_groups"):
        MetaStateLayer(32, 2, 16, 100, moe_groups=3)
    with pytest.raises(ValueError, match="moe_top_k"):
        MetaStateLayer(32, 2, 16, 96, moe_groups=3, moe_top_k=4)
    with pytest.raises(ValueError, match="num_param_tokens"):
        MetaStateLayer(32, 2, 16, 0)
    ml = MetaStateLayer(32, 2, 16)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        ml(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="read-out"):
        ml(torch.randn(2, 3, 32), torch.randn(2, 3, 4, 8))
