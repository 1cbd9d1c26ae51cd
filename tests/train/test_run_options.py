"""train()'s options for generated-task runs (what ``wuneng bench-arch`` trains with): fresh data every epoch
(``dataset_for_epoch``), a stop hook (``should_stop``), a wall-clock budget (``max_seconds``) and no checkpoints
(``save_checkpoints: false``)."""

from __future__ import annotations

import pytest
import torch

from wuneng.labels import IGNORE_INDEX
from wuneng.train.config import ConfigError, config_from_dict
from wuneng.train.data import PackedDataset
from wuneng.train.loop import EpochData, GlobalSampler, train

from train_helpers import quick_config, tiny_qwen2

ROWS, SEQ = 6, 8


class RecordingRows(PackedDataset):
    """A PackedDataset that records which of its rows each batch takes."""

    taken: list

    def batch(self, indices):
        self.taken.extend(int(i) for i in indices)
        return super().batch(indices)


def epoch_rows(epoch: int) -> RecordingRows:
    """Rows whose first token names the epoch and the row (so a batch shows where it came from)."""
    g = torch.Generator().manual_seed(epoch)
    ids = torch.randint(10, 250, (ROWS, SEQ), generator=g)
    ids[:, 0] = epoch * 10 + torch.arange(ROWS)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    data = RecordingRows(ids, labels, torch.ones_like(ids), ROWS, 0)
    data.taken = []
    return data


def test_epoch_data_gives_each_epochs_rows_in_the_samplers_order():
    made = {}
    epochs = EpochData(lambda e: made.setdefault(e, epoch_rows(e)))
    sampler = GlobalSampler(ROWS, seed=3)
    # 3 batches of 4 rows span epochs 0 and 1 (positions 0..11); the middle batch crosses the boundary
    firsts = []
    for start in (0, 4, 8):
        b = epochs.batch(sampler.positions(start, 4))
        assert b["input_ids"].shape == (4, SEQ)
        firsts += b["input_ids"][:, 0].tolist()
    assert sorted(firsts[:ROWS]) == list(range(ROWS))  # epoch 0: every row once
    assert sorted(firsts[ROWS:]) == [10 + r for r in range(ROWS)]  # epoch 1: fresh rows, every one once
    assert firsts[:ROWS] == [int(r) for r in sampler.rows(0, ROWS)]  # in the sampler's seeded order
    assert sorted(made) == [0, 1]


def test_epoch_data_refuses_an_epoch_of_another_size():
    epochs = EpochData(
        lambda e: epoch_rows(0) if e == 0 else PackedDataset(*[torch.zeros(2, SEQ, dtype=torch.long)] * 3)
    )
    with pytest.raises(ValueError, match=r"dataset_for_epoch\(1\) returned 2 rows"):
        epochs.get(1)


def test_train_with_fresh_data_every_epoch_stop_hook_and_no_checkpoints(tmp_path, tokenizer):
    made: dict[int, RecordingRows] = {}
    model = tiny_qwen2()
    calls = []

    def should_stop(step, trained):
        calls.append(step)
        assert trained is model
        return step == 4

    config = quick_config(tmp_path / "run", max_steps=10, micro_batch_size=2, save_checkpoints=False)
    result = train(
        config,
        model=model,
        tokenizer=tokenizer,
        dataset_for_epoch=lambda e: made.setdefault(e, epoch_rows(e)),
        should_stop=should_stop,
    )
    # 4 steps x 2 rows = 8 rows: all 6 of epoch 0, then 2 fresh rows of epoch 1
    assert result.step == 4 and calls == [1, 2, 3, 4]
    assert sorted(made) == [0, 1]
    assert sorted(made[0].taken) == list(range(ROWS)) and len(made[1].taken) == 2
    assert result.last_checkpoint is None and not (tmp_path / "run" / "checkpoints").exists()
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]


def test_wall_clock_budget_ends_the_run_with_its_checkpoint(tmp_path, tokenizer):
    config = quick_config(tmp_path / "run", max_steps=10, micro_batch_size=2, max_seconds=1e-9, save_every=100)
    result = train(config, model=tiny_qwen2(), tokenizer=tokenizer, dataset=epoch_rows(0))
    assert result.step == 1  # the first step already ran past the budget; the schedule still spans 10 steps
    assert result.last_checkpoint is not None and result.last_checkpoint.name == "step_00000001"


def test_run_options_are_checked(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="max_seconds"):
        train(
            quick_config(tmp_path / "a", max_seconds=0.0),
            model=tiny_qwen2(),
            tokenizer=tokenizer,
            dataset=epoch_rows(0),
        )
    with pytest.raises(ConfigError, match="dataset_for_epoch"):
        train(
            quick_config(tmp_path / "b"),
            model=tiny_qwen2(),
            tokenizer=tokenizer,
            dataset=epoch_rows(0),
            dataset_for_epoch=epoch_rows,
        )
    with pytest.raises(ConfigError, match="device"):
        config_from_dict({"device": "tpu"})
    assert config_from_dict({"device": "cpu", "save_checkpoints": False, "max_seconds": 30}).max_seconds == 30
