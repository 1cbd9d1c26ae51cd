"""The command line's errors (issue 13, item 10): every bad input is one ``error: ...`` line on stderr naming the
file or key, with exit code 2 for usage errors and 1 for failures, and no traceback unless ``wuneng --debug``.
Also: ``convert --help`` says what the tests show about ARWKV conversion (it is not function-preserving)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.models import MetaStateConfig, MetaStateForCausalLM
from wuneng.tokenization import ByteLevelTokenizer

runner = CliRunner()
SHAPES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
OWN_TYPES = "wuneng, wuneng_metastate, wuneng_rwkv7"


def save_qwen2(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(ByteLevelTokenizer()), **{**SHAPES, **overrides})).save_pretrained(path)
    ByteLevelTokenizer().save_pretrained(path)
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def one_error_line(result, code: int) -> str:
    """The single stderr line of a failed invocation (checks the exit code, that the error was handled (no
    exception escaped to the runner) and that stderr is exactly one ``error: ...`` line)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def write_run(tmp_path: Path, **config) -> Path:
    (tmp_path / "data.txt").write_text(
        "\n".join(["the cat sat on the mat", "one two three four"] * 8), encoding="utf-8"
    )
    cfg = {
        "data": {"sources": [str(tmp_path / "data.txt")], "seq_len": 16, "text_unit": "line"},
        "max_steps": 1,
        "progress": False,
        "tensorboard": False,
        "save_final": False,
        "mixed_precision": "no",
        "output_dir": str(tmp_path / "run"),
        **config,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ model folders
def test_eval_truncated_weights(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    truncate(folder / "model.safetensors")
    line = one_error_line(runner.invoke(app, ["eval", str(folder), "--tasks", "arithmetic", "--limit", "2"]), 1)
    assert (
        f"{folder / 'model.safetensors'}: not a readable safetensors file" in line and "save or copy it again" in line
    )


def test_eval_weights_that_disagree_with_config_json(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    edit_config(folder, hidden_size=32, head_dim=8)
    line = one_error_line(runner.invoke(app, ["eval", str(folder), "--tasks", "arithmetic", "--limit", "2"]), 1)
    assert "the weights do not match its config.json" in line and "model.embed_tokens.weight" in line
    assert "use the config.json saved with these weights" in line


def test_eval_unknown_model_type(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    edit_config(folder, model_type="qwen7")
    line = one_error_line(runner.invoke(app, ["eval", str(folder), "--tasks", "arithmetic", "--limit", "2"]), 1)
    assert f"{folder / 'config.json'}: unknown model_type 'qwen7'" in line and OWN_TYPES in line


def test_eval_missing_folder_is_a_usage_error(tmp_path):
    line = one_error_line(runner.invoke(app, ["eval", str(tmp_path / "nothing")]), 2)
    assert "not a model folder" in line


def test_train_with_a_corrupt_model(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    truncate(folder / "model.safetensors")
    line = one_error_line(runner.invoke(app, ["train", str(write_run(tmp_path, model={"path": str(folder)}))]), 1)
    assert "model.safetensors: not a readable safetensors file" in line
    assert not (tmp_path / "run").exists() or not os.listdir(
        tmp_path / "run"
    )  # nothing written: a rerun is not refused


def test_train_with_an_unknown_model_type_is_a_usage_error(tmp_path):
    run = write_run(tmp_path, model={"config": {"model_type": "rwkv77", "hidden_size": 32}})
    line = one_error_line(runner.invoke(app, ["train", str(run)]), 2)
    assert "model.config.model_type: unknown 'rwkv77'" in line and OWN_TYPES in line


def test_train_into_an_earlier_run_is_a_usage_error(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    run = write_run(tmp_path, model={"path": str(folder)})
    assert runner.invoke(app, ["train", str(run)]).exit_code == 0
    line = one_error_line(runner.invoke(app, ["train", str(run)]), 2)
    assert "already holds" in line and "--resume" in line


@pytest.fixture
def converted(tmp_path):
    """A qwen2 teacher and its WuNeng conversion (no middle heads: quick)."""
    teacher = save_qwen2(tmp_path / "teacher")
    result = runner.invoke(app, ["convert", str(teacher), str(tmp_path / "student"), "--middle-heads", "0"])
    assert result.exit_code == 0, result.output
    return teacher, tmp_path / "student"


def test_align_with_a_teacher_of_another_architecture(tmp_path, converted):
    _, student = converted
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(ByteLevelTokenizer()), **SHAPES)).save_pretrained(tmp_path / "llama")
    run = write_run(tmp_path, stage="align", model={"path": str(student)}, teacher=str(tmp_path / "llama"))
    line = one_error_line(runner.invoke(app, ["train", str(run)]), 1)  # was accepted silently (exit 0)
    assert (
        "teacher is a 'llama' model" in line and "converted from a 'qwen2' teacher" in line and "set `teacher:`" in line
    )


def test_align_with_a_teacher_of_other_shapes(tmp_path, converted):
    _, student = converted
    other = save_qwen2(tmp_path / "other", num_key_value_heads=4)
    run = write_run(tmp_path, stage="align", model={"path": str(student)}, teacher=str(other))
    line = one_error_line(runner.invoke(app, ["train", str(run)]), 1)
    assert "num_key_value_heads 4 (teacher) vs 2 (student)" in line


def test_convert_a_corrupt_teacher(tmp_path):
    teacher = save_qwen2(tmp_path / "teacher")
    truncate(teacher / "model.safetensors")
    line = one_error_line(runner.invoke(app, ["convert", str(teacher), str(tmp_path / "out")]), 1)
    assert f"{teacher / 'model.safetensors'}: not a readable safetensors file" in line
    assert not (tmp_path / "out").exists()


def test_grow_a_corrupt_or_mismatched_model(tmp_path):
    torch.manual_seed(0)
    MetaStateForCausalLM(
        MetaStateConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16)
    ).save_pretrained(tmp_path / "ms")
    edit_config(tmp_path / "ms", num_param_tokens=48)
    line = one_error_line(runner.invoke(app, ["grow", str(tmp_path / "ms"), str(tmp_path / "out"), "--heads", "3"]), 1)
    assert "the weights do not match its config.json" in line and "shape mismatch" in line
    truncate(tmp_path / "ms" / "model.safetensors")
    line = one_error_line(runner.invoke(app, ["grow", str(tmp_path / "ms"), str(tmp_path / "out"), "--heads", "3"]), 1)
    assert "model.safetensors: not a readable safetensors file" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_import_rwkv_a_corrupt_checkpoint(tmp_path, damage):
    from wuneng.models import RWKV7Config, RWKV7ForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "rwkv.pth"
    torch.save(
        RWKV7ForCausalLM(
            RWKV7Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16)
        ).to_rwkv_lm_state_dict(),
        path,
    )
    if damage == "truncated":
        truncate(path)
    else:
        path.write_bytes(b"garbage" * 20)
    line = one_error_line(runner.invoke(app, ["import-rwkv", str(path), str(tmp_path / "out")]), 1)
    assert f"{path}: not a readable RWKV-LM .pth state dict" in line and "copy or save it again" in line
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path):
    line = one_error_line(runner.invoke(app, ["grow", str(tmp_path), str(tmp_path / "o")]), 2)
    assert "nothing to grow" in line
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "o"), "--dtype", "float8"])
    assert result.exit_code == 2 and "float8" in result.stderr  # typer's own usage errors keep code 2


def test_an_unexpected_error_is_named_and_points_to_debug(tmp_path, monkeypatch):
    import wuneng.eval.evaluate as evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(evaluate, "load_model_folder", broken)
    line = one_error_line(runner.invoke(app, ["eval", str(tmp_path)]), 1)
    assert line == "error: RuntimeError: boom second line (rerun as `wuneng --debug ...` for the traceback)"
    result = runner.invoke(app, ["--debug", "eval", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)  # --debug: the exception itself (full traceback)


def test_a_non_finite_loss_exits_3(tmp_path, monkeypatch):
    import wuneng.train.loop as loop

    def diverging(config, **kwargs):
        raise loop.NonFiniteLossError(
            "loss is nan at step 5 (stage pretrain); the run stopped before updating the weights."
        )

    monkeypatch.setattr(loop, "train", diverging)
    run = write_run(
        tmp_path,
        model={
            "config": {
                "model_type": "qwen2",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 260,
            }
        },
    )
    line = one_error_line(runner.invoke(app, ["train", str(run)]), 3)
    assert line.startswith("error: loss is nan at step 5")


@pytest.mark.slow  # two fresh processes (about 15 s each on a loaded 2-core machine)
def test_a_real_process_prints_one_line_and_a_traceback_only_with_debug(tmp_path):
    folder = save_qwen2(tmp_path / "m")
    truncate(folder / "model.safetensors")
    cmd = [sys.executable, "-m", "wuneng.cli", "eval", str(folder), "--tasks", "arithmetic", "--limit", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()] and "model.safetensors" in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelFolderError" in debug.stderr


# ------------------------------------------------------------------------------------------------ convert --help
def test_convert_help_says_what_the_conversion_preserves(tmp_path, converted):
    """Hybrid conversion reproduces the teacher's logits; ARWKV conversion does not (the help says so) and keeps
    the teacher's embeddings, MLPs and norms."""
    from wuneng.models.wuneng import WuNengForCausalLM

    help_text = " ".join(runner.invoke(app, ["convert", "--help"]).output.split())
    assert "Hybrid conversion is function-preserving" in help_text
    assert "ARWKV conversion (--arwkv, --arwkv-layers) is not function-preserving" in help_text
    teacher_dir, hybrid_dir = converted
    assert runner.invoke(app, ["convert", str(teacher_dir), str(tmp_path / "arwkv"), "--arwkv"]).exit_code == 0
    teacher = Qwen2ForCausalLM.from_pretrained(teacher_dir).eval()
    hybrid = WuNengForCausalLM.from_pretrained(hybrid_dir).eval()
    arwkv = WuNengForCausalLM.from_pretrained(tmp_path / "arwkv").eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher(ids).logits
        assert (hybrid(ids).logits - ref).abs().max() <= 1e-4
        assert (arwkv(ids).logits - ref).abs().max() >= 0.1  # not function-preserving
    kept = dict(arwkv.named_parameters())
    for name, p in teacher.named_parameters():
        if ".self_attn." not in name:  # embeddings, MLPs, norms, head: the teacher's
            assert torch.equal(kept[name], p), name
