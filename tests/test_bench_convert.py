"""``wuneng bench-convert`` (issue 18 item 4): the subtask mix, equal data and steps for the four arms, the rows and
the report of a tiny run, reruns that skip finished rows, and the interval math of bench-arch."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from wuneng.apps import bench_convert as bc
from wuneng.apps.bench_arch import t_interval


def tiny(out, **kw) -> bc.ConvertBenchConfig:
    """A ~0.1 M-parameter teacher of 2 layers and a few steps everywhere (seconds per arm)."""
    settings = dict(
        output_dir=str(out),
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        intermediate_size=64,
        teacher_steps=3,
        teacher_batch=4,
        context=64,
        align_steps=2,
        sft_steps=3,
        batch=2,
        eval_per_category=2,
        parity_test=4,
        parity_bits=8,
        select_steps=1,
        seeds=(0, 1),
        progress=False,
        threads=1,
    )
    return bc.ConvertBenchConfig(**{**settings, **kw})


# ------------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("share", [0.5, 0.3])
def test_the_mix_holds_the_subtask_at_the_stated_share(tmp_path, share):
    cfg = tiny(tmp_path, parity_share=share, parity_bits=12, parity_test=16)
    test, _ = bc._test_examples(cfg)
    examples = bc.mix_examples(cfg, 200, seed=3, epoch=1, test=test)
    parity = [e for e in examples if e.category == "parity"]
    assert len(examples) == 200
    assert len(parity) == round(share * 200)
    held_out = {e.prompt for e in bc.parity_test_set(cfg)}
    assert len(held_out) == 16 and not held_out & {e.prompt for e in parity}
    assert all(len(e.prompt) == len("P:") + 12 + len("=") for e in parity)
    assert all(e.answer == str(e.prompt[2:-1].count("1") % 2) for e in parity)
    # the rest is the teacher's own mix, never a held-out prompt
    others = {e.category for e in examples if e.category != "parity"}
    assert others <= {"+1d", "-1d", "recall"} and "recall" in others
    assert all(test.allows(e) for e in examples if e.category != "parity")
    # shuffled: parity lines are not all at one end
    first_half = sum(e.category == "parity" for e in examples[:100])
    assert 0 < first_half < len(parity)


def test_parity_lines_label_every_prefix_parity_and_the_answer(tmp_path):
    cfg = tiny(tmp_path, context=64)
    test, _ = bc._test_examples(cfg)
    data = bc.mix_dataset(cfg, 6, seed=0, epoch=1, test=test)
    text = bytes(data.input_ids.view(-1).tolist()).decode("ascii")
    labels = data.labels.view(-1).tolist()
    checked = 0
    start = text.find("P:")
    while start != -1 and start + 14 <= len(text):  # "P:" 8 bits "=" " " answer "\n"
        bits = text[start + 2 : start + 10]
        running = 0
        for j, bit in enumerate(bits):
            running ^= int(bit)
            assert labels[start + 2 + j + 1] == ord(str(running)), (bits, j)
        assert text[start + 10 : start + 12] == "= "
        assert labels[start + 11] == ord(" ") and labels[start + 12] == ord(str(bits.count("1") % 2))
        assert labels[start + 2] == -100 and labels[start] == -100  # the first bit and "P" are inputs only
        checked += 1
        start = text.find("P:", start + 1)
    assert checked >= 3
    # without the prefix labels the rows are the same and only those labels (the byte after each bit) are gone
    plain = bc.mix_dataset(tiny(tmp_path, parity_prefix_labels=False), 6, seed=0, epoch=1, test=test)
    assert (plain.input_ids == data.input_ids).all()
    differ = (plain.labels != data.labels).view(-1).nonzero().view(-1).tolist()
    assert len(differ) >= 8 * checked
    assert all(text[i - 1] in "01" and plain.labels.view(-1)[i] == -100 for i in differ)


def test_same_seed_same_rows_other_seed_other_rows(tmp_path):
    cfg = tiny(tmp_path)
    test, _ = bc._test_examples(cfg)
    a = bc.arm_datasets(cfg, 0, test)
    b = bc.arm_datasets(cfg, 0, test)
    c = bc.arm_datasets(cfg, 1, test)
    assert bc.dataset_fingerprint(a["sft"]) == bc.dataset_fingerprint(b["sft"])
    assert bc.dataset_fingerprint(a["sft"]) != bc.dataset_fingerprint(c["sft"])
    assert bc.dataset_fingerprint(a["sft"]) != bc.dataset_fingerprint(a["align"])
    assert len(a["sft"]) == cfg.sft_steps * cfg.batch and len(a["align"]) == cfg.align_steps * cfg.batch


# -------------------------------------------------------------------------------------------------- config
def test_run_keys_name_the_budget_and_the_teacher(tmp_path):
    cfg = tiny(tmp_path)
    assert cfg.run_key("wuneng", 0) != cfg.run_key("wuneng", 1)
    assert cfg.run_key("wuneng", 0) != tiny(tmp_path, sft_steps=4).run_key("wuneng", 0)
    assert bc.teacher_key(cfg) == bc.teacher_key(tiny(tmp_path, sft_steps=4))  # the teacher does not depend on it
    assert bc.teacher_key(cfg) != bc.teacher_key(tiny(tmp_path, teacher_steps=4))
    assert bc.teacher_key(cfg) in cfg.run_key("teacher", 0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(arms=("wuneng", "mamba")), "unknown arm 'mamba'"),
        (dict(parity_share=1.0), "parity_share"),
        (dict(keep=2), "keep"),
        (dict(sft_steps=0), "sft_steps"),
        (dict(parity_bits=3, parity_test=4), "too few to hold out"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kw)


# ------------------------------------------------------------------------------------------------- results
def fake_rows(values: dict) -> list[dict]:
    chance = {"parity": 0.5, "arithmetic": 0.1, "recall": 0.1}
    rows = []
    for arm, per_seed in values.items():
        for seed, (p, a, r) in enumerate(per_seed):
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "parity": p,
                    "arithmetic": a,
                    "recall": r,
                    "chance": chance,
                    "seconds": 1.0,
                    "params": 1000,
                    "kept_layers": None,
                    "stages": {"sft": {"final_loss": 1.0}},
                }
            )
    return rows


TEACHER = {"parity": 0.5, "arithmetic": 0.9, "recall": 0.3, "chance": {"parity": 0.5, "arithmetic": 0.1, "recall": 0.1}}


def test_intervals_are_bench_arch_t_intervals():
    rows = fake_rows({"wuneng": [(0.5, 0.7, 0.2), (0.6, 0.8, 0.3), (0.7, 0.9, 0.25)], "teacher": [(0.5, 0.9, 0.3)] * 3})
    s = bc.summarise(rows, TEACHER)
    # by hand: mean 0.6, sample sd 0.1, t_{0.975, 2} = 4.303 -> half-width 4.303 * 0.1 / sqrt(3)
    assert s["wuneng"]["parity"]["mean"] == pytest.approx(0.6)
    assert s["wuneng"]["parity"]["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    for m in ("parity", "arithmetic", "recall"):
        values = s["wuneng"][m]["values"]
        assert (s["wuneng"][m]["mean"], s["wuneng"][m]["half_width"]) == t_interval(values)
    # relative to the teacher before: (x - chance) / (teacher - chance) per seed, then the interval
    rel = s["wuneng"]["relative"]["arithmetic"]
    assert rel["values"] == pytest.approx([0.75, 0.875, 1.0])
    assert (rel["mean"], rel["half_width"]) == t_interval(rel["values"])
    assert s["wuneng"]["relative"]["parity"] is None  # the teacher is at chance there: undefined
    assert s["teacher"]["parity"]["half_width"] == 0.0
    report = bc.results_markdown(rows, {"key": "k", "params": 1000, "scores": TEACHER})
    assert "| 60.0% ± 24.8 |" in report and "| 0.88 ± 0.31 |" in report  # parity; arithmetic relative


@pytest.mark.parametrize(
    "wuneng, teacher, status",
    [
        ([0.9, 0.92, 0.94], [0.5, 0.52, 0.48], "held"),
        ([0.5, 0.52, 0.48], [0.9, 0.92, 0.94], "not held"),
        ([0.5, 0.51, 0.49], [0.5, 0.52, 0.48], "not held"),  # both at chance
        ([0.5, 0.55, 0.45], [0.5, 0.52, 0.48], "inconclusive"),  # as wide as 12 points: cannot tell
        ([0.6, 0.9, 0.75], [0.55, 0.7, 0.6], "inconclusive"),
    ],
)
def test_verdict(wuneng, teacher, status):
    rows = fake_rows({"wuneng": [(p, 0.9, 0.3) for p in wuneng], "teacher": [(p, 0.9, 0.3) for p in teacher]})
    assert bc.verdict(bc.summarise(rows, TEACHER))[0] == status


def test_one_seed_has_no_interval_and_no_verdict():
    rows = fake_rows({"wuneng": [(0.9, 0.9, 0.3)], "teacher": [(0.5, 0.9, 0.3)]})
    s = bc.summarise(rows, TEACHER)
    assert s["wuneng"]["parity"]["half_width"] is None
    assert bc.verdict(s)[0] == "inconclusive"


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-convert")
    cfg = tiny(out)
    rows = bc.run_convert_bench(cfg)
    return cfg, rows


@pytest.mark.slow
def test_a_tiny_run_writes_rows_and_the_report(tiny_run):
    cfg, rows = tiny_run
    out = cfg.output_dir
    lines = [json.loads(line) for line in open(f"{out}/results.jsonl", encoding="utf-8")]
    assert len(lines) == len(rows) == 8
    assert {(r["arm"], r["seed"]) for r in lines} == set(cfg.runs())
    assert {r["key"] for r in lines} == {cfg.run_key(*run) for run in cfg.runs()}
    for r in lines:
        for m in ("parity", "arithmetic", "recall"):
            assert 0.0 <= r[m] <= 1.0
        assert set(r["per_category"]) == {"+1d", "-1d", "recall", "parity"}
        assert 0 <= r["solved_up_to"] <= cfg.parity_bits and set(r["prefix_per_length"]) == {
            str(k) for k in range(1, cfg.parity_bits + 1)
        }
    keep = [r["kept_layers"] for r in lines if r["arm"] == "arwkv-keep"]
    assert keep[0] == keep[1] and len(keep[0]) == cfg.keep
    chosen = json.loads((bc.teacher_dir(cfg) / f"select-k1-s1-lr{cfg.select_lr:g}" / "keep_attention.json").read_text())
    assert chosen["attn"]["layers"] == keep[0]
    report = open(f"{out}/results.md", encoding="utf-8").read()
    for label in bc.ARM_LABELS.values():
        assert label in report
    assert "Verdict" in report and "±" in report and "solved k <=" in report
    with open(f"{out}/accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_four_arms_get_identical_data_and_steps(tiny_run):
    cfg, rows = tiny_run
    for seed in cfg.seeds:
        arms = {r["arm"]: r["stages"] for r in rows if r["seed"] == seed}
        assert set(arms) == set(bc.ARMS)
        sft = {
            (s["sft"]["data"], s["sft"]["steps"], s["sft"]["rows"], s["sft"]["batch"], s["sft"]["lr"])
            for s in arms.values()
        }
        assert sft == {(sft.copy().pop()[0], cfg.sft_steps, cfg.sft_steps * cfg.batch, cfg.batch, cfg.sft_lr)}
        # stage 1 for the converted arms only (new parameters; the teacher has none), on the same rows
        align = {(s["align"]["data"], s["align"]["steps"]) for a, s in arms.items() if a != "teacher"}
        assert len(align) == 1 and align.pop()[1] == cfg.align_steps
        assert "align" not in arms["teacher"]
    assert len({r["stages"]["sft"]["data"] for r in rows}) == len(cfg.seeds)  # seeds differ


@pytest.mark.slow
def test_a_rerun_skips_finished_rows_and_the_cached_teacher(tiny_run, monkeypatch):
    cfg, rows = tiny_run
    before = open(f"{cfg.output_dir}/results.jsonl", encoding="utf-8").read()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run or the cached teacher was trained again")

    import wuneng.train.loop

    monkeypatch.setattr(wuneng.train.loop, "train", no_training)
    monkeypatch.setattr(bc, "train_arm", no_training)
    again = bc.run_convert_bench(cfg)
    assert open(f"{cfg.output_dir}/results.jsonl", encoding="utf-8").read() == before
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    # a third seed trains only its own four runs
    trained = []

    def fake_train(arm, seed, cfg, keep=(), threads=None):
        trained.append((arm, seed))
        return {**rows[0], "arm": arm, "seed": seed}

    monkeypatch.setattr(bc, "train_arm", fake_train)
    bc.run_convert_bench(tiny(cfg.output_dir, seeds=(0, 1, 2)))
    assert sorted(trained) == sorted((arm, 2) for arm in bc.ARMS)


def test_the_command_refuses_an_unknown_arm_as_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from wuneng.cli import app

    result = CliRunner().invoke(app, ["bench-convert", "--arms", "wuneng,mamba", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "unknown arm 'mamba'" in result.stderr and result.stdout == ""
    assert not (tmp_path / "x").exists()


class PrefixParityOracle(torch.nn.Module):
    """Logits [B, T, 259] that put the parity of the bits so far (bytes "0"/"1" after "P:") at every position;
    ``wrong_from``: from that bit on, the opposite."""

    def __init__(self, wrong_from: int = 10**9):
        super().__init__()
        self.wrong_from = wrong_from

    def forward(self, input_ids):
        bits = (input_ids[:, 2:] == ord("1")).long()
        running = torch.cumsum(bits, dim=1) % 2
        running[:, self.wrong_from :] ^= 1
        target = torch.full_like(input_ids, ord(" "))
        target[:, 2:] = running + ord("0")
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(target, 259).float())


def test_prefix_parity_scores_the_logit_at_each_bit(tmp_path):
    cfg = tiny(tmp_path, parity_bits=8, parity_test=16)
    lines = bc.parity_test_set(cfg)
    exact = bc.prefix_parity(PrefixParityOracle(), lines, batch_size=5)
    assert exact["accuracy"] == 1.0 and exact["solved_up_to"] == 8
    assert exact["per_length"] == {k: 1.0 for k in range(1, 9)}
    broken = bc.prefix_parity(PrefixParityOracle(wrong_from=3), lines)
    assert broken["solved_up_to"] == 3 and broken["per_length"][4] == 0.0
    assert broken["accuracy"] == pytest.approx(3 / 8)
