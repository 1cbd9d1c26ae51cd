"""Checkpoints: atomic, complete-or-absent, resumable.

Layout of ``RUN_DIR/checkpoints/step_00000120/``:

- ``model.safetensors``: the trained model's weights (``safetensors.torch.save_model``; tied weights once);
- ``optimizer.pt``, ``scheduler.pt``: ``torch.save`` of their ``state_dict`` (numbers and tensors only,
  loaded with ``torch.load(weights_only=True)``);
- ``rng_rank{r}.pt``: Python / NumPy / torch (and CUDA) RNG states of process r;
- ``data_state.json`` (streamed data only): the position of the next row in the data stream
  (:meth:`wuneng.train.streaming.TokenStream.state_dict`), read back by :func:`load_data_state`;
- ``trainer_state.json``: step, samples consumed, the last logged metrics. Written last.

A run with ``distributed.strategy: fsdp`` writes ``distributed_state/`` instead of ``model.safetensors`` and
``optimizer.pt``: a ``torch.distributed.checkpoint`` folder of the model's and the optimizer's state, each process
its own shards (:mod:`wuneng.train.fsdp`), readable with any number of processes.

A checkpoint is assembled in ``checkpoints/.tmp-step_XXXXXXXX`` and renamed into place with one
``os.replace`` once every file is written and flushed, so a killed run leaves either a complete
checkpoint or a temporary folder that :func:`latest_checkpoint` never picks up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..saving import apply_umask, replace_folder
from .fsdp import DISTRIBUTED_STATE_DIR, has_distributed_state, load_distributed_state, save_distributed_state

__all__ = [
    "CHECKPOINT_DIR",
    "save_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_checkpoint",
    "load_data_state",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})$")
DATA_STATE_FILE = "data_state.json"
_REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
#: An FSDP checkpoint's files: the DCP folder's metadata (written after every shard) instead of model and optimizer.
_REQUIRED_DISTRIBUTED = (f"{DISTRIBUTED_STATE_DIR}/.metadata", "scheduler.pt", "trainer_state.json")


def _complete(folder: Path) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in (_REQUIRED, _REQUIRED_DISTRIBUTED))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The RNG states of this process, as plain data and tensors (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: folders named ``step_XXXXXXXX`` holding every
    required file (``trainer_state.json``, written last, must parse)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    found = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if not m or not d.is_dir() or not _complete(d):
            continue
        try:
            with open(d / "trainer_state.json", encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if state.get("step") != int(m.group(1)):
            continue
        found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    keep_last: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    model_state_dict: Optional[dict] = None,
    sharded_optimizer: bool = False,
    data_state: Optional[dict] = None,
    distributed_state: Optional[tuple[torch.nn.Module, torch.optim.Optimizer]] = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``; every process calls
    this (each writes its RNG state; process 0 writes the rest and renames). Returns the final path.

    ``model_state_dict``: an already gathered full state dict (FSDP/ZeRO); else ``model`` is saved.
    ``sharded_optimizer`` (FSDP/ZeRO): every process writes its own ``optimizer_rank{r}.pt`` and
    ``optimizer.pt`` only records that; resuming then needs the same number of processes.
    ``data_state``: the data stream's position (plain JSON data; every process reads the same stream, process 0
    writes it).
    ``distributed_state``: ``(model, optimizer)`` of an FSDP run (``distributed.strategy: fsdp``): every process
    writes its shards of both into ``distributed_state/`` (``model``/``optimizer`` and ``model_state_dict`` unused).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _fsync_file(tmp / f"rng_rank{rank}.pt")
    if distributed_state is not None:
        save_distributed_state(tmp / DISTRIBUTED_STATE_DIR, *distributed_state)
    elif sharded_optimizer:
        torch.save(optimizer.state_dict(), tmp / f"optimizer_rank{rank}.pt")
        _fsync_file(tmp / f"optimizer_rank{rank}.pt")
    barrier()
    if rank == 0:
        if distributed_state is None:  # an FSDP run's model and optimizer are in distributed_state/
            if model_state_dict is not None:
                from safetensors.torch import save_file

                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in model_state_dict.items()},
                    str(tmp / "model.safetensors"),
                )
            else:
                save_model(model, str(tmp / "model.safetensors"))
            torch.save(
                {"sharded": True, "world_size": world_size} if sharded_optimizer else optimizer.state_dict(),
                tmp / "optimizer.pt",
            )
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if data_state is not None:
            with open(tmp / DATA_STATE_FILE, "w", encoding="utf-8") as f:
                json.dump(data_state, f, indent=1)
        state = dict(trainer_state, step=step, world_size=world_size)
        with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        apply_umask(tmp)  # safetensors writes 0o600 whatever the umask; others of a shared machine may read runs
        for name in os.listdir(tmp):
            if (tmp / name).is_file():
                _fsync_file(tmp / name)
        if distributed_state is not None:
            for name in os.listdir(tmp / DISTRIBUTED_STATE_DIR):
                _fsync_file(tmp / DISTRIBUTED_STATE_DIR / name)
            _fsync_dir(tmp / DISTRIBUTED_STATE_DIR)
        _fsync_dir(tmp)
        # The same step written again (a resumed run): the old one is renamed aside, the new one in, then the old
        # one deleted; a failed rename-in puts the old one back (wuneng.saving.replace_folder).
        replace_folder(tmp, final)
        _fsync_dir(root)
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(
    path: str | Path,
    *,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects; returns the
    trainer state (``step``, ``samples_consumed``, ...). Any of model / optimizer / scheduler may be
    None (the loop loads weights before wrapping the model for DDP/FSDP, the rest after). RNG states of
    ``rank`` are restored when that file exists (extra processes of a larger resumed run keep their seed).

    An FSDP checkpoint (``distributed_state/``) loads model and optimizer together, after sharding: give both or
    neither (collective: every process calls this)."""
    path = Path(path)
    distributed = has_distributed_state(path)
    missing = [f for f in (_REQUIRED_DISTRIBUTED if distributed else _REQUIRED) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    if distributed and (model is None) != (optimizer is None):
        raise ValueError(f"{path} is a sharded (FSDP) checkpoint: load its model and optimizer together")
    if distributed and model is not None:
        load_distributed_state(path / DISTRIBUTED_STATE_DIR, model, optimizer)
        model = optimizer = None
    if model is not None:
        missing_keys, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing_keys or unexpected:
            raise ValueError(
                f"{path}/model.safetensors does not match the model: missing {sorted(missing_keys)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was it saved from another model?)"
            )
    if optimizer is not None:
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if opt_state.get("sharded"):
            shard = path / f"optimizer_rank{rank}.pt"
            if not shard.is_file():
                raise ValueError(
                    f"{path}: the optimizer state is sharded over {opt_state['world_size']} processes; "
                    f"resume with that many processes (no {shard.name})"
                )
            opt_state = torch.load(shard, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    with open(path / "trainer_state.json", encoding="utf-8") as f:
        return json.load(f)


def load_data_state(path: str | Path) -> Optional[dict]:
    """The data stream position saved in checkpoint ``path`` (``data_state.json``), or None when the run that
    wrote it did not stream its data."""
    file = Path(path) / DATA_STATE_FILE
    if not file.is_file():
        return None
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError as e:
        raise ValueError(
            f"{file}: not valid JSON ({e}); the checkpoint is damaged, resume from an earlier one"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object (the data stream position), got {type(state).__name__}")
    return state
