"""``wuneng bench-arch``: results accumulate in one table, finished runs are skipped on resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from wuneng.apps.bench_arch import (
    VARIANTS,
    BenchConfig,
    TaskSetting,
    best_rows,
    build_model,
    labelled_cross_entropy,
    next_token_rows,
    read_results,
    run_bench,
    train_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(out, variants, **kw) -> BenchConfig:
    settings = (TaskSetting("mqar", 16, 2, 64), TaskSetting("state", 6, group="A4"))
    return BenchConfig(
        output_dir=str(out),
        settings=settings,
        variants=variants,
        lrs=(3e-3,),
        d_model=32,
        head_size=16,
        steps=3,
        batch_size=4,
        examples_per_epoch=8,
        test_examples=8,
        threads=1,
        **{"seeds": (0,), **kw},
    )


def test_results_accumulate_and_resume_skips_finished_runs(tmp_path):
    torch.manual_seed(0)
    rows = run_bench(_tiny(tmp_path, ("transformer", "rwkv7")))
    assert len(rows) == 4  # 2 settings x 2 variants
    # examples_per_epoch=8 with batch 4: epoch 1 is fresh data (2 epochs over 3 steps), and the budget is the same
    assert {r["steps"] for r in rows} == {3} and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert {r["tokens"] for r in rows if r["task"] == "mqar"} == {3 * 4 * 16}
    assert all("solved_up_to" in r for r in rows if r["task"] == "state")
    path = tmp_path / "results.jsonl"
    before = path.read_text()

    # the same sweep again: nothing is retrained, the file is unchanged
    again = run_bench(_tiny(tmp_path, ("transformer", "rwkv7")))
    assert path.read_text() == before and len(again) == 4

    # a larger sweep: only the new variant trains; the table holds all three
    rows = run_bench(_tiny(tmp_path, ("transformer", "rwkv7", "wuneng-gate")))
    assert len(rows) == 6 and path.read_text().startswith(before)
    assert [r["variant"] for r in rows[4:]] == ["wuneng-gate", "wuneng-gate"]
    table = (tmp_path / "results.md").read_text()
    for v in ("transformer", "rwkv7", "wuneng-gate"):
        assert f"| {v} |" in table
    assert "mqar T=16 n=2 V=64" in table and "state A4 k=6" in table
    contribution = table.split("## State-head contribution")[1].split("| setting | variant | params |")[0]
    assert "| wuneng-gate | mqar T=16 n=2 V=64 |" in contribution and "| rwkv7 |" not in contribution
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG_MAGIC

    # a changed budget is a different run
    rows = run_bench(_tiny(tmp_path, ("transformer",), max_seconds=60.0))
    assert len(rows) == 8


def test_only_keeps_the_run_keys_of_the_whole_sweep(tmp_path):
    cfg = _tiny(tmp_path, ("transformer",))
    part = cfg.only(["state"])
    assert [s.name for s in part.settings] == ["state A4 k=6"]
    assert {part.run_key(*r) for r in part.runs()} < {cfg.run_key(*r) for r in cfg.runs()}
    with pytest.raises(ValueError, match="no setting matches"):
        cfg.only(["parity"])


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(
        json.dumps({"key": "a", "setting": "s", "variant": "rwkv7", "lr": 1e-3, "seed": 0, "accuracy": 0.5})
        + '\n{"key": '
    )
    assert [r["key"] for r in read_results(path)] == ["a"]


def test_best_rows_picks_the_best_learning_rate_by_mean_over_seeds():
    rows = [
        {"setting": "s", "variant": "rwkv7", "lr": 1e-3, "seed": 0, "accuracy": 0.9},
        {"setting": "s", "variant": "rwkv7", "lr": 1e-3, "seed": 1, "accuracy": 0.1},  # mean 0.5
        {"setting": "s", "variant": "rwkv7", "lr": 3e-3, "seed": 0, "accuracy": 0.6},
        {"setting": "s", "variant": "rwkv7", "lr": 3e-3, "seed": 1, "accuracy": 0.6},  # mean 0.6
    ]
    best = best_rows(rows)[("s", "rwkv7")]
    assert best["lr"] == 3e-3 and best["accuracy"] == pytest.approx(0.6) and best["seeds"] == [0, 1]
    assert best["by_lr"] == {1e-3: pytest.approx(0.5), 3e-3: pytest.approx(0.6)}


def test_labelled_cross_entropy_scores_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 1] = 4, 2
    expected = -(torch.log_softmax(logits[0, 3], -1)[4] + torch.log_softmax(logits[1, 1], -1)[2]) / 2
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_next_token_rows_score_what_the_task_labels(tmp_path):
    """train()'s next-token loss on the shifted rows is the task's same-position loss on the original rows, for a
    causal model (float64; the appended token changes no earlier logit)."""
    from wuneng.train.stages import shifted_cross_entropy_sum

    setting = TaskSetting("state", 6, group="A4")
    x, y = setting.generate(5, seed=0)
    model = build_model("rwkv7", _tiny(tmp_path, ("rwkv7",)), setting.model_vocab, 6, seed=0).double()
    rows = next_token_rows(x, y)
    assert rows.input_ids.shape == (5, 7) and rows.num_target_tokens == int((y != -100).sum())
    with torch.no_grad():
        expected = labelled_cross_entropy(model(input_ids=x).logits.double(), y)
        logits = model(input_ids=rows.input_ids).logits.double()
        total, count = shifted_cross_entropy_sum(logits, rows.labels)
        assert torch.allclose(logits[:, :6], model(input_ids=x).logits.double(), rtol=0, atol=1e-12)
    assert abs(float(total / count) - float(expected)) < 1e-10


def test_a_run_trains_through_the_library_train_loop(tmp_path, monkeypatch):
    """train_run calls wuneng.train.loop.train with fresh rows every epoch, the step budget, no checkpoints."""
    import wuneng.train.loop as loop

    seen = {}
    real_train = loop.train

    def spy(config, **kwargs):
        seen["config"], seen["kwargs"] = config, kwargs
        return real_train(config, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    cfg = _tiny(tmp_path, ("transformer",), eval_every=1, stop_accuracy=0.0)
    row = train_run(cfg.settings[0], "transformer", 3e-3, 0, cfg, progress=False)
    config, kwargs = seen["config"], seen["kwargs"]
    assert config.max_steps == 3 and config.micro_batch_size == 4 and not config.save_checkpoints
    assert kwargs["dataset_for_epoch"](1).input_ids.shape == (8, 17)  # fresh rows of T + 1 tokens
    # stop_accuracy 0 is reached at the first evaluation: the run ends after step 1
    assert row["steps"] == 1 and row["stopped_at_accuracy"] and len(row["loss_curve"]) == 1


def test_every_variant_builds_and_maps_tokens_to_logits(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny(tmp_path, VARIANTS)
    x = torch.randint(0, 64, (2, 16))
    for v in VARIANTS:
        model = build_model(v, cfg, 64, 16, seed=0)
        assert model(input_ids=x).logits.shape == (2, 16, 64), v
        assert all(p.requires_grad for p in model.parameters()), v
    lam0 = build_model("wuneng-gate-lambda0", cfg, 64, 16, seed=0)
    assert lam0.config.state_query is False and lam0.config.fusion == "gate"


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        _tiny(tmp_path, ("transformer", "mamba"))
    with pytest.raises(ValueError, match="'mqar' or 'state'"):
        TaskSetting("parity", 16)
    with pytest.raises(ValueError, match="settings is empty"):
        BenchConfig(settings=())
