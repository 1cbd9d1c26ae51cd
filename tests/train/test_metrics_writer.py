"""MetricsWriter: metrics.jsonl always, TensorBoard scalars when the package is importable (a stand-in
SummaryWriter here: tensorboard is an optional dependency and not installed in CI)."""

from __future__ import annotations

import json
import sys
import types

from wuneng.train.loop import MetricsWriter


class FakeSummaryWriter:
    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_jsonl_and_tensorboard_scalars(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.instances.clear()
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    writer.write({"step": 3, "loss": 1.5, "lr": 1e-3, "stage": "align"})
    writer.write({"event": "checkpoint", "path": "x"})  # no step: jsonl only
    writer.close()
    (tb,) = FakeSummaryWriter.instances
    assert tb.log_dir == str(tmp_path / "tensorboard") and tb.closed
    assert tb.scalars == [("loss", 1.5, 3), ("lr", 1e-3, 3)]  # numbers only, the step not as a scalar
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": 1.5, "lr": 1e-3, "stage": "align"}, {"event": "checkpoint", "path": "x"}]


def test_without_tensorboard_or_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    writer = MetricsWriter(tmp_path / "a", enabled=True, tensorboard=True)
    (tmp_path / "a").mkdir()
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert writer.tb is None
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    quiet = MetricsWriter(tmp_path / "b", enabled=False, tensorboard=True)  # not the main process
    quiet.write({"step": 1, "loss": 2.0})
    assert quiet.tb is None and not (tmp_path / "b").exists()
