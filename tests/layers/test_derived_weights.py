"""No stale derived weights: after the weights change, no-grad inference (a prefill, evaluation without a cache,
decoding with a new cache, the fused one-token kernels) computes what a freshly built model with the same
weights computes, whatever way the weights changed: a write through ``.data`` (EMA swaps, weight averaging: no
version bump), ``load_state_dict``, ``to()`` / ``half()``, an optimizer step, or a parameter replaced by a new
``nn.Parameter``. And within one decoding session the derived weights are built once, not per token.

Models: RWKV-7 (time-mix: the stacked LoRA bank and the fused one-token kernel), Meta-State (its time-mix with
the self-state query) and WuNeng (hybrid mixer: bank, joined low-rank factors and its fused kernel; an ARWKV
layer), tiny, with every parameter perturbed so that the zero-initialised LoRA paths matter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.models.wuneng import WuNengConfig, WuNengForCausalLM

from _helpers import perturb_

VOCAB = 50
KINDS = ("rwkv7", "metastate", "wuneng")
CHANGES = ("data_write", "load_state_dict", "to_double", "half_and_back", "optimizer_step", "new_parameter")


def config_of(kind: str):
    if kind == "rwkv7":
        return RWKV7Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, head_size=16)
    if kind == "metastate":
        return MetaStateConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, head_size=16)
    return WuNengConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        middle_heads=1,
        arwkv_head_size=16,
        layer_kinds=["hybrid", "arwkv"],
    )


def model_class(kind: str):
    return {"rwkv7": RWKV7ForCausalLM, "metastate": MetaStateForCausalLM, "wuneng": WuNengForCausalLM}[kind]


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return perturb_(model_class(kind)(config_of(kind)), 0.3, seed=seed + 1).eval()


def fresh_copy(model):
    """A model built anew from the config, holding ``model``'s current weights (same dtype)."""
    torch.manual_seed(99)
    copy = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():  # non-persistent buffers too (the rotary frequencies after half() are rounded)
        for name, buffer in model.named_buffers():
            copy.get_buffer(name).copy_(buffer)
    return copy


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def inference_outputs(model):
    """Logits of a no-grad forward without a cache, and of a prefill plus two one-token decode steps with a new
    cache (on CPU float32/64 the decode steps take the fused one-token kernels)."""
    full = model(IDS, use_cache=False).logits
    out = model(IDS[:, :-2], use_cache=True)
    steps = [out.logits[:, -1]]
    cache = out.past_key_values
    for t in (7, 8):
        out = model(IDS[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
        cache = out.past_key_values
    return full, torch.stack(steps, 1)


def lora_parameters(model):
    """(module, name) of the low-rank factors and token-shift mixes that the derived weights are built from."""
    found = []
    for module in model.modules():
        for name in ("w1", "w2", "a2", "g1", "x_r", "x_w", "receptance_lora_a", "gate_lora_b", "middle_lora_a"):
            p = module._parameters.get(name)
            if isinstance(p, nn.Parameter):
                found.append((module, name))
    return found


def change(model, how: str):
    """Change the weights of ``model`` the way ``how`` names; returns the model to use afterwards."""
    gen = torch.Generator().manual_seed(11)
    if how == "data_write":  # no version bump: EMA swaps and weight averaging write like this
        for p in model.parameters():
            p.data.copy_(p.data * 0.8 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    elif how == "load_state_dict":
        other = build(_kind_of(model), seed=3)
        model.load_state_dict(other.state_dict())
    elif how == "to_double":
        model = model.to(torch.float64)
    elif how == "half_and_back":
        model = model.half().float()  # new storages, rounded weights
    elif how == "optimizer_step":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        model.eval()
    elif how == "new_parameter":
        for module, name in lora_parameters(model):
            old = module._parameters[name]
            setattr(
                module, name, nn.Parameter(old.detach() + 0.2 * torch.randn(old.shape, generator=gen, dtype=old.dtype))
            )
    else:  # pragma: no cover
        raise ValueError(how)
    return model


def _kind_of(model) -> str:
    return {RWKV7ForCausalLM: "rwkv7", MetaStateForCausalLM: "metastate", WuNengForCausalLM: "wuneng"}[type(model)]


@pytest.mark.parametrize("how", CHANGES)
@pytest.mark.parametrize("kind", KINDS)
def test_inference_after_a_weight_change_equals_a_fresh_model(kind, how):
    """Warm every derived weight (no-grad forward, prefill and fused decoding), change the weights, and compare
    the no-grad outputs with those of a model built anew with the changed weights: max abs difference <= 1e-6
    of the logits' scale (float32 round-off of identical arithmetic; stale weights differ by ~1e-1)."""
    model = build(kind)
    inference_outputs(model)  # warm up: derived weights built for these parameters
    model = change(model, how)
    got = inference_outputs(model)
    want = inference_outputs(fresh_copy(model))
    for name, a, b in zip(("forward", "decode"), got, want):
        assert a.dtype == b.dtype
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-6 * scale, (kind, how, name, float((a - b).abs().max()), float(scale))


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_builds_the_derived_weights_once_per_session(kind):
    """The point of keeping them: a decoding session stacks its weights at its first no-grad forwards (the
    prefill; the first decode step adds what only the one-token kernel uses) and reuses them for every later
    token: the store's build count stops growing. A new cache starts a new session that builds them again."""
    model = build(kind)
    with torch.no_grad():
        cache = model(IDS[:, :4], use_cache=True).past_key_values
        after_prefill = cache.derived_weights.builds
        assert after_prefill > 0 and len(cache.derived_weights) == after_prefill
        cache = model(IDS[:, 4:5], past_key_values=cache, use_cache=True).past_key_values
        after_first_token = cache.derived_weights.builds
        for t in range(5, 9):
            cache = model(IDS[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
        assert cache.derived_weights.builds == after_first_token
        other = model(IDS[:, :4], use_cache=True).past_key_values
        assert other.derived_weights is not cache.derived_weights and other.derived_weights.builds == after_prefill
    cache.reset()
    assert len(cache.derived_weights) == 0


def test_a_data_write_within_a_session_is_seen_after_clearing_its_weights():
    """The documented limit: inside one decoding session a write through ``.data`` bumps no version, so the
    session keeps its weights; clearing them (``cache.reset()`` does, as does a new cache) rebuilds them from
    the parameters. Reference: a fresh model with the new weights continuing from the same state."""
    model = build("rwkv7")
    with torch.no_grad():
        cache = model(IDS[:, :4], use_cache=True).past_key_values
        prefix_states = [{name: t.clone() for name, t in layer.items()} for layer in cache.states]
        for p in model.parameters():
            p.data.mul_(0.9)
        stale = model(IDS[:, 4:6], past_key_values=copy_cache(cache), use_cache=True).logits
        cache.derived_weights.clear()
        got = model(IDS[:, 4:6], past_key_values=cache, use_cache=True).logits
        ref_model = fresh_copy(model)
        ref_cache = ref_model(IDS[:, :4], use_cache=True).past_key_values
        ref_cache.states = prefix_states  # the prefix state computed with the old weights, as in ``cache``
        want = ref_model(IDS[:, 4:6], past_key_values=ref_cache, use_cache=True).logits
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert (stale - want).abs().max() > 1e-3 * want.abs().max()  # not cleared: the old weights, as documented


def copy_cache(cache):
    """The same states and the same derived-weight store (a second handle on the session)."""
    twin = type(cache)(len(cache.states))
    twin.states = [{name: t.clone() for name, t in layer.items()} for layer in cache.states]
    twin.seen_tokens = cache.seen_tokens
    twin.derived_weights = cache.derived_weights
    return twin


def test_a_copied_cache_starts_an_empty_store_and_copies_no_module():
    """copy.deepcopy(cache) (reusing a prompt's cache for several continuations) must not copy the model through
    the modules the store refers to: the copy's store is empty and rebuilds on use, with the same outputs."""
    import copy
    import pickle

    model = build("rwkv7")
    with torch.no_grad():
        cache = model(IDS[:, :4], use_cache=True).past_key_values
        memo: dict = {}
        twin = copy.deepcopy(cache, memo)
        assert len(cache.derived_weights) > 0 and len(twin.derived_weights) == 0
        assert not any(isinstance(v, (nn.Module, nn.Parameter)) for v in memo.values())  # no model copied
        a = model(IDS[:, 4:6], past_key_values=cache, use_cache=True).logits
        b = model(IDS[:, 4:6], past_key_values=twin, use_cache=True).logits
    assert torch.equal(a, b) and len(twin.derived_weights) > 0
    assert len(pickle.loads(pickle.dumps(cache.derived_weights))) == 0
