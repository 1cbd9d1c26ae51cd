"""MetaStateForCausalLM: config, equality with RWKV-7 at eta = 0, decoding against the full forward, generate()
with a constant-size cache, padding, save/load and the Auto classes.

Metric: max |logits_a - logits_b| / max |logits_b|, below 1e-5 in float32 unless stated.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from wuneng.cache import RecurrentStateCache
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

from _helpers import perturb_

V, C, L, N = 64, 32, 2, 16


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def randomise_(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter, so that eta, W_o, V_P and the LoRAs (zero at init) all take part."""
    return perturb_(model, scale)


def tiny(**kw) -> MetaStateForCausalLM:
    cfg = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N)
    cfg.update(kw)
    return randomise_(MetaStateForCausalLM(MetaStateConfig(**cfg))).eval()


# -- configuration ------------------------------------------------------------------------------------------
def test_config_defaults_and_round_trip(tmp_path):
    cfg = MetaStateConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N)
    assert cfg.num_heads == C // N and cfg.num_param_tokens == 4 * C
    assert cfg.model_type == "wuneng_metastate"
    assert cfg.num_states == L * (C // N) * N * N
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, MetaStateConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(again.to_dict()) == drop(cfg.to_dict())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=40), "must divide hidden_size"),
        (dict(num_heads=0), "num_heads"),
        (dict(sse_heads=5), "sse_heads"),
        (dict(moe_groups=3), "moe_groups"),
        (dict(moe_groups=4, moe_top_k=5), "moe_top_k"),
        (dict(wkv_impl="cuda"), "wkv_impl"),
        (dict(a_low_rank_dim=0), "MetaStateConfig: a_low_rank_dim must be a positive int"),
        (dict(layer_norm_eps=0.0), "MetaStateConfig: layer_norm_eps must be a positive float"),
        (dict(vocab_size=True), "MetaStateConfig: vocab_size must be a positive int"),
    ],
    ids=["width", "heads", "sse", "groups", "topk", "impl", "rank", "eps", "vocab"],
)
def test_config_rejects_bad_values(kwargs, match):
    base = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MetaStateConfig(**base)


def test_init_is_rwkv7_init():
    """At init: eta = 0, V_P = 0 and W_o = 0 (RWKV-7's zero inits), so every block is the identity."""
    torch.manual_seed(0)
    m = MetaStateForCausalLM(MetaStateConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N))
    for block in m.model.blocks:
        assert torch.count_nonzero(block.ffn.sse.eta) == 0
        assert torch.count_nonzero(block.ffn.param_values) == 0
        assert torch.count_nonzero(block.att.output.weight) == 0
        assert torch.count_nonzero(block.ffn.param_keys) > 0


# -- eta = 0 is RWKV-7 ----------------------------------------------------------------------------------------
def test_from_rwkv7_equals_rwkv7_and_eta_then_changes_it():
    torch.manual_seed(1)
    rwkv = randomise_(
        RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N))
    ).eval()
    ms = MetaStateForCausalLM.from_rwkv7(rwkv).eval()
    assert ms.config.num_param_tokens == rwkv.config.intermediate_size
    ids = torch.randint(0, V, (2, 23))
    ref = rwkv(ids).logits
    assert rel_max(ms(ids).logits, ref) < 1e-5
    with torch.no_grad():
        ms.model.blocks[1].ffn.sse.eta.normal_()
    assert rel_max(ms(ids).logits, ref) > 1e-3  # the SSE really reads the state


def test_zero_sse_heads_ignores_eta():
    torch.manual_seed(2)
    rwkv = randomise_(
        RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N))
    ).eval()
    ms = MetaStateForCausalLM.from_rwkv7(rwkv, sse_heads=0).eval()
    randomise_(ms.model.blocks[0].ffn.sse)
    ids = torch.randint(0, V, (1, 9))
    assert rel_max(ms(ids).logits, rwkv(ids).logits) < 1e-5


def test_from_rwkv7_rejects_other_models():
    with pytest.raises(TypeError, match="RWKV7ForCausalLM"):
        MetaStateForCausalLM.from_rwkv7(tiny())


# -- recurrence: pieces, token by token, generate ---------------------------------------------------------------
def test_token_by_token_decoding_equals_full_forward():
    torch.manual_seed(3)
    m = tiny(num_heads=3, sse_heads=2)  # 3 heads > C / N: head 2 reuses block 0
    ids = torch.randint(0, V, (2, 20))
    full = m(ids).logits
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = m(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert rel_max(torch.cat(steps, 1), full) < 1e-5
    # prefill + continue in chunks also equals the whole
    out = m(ids[:, :13], use_cache=True)
    rest = m(ids[:, 13:], past_key_values=out.past_key_values, use_cache=True).logits
    assert rel_max(torch.cat([out.logits, rest], 1), full) < 1e-5


def test_generate_greedy_matches_manual_loop():
    torch.manual_seed(4)
    m = tiny()
    prompt = torch.randint(1, V, (2, 7))
    gen = m.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert isinstance(gen, torch.Tensor) and gen.shape == (2, 13)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)


@pytest.mark.slow
def test_cache_size_is_constant_100_vs_5000_tokens():
    torch.manual_seed(5)
    m = tiny()
    sizes = {}
    for T in (100, 5000):
        ids = torch.randint(0, V, (1, T - 1))
        with torch.no_grad():
            cache = m(ids, use_cache=True).past_key_values  # prefill T - 1 tokens
            out = m(ids[:, -1:], past_key_values=cache, use_cache=True)  # and decode one more
        assert isinstance(out.past_key_values, RecurrentStateCache)
        assert out.past_key_values.get_seq_length() == T
        sizes[T] = out.past_key_values.nbytes()
    assert sizes[100] == sizes[5000]
    per_layer = (C + C) * 4 + (C // N) * N * N * 4  # two shifts [C] + the WKV state [H, N, N], float32
    assert sizes[100] == L * per_layer


def test_left_padding_matches_unpadded():
    torch.manual_seed(6)
    m = tiny()
    a, b = torch.randint(1, V, (1, 9)), torch.randint(1, V, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    logits = m(batch, attention_mask=mask).logits
    assert rel_max(logits[0], m(a).logits[0]) < 1e-5
    assert rel_max(logits[1, 4:], m(b).logits[0]) < 1e-5


# -- training, save / load ---------------------------------------------------------------------------------------
def test_loss_and_gradients_reach_meta_state_parameters():
    torch.manual_seed(7)
    m = tiny().train()
    ids = torch.randint(0, V, (2, 16))
    out = m(ids, labels=ids)
    out.loss.backward()
    block = m.model.blocks[1]
    for p in (block.ffn.sse.eta, block.ffn.param_keys, block.ffn.param_values, block.att.output.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_save_and_load_with_auto_classes(tmp_path):
    torch.manual_seed(8)
    m = tiny(num_heads=3, num_param_tokens=80, sse_heads=0.5)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MetaStateForCausalLM)
    assert loaded.config.num_heads == 3 and loaded.config.num_param_tokens == 80 and loaded.config.sse_heads == 0.5
    ids = torch.randint(0, V, (2, 11))
    assert torch.equal(loaded(ids).logits, m(ids).logits)


def test_sparse_routing_model_runs_and_decodes():
    torch.manual_seed(9)
    m = tiny(moe_groups=4, moe_top_k=2)
    ids = torch.randint(0, V, (1, 12))
    full = m(ids).logits
    cache, steps = None, []
    for t in range(12):
        out = m(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache, _ = out.past_key_values, steps.append(out.logits)
    assert rel_max(torch.cat(steps, 1), full) < 1e-5
    dense = tiny(moe_groups=1)
    dense.load_state_dict(m.state_dict())
    assert rel_max(dense(ids).logits, full) > 1e-4  # routing changes the function


def test_from_rwkv_lm_state_dict_and_no_export():
    torch.manual_seed(10)
    rwkv = randomise_(
        RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N))
    ).eval()
    ms = MetaStateForCausalLM.from_rwkv_lm(rwkv.to_rwkv_lm_state_dict(), head_size=N, sse_heads=1).eval()
    assert ms.config.sse_heads == 1
    ids = torch.randint(0, V, (1, 8))
    assert rel_max(ms(ids).logits, rwkv(ids).logits) < 1e-5
    with pytest.raises(NotImplementedError, match="save_pretrained"):
        ms.to_rwkv_lm_state_dict()
