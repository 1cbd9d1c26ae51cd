"""Experiment trackers through accelerate (docs/training.md, "Trackers"): ``log_with`` in the recipe.

TensorBoard is real here (the test extra installs it): a few training steps, then the event files are read back
with TensorBoard's own EventAccumulator and must hold exactly the loop's numbers. wandb and mlflow are not
installed: naming one gives one line naming the extra; wandb's wiring is checked with a stand-in ``wandb`` module.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import subprocess
import sys
import types

import accelerate.tracking
import pytest
from accelerate.utils import LoggerType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from wuneng.train import train
from wuneng.train.config import ConfigError, config_from_dict, validate
from wuneng.train.loop import RUN_ENTRIES, check_run_dir

from train_helpers import PYTHON, REPO, TEXTS, quick_config, saved_run_files, tiny_qwen2

STEP_KEYS = ("loss", "lr", "grad_norm", "tokens")


def run(tmp_path, tokenizer, name="run", **overrides):
    cfg = quick_config(tmp_path / name, max_steps=4, save_every=1000, micro_batch_size=2, **overrides)
    return train(cfg, model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def float32(x: float) -> float:
    """TensorBoard stores scalars as float32."""
    import numpy as np

    return float(np.float32(x))


def test_tensorboard_events_hold_the_loops_numbers(tmp_path, tokenizer):
    result = run(tmp_path, tokenizer, log_with=["tensorboard"])
    assert len(result.history) == 4
    logged = scalars(tmp_path / "run" / "trackers" / "wuneng")  # project_dir / tracker_project
    for key in STEP_KEYS:
        assert logged[key] == [(r["step"], float32(r[key])) for r in result.history], key
    # the plain metrics file is still there, with the same steps
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l for l in lines if "event" not in l] == result.history
    assert [l["event"] for l in lines if "event" in l] == ["start", "end"]
    # the hyperparameters (accelerate's TensorBoard tracker keeps them as YAML beside the events)
    (hparams,) = (tmp_path / "run" / "trackers" / "wuneng").glob("*/hparams.yml")
    assert "optim.lr: 0.003" in hparams.read_text()


def test_project_dir_and_project_name(tmp_path, tokenizer):
    run(tmp_path, tokenizer, log_with=["tensorboard"], project_dir=str(tmp_path / "tb"), tracker_project="s1")
    assert scalars(tmp_path / "tb" / "s1")["loss"][-1][0] == 4
    assert not (tmp_path / "run" / "trackers").exists()


def test_implicit_tensorboard_flag(tmp_path, tokenizer):
    """``tensorboard: true`` (the default) adds TensorBoard when installed; false leaves only log_with's trackers."""
    run(tmp_path, tokenizer, name="on", tensorboard=True)
    assert [s for s, _ in scalars(tmp_path / "on" / "trackers" / "wuneng")["loss"]] == [1, 2, 3, 4]
    run(tmp_path, tokenizer, name="off", tensorboard=False)
    assert not (tmp_path / "off" / "trackers").exists()


def test_fresh_run_refuses_earlier_tracker_logs(tmp_path):
    assert "trackers" in RUN_ENTRIES
    (tmp_path / "trackers").mkdir()
    with pytest.raises(FileExistsError, match="trackers"):
        check_run_dir(tmp_path, resume=False, stage="pretrain")


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, tokenizer, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        run(tmp_path, tokenizer, log_with=[name])
    message = str(err.value)
    assert "\n" not in message
    assert f"config.log_with: {name!r} needs the {name} package" in message
    assert f"pip install 'wuneng[{name}]'" in message
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_tracker_names_and_kwargs_are_checked():
    cfg = config_from_dict({"log_with": ["tensorboard", "wandb", "mlflow"]})
    assert cfg.log_with == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(ConfigError, match=r"config.log_with\[0\]: 'comet' is not allowed"):
        config_from_dict({"log_with": ["comet"]})
    bad = config_from_dict({"tracker_kwargs": {"wandbb": {"mode": "online"}}, "model": {"path": "m"}})
    with pytest.raises(ConfigError, match=r"config.tracker_kwargs.wandbb: expected a tracker name"):
        validate(bad, has_data=True)


class FakeWandbRun:
    def __init__(self, init_kwargs):
        self.init_kwargs, self.logged, self.finished = init_kwargs, [], False

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def fake_wandb() -> types.ModuleType:
    """The part of wandb's API accelerate's WandBTracker calls (init, config.update, run.log, run.finish)."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []
    module.config = types.SimpleNamespace(stored={})
    module.config.update = lambda values, allow_val_change=False: module.config.stored.update(values)

    def init(**kwargs):
        module.runs.append(FakeWandbRun(kwargs))
        return module.runs[-1]

    module.init = init
    return module


def test_wandb_gets_the_steps_offline_in_the_run_folder(tmp_path, tokenizer, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.WANDB])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = run(tmp_path, tokenizer, log_with=["wandb"], tracker_kwargs={"wandb": {"name": "s1"}}, tensorboard=False)
    (wb,) = wandb.runs
    assert wb.init_kwargs == {
        "project": "wuneng",
        "name": "s1",
        "dir": str(tmp_path / "run" / "trackers"),
        "mode": "offline",
    }
    assert [(step, {k: v[k] for k in STEP_KEYS}) for step, v in wb.logged] == [
        (r["step"], {k: r[k] for k in STEP_KEYS}) for r in result.history
    ]
    assert wb.finished and wandb.config.stored["optim.lr"] == 3e-3


@pytest.mark.slow
def test_two_processes_write_one_set_of_events(tmp_path, tokenizer):
    """torchrun with 2 processes (gloo): only the main process writes TensorBoard events, and they hold the
    global step's numbers that the main process's metrics.jsonl holds."""
    path = saved_run_files(tmp_path, tokenizer, max_steps=3, save_every=1000, log_with=["tensorboard"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "wuneng.cli", "train", str(path),
        "--output-dir", str(tmp_path / "two"), "-o", "micro_batch_size=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "two" / "trackers" / "wuneng"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    lines = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "event" not in l]
    assert [l["world_size"] for l in lines if l.get("event") == "start"] == [2]
    assert scalars(folder)["loss"] == [(r["step"], float32(r["loss"])) for r in steps]
