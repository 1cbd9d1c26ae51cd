"""``wuneng demo``: the answer-only packing, and ``wuneng demo --fast`` end to end (report, plots, numbers)."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from wuneng.apps.demo import DemoBudget, DemoConfig, answer_only_dataset
from wuneng.eval.tasks.arithmetic import arithmetic_example, recall_example

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_answer_only_dataset_labels_exactly_the_answers():
    torch.manual_seed(0)
    examples = [arithmetic_example(5, "+", 3, "Tom", "shells"), recall_example([0, 3], [5, 9], 3)] * 4
    text = "".join(e.text + "\n" for e in examples)
    data = answer_only_dataset(examples, context=32)
    assert data.input_ids.shape == (len(text) // 32, 32)
    assert bytes(data.input_ids.flatten().tolist()).decode() == text[: data.input_ids.numel()]
    labelled = "".join(chr(t) if t != -100 else "_" for t in data.labels.flatten().tolist())
    # the separating space, the answers and their closing newline are targets; prompts are not
    expected = "".join("_" * len(e.prompt) + " " + e.answer + "\n" for e in examples)[: data.input_ids.numel()]
    assert labelled == expected
    assert bool((data.attention_mask == 1).all())


def test_answer_only_dataset_rejects_too_little_text():
    with pytest.raises(ValueError, match="cannot fill"):
        answer_only_dataset([arithmetic_example(1, "+", 1, "Tom", "pens")], context=16, num_rows=10)


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="positive int"):
        DemoBudget(teacher_steps=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        DemoConfig(hidden_size=96, num_heads=4)


def test_stage_rows_hold_passkey_prompts_at_the_stated_share_in_the_grid_format():
    import re

    from wuneng.apps.demo import demo_passkey_config, stage_dataset
    from wuneng.eval.tasks.arithmetic import ArithmeticConfig, make_test_set
    from wuneng.eval.tasks.passkey import CLASSIC_FILLER, generate_passkey_examples, passkey_match

    task = ArithmeticConfig()
    test = make_test_set(task, per_category=4, seed=1)
    cfg = demo_passkey_config()
    data = stage_dataset(task, test, 40, 128, 0, 0, cfg, 0.25)
    assert data.input_ids.shape == (40, 128)
    rows = [bytes(r.tolist()).decode("ascii") for r in data.input_ids]
    labels = ["".join("_" if t == -100 else chr(t) for t in r.tolist()) for r in data.labels]
    # one prompt of the grid's format: filler sentences, the needle among them, the question
    sentence = "|".join(re.escape(f) for f in CLASSIC_FILLER)
    grid_format = re.compile(rf"((?:{sentence}) )*The pass key is (\d{{5}})\. ((?:{sentence}) )*What is the pass key\?")
    starts = [i for i, r in enumerate(rows) if r.startswith(("The ", "Here ")) and "pass key" in r.split("\n")[0]]
    assert len(starts) == 10  # round(0.25 * 40) rows start with a passkey prompt
    assert all("pass key" not in r for i, r in enumerate(rows) if i not in starts)  # nowhere else
    lengths = []
    for i in starts:
        line = rows[i].split("\n")[0]
        prompt, key = line.rsplit(" ", 1)
        m = grid_format.fullmatch(prompt)
        assert m is not None and m.group(2) == key, line
        assert passkey_match(" " + key, key)
        # the loss is on the separating space, the key and the newline only
        assert labels[i][: len(line) + 1] == "_" * len(prompt) + " " + key + "\n"
        lengths.append(len(prompt))
    assert 44 <= min(lengths) and max(lengths) <= 128 - 7 and len(set(lengths)) > 3
    # the grid asks in the same format (ByteLevelTokenizer: a byte per token) at 0.5 and 1 x the row
    for e in generate_passkey_examples(cfg, [64, 128], seed=1):
        assert grid_format.fullmatch(e.prompt) is not None
    # passkey_fraction 0: the rows of the demo before passkey rows (arithmetic and recall only)
    plain = stage_dataset(task, test, 40, 128, 0, 0, cfg, 0.0)
    assert torch.equal(plain.input_ids, stage_dataset(task, test, 40, 128, 0, 0).input_ids)
    assert not any(b"pass key" in bytes(r.tolist()) for r in plain.input_ids)


def _png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    torch.manual_seed(0)
    from typer.testing import CliRunner

    from wuneng.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--fast", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "held-out results" in result.output

    report = (out / "report.md").read_text()
    for needle in (
        "## Held-out results",
        "| model | params | exact |",
        "## Students after each stage",
        "## Stage 1: alignment loss",
        "![loss curves](losses.png)",
        "![accuracy](accuracy.png)",
    ):
        assert needle in report
    for model in ("teacher", "wuneng", "arwkv"):
        assert f"| {model} |" in report
    for png in ("losses.png", "accuracy.png"):
        w, h = _png_size(out / png)
        assert w > 400 and h > 200

    res = json.loads((out / "results.json").read_text())
    assert set(res["final"]) == {"teacher", "wuneng", "arwkv"}
    for name, r in [*res["final"].items(), *((f"{s}/{k}", v) for s, d in res["stages"].items() for k, v in d.items())]:
        for key in ("exact", "final", "recall"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        for cat, row in r["per_category"].items():
            assert 0.0 <= row["exact"] <= 1.0 and row["count"] == res["budget"]["eval_per_category"], (name, cat)
        assert math.isfinite(r["ppl"]) and r["ppl"] >= 1.0, (name, r["ppl"])
    # the teacher trained on answers: their held-out per-byte perplexity is below the uniform 259-way guess
    assert res["final"]["teacher"]["ppl"] < 259
    # function-preserving conversion: the converted WuNeng student computes the teacher's outputs
    assert res["align"]["wuneng_output_first"] < 1e-4
    assert res["stages"]["wuneng"]["converted"]["ppl"] == pytest.approx(res["final"]["teacher"]["ppl"], rel=1e-4)
    assert res["align"]["wuneng_state_first"] > 1e-3 and res["align"]["arwkv_output_first"] > 1e-3
    # the retention report of each student against the teacher: in report.md, in retention/<student>/, in results.json
    for needle in (
        "## Retention against the teacher",
        "### Retention report: student wuneng vs teacher teacher",
        "### Retention report: student arwkv vs teacher teacher",
        "![wuneng: passkey accuracy per cell](retention/wuneng/passkey_grid.png)",
    ):
        assert needle in report
    for kind in ("wuneng", "arwkv"):
        for name in ("retention.md", "retention.json", "passkey_grid.png", "memory_speed.png"):
            assert (out / "retention" / kind / name).is_file(), (kind, name)
    c = res["config"]
    head_dim = c["hidden_size"] // c["num_heads"]
    lengths = [64, 128, 256, 512]  # 0.5, 1, 2 and 4 x the context
    kv_per_position = c["num_layers"] * 2 * c["num_kv_heads"] * head_dim * 4  # keys and values, float32
    for kind in ("wuneng", "arwkv"):
        memory = res["retention"][kind]["memory"]
        assert [m["length"] for m in memory["teacher"]] == lengths
        assert [(m["state_bytes"], m["kv_bytes"]) for m in memory["teacher"]] == [
            (0, kv_per_position * n) for n in lengths
        ]
        states = {m["state_bytes"] for m in memory["student"]}
        assert len(states) == 1 and states.pop() > 0  # the recurrent state does not grow with the context
        # ARWKV keeps no keys/values; WuNeng's attention keeps them in buffers of max(256, L) positions
        expected_kv = [0] * 4 if kind == "arwkv" else [kv_per_position * max(256, n) for n in lengths]
        assert [m["kv_bytes"] for m in memory["student"]] == expected_kv
        assert f"{memory['teacher'][-1]['kv_bytes']:,}" in report
    assert res["seconds"]["retention"] < 60
    # passkey rows in the training mix, and the grid of all three models in one table of report.md
    assert res["config"]["passkey_fraction"] == 0.25 and res["passkey_bytes"] == [44, 121]
    assert "Passkey rows: 25% of the rows" in report
    assert "## Passkey retrieval per context length" in report and "| model | 64 | 128 | 256 * | 512 * |" in report
    for name in ("teacher", "wuneng", "arwkv"):
        grid = res["retention"]["arwkv" if name == "arwkv" else "wuneng"]["passkey"]
        grid = grid["teacher" if name == "teacher" else "student"]
        for n in lengths:
            cells = [c for c in grid if c["length"] == n]
            assert len(cells) == 5 and all(c["count"] == 4 for c in cells)  # every cell holds a prompt, 4 keys
            mean = sum(c["accuracy"] for c in cells) / 5
            assert res["passkey"][name]["per_length"][str(n)] == pytest.approx(mean, abs=1e-12)

    # same token budget for both students in every stage
    for stage in ("align", "distill", "sft"):
        w, a = res["histories"][f"wuneng/{stage}"], res["histories"][f"arwkv/{stage}"]
        assert w[-1]["step"] == a[-1]["step"] == res["budget"][f"{stage}_steps"]
        assert w[-1]["tokens"] == a[-1]["tokens"] == res["tokens"][stage]

    # the same command again (here with a tiny budget) replaces the earlier run instead of failing on its checkpoints
    tiny = [
        "--teacher-steps",
        "2",
        "--align-steps",
        "1",
        "--distill-steps",
        "1",
        "--sft-steps",
        "1",
        "--eval-per-category",
        "1",
    ]
    again = CliRunner().invoke(app, ["demo", "--fast", "--threads", "1", "--out", str(out), *tiny])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "replacing the earlier demo run" in again.output
    assert json.loads((out / "results.json").read_text())["budget"]["teacher_steps"] == 2


def test_an_earlier_demo_run_is_replaced_or_with_no_overwrite_refused(tmp_path):
    from typer.testing import CliRunner

    from wuneng.apps.demo import prepare_output_dir
    from wuneng.cli import app

    out = tmp_path / "demo"
    (out / "teacher" / "step_00000040").mkdir(parents=True)
    (out / "report.md").write_text("old")
    (out / "notes.txt").write_text("mine")  # not the demo's: never touched
    result = CliRunner().invoke(app, ["demo", "--fast", "--no-overwrite", "--out", str(out)])
    assert result.exit_code == 2 and "earlier demo run" in result.output and "--no-overwrite" in result.output
    assert (out / "teacher" / "step_00000040").is_dir()  # nothing removed
    with pytest.raises(FileExistsError, match=r"teacher, report\.md"):
        prepare_output_dir(out, overwrite=False)
    prepare_output_dir(out, overwrite=True)  # the default: the demo's own entries go, nothing else
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    prepare_output_dir(tmp_path / "new" / "demo", overwrite=False)  # a fresh folder is created
    assert (tmp_path / "new" / "demo").is_dir()
