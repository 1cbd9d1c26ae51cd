"""Strict configuration loading: unknown keys, wrong types, stage requirements, overrides, CLI errors."""

import pytest
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.train.config import ConfigError, TrainConfig, config_from_dict, load_config, validate

from train_helpers import write_yaml

GOOD = {"model": {"config": {"model_type": "qwen2"}}, "data": {"sources": ["x.txt"]}}


def test_good_config_and_types(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {**GOOD, "optim": {"lr": 1, "betas": [0.9, 0.99]}}))
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # ints accepted for floats
    assert cfg.optim.betas == (0.9, 0.99)
    validate(cfg)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: config\.optim: unknown key 'lrr'; did you mean 'lr'\?"):
        load_config(write_yaml(tmp_path / "c.yaml", {**GOOD, "optim": {"lrr": 0.1}}))


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"optim": {"lr": "fast"}}, r"optim.lr: expected a number, got str 'fast'"),
        ({"max_steps": "ten"}, r"max_steps: expected an integer, got str 'ten'"),
        ({"max_steps": True}, r"max_steps: expected an integer"),
        ({"stage": "finetune"}, r"stage: 'finetune' is not allowed; use one of 'pretrain', 'align', 'distill', 'sft'"),
        ({"optim": {"betas": [0.9]}}, r"optim.betas: expected a list of 2 values"),
        ({"data": {"sources": "x.txt"}}, r"data.sources: expected a list"),
        ({"progress": "yes"}, r"progress: expected true or false"),
        ({"optim": 3}, r"optim: expected a mapping"),
    ],
)
def test_wrong_types_name_the_key(patch, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**GOOD, **patch})


@pytest.mark.parametrize("stage", ["align", "distill"])
def test_missing_teacher(stage):
    cfg = config_from_dict({"stage": stage, "model": {"path": "student"}, "data": {"sources": ["x"]}})
    with pytest.raises(ConfigError, match=rf"stage '{stage}' needs a teacher: set `teacher:"):
        validate(cfg)
    validate(cfg, has_teacher=True)  # a teacher object passed from Python is enough


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model": {}}, "give exactly one of `path`"),
        ({"model": {"path": "a", "config": {"model_type": "qwen2"}}}, "give exactly one of `path`"),
        ({"data": {"sources": []}}, "data.sources: give at least one"),
        ({"micro_batch_size": 0}, "micro_batch_size: must be >= 1"),
        ({"optim": {"min_lr": 0.0}}, "exponential schedule needs min_lr > 0"),
        ({"distill": {"temperature": 0}}, "temperature: must be > 0"),
    ],
)
def test_semantic_checks(patch, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({**GOOD, **patch}))


def test_overrides_are_yaml_values(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", GOOD)
    cfg = load_config(path, ["optim.lr=3e-4", "data.seq_len=64", "align.layers=[0, 2]", "teacher=t"], stage="sft")
    assert cfg.optim.lr == 3e-4 and cfg.data.seq_len == 64 and cfg.align.layers == [0, 2]
    assert cfg.teacher == "t" and cfg.stage == "sft"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown key 'sequence_len'"):
        load_config(path, ["data.sequence_len=5"])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(p)
    p.write_bytes(b"stage: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**GOOD, "stage": "align"})
    result = CliRunner().invoke(app, ["train", str(path), "-o", "optim.lr=1e-3"])
    assert result.exit_code == 2
    assert "needs a teacher" in result.output
