"""`wuneng train` with `mixed_precision: bf16` (CPU autocast through accelerate) for every project model and every
stage kind: RWKV-7 pretrain, Meta-State sft, WuNeng align and distill, ARWKV align and distill. Each run must keep
a finite loss at every step and change the weights. Also: every YAML spelling of `mixed_precision`, one clear
error line for anything else, and fp16 refused on the CPU (where accelerate cannot apply it)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wuneng import RWKV7Config, RWKV7ForCausalLM
from wuneng.cli import app
from wuneng.convert import convert_teacher
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.tokenization import ByteLevelTokenizer
from wuneng.train.config import ConfigError, load_config
from wuneng.train.loop import _mixed_precision

from train_helpers import CHATS, TEXTS, tiny_qwen2, write_jsonl, write_yaml

COMMON = {"progress": False, "tensorboard": False, "micro_batch_size": 2, "save_every": 1000, "max_steps": 3,
          "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models of every kind (each with the byte tokenizer), the teacher they came from, and data."""
    root = tmp_path_factory.mktemp("mp")
    tok = ByteLevelTokenizer()
    torch.manual_seed(0)
    teacher = tiny_qwen2(hidden=64)
    models = {
        "teacher": teacher,
        "wuneng": convert_teacher(teacher, middle_heads=2),
        "arwkv": convert_teacher(teacher, attention=False),
        "rwkv7": RWKV7ForCausalLM(RWKV7Config(vocab_size=260, hidden_size=32, num_hidden_layers=2, head_size=16)),
        "metastate": MetaStateForCausalLM(
            MetaStateConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, head_size=16)
        ),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "text.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(root / "chat.jsonl", CHATS)
    return root


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


CASES = [("rwkv7", "pretrain"), ("metastate", "sft"), ("wuneng", "align"), ("wuneng", "distill"), ("arwkv", "align"),
         ("arwkv", "distill")]  # fmt: skip


# ~1 s per run on 2 cores
@pytest.mark.parametrize("kind, stage", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_cli_stage_trains_under_bf16(folders, tmp_path, kind, stage):
    data = folders / ("chat.jsonl" if stage == "sft" else "text.jsonl")
    cfg = {**COMMON, "stage": stage, "model": {"path": str(folders / kind)}, "mixed_precision": "bf16",
           "data": {"sources": [str(data)], "seq_len": 48 if stage == "sft" else 24}}  # fmt: skip
    if stage in ("align", "distill"):
        cfg["teacher"] = str(folders / "teacher")
    run = tmp_path / "run"
    result = run_cli("train", write_yaml(tmp_path / "run.yaml", cfg), "--output-dir", run)
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    assert load_config(run / "config.yaml").mixed_precision == "bf16"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"event"' not in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in steps)
    before = load_file(str(folders / kind / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in after.values())
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert all(after[k].dtype == before[k].dtype == torch.float32 for k in changed)  # autocast keeps float32 weights


def test_bf16_acts_in_a_cli_run(folders, tmp_path):
    """The same first step with `no` and with `bf16`: the loss moves by bf16 rounding only."""
    first = {}
    for mp in ("no", "bf16"):
        cfg = {**COMMON, "model": {"path": str(folders / "rwkv7")}, "mixed_precision": mp, "max_steps": 1,
               "data": {"sources": [str(folders / "text.jsonl")], "seq_len": 24}}  # fmt: skip
        run = tmp_path / mp
        result = run_cli("train", write_yaml(tmp_path / f"{mp}.yaml", cfg), "--output-dir", run)
        assert result.exit_code == 0, result.output
        first[mp] = next(
            r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        )
    assert first["bf16"] != first["no"] and first["bf16"] == pytest.approx(first["no"], rel=1e-2)


@pytest.mark.parametrize("spelling", ["no", '"no"', "false", "off", "False", "'No'"])
def test_yaml_spellings_of_full_precision(tmp_path, spelling):
    path = tmp_path / "c.yaml"
    path.write_text(f"mixed_precision: {spelling}\n", encoding="utf-8")
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, overrides=[f"mixed_precision={spelling}"]).mixed_precision == "no"


@pytest.mark.parametrize("spelling, expected", [("bf16", "bf16"), ("BF16", "bf16"), ("fp16", "fp16"), ("auto", "auto")])
def test_yaml_precisions(tmp_path, spelling, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"mixed_precision: {spelling}\n", encoding="utf-8")
    assert load_config(path).mixed_precision == expected


@pytest.mark.parametrize("spelling", ["bf32", "yes", "true", "1", "null", "[bf16]"])
def test_other_values_get_one_line_naming_the_key(tmp_path, spelling):
    path = tmp_path / "c.yaml"
    path.write_text(f"mixed_precision: {spelling}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and "c.yaml: config.mixed_precision:" in message
    assert "use one of bf16, fp16, auto, or no" in message


def test_cli_bad_value_exits_2_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "mixed_precision: bf32\nmodel: {config: {model_type: rwkv7}}\ndata: {sources: [x.txt]}\n", encoding="utf-8"
    )
    result = run_cli("train", path, "--output-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "config.mixed_precision: 'bf32' is not a precision" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_python_api_accepts_false_and_no():
    assert _mixed_precision(False) == _mixed_precision("no") == "no"
    assert _mixed_precision("bf16") == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where no GPU can apply it")
def test_fp16_on_cpu_is_refused_before_anything_is_written(folders, tmp_path):
    cfg = {**COMMON, "model": {"path": str(folders / "rwkv7")}, "mixed_precision": "fp16",
           "data": {"sources": [str(folders / "text.jsonl")], "seq_len": 24}}  # fmt: skip
    run = tmp_path / "run"
    result = run_cli("train", write_yaml(tmp_path / "run.yaml", cfg), "--output-dir", run)
    assert result.exit_code == 2, result.output
    assert "config.mixed_precision: 'fp16' cannot act on the CPU" in result.output and "use bf16" in result.output
    assert not run.exists()
    with pytest.raises(ConfigError, match="'fp16' cannot act on the CPU"):
        _mixed_precision("fp16")
