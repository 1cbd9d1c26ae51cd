"""Cached teacher logits (issue 16 item 4): the bucketed KL (top-k + rest) against a float64 reference, k = V equal
to live distillation (loss and gradients), refusal of a cache made for other data, an interrupted build, and a
run of train() from the cache equal to the live run."""

import math

import pytest
import torch

from wuneng.train.config import DataConfig, DistillConfig, TeacherCacheConfig
from wuneng.train.data import build_dataset
from wuneng.train.loop import train
from wuneng.train.stages import DistillObjective
from wuneng.train.teacher_cache import (
    TeacherCacheError,
    TeacherLogitCache,
    bucketed_kl_divergence_sum,
    build_teacher_cache,
    chunked_bucketed_kl_divergence_sum,
    teacher_fingerprint,
)

from train_helpers import TEXTS, quick_config, state_of, tiny_qwen2

TAU = 1.5
VOCAB = 260


@pytest.fixture
def rows(tokenizer):
    return build_dataset(DataConfig(seq_len=24, text_unit="line"), tokenizer, "distill", [TEXTS])


def _build(teacher, rows, path, top_k, shard_rows=5, **kw):
    return build_teacher_cache(
        teacher,
        rows.input_ids,
        rows.attention_mask,
        path,
        top_k=top_k,
        teacher_id=teacher_fingerprint(teacher),
        temperature=TAU,
        shard_rows=shard_rows,
        batch_size=3,
        **kw,
    )


def bucketed_reference(teacher_logits, student_logits, mask, k, tau):
    """The bucketed KL in float64 from the full teacher logits, written out token by token."""
    zt, zs = teacher_logits.double() / tau, student_logits.double() / tau
    total = 0.0
    for b in range(zt.shape[0]):
        for t in range(zt.shape[1]):
            if not mask[b, t]:
                continue
            q, p = zt[b, t].softmax(-1), zs[b, t].softmax(-1)
            top = zt[b, t].topk(k).indices
            q_top, p_top = q[top], p[top]
            kl = float((q_top * (q_top.log() - p_top.log())).sum())
            q_rest, p_rest = 1 - float(q_top.sum()), 1 - float(p_top.sum())
            if k < zt.shape[-1]:
                kl += q_rest * (math.log(q_rest) - math.log(p_rest))
            total += tau**2 * kl
    return total


def test_full_vocabulary_cache_matches_live_distillation(tmp_path, tokenizer, rows):
    teacher, student = tiny_qwen2(seed=0), tiny_qwen2(seed=1)
    cache = TeacherLogitCache(_build(teacher, rows, tmp_path / "cache", top_k=VOCAB))
    idx = [7, 0, 3]
    batch = rows.batch(idx)
    live = DistillObjective(student, teacher, TAU, tokenizer_size=len(tokenizer))
    cached = DistillObjective(student, None, TAU, tokenizer_size=len(tokenizer), teacher_cache=cache)
    loss_live = live(batch)["loss_sum"]
    g_live = torch.autograd.grad(loss_live, [p for p in student.parameters() if p.requires_grad])
    loss_cached = cached({**batch, "row_index": torch.tensor(idx)})["loss_sum"]
    g_cached = torch.autograd.grad(loss_cached, [p for p in student.parameters() if p.requires_grad])
    # float32 throughout, the vocabulary summed in another order: relative 1e-5 on the loss; each gradient within
    # 1e-4 relative plus 1e-5 of its largest entry (absolute)
    assert float(loss_cached.detach()) == pytest.approx(float(loss_live.detach()), rel=1e-5)
    for a, b in zip(g_cached, g_live):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_loss_equals_float64_reference(tmp_path, rows, k):
    teacher, student = tiny_qwen2(seed=0), tiny_qwen2(seed=1)
    cache = TeacherLogitCache(_build(teacher, rows, tmp_path / "cache", top_k=k))
    idx = [2, 6, 11]  # crosses shards of 5 rows
    batch = rows.batch(idx)
    c = cache.rows(idx)
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"]
    want = bucketed_reference(zt, zs, mask, k, TAU)
    # the formula, evaluated in float64 from float64 top-k logits and rest log-sum-exp: relative 1e-10
    vals64, ids64 = zt.double().topk(k, dim=-1)
    rest64 = (zt.double() / TAU).scatter(-1, ids64, -math.inf).logsumexp(-1)
    got64 = bucketed_kl_divergence_sum(ids64, vals64, rest64, zs.double(), mask, TAU)
    assert float(got64) == pytest.approx(want, rel=1e-10)
    # from the float32 cache in float32: the bucketed KL is a small difference of larger terms (at k = 1 the
    # per-token KL is ~1e-5), so the bound is absolute: 1e-6 per real token
    got = bucketed_kl_divergence_sum(c["topk_ids"], c["topk_logits"], c["rest_lse"], zs, mask, TAU)
    assert abs(float(got) - want) <= 1e-6 * int(mask.sum())
    # the checkpointed chunks give the same value and gradient
    s1 = zs.clone().requires_grad_(True)
    s2 = zs.clone().requires_grad_(True)
    a = bucketed_kl_divergence_sum(c["topk_ids"], c["topk_logits"], c["rest_lse"], s1, batch["attention_mask"], TAU)
    b = chunked_bucketed_kl_divergence_sum(
        c["topk_ids"], c["topk_logits"], c["rest_lse"], s2, batch["attention_mask"], TAU, chunk_tokens=7
    )
    (ga,), (gb,) = torch.autograd.grad(a, [s1]), torch.autograd.grad(b, [s2])
    assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-8)
    # the rest bucket: teacher mass off the top-k from the stored log-sum-exp is exact
    zt_tau = zt.float() / TAU
    q_top = (c["topk_logits"] / TAU - zt_tau.logsumexp(-1, keepdim=True)).exp().sum(-1)
    q_rest = (c["rest_lse"] - zt_tau.logsumexp(-1)).exp()
    torch.testing.assert_close(q_top + q_rest, torch.ones_like(q_rest), rtol=0, atol=1e-5)


def test_cache_for_other_data_teacher_or_k_is_refused(tmp_path, tokenizer, rows):
    teacher = tiny_qwen2(seed=0)
    cache = TeacherLogitCache(_build(teacher, rows, tmp_path / "cache", top_k=8))
    tid = teacher_fingerprint(teacher)
    cache.check(rows.input_ids, rows.attention_mask, top_k=8, temperature=TAU, teacher_id=tid)  # the right one
    other = build_dataset(DataConfig(seq_len=24, text_unit="line"), tokenizer, "distill", [TEXTS[1:]])
    with pytest.raises(TeacherCacheError, match="other training data") as e:
        cache.check(other.input_ids, other.attention_mask, top_k=8, temperature=TAU, teacher_id=tid)
    assert "\n" not in str(e.value) and str(tmp_path / "cache") in str(e.value)
    with pytest.raises(TeacherCacheError, match="another teacher"):
        cache.check(
            rows.input_ids,
            rows.attention_mask,
            top_k=8,
            temperature=TAU,
            teacher_id=teacher_fingerprint(tiny_qwen2(seed=3)),
        )
    with pytest.raises(TeacherCacheError, match="top_k 8"):
        cache.check(rows.input_ids, rows.attention_mask, top_k=16, temperature=TAU, teacher_id=tid)
    with pytest.raises(TeacherCacheError, match="temperature"):
        cache.check(rows.input_ids, rows.attention_mask, top_k=8, temperature=1.0, teacher_id=tid)
    # train() refuses it before anything is written
    cfg = quick_config(
        tmp_path / "run",
        stage="distill",
        max_steps=1,
        distill=DistillConfig(temperature=TAU, teacher_cache=TeacherCacheConfig(path=str(tmp_path / "cache"), top_k=8)),
    )
    with pytest.raises(TeacherCacheError, match="other training data"):
        train(cfg, model=tiny_qwen2(seed=1), tokenizer=tokenizer, dataset=other)
    assert not (tmp_path / "run").exists()


def test_interrupted_build_leaves_no_usable_half_shard(tmp_path, rows, monkeypatch):
    teacher = tiny_qwen2(seed=0)
    path = tmp_path / "cache"
    calls = {"n": 0}
    forward = teacher.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 = rows 0-4 (batches of 3: 2 calls); the 4th call is in the middle of shard 1
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="injected"):
        _build(teacher, rows, path, top_k=8)
    assert sorted(p.name for p in path.iterdir()) == ["shard-00000.safetensors"]  # no shard 1, no temp, no manifest
    with pytest.raises(TeacherCacheError, match="interrupted build"):
        TeacherLogitCache(path)
    # a rebuild keeps the complete shard and writes the rest; the result equals a build in one go
    _build(teacher, rows, path, top_k=8)
    per_shard = [math.ceil(min(5, len(rows) - s) / 3) for s in range(5, len(rows), 5)]  # shards 1.. in batches of 3
    assert calls["n"] == 4 + sum(per_shard)  # shard 0 was kept, not recomputed
    monkeypatch.undo()
    whole = TeacherLogitCache(_build(teacher, rows, tmp_path / "whole", top_k=8))
    resumed = TeacherLogitCache(path)
    every = list(range(len(rows)))
    for key, value in whole.rows(every).items():
        torch.testing.assert_close(resumed.rows(every)[key], value, rtol=0, atol=0)


def test_train_from_cache_equals_live_run_and_needs_no_teacher(tmp_path, tokenizer, rows):
    """k = V: three optimiser steps from the cache give the live run's weights (float32; atol 1e-5)."""
    teacher = tiny_qwen2(seed=0)
    _build(teacher, rows, tmp_path / "cache", top_k=VOCAB, shard_rows=4)
    common = dict(stage="distill", max_steps=3, micro_batch_size=2, grad_accum_steps=2)
    live_student = tiny_qwen2(seed=1)
    train(
        quick_config(tmp_path / "live", distill=DistillConfig(temperature=TAU), **common),
        model=live_student,
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=rows,
    )
    cached_student = tiny_qwen2(seed=1)
    cache_cfg = TeacherCacheConfig(path=str(tmp_path / "cache"), top_k=VOCAB)
    result = train(
        quick_config(tmp_path / "cached", distill=DistillConfig(temperature=TAU, teacher_cache=cache_cfg), **common),
        model=cached_student,
        tokenizer=tokenizer,
        dataset=rows,
    )
    assert result.step == 3
    live_state, cached_state = state_of(live_student), state_of(cached_student)
    assert any(not torch.equal(v, state_of(tiny_qwen2(seed=1))[k]) for k, v in cached_state.items())  # it trained
    for k, v in live_state.items():
        torch.testing.assert_close(cached_state[k], v, rtol=0, atol=1e-5)


def test_cli_cache_teacher_then_train_without_the_teacher(tmp_path, tokenizer, monkeypatch):
    """`wuneng cache-teacher RECIPE` then `wuneng train RECIPE`: the run never loads the teacher; a recipe with other
    data is refused with one line (exit 2); a second cache-teacher run over a complete cache is a no-op."""
    from typer.testing import CliRunner

    import wuneng.train.loop as loop
    from wuneng.cli import app

    from train_helpers import saved_run_files

    recipe = saved_run_files(
        tmp_path,
        tokenizer,
        stage="distill",
        teacher=str(tmp_path / "model"),
        max_steps=2,
        micro_batch_size=2,
        distill={"teacher_cache": {"path": str(tmp_path / "cache"), "top_k": 8, "shard_rows": 8}},
    )
    result = CliRunner().invoke(app, ["cache-teacher", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "cache.json").is_file()
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    mtime = shard.stat().st_mtime_ns
    assert CliRunner().invoke(app, ["cache-teacher", str(recipe)]).exit_code == 0
    assert shard.stat().st_mtime_ns == mtime  # nothing rewritten

    load_causal_lm = loop.load_causal_lm  # loads the student too (model.path)

    def no_teacher(path, dtype=None, what="model", check=None):
        if what == "teacher":
            raise AssertionError("the teacher was loaded")
        return load_causal_lm(path, dtype, what, check)

    monkeypatch.setattr(loop, "load_causal_lm", no_teacher)
    result = CliRunner().invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--output-dir", str(tmp_path / "run2"), "-o", "data.seq_len=12"]
    )
    assert result.exit_code == 2 and "was made for other training data" in result.output
    assert not (tmp_path / "run2").exists()
