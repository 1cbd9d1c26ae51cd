"""Every teacher family of :data:`wuneng.convert.TESTED_TEACHERS` converts exactly (issue 14 item 2).

Each teacher is built from transformers' own config and causal-LM classes with a tiny random config (seeded) that
switches on what the family needs of the wrapper: Llama 3 RoPE scaling, Qwen2 qkv biases and tied embeddings,
Qwen3 q/k norms, Mistral's sliding window (shorter than the test sequence), Gemma 3's alternating sliding/full
layers and final logit softcapping (and attention softcapping in its config, which transformers 5.23's Gemma 3
attention does not apply), Phi-3's fused
qkv and gate/up projections, Qwen3-MoE's experts. Checked with the default conversion (every layer hybrid) and
with ``keep_attention=[1]``:

- student logits == teacher logits on a left-padded batch (max abs difference <= 1e-6; observed 0);
- greedy ``generate()`` (past the sliding window) gives the teacher's tokens and per-step logits, and beam
  search the teacher's beams on the sliding-window families;
- chunked prefill through ``model.new_cache()`` gives the last logits of one pass (within 1e-5 of their scale),
  also with trained (perturbed) state heads, and cached greedy decoding of such a student equals recomputing
  the whole sequence at every step;
- ``save_pretrained`` then ``AutoModelForCausalLM.from_pretrained`` gives bit-identical logits;
- left padding changes no row's logits, with state heads that act;
- ARWKV (``attention=False``) converts with defaults and trains; ``untie_embeddings``; the one-line error for a
  teacher the wrapper cannot serve; defaults that adapt to a 2-head teacher and to a width that 64 does not divide.

The student runs the teacher's attention implementation (eager stays eager), and a head_dim that 16 does not
divide (24) still gets hybrid layers (state heads are multiples of 8).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.cache_utils import DynamicCache

from wuneng.layers.hybrid import HybridMixer
from wuneng.models.wuneng import WuNengForCausalLM

from _helpers import perturb_

VOCAB = 101
WINDOW = 5  # sliding window of Mistral and Gemma 3: shorter than the prompt and the generated continuation
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,  # peaked attention and logits, so that a wrong mask or position changes the output
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: model_type -> (config class, causal LM class, what the family needs on top of SHAPES)
FAMILIES = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        ),
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # q/k norms are Qwen3's default
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,  # stored, but transformers 5.23's Gemma 3 attention does not apply it
            final_logit_softcapping=30.0,
        ),
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(head_dim=None)),  # fused qkv_proj and gate_up_proj
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    ),
}
FAMILY_NAMES = list(FAMILIES)
SLIDING_FAMILIES = ["mistral", "gemma3_text"]
TIED_FAMILIES = ["qwen2", "gemma3_text"]  # Gemma 3 ties its embeddings by default
#: conversion options: the defaults (every layer hybrid) and one layer that keeps the teacher's attention
LAYOUTS = {"defaults": {}, "keep_attention_1": {"keep_attention": [1]}}

LOGITS_ATOL = 1e-6  # student vs teacher, float32; the wrapper runs the teacher's own code (observed: 0)
CHUNK_RTOL = 1e-5  # chunked vs one-pass prefill, relative to the logits' scale (other matmul shapes)
NEW_TOKENS = 10  # generated past the sliding window (8 real prompt tokens in the padded row + 10 > WINDOW)


def make_teacher(family: str, seed: int = 0, **overrides):
    """The family's tiny random causal LM (seeded), in eval mode."""
    config_class, model_class, extra = FAMILIES[family]
    kwargs = {**SHAPES, **extra, **overrides}
    attn_implementation = kwargs.pop("attn_implementation", None)
    if kwargs.get("head_dim", 0) is None:
        kwargs.pop("head_dim")  # Phi-3 derives it from hidden_size / num_attention_heads
    config = config_class(**kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    teacher = model_class(config).eval()
    assert teacher.config.model_type == family
    return teacher


def padded_batch(length: int = 12, pad: int = 4):
    """input_ids [2, length] and a 2-D attention mask with row 0 left-padded by ``pad`` tokens."""
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = SHAPES["pad_token_id"]
    return ids, mask


def perturb_new_parameters(student, scale: float = 0.1, seed: int = 1):
    """Noise on the student's new parameters only, so that the state heads (zero-initialised fusion and query
    paths) change the output: what a trained student looks like to its cache."""
    new = student.new_parameter_names()
    assert new, "the student has no new parameters"
    return perturb_(student, scale, only=lambda name: name in new, seed=seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def greedy(model, ids, mask, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # no early stop at a random eos: every step is compared
        do_sample=False,
        pad_token_id=SHAPES["pad_token_id"],
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def test_tested_teachers_are_the_families_checked_here():
    from wuneng.convert import TESTED_TEACHERS

    assert sorted(TESTED_TEACHERS) == sorted(FAMILIES)


# -- function preservation at step 0 ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_student_logits_equal_the_teachers_on_a_left_padded_batch(family, layout):
    teacher = make_teacher(family)
    student = WuNengForCausalLM.from_teacher(teacher, **LAYOUTS[layout])
    expected_kinds = ["hybrid"] * 4 if layout == "defaults" else ["hybrid", "attention", "hybrid", "hybrid"]
    assert student.config.layer_kinds == expected_kinds
    for kind, layer, teacher_layer in zip(expected_kinds, student.model.layers, teacher.model.layers):
        # hybrid: the teacher's attention class, wrapped; attention: the teacher's class itself
        assert isinstance(layer.self_attn, type(teacher_layer.self_attn))
        assert isinstance(layer.self_attn, HybridMixer) == (kind == "hybrid")
    assert student.config.teacher_config._attn_implementation == teacher.config._attn_implementation
    ids, mask = padded_batch()
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask).logits
        got = student(ids, attention_mask=mask).logits
    assert got.shape == want.shape == (2, 12, VOCAB)
    assert max_diff(got, want) <= LOGITS_ATOL, (family, layout, max_diff(got, want))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_equals_the_teachers_past_the_sliding_window(family, layout):
    teacher = make_teacher(family)
    student = WuNengForCausalLM.from_teacher(teacher, **LAYOUTS[layout])
    ids, mask = padded_batch()
    with torch.no_grad():
        want = greedy(teacher, ids, mask)
        got = greedy(student, ids, mask)
    assert torch.equal(got.sequences, want.sequences), (family, layout, got.sequences, want.sequences)
    assert got.sequences.shape == (2, 12 + NEW_TOKENS)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert max_diff(a, b) <= LOGITS_ATOL, (family, layout, step, max_diff(a, b))


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_beam_search_equals_the_teachers(family):
    teacher = make_teacher(family)
    student = WuNengForCausalLM.from_teacher(teacher)
    ids, mask = padded_batch()
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        pad_token_id=SHAPES["pad_token_id"],
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        want = teacher.generate(ids, **kwargs)
        got = student.generate(ids, **kwargs)
    assert got.sequences.shape == (6, 12 + NEW_TOKENS)
    assert torch.equal(got.sequences, want.sequences), (family, got.sequences, want.sequences)
    assert max_diff(got.sequences_scores, want.sequences_scores) <= LOGITS_ATOL
    # with state heads that act, the beams' recurrent states follow their beams: the cached search equals the
    # search that recomputes every beam's whole sequence at each step (use_cache=False)
    perturb_new_parameters(student)
    with torch.no_grad():
        cached = student.generate(ids, **kwargs)
        recomputed = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences), (family, cached.sequences, recomputed.sequences)
    assert max_diff(cached.sequences_scores, recomputed.sequences_scores) <= CHUNK_RTOL


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_student_runs_the_teachers_attention_implementation(family):
    teacher = make_teacher(family, attn_implementation="eager")
    assert teacher.config._attn_implementation == "eager"
    student = WuNengForCausalLM.from_teacher(teacher)
    ids, mask = padded_batch()
    with torch.no_grad():
        err = max_diff(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)
    assert student.config.teacher_config._attn_implementation == "eager"
    assert student.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert err <= LOGITS_ATOL, err


# -- the cache: chunked prefill and cached decoding -------------------------------------------------------------
def chunked_last_logits(model, ids, mask, split: int, cache):
    """Last-position logits [B, V] of the prompt fed as ids[:, :split] then ids[:, split:] through ``cache``."""
    first = model(ids[:, :split], attention_mask=mask[:, :split], past_key_values=cache, use_cache=True)
    second = model(ids[:, split:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
    assert second.past_key_values is cache
    return second.logits[:, -1]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chunked_prefill_equals_one_pass(family):
    """Prompt of 12 in chunks of 7 and 5 (each longer than the sliding window): the same last logits as one pass,
    for the student at conversion (= the teacher's, and the teacher's own chunked prefill) and for a student
    whose state heads matter (perturbed new parameters)."""
    teacher = make_teacher(family)
    student = WuNengForCausalLM.from_teacher(teacher, keep_attention=[1])
    ids, mask = padded_batch()
    with torch.no_grad():
        one_pass = teacher(ids, attention_mask=mask).logits[:, -1]
        teacher_cache, student_cache = DynamicCache(config=teacher.config), student.new_cache()
        teacher_chunked = chunked_last_logits(teacher, ids, mask, 7, teacher_cache)
        student_chunked = chunked_last_logits(student, ids, mask, 7, student_cache)
        # the student's cache holds the teacher's kind of key/value layer: a sliding layer keeps only its window
        for i, (ours, theirs) in enumerate(zip(student_cache.layers, teacher_cache.layers)):
            assert ours.keys.shape == theirs.keys.shape, (family, i, ours.keys.shape, theirs.keys.shape)
            assert max_diff(ours.keys, theirs.keys) <= LOGITS_ATOL and max_diff(ours.values, theirs.values) <= (
                LOGITS_ATOL
            )
        if family in SLIDING_FAMILIES:
            assert min(layer.keys.shape[-2] for layer in student_cache.layers) < ids.shape[1]
        scale = float(one_pass.abs().max())
        assert max_diff(teacher_chunked, one_pass) <= CHUNK_RTOL * scale  # the reference itself
        assert max_diff(student_chunked, one_pass) <= CHUNK_RTOL * scale, (family, max_diff(student_chunked, one_pass))
        perturb_new_parameters(student)
        one_pass = student(ids, attention_mask=mask).logits[:, -1]
        assert max_diff(one_pass, teacher(ids, attention_mask=mask).logits[:, -1]) > 1e-3  # the state heads act
        for split in (3, 7, 11):
            chunked = chunked_last_logits(student, ids, mask, split, student.new_cache())
            err = max_diff(chunked, one_pass)
            assert err <= CHUNK_RTOL * float(one_pass.abs().max()), (family, split, err)


@pytest.mark.parametrize("kind", ["hybrid", "arwkv"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_greedy_decoding_of_a_trained_student_equals_recomputation(family, kind):
    """With state heads that act (perturbed), ``generate()`` through the cache (sliding-window KV, recurrent
    states, left padding) gives, at every step, the logits of the whole sequence recomputed without a cache; for
    hybrid layers and for ARWKV ones (with layer 1 kept as the teacher's attention)."""
    teacher = make_teacher(family)
    options = {} if kind == "hybrid" else dict(attention=False, keep_attention=[1])
    student = perturb_new_parameters(WuNengForCausalLM.from_teacher(teacher, **options))
    assert student.config.layer_kinds.count(kind) >= 3
    ids, mask = padded_batch()
    with torch.no_grad():
        out = greedy(student, ids, mask)
        seq = out.sequences
        for step, step_logits in enumerate(out.logits):
            n = ids.shape[1] + step
            full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
            # the positions generate() gives a left-padded batch
            positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
            want = student(seq[:, :n], attention_mask=full_mask, position_ids=positions, use_cache=False).logits[:, -1]
            err = max_diff(step_logits, want)
            assert err <= CHUNK_RTOL * float(want.abs().max()), (family, step, err)
            want[:, SHAPES["eos_token_id"]] = -float("inf")  # what min_new_tokens does to the eos logit
            assert torch.equal(seq[:, n], want.argmax(-1)), (family, step)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padding_does_not_change_a_rows_logits_when_the_state_heads_act(family):
    """A left-padded row (positions as ``generate()`` gives them) has, at its real tokens, the logits of the same
    tokens alone: the padding reaches neither the attention nor the recurrent state (perturbed new parameters,
    so the state heads change the output). The teacher's own difference is the reference of the tolerance."""
    teacher = make_teacher(family)
    student = perturb_new_parameters(WuNengForCausalLM.from_teacher(teacher, keep_attention=[1]))
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    real = mask[0].bool()
    with torch.no_grad():
        for model in (teacher, student):
            padded = model(ids, attention_mask=mask, position_ids=positions).logits[0, real]
            alone = model(ids[:1, real]).logits[0]
            err = max_diff(padded, alone)
            assert err <= CHUNK_RTOL * float(alone.abs().max()), (family, type(model).__name__, err)


# -- saving -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_and_auto_load_in_the_same_process_gives_identical_logits(family, tmp_path):
    teacher = make_teacher(family)
    student = perturb_new_parameters(WuNengForCausalLM.from_teacher(teacher, keep_attention=[1]))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is WuNengForCausalLM
    assert loaded.config.teacher_config.model_type == family
    assert loaded.config.layer_kinds == student.config.layer_kinds
    assert type(loaded.model.layers[0].self_attn) is type(student.model.layers[0].self_attn)
    tied = bool(teacher.config.tie_word_embeddings)
    shares = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shares == tied, (family, tied)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = student(ids, attention_mask=mask).logits
        got = loaded(ids, attention_mask=mask).logits
    assert torch.equal(got, want), (family, max_diff(got, want))


# -- ARWKV ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_arwkv_conversion_with_defaults_gives_finite_logits_and_trains(family):
    teacher = make_teacher(family)
    student = WuNengForCausalLM.from_teacher(teacher, attention=False)
    assert student.config.layer_kinds == ["arwkv"] * 4
    assert student.config.arwkv_head_size == 64  # divides hidden_size 64
    # the teacher's MLPs (dense, fused gate/up, experts) and norms are kept as they are
    theirs = teacher.state_dict()
    kept = [n for n in student.teacher_parameter_names() if ".mlp." in n]
    assert kept and all(torch.equal(student.state_dict()[n], theirs[n]) for n in kept)
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = student(ids, attention_mask=mask).logits
    assert logits.shape == (2, 12, VOCAB) and bool(torch.isfinite(logits).all())
    student.train()
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss = student(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    arwkv_grads = [
        p.grad for n, p in student.named_parameters() if ".self_attn." in n and p.grad is not None and p.grad.any()
    ]
    assert arwkv_grads, "no ARWKV parameter got a gradient"
    optimizer.step()
    optimizer.zero_grad()
    after = student(ids, attention_mask=mask, labels=labels).loss
    loss, after = float(loss.detach()), float(after.detach())
    assert torch.isfinite(torch.tensor(loss)) and after < loss, (family, loss, after)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hybrid_state_side_trains_with_the_teacher_frozen(family):
    """Distillation's first stage: the teacher's parameters frozen, three AdamW steps on a repeated batch; every
    new parameter the forward uses gets a gradient by the third step (the zero-initialised fusion and query paths
    open up one step after another) and the loss falls at every step."""
    student = WuNengForCausalLM.from_teacher(make_teacher(family), keep_attention=[1]).train()
    assert student.freeze_teacher_parameters() > 0
    trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert set(trained) == student.new_parameter_names()
    used = set(trained) - student.unused_parameter_names()
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-3)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    losses, got_gradient = [], set()
    for _ in range(3):
        loss = student(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        got_gradient |= {n for n, p in trained.items() if p.grad is not None and bool(p.grad.any())}
        assert all(bool(torch.isfinite(p.grad).all()) for p in trained.values() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert sorted(used - got_gradient) == [], family
    assert losses[0] > losses[1] > losses[2], (family, losses)


# -- tied embeddings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_untie_embeddings_gives_an_own_lm_head_and_keeps_the_logits(family, tmp_path):
    teacher = make_teacher(family)
    assert teacher.config.tie_word_embeddings
    tied = WuNengForCausalLM.from_teacher(teacher)
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = WuNengForCausalLM.from_teacher(teacher, untie_embeddings=True)
    assert not untied.config.tie_word_embeddings
    head, embedding = untied.lm_head.weight, untied.model.embed_tokens.weight
    assert head.untyped_storage().data_ptr() != embedding.untyped_storage().data_ptr()
    assert torch.equal(head, embedding)  # a copy, at conversion
    ids, mask = padded_batch()
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask).logits
        assert max_diff(untied(ids, attention_mask=mask).logits, want) <= LOGITS_ATOL
        head.add_(1.0)  # the head is its own: the embedding does not move with it
    assert not torch.equal(head, embedding)
    untied.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, head) and torch.equal(loaded.model.embed_tokens.weight, embedding)


# -- teachers the wrapper cannot serve ---------------------------------------------------------------------------
class _OpaqueAttention(nn.Module):
    """An attention module without the q/k/v/o projections the wrapper needs."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mix = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, *args, **kwargs):
        return self.mix(hidden_states), None


def _teacher_with_an_opaque_attention():
    teacher = make_teacher("llama", num_hidden_layers=2)
    teacher.model.layers[1].self_attn = _OpaqueAttention(SHAPES["hidden_size"])
    return teacher


class _NotATransformersModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)),
            r"GPT2LMHeadModel.*no decoder layers in \.model\.layers",
        ),
        (_teacher_with_an_opaque_attention, r"_OpaqueAttention cannot be wrapped: it has no q_proj, k_proj, v_proj"),
        (_NotATransformersModel, r"_NotATransformersModel.*not a transformers model"),
    ],
    ids=["gpt2", "opaque_attention", "plain_module"],
)
def test_a_teacher_whose_attention_cannot_be_wrapped_is_one_line_naming_what_is_missing(make, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        WuNengForCausalLM.from_teacher(make())
    message = str(err.value)
    assert "\n" not in message and message.startswith("unsupported teacher architecture"), message


# -- defaults adapt to the teacher's shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_defaults_on_a_two_head_teacher(family, caplog):
    overrides = dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    if family == "phi3":
        overrides.pop("head_dim")  # 64 / 2
    if family == "gemma3_text":
        overrides.update(layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32)
    teacher = make_teacher(family, **overrides)
    with caplog.at_level("INFO", logger="wuneng.convert"):
        student = WuNengForCausalLM.from_teacher(teacher)
    assert student.config.middle_heads == 2 and "middle_heads=2" in caplog.text
    assert all(layer.self_attn.num_middle_heads == 2 for layer in student.model.layers)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert max_diff(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits) <= (
            LOGITS_ATOL
        )


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_arwkv_defaults_on_a_width_that_64_does_not_divide(family, caplog, tmp_path):
    """hidden_size 48 (3 heads of 16): the ARWKV head size becomes 16, is logged and is stored in the config."""
    overrides = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    if family == "phi3":
        overrides.pop("head_dim")
    if family == "gemma3_text":
        overrides.update(layer_types=["sliding_attention", "full_attention"])
    teacher = make_teacher(family, **overrides)
    with caplog.at_level("INFO", logger="wuneng.convert"):
        student = WuNengForCausalLM.from_teacher(teacher, attention=False)
    assert student.config.arwkv_head_size == 16 and "arwkv_head_size=16" in caplog.text
    assert student.config.middle_heads == 3
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = student(ids, attention_mask=mask).logits
    assert logits.shape == (2, 12, VOCAB) and bool(torch.isfinite(logits).all())
    student.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.arwkv_head_size == 16


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_hybrid_defaults_on_a_head_dim_that_16_does_not_divide(family):
    overrides = dict(num_hidden_layers=2, hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    if family == "phi3":
        overrides.pop("head_dim")  # 96 / 4
    teacher = make_teacher(family, **overrides)
    student = WuNengForCausalLM.from_teacher(teacher)
    ids, mask = padded_batch()
    with torch.no_grad():
        err = max_diff(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)
    assert err <= LOGITS_ATOL, err
