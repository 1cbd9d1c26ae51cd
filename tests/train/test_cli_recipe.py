"""The command line end to end: pretrain from a config, plot, and the conversion recipe
`wuneng convert` -> `train --stage align` -> `--stage distill` -> `--stage sft` on a tiny saved teacher."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.train.config import load_config

from train_helpers import CHATS, TEXTS, tiny_qwen2, write_jsonl, write_yaml

COMMON = {"progress": False, "tensorboard": False, "mixed_precision": "no", "micro_batch_size": 4, "save_every": 1000}


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result


def step_records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' not in l]


def test_pretrain_from_config_then_plot(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    model = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip
    cfg = {**COMMON, "model": {"config": model}, "data": {"sources": [str(tmp_path / "data")], "seq_len": 32, "text_unit": "line"},
           "optim": {"lr": "3e-3", "min_lr": "3e-4", "warmup_steps": 2}}  # fmt: skip
    path = write_yaml(tmp_path / "pre.yaml", cfg)
    run = tmp_path / "run"
    invoke("train", path, "--stage", "pretrain", "--output-dir", run, "--max-steps", 12)
    saved = load_config(run / "config.yaml")  # the resolved config is a loadable run description
    assert saved.max_steps == 12 and saved.optim.lr == 3e-3 and saved.stage == "pretrain"
    records = step_records(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "final" / "config.json").is_file() and (run / "final" / "tokenizer_config.json").is_file()
    out = invoke("plot", run)
    png = run / "loss.png"
    assert out.output.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_errors(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "metrics.jsonl does not exist" in result.output


def test_bad_data_file_through_cli(tmp_path):
    torch.manual_seed(0)
    tiny_qwen2().save_pretrained(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    path = write_yaml(
        tmp_path / "c.yaml", {**COMMON, "model": {"path": str(tmp_path / "m")}, "data": {"sources": [str(bad)]}}
    )
    result = CliRunner().invoke(app, ["train", str(path), "--output-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in result.output


def test_conversion_recipe(tmp_path, tokenizer):
    pytest.importorskip("wuneng.convert")
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    tiny_qwen2(hidden=64).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    invoke("convert", teacher_dir, tmp_path / "student")
    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(tmp_path / "chat.jsonl", CHATS)
    base = {**COMMON, "teacher": str(teacher_dir), "data": {"sources": [str(tmp_path / "text.jsonl")], "seq_len": 32},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2}, "max_steps": 8}  # fmt: skip
    path = write_yaml(tmp_path / "recipe.yaml", base)

    invoke(
        "train", path, "--stage", "align", "--output-dir", tmp_path / "s1", "-o", f"model.path={tmp_path / 'student'}"
    )
    s1 = step_records(tmp_path / "s1")
    assert "align_output" in s1[0] and "align_state" in s1[0]
    assert s1[-1]["align_state"] < s1[0]["align_state"]

    invoke("train", path, "--stage", "distill", "--output-dir", tmp_path / "s2", "-o", f"model.path={tmp_path / 's1' / 'final'}",
           "-o", "distill.temperature=2.0")  # fmt: skip
    s2 = step_records(tmp_path / "s2")
    assert s2[0]["kl"] < 1e-3  # the aligned hybrid still computes the teacher's function (output alignment 0)

    invoke("train", path, "--stage", "sft", "--output-dir", tmp_path / "s3", "-o", f"model.path={tmp_path / 's2' / 'final'}",
           "-o", f"data.sources=[{tmp_path / 'chat.jsonl'}]", "-o", "data.seq_len=48")  # fmt: skip
    s3 = step_records(tmp_path / "s3")
    assert s3[-1]["loss"] < s3[0]["loss"]
    # the three stages chained: stage 2 started from stage 1's weights
    w1 = load_file(str(tmp_path / "s1" / "final" / "model.safetensors"))
    w_conv = load_file(str(tmp_path / "student" / "model.safetensors"))
    state_keys = [k for k in w1 if ".state." in k and k in w_conv]
    assert state_keys and any(not torch.equal(w1[k], w_conv[k]) for k in state_keys)
