"""WuNengForCausalLM: conversion from tiny Qwen2/Llama teachers (function preservation), save/load, the hybrid
cache and generate() (greedy, sampling, beam search, left padding, chunked prefill), gradients, parameter
accounting at Qwen2.5-7B shapes, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wuneng.layers.hybrid import HybridContext
from wuneng.models.wuneng import WuNengConfig, WuNengForCausalLM

from _helpers import perturb_

VOCAB = 97
PAD = VOCAB - 1  # never sampled as a prompt token, so generate() never mistakes a token for padding


def tiny_teacher(arch: str = "qwen2", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
    )
    common.update(overrides)
    if arch == "qwen2":
        teacher = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        common.setdefault("attention_bias", True)
        common.setdefault("rope_theta", 5000.0)
        teacher = LlamaForCausalLM(LlamaConfig(**common))
    # non-trivial norms and biases, so that copying them matters
    perturb_(teacher, 0.1, only=lambda name: name.endswith(("norm.weight", ".bias")))
    return teacher.eval()


def perturb_new_(model, scale=0.1, seed=123):
    """Noise on every new parameter, so that the RWKV path changes the output."""
    return perturb_(model, scale, only=model.new_parameter_names().__contains__, seed=seed)


def prompts(batch=2, length=10, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (batch, length), generator=g)


# -------------------------------------------------------------------------------------------------------------
# Function preservation
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("fusion", ["gate", "add", "concat", "none"])
@pytest.mark.parametrize("middle_heads", [0, 2])
@pytest.mark.parametrize("state_query", [False, True])
def test_converted_logits_equal_teacher(arch, fusion, middle_heads, state_query):
    teacher = tiny_teacher(arch)
    student = WuNengForCausalLM.from_teacher(teacher, fusion=fusion, middle_heads=middle_heads, state_query=state_query)
    ids = prompts()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for kwargs in (dict(), dict(attention_mask=mask, position_ids=pos)):
            ref = teacher(ids, **kwargs).logits
            out = student(ids, **kwargs).logits
            keep = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
            assert (out - ref)[keep].abs().max() <= 1e-4


def test_hymba_converts_but_changes_logits():
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher, fusion="hymba")
    ids = prompts()
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max()
    assert torch.isfinite(diff) and diff > 1e-3


def test_layer_selection_and_tied_embeddings():
    teacher = tiny_teacher(tie_word_embeddings=True)
    student = WuNengForCausalLM.from_teacher(teacher, hybrid_layers=[0, 2])
    assert student.config.layer_kinds == ["hybrid", "attention", "hybrid"]
    assert student.converted_layer_indices() == [0, 2]
    assert student.lm_head.weight is student.model.embed_tokens.weight
    ids = prompts()
    with torch.no_grad():
        assert (student(ids).logits - teacher(ids).logits).abs().max() <= 1e-4
    arwkv = WuNengForCausalLM.from_teacher(teacher, hybrid_layers=[1], attention=False)
    assert arwkv.config.layer_kinds == ["attention", "arwkv", "attention"]
    assert not hasattr(arwkv.model.layers[1].self_attn, "q_proj")
    mixed = WuNengForCausalLM.from_teacher(teacher, layer_kinds=["hybrid", "arwkv", "attention"])
    assert mixed.converted_layer_indices() == [0, 1]
    assert WuNengForCausalLM.from_teacher(teacher, arwkv_layers=[-1]).config.layer_kinds == [
        "hybrid",
        "hybrid",
        "arwkv",
    ]


def test_new_parameter_names_and_freeze():
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher, layer_kinds=["hybrid", "arwkv", "attention"])
    new = student.new_parameter_names()
    teacher_names = {n for n, _ in teacher.named_parameters()}
    student_names = {n for n, _ in student.named_parameters()}
    assert new == student_names - teacher_names
    assert "model.layers.0.self_attn.state.w1" in new and "model.layers.1.self_attn.receptance.weight" in new
    assert "model.layers.0.self_attn.q_proj.weight" not in new
    assert student.teacher_parameter_names() == student_names - new


def test_save_pretrained_round_trip(tmp_path):
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher, layer_kinds=["hybrid", "arwkv", "hybrid"], fusion="concat")
    perturb_new_(student)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, WuNengForCausalLM)
    assert loaded.config.layer_kinds == ["hybrid", "arwkv", "hybrid"] and loaded.config.fusion == "concat"
    ids = prompts()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


# -------------------------------------------------------------------------------------------------------------
# Cache and generation (after perturbing the new parameters, so the state matters)
# -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perturbed():
    teacher = tiny_teacher("qwen2", seed=1)
    student = WuNengForCausalLM.from_teacher(teacher, layer_kinds=["hybrid", "arwkv", "hybrid"])
    perturb_new_(student)
    return student.eval()


def test_state_path_matters(perturbed):
    teacher = tiny_teacher("qwen2", seed=1)
    ids = prompts()
    with torch.no_grad():
        assert (perturbed(ids).logits - teacher(ids).logits).abs().max() > 1e-2


def test_token_by_token_and_chunked_prefill_equal_full_forward(perturbed):
    torch.manual_seed(0)
    ids = prompts(length=12)
    with torch.no_grad():
        full = perturbed(ids).logits
        for sizes in ([1] * 12, [5, 4, 3], [12]):
            cache, outs, start = perturbed.new_cache(), [], 0
            for n in sizes:
                outs.append(perturbed(ids[:, start : start + n], past_key_values=cache, use_cache=True).logits)
                start += n
            assert (torch.cat(outs, 1) - full).abs().max() <= 1e-4, sizes
            assert cache.get_seq_length() == 12


def test_generate_greedy_cache_equals_no_cache_and_chunked_prefill(perturbed):
    torch.manual_seed(0)
    ids = prompts(batch=1, length=9)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        cached = perturbed.generate(ids, **kw)
        uncached = perturbed.generate(ids, use_cache=False, **kw)
        chunked = perturbed.generate(ids, prefill_chunk_size=4, **kw)
    assert cached.shape == (1, 17)
    assert torch.equal(cached, uncached) and torch.equal(cached, chunked)


def test_left_padded_batch_generation_equals_single(perturbed):
    torch.manual_seed(0)
    a, b = prompts(1, 6, seed=1), prompts(1, 11, seed=2)
    batch = torch.full((2, 11), PAD)
    batch[0, 5:], batch[1] = a[0], b[0]
    mask = (torch.arange(11)[None] >= torch.tensor([[5], [0]])).long()
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        together = perturbed.generate(batch, attention_mask=mask, **kw)
        alone_a = perturbed.generate(a, **kw)
        alone_b = perturbed.generate(b, **kw)
    assert torch.equal(together[0, 11:], alone_a[0, 6:])
    assert torch.equal(together[1, 11:], alone_b[0, 11:])


def test_sampling_is_reproducible_and_matches_no_cache(perturbed):
    ids = prompts(batch=2, length=5)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9, pad_token_id=PAD)
    with torch.no_grad():
        torch.manual_seed(11)
        cached = perturbed.generate(ids, **kw)
        torch.manual_seed(11)
        uncached = perturbed.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_the_cache(perturbed):
    ids = prompts(batch=2, length=6)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD, early_stopping=True)
    with torch.no_grad():
        cached = perturbed.generate(ids, **kw)
        reference = perturbed.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, reference)
    # the returned beams change ancestry along the way, so the cache really was reordered
    with torch.no_grad():
        out = perturbed.generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, cached)
    bi = out.beam_indices[:, : out.sequences.shape[1] - ids.shape[1]]
    valid = (bi[:, 1:] >= 0) & (bi[:, :-1] >= 0)
    assert ((bi[:, 1:] != bi[:, :-1]) & valid).any()


def test_cache_type_is_checked(perturbed):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="RecurrentStateCache"):
        perturbed(prompts(), past_key_values=DynamicCache(), use_cache=True)


# -------------------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------------------
def test_gradients_reach_every_new_parameter():
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher, layer_kinds=["hybrid", "hybrid", "arwkv"])
    perturb_new_(student)
    student.train()
    ids = prompts(length=12)
    student(ids, labels=ids).loss.backward()
    new, unused = student.new_parameter_names(), student.unused_parameter_names()
    assert unused == {f"model.layers.0.self_attn.state.{n}" for n in ("x_v", "v0", "v1", "v2")} | {
        f"model.layers.2.self_attn.{n}" for n in ("v0", "v1", "v2")
    }
    for name, p in student.named_parameters():
        if name in new - unused:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        if name in unused:
            assert p.grad is None, name


def test_activation_checkpointing_gives_the_same_gradients():
    student = WuNengForCausalLM.from_teacher(tiny_teacher(), layer_kinds=["hybrid", "arwkv", "hybrid"])
    perturb_new_(student)
    student.train()
    ids = prompts(length=12)
    student(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    (
        student.activation_checkpointing_enable
        if hasattr(student, "activation_checkpointing_enable")
        else student.gradient_checkpointing_enable
    )()  # transformers 5.17 has only the old name
    assert student.model.gradient_checkpointing
    student(ids, labels=ids).loss.backward()
    for name, p in student.named_parameters():
        if name in plain:
            assert torch.allclose(p.grad, plain[name], rtol=1e-5, atol=1e-7), name


def test_frozen_teacher_mode_leaves_teacher_weights_bit_identical():
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher)
    student.train()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert student.freeze_teacher_parameters() == len(student.teacher_parameter_names())
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = prompts(length=12)
    student(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= student.new_parameter_names()
    for name in student.teacher_parameter_names():
        assert torch.equal(dict(student.named_parameters())[name], before[name]), name


def test_align_forward_contract():
    """align_forward on the teacher's normed hidden states: output equals the teacher's attention output at
    init; state = o_proj(Y)."""
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher)
    ids = prompts()
    captured = {}

    def hook(module, args, kwargs, output):
        kwargs = dict(kwargs)
        captured[module.layer_idx] = (kwargs.pop("hidden_states"), kwargs, output[0])

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in teacher.model.layers]
    with torch.no_grad():
        teacher(ids, use_cache=False)
        for h in handles:
            h.remove()
        context = HybridContext()  # one per batch: the first hybrid layer publishes v_first there
        for i in student.converted_layer_indices():
            hs, kwargs, y_teacher = captured[i]
            res = student.model.layers[i].self_attn.align_forward(hs, wuneng_context=context, **kwargs)
            assert set(res) >= {"output", "state"} and res["state"].shape == hs.shape
            assert (res["output"] - y_teacher).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------------------------
# Parameter accounting
# -------------------------------------------------------------------------------------------------------------
def qwen25_7b_config():
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )


@pytest.mark.slow
def test_default_config_at_qwen25_7b_shapes_adds_under_5_percent(caplog):
    from wuneng.convert import config_from_teacher

    cfg = config_from_teacher(qwen25_7b_config())
    assert cfg.fusion == "gate" and cfg.middle_heads == 4 and cfg.state_query and cfg.head_dim == 128
    with torch.device("meta"):
        model = WuNengForCausalLM(cfg)
    teacher_count = model.teacher_num_parameters()
    with torch.device("meta"):
        assert teacher_count == sum(p.numel() for p in Qwen2ForCausalLM(qwen25_7b_config()).parameters())
    extra = model.num_extra_parameters()
    assert extra == sum(p.numel() for n, p in model.named_parameters() if n in model.new_parameter_names())
    assert 0 < extra < 0.05 * teacher_count, extra / teacher_count
    with caplog.at_level("INFO", logger="wuneng.models.wuneng.modeling_wuneng"):
        model.print_parameter_breakdown()
    printed = caplog.text
    assert "state heads" in printed and "extra (student - teacher)" in printed
    breakdown = model.parameter_breakdown()
    assert sum(v for k, v in breakdown.items() if not k.startswith("teacher")) == extra


def test_breakdown_counts_dropped_attention_for_arwkv():
    teacher = tiny_teacher()
    student = WuNengForCausalLM.from_teacher(teacher, attention=False)
    total = sum(p.numel() for p in student.parameters())
    assert student.teacher_num_parameters() == sum(p.numel() for p in teacher.parameters())
    assert student.num_extra_parameters() == total - student.teacher_num_parameters()
    bd = student.parameter_breakdown()
    assert bd["dropped: teacher attention of ARWKV layers"] < 0
    assert sum(v for k, v in bd.items() if not k.startswith("dropped")) == total


# -------------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------------
def test_unsupported_teacher_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="unsupported teacher architecture GPT2LMHeadModel"):
        WuNengForCausalLM.from_teacher(gpt2)


def test_head_size_the_state_heads_cannot_use():
    teacher = tiny_teacher(hidden_size=64, num_attention_heads=16, num_key_value_heads=4)  # head_dim 4
    with pytest.raises(ValueError, match="head size 4 cannot be used by RWKV-7 heads"):
        WuNengForCausalLM.from_teacher(teacher)
    # attention-only and ARWKV layers do not need the teacher's head size
    WuNengForCausalLM.from_teacher(teacher, attention=False)


def test_unknown_fusion_and_option():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        WuNengForCausalLM.from_teacher(teacher, fusion="sum")
    with pytest.raises(TypeError, match="unknown conversion option"):
        WuNengForCausalLM.from_teacher(teacher, gate_rnak=8)
    with pytest.raises(ValueError, match="middle_heads"):
        WuNengForCausalLM.from_teacher(teacher, middle_heads=5)
    with pytest.raises(ValueError, match="out of range"):
        WuNengForCausalLM.from_teacher(teacher, hybrid_layers=[3])


def test_checkpoint_whose_config_does_not_match_its_weights(tmp_path):
    student = WuNengForCausalLM.from_teacher(tiny_teacher())
    student.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fusion"] = "add"  # gate weights in the file, add weights expected
    cfg["middle_rank"] = 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not match its config.*(fusion_beta|gate_lora_a|middle_lora)"):
        WuNengForCausalLM.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown mixer kind"):
        WuNengConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_kinds=["hybrid", "mamba"])
    with pytest.raises(ValueError, match="one entry per layer"):
        WuNengConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_kinds=["hybrid"])
    cfg = WuNengConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, hybrid_layers=[0], arwkv_layers=[2])
    assert cfg.layer_kinds == ["hybrid", "attention", "arwkv"]
    assert cfg.hybrid_layers == [0] and cfg.arwkv_layers == [2]
    again = WuNengConfig.from_dict(cfg.to_dict())
    assert again.layer_kinds == cfg.layer_kinds


def test_parameter_accounting_lives_in_the_report_module():
    """Issue 15: the accounting is in wuneng.models.wuneng.report; the model's methods only forward to it."""
    import wuneng.models.wuneng.modeling_wuneng as modeling
    from wuneng.models.wuneng import report

    student = WuNengForCausalLM.from_teacher(tiny_teacher(), attention=False)
    assert report.parameter_breakdown(student) == student.parameter_breakdown()
    assert report.format_parameter_breakdown(student) == student.format_parameter_breakdown()
    assert report.teacher_num_parameters(student.config) == student.teacher_num_parameters()
    assert report.num_extra_parameters(student) == student.num_extra_parameters()
    assert not any(hasattr(modeling, n) for n in ("_attention_params", "_mlp_params", "_HYBRID_COMPONENTS"))
