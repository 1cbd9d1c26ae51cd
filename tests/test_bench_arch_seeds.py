"""``wuneng bench-arch`` (issue 18 items 1-3): seeds and 95% intervals, ``--seeds`` extends a finished sweep, the
positive controls and their "not interpretable" marking, the length-generalisation state-tracking setting, the
state-head contribution of the WuNeng variants (accuracy with Y = 0, magnitudes per layer; old rows without it)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import wuneng.apps.bench_arch as bench
from wuneng.apps.bench_arch import (
    BenchConfig,
    Control,
    TaskSetting,
    best_rows,
    check_controls,
    evaluate,
    parse_seeds,
    results_markdown,
    run_bench,
    t_interval,
)


def test_t_interval_matches_a_hand_computed_value():
    # n = 3: mean 0.95, sample sd 0.05, t_{0.975, 2} = 4.303 -> half-width 4.303 * 0.05 / sqrt(3) = 0.124217
    mean, hw = t_interval([0.90, 0.95, 1.00])
    assert mean == pytest.approx(0.95, abs=1e-12)
    assert hw == pytest.approx(0.124217, abs=1e-6)
    # n = 5: values 1..5, sd sqrt(2.5), t_{0.975, 4} = 2.776 -> 2.776 * 1.5811388 / 2.2360680 = 1.962928
    assert t_interval([1, 2, 3, 4, 5])[1] == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    assert t_interval([1, 2, 3, 4, 5])[1] == pytest.approx(1.962928, abs=1e-6)
    assert t_interval([0.4]) == (0.4, None)  # one seed: no interval
    rows = [
        {"setting": "s", "variant": "rwkv7", "lr": 1e-3, "seed": i, "accuracy": a}
        for i, a in enumerate([0.9, 1.0, 0.95])
    ]
    best = best_rows(rows)[("s", "rwkv7")]
    assert best["half_width"] == pytest.approx(0.124217, abs=1e-6) and best["accuracies"] == [0.9, 1.0, 0.95]


def test_parse_seeds_a_count_or_a_list():
    assert parse_seeds("3") == (0, 1, 2)
    assert parse_seeds("0,4") == (0, 4)
    for bad in ("0", "-1", "a,b", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    # a user who means "seed 0 only" is told how to pick seeds
    with pytest.raises(ValueError, match="comma-separated list of two or more, e.g. '0,1'"):
        parse_seeds("1")


def _tiny(out, seeds, controls=(), variants=("transformer",)) -> BenchConfig:
    return BenchConfig(
        output_dir=str(out),
        settings=(TaskSetting("mqar", 16, 2, 64),),
        variants=variants,
        lrs=(3e-3,),
        seeds=seeds,
        controls=controls,
        d_model=32,
        head_size=16,
        steps=2,
        batch_size=4,
        examples_per_epoch=8,
        test_examples=8,
        threads=1,
    )


@pytest.mark.slow  # three sweeps with their plots: 6 s on a quiet machine, 35 s at load 8
def test_more_seeds_train_only_the_missing_runs(tmp_path, monkeypatch):
    trained = []
    real = bench.train_run

    def counting(setting, variant, lr, seed, cfg, progress=True):
        trained.append((setting.name, variant, seed))
        return real(setting, variant, lr, seed, cfg, progress=False)

    monkeypatch.setattr(bench, "train_run", counting)
    rows = run_bench(_tiny(tmp_path, (0,)))
    assert len(trained) == 1 and len(rows) == 1
    rows = run_bench(_tiny(tmp_path, parse_seeds("3")))
    assert [t[2] for t in trained] == [0, 1, 2]  # seed 0 was reused, only seeds 1 and 2 trained
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    run_bench(_tiny(tmp_path, parse_seeds("3")))  # finished: nothing trains
    assert len(trained) == 3
    table = (tmp_path / "results.md").read_text()
    assert "n=3" in table and " ± " in table


def test_a_failed_control_marks_the_comparisons_not_interpretable(tmp_path):
    setting = "mqar T=16 n=2 V=64"
    impossible = Control("recall", setting, "transformer", at_least=0.99)  # 2 steps cannot reach 99%
    run_bench(_tiny(tmp_path, (0,), controls=(impossible,)))
    text = (tmp_path / "results.md").read_text()
    head = text.split("## Accuracy")[0]
    assert "**FAILED**: recall" in head and "NOT INTERPRETABLE" in head
    assert "NOT INTERPRETABLE" in text.split("## Accuracy")[1].splitlines()[0]

    trivial = Control("recall", setting, "transformer", at_least=0.0)
    missing = Control("state", "state Z2 k=8 test k=16", "rwkv7", at_least=0.95)
    rows = bench.read_results(tmp_path / "results.jsonl")
    verdicts = check_controls(rows, (trivial, missing))
    assert [v["status"] for v in verdicts] == ["reproduced", "not run"]
    assert "NOT INTERPRETABLE" in results_markdown(rows, (trivial, missing))  # a control not run counts as failed
    ok = results_markdown(rows, (trivial,))
    assert "NOT INTERPRETABLE" not in ok and "**REPRODUCED**: recall" in ok


def test_parity_length_generalisation_labels_and_scoring():
    s = TaskSetting("state", 8, group="Z2", test_seq_len=20)
    assert s.name == "state Z2 k=8 test k=20" and s.chance == 0.5 and s.max_seq_len == 20
    x, y = s.generate(64, seed=3)
    assert x.shape == (64, 8)
    tx, ty = s.generate_test(50, seed=10_003)
    assert tx.shape == ty.shape == (50, 20)
    for xs, ys in ((x, y), (tx, ty)):  # brute force: label t is the parity of the first t + 1 bits
        for row, lab in zip(xs.tolist(), ys.tolist()):
            assert lab == [sum(row[: t + 1]) % 2 for t in range(len(row))]

    class WrongBeyondTraining(torch.nn.Module):
        """Right parity up to position 8, wrong after: one-hot logits [B, T, 2]."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            parity = torch.cumsum(input_ids, 1) % 2
            parity[:, 8:] = 1 - parity[:, 8:]
            return type("Out", (), {"logits": torch.nn.functional.one_hot(parity, 2).float()})

    res = evaluate(WrongBeyondTraining(), tx, ty, "state", train_len=8)
    assert res["accuracy"] == 0.0 and res["accuracy_within_train_len"] == 1.0 and res["solved_up_to"] == 8
    with pytest.raises(ValueError, match="test_seq_len"):
        TaskSetting("state", 8, group="Z2", test_seq_len=8)
    with pytest.raises(ValueError, match="test_seq_len"):
        TaskSetting("mqar", 16, 2, 64, test_seq_len=32)


def test_default_sweep_holds_both_controls_every_variant_and_three_seeds():
    cfg = BenchConfig.default()
    assert len(cfg.seeds) >= 3 and len(cfg.controls) >= 2
    names = {s.name for s in cfg.settings}
    assert all(c.setting in names and c.variant in cfg.variants for c in cfg.controls)
    for v in ("transformer", "rwkv7", "wuneng-gate", "wuneng-add", "wuneng-concat", "wuneng-hymba", "wuneng-none"):
        assert v in cfg.variants
    for v in ("wuneng-gate-lambda0", "metastate", "arwkv", "arwkv-attn"):
        assert v in cfg.variants
    assert np.all([c.at_least is None or c.at_least >= 0.95 for c in cfg.controls])


@pytest.mark.slow
def test_jobs_train_runs_in_parallel_processes_with_the_same_results(tmp_path):
    """jobs=2 (spawned workers, 1 thread each) gives the rows that jobs=1 gives, each run once, in one file."""
    one = run_bench(_tiny(tmp_path / "one", (0, 1)))
    two = run_bench(replace(_tiny(tmp_path / "two", (0, 1)), jobs=2))
    by_key = {r["key"]: r for r in two}
    assert sorted(by_key) == sorted(r["key"] for r in one) and len(two) == 2
    for r in one:
        assert by_key[r["key"]]["final_loss"] == pytest.approx(r["final_loss"], rel=1e-6)
        assert by_key[r["key"]]["accuracy"] == r["accuracy"]
    with pytest.raises(ValueError, match="jobs"):
        replace(_tiny(tmp_path, (0,)), jobs=0)


# ---------------------------------------------------------------------------------- state-head contribution (item 3)
def test_a_wuneng_run_records_its_accuracy_with_the_state_heads_zeroed(tmp_path, monkeypatch):
    """train_run evaluates a WuNeng model once more under state_heads_zeroed (the same test set) and records the
    magnitudes per layer; a non-WuNeng run records neither."""
    from wuneng.eval.ablation import state_head_magnitudes, state_heads_zeroed

    trained = {}
    real_build = bench.build_model

    def keep(*args, **kwargs):
        trained["model"] = real_build(*args, **kwargs)
        return trained["model"]

    monkeypatch.setattr(bench, "build_model", keep)
    cfg = _tiny(tmp_path, (0,), variants=("wuneng-add",))
    setting = cfg.settings[0]
    row = bench.train_run(setting, "wuneng-add", 3e-3, 0, cfg, progress=False)
    model = trained["model"]
    test_x, test_y = setting.generate_test(cfg.test_examples, seed=10_000)
    with state_heads_zeroed(model):
        expected = evaluate(model, test_x, test_y, setting.task, train_len=setting.seq_len)["accuracy"]
    assert row["accuracy_state_zeroed"] == expected
    assert row["accuracy"] == evaluate(model, test_x, test_y, setting.task, train_len=setting.seq_len)["accuracy"]
    assert row["state_head_magnitudes"] == state_head_magnitudes(model)
    assert [m["fusion"] for m in row["state_head_magnitudes"]] == ["add", "add"]
    plain = bench.train_run(setting, "transformer", 3e-3, 0, cfg, progress=False)
    assert "accuracy_state_zeroed" not in plain and "state_head_magnitudes" not in plain


def _wuneng_row(seed, acc, zeroed=None, lam=None, lr=1e-3):
    row = {"setting": "s", "task": "mqar", "variant": "wuneng-gate", "lr": lr, "seed": seed, "accuracy": acc}
    row.update(params=1000, steps=3, tokens=48, seconds=1.0, final_loss=2.0, chance=0.1)  # as an old row has
    if zeroed is not None:
        row["accuracy_state_zeroed"] = zeroed
        row["state_head_magnitudes"] = [
            {"layer": 0, "kind": "hybrid", "fusion": "gate", "lambda_mean_abs": lam, "lambda_max_abs": 2 * lam,
             "rho_mean_abs": 0.5},
            {"layer": 1, "kind": "arwkv", "fusion": None},
        ]  # fmt: skip
    return row


def test_state_contribution_table_holds_hand_computed_means_and_intervals():
    """At the best lr: accuracy, accuracy with Y = 0 and the drop, each mean ± 95% t-interval over the seeds that
    have the ablation; the per-layer magnitudes are means over those seeds."""
    rows = [
        _wuneng_row(0, 0.90, 0.50, lam=0.1),
        _wuneng_row(1, 1.00, 0.70, lam=0.3),
        _wuneng_row(2, 0.95, 0.30, lam=0.2),
        _wuneng_row(0, 0.10, 0.10, lam=9.0, lr=3e-3),  # a worse lr: not reported
        {**_wuneng_row(0, 0.99), "variant": "transformer"},
    ]
    got = bench.state_contribution(rows)
    assert list(got) == [("s", "wuneng-gate")]
    c = got[("s", "wuneng-gate")]
    # drops 0.40, 0.30, 0.65: mean 0.45, sd 0.180278, half-width 4.303 * 0.180278 / sqrt(3) = 0.447870
    assert c["seeds"] == [0, 1, 2] and c["lr"] == 1e-3
    assert c["accuracy"] == pytest.approx(t_interval([0.9, 1.0, 0.95]))
    assert c["zeroed"] == pytest.approx(t_interval([0.5, 0.7, 0.3]))
    assert c["drop"][0] == pytest.approx(0.45) and c["drop"][1] == pytest.approx(0.447870, abs=1e-6)
    assert c["layers"] == [
        {"layer": 0, "kind": "hybrid", "fusion": "gate", "lambda_mean_abs": pytest.approx(0.2),
         "lambda_max_abs": pytest.approx(0.4), "rho_mean_abs": pytest.approx(0.5)},
        {"layer": 1, "kind": "arwkv", "fusion": None},
    ]  # fmt: skip
    text = results_markdown(rows)
    section = text.split("## State-head contribution")[1].split("| setting | variant | params |")[0]
    assert "| wuneng-gate | s | 95.0% ± 12.4 | 50.0% ± 49.7 | 45.0 ± 44.8 | 3 | **held** |" in section  # 45.0 > 44.8
    narrow = [
        _wuneng_row(0, 0.9, 0.5, 0.1),
        _wuneng_row(1, 1.0, 0.9, 0.1),
        _wuneng_row(2, 0.95, 0.3, 0.1),
    ]  # drops .4 .1 .65
    assert "| 3 | **inconclusive** |" in results_markdown(narrow)  # 38.3 ± 68.4 contains 0
    assert "| wuneng-gate | s | 0 | gate | 0.2 | 0.4 | 0.5 | - | - | - |" in section
    assert "| wuneng-gate | s | 1 | arwkv |" in section
    assert "transformer" not in section


def test_old_rows_without_the_ablation_still_load_and_extend(tmp_path, monkeypatch):
    """A results.jsonl written before the ablation existed: its rows load, count in the accuracy table, and a
    --seeds extension adds the new seeds' ablation; the contribution table uses only the seeds that have it."""
    old = _wuneng_row(0, 0.9)
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"key": "old", **old}) + "\n")
    rows = bench.read_results(path)
    assert bench.state_contribution(rows) == {}
    text = results_markdown(rows)
    assert "| wuneng-gate | 90.0%" in text and "## State-head contribution" not in text
    rows.append(_wuneng_row(1, 1.0, 0.5, lam=0.1))
    rows.append(_wuneng_row(2, 0.8, 0.4, lam=0.3))
    c = bench.state_contribution(rows)[("s", "wuneng-gate")]
    assert c["seeds"] == [1, 2] and c["drop"][0] == pytest.approx(0.45)
    assert best_rows(rows)[("s", "wuneng-gate")]["seeds"] == [0, 1, 2]
    assert "| 2 |" in results_markdown(rows).split("## State-head contribution")[1]


def test_seeds_extend_a_sweep_whose_wuneng_rows_predate_the_ablation(tmp_path, monkeypatch):
    """run_bench reuses an old WuNeng row (no ablation fields) and trains only the new seed, whose row has them."""
    cfg = _tiny(tmp_path, (0,), variants=("wuneng-add",))
    run_bench(cfg)
    path = tmp_path / "results.jsonl"
    (row,) = bench.read_results(path)
    old = {k: v for k, v in row.items() if k not in ("accuracy_state_zeroed", "state_head_magnitudes")}
    path.write_text(json.dumps(old) + "\n")  # as a sweep before the ablation wrote it
    trained = []
    real = bench.train_run

    def counting(setting, variant, lr, seed, cfg, progress=True):
        trained.append(seed)
        return real(setting, variant, lr, seed, cfg, progress=False)

    monkeypatch.setattr(bench, "train_run", counting)
    rows = run_bench(replace(cfg, seeds=(0, 1)))
    assert trained == [1] and sorted(r["seed"] for r in rows) == [0, 1]
    assert [("accuracy_state_zeroed" in r) for r in sorted(rows, key=lambda r: r["seed"])] == [False, True]
    text = (tmp_path / "results.md").read_text()
    assert "n=2" in text.split("## State-head contribution")[0]
    assert bench.state_contribution(rows)[(cfg.settings[0].name, "wuneng-add")]["seeds"] == [1]
