"""MetricsWriter: metrics.jsonl always; the numbers of each step's record also go to the run's experiment trackers
(``accelerator.log``; a stand-in accelerator here, the real trackers in test_trackers.py)."""

from __future__ import annotations

import json

from wuneng.train.loop import MetricsWriter


class FakeTracker:
    def __init__(self):
        self.finished = False

    def finish(self):
        self.finished = True


class FakeAccelerator:
    def __init__(self, trackers):
        self.trackers, self.logged = trackers, []

    def log(self, values, step=None):
        self.logged.append((step, values))


def test_jsonl_and_tracker_scalars(tmp_path):
    tracker = FakeTracker()
    accelerator = FakeAccelerator([tracker])
    writer = MetricsWriter(tmp_path, enabled=True, accelerator=accelerator)
    writer.write({"step": 3, "loss": 1.5, "lr": 1e-3, "stage": "align", "ok": True})
    writer.write({"event": "checkpoint", "path": "x"})  # no step: jsonl only
    writer.write({"event": "end", "step": 3, "loss": 1.5})  # an event: jsonl only (the step's numbers went already)
    writer.close()
    assert accelerator.logged == [(3, {"loss": 1.5, "lr": 1e-3})]  # numbers only, the step not as a scalar
    assert tracker.finished and accelerator.trackers == []
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 3, "loss": 1.5, "lr": 1e-3, "stage": "align", "ok": True},
        {"event": "checkpoint", "path": "x"},
        {"event": "end", "step": 3, "loss": 1.5},
    ]


def test_without_trackers_or_on_other_ranks(tmp_path):
    (tmp_path / "a").mkdir()
    writer = MetricsWriter(tmp_path / "a", enabled=True, accelerator=FakeAccelerator([]))
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert writer.accelerator is None
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    accelerator = FakeAccelerator([FakeTracker()])
    quiet = MetricsWriter(tmp_path / "b", enabled=False, accelerator=accelerator)  # not the main process
    quiet.write({"step": 1, "loss": 2.0})
    quiet.close()
    assert accelerator.logged == [] and not (tmp_path / "b").exists()
