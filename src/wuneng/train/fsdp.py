"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``distributed.strategy: fsdp``, applied by the loop itself.

accelerate runs its FSDP plugin only on accelerators (on CPU it picks MULTI_CPU and wraps DDP), so the loop shards
the student here, on any backend (gloo on CPU, NCCL on GPU): every decoder layer (the classes the model names in
``_no_split_modules``: ``RWKV7Block``, ``MetaStateBlock``, a WuNeng student's teacher decoder layers) is one FSDP
unit, the root (embeddings, final norm, head; a tied head stays with its embedding) another. Parameters become
``DTensor`` shards of dim 0; gradients are reduce-scattered (averaged over the processes, as DDP does).

Checkpoints are ``torch.distributed.checkpoint`` (DCP) folders of the model's and the optimizer's sharded state
dicts (``get_state_dict`` / ``set_state_dict``: keys are parameter names, so any process count reads them back).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "DISTRIBUTED_STATE_DIR",
    "shard_model",
    "sharded_units",
    "no_gradient_sync",
    "clip_grad_norm",
    "save_distributed_state",
    "load_distributed_state",
    "has_distributed_state",
    "full_model_state_dict",
]

logger = logging.getLogger(__name__)

#: The DCP folder inside a checkpoint (``.metadata`` plus one ``.distcp`` file per process).
DISTRIBUTED_STATE_DIR = "distributed_state"


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own: instances of the classes named in
    ``model._no_split_modules`` (the decoder layers), outermost first, none inside another."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"distributed.strategy fsdp: {type(model).__name__} names no decoder layer classes in _no_split_modules; "
            "FSDP would shard the whole model as one unit (no memory saved); use strategy ddp"
        )
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        units.append(module)
        inside.update(id(m) for m in module.modules())
    if not units:
        raise ValueError(
            f"distributed.strategy fsdp: {type(model).__name__} has no module of the classes {sorted(names)} "
            "(_no_split_modules); use strategy ddp"
        )
    return units


def shard_model(model: nn.Module, device_type: Optional[str] = None) -> nn.Module:
    """Shard ``model`` in place over the default process group: rank 0's weights are broadcast first (every process
    then starts from the same weights, as DDP does), then ``fully_shard`` each decoder layer and the root. Build the
    optimizer after this (its parameters are the sharded ones). ``device_type``: where the model is ("cpu",
    "cuda"; default: its first parameter's). Returns ``model``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    units = sharded_units(model)
    # the mesh on the model's device (FSDP's default follows the machine: CUDA even for a run on the CPU)
    mesh = init_device_mesh(device_type or next(model.parameters()).device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info(
        "FSDP: %d decoder layers (%s) and the root sharded over %d processes",
        len(units),
        ", ".join(sorted({type(u).__name__ for u in units})),
        dist.get_world_size(),
    )
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation without the reduce-scatter of every micro-batch: the unsharded gradients accumulate
    until a backward outside this context reduces them (FSDP2's ``set_requires_gradient_sync``)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """The total 2-norm of the gradients of ``params`` (``DTensor`` shards: the norm of the full gradients, the
    same on every process), and with ``max_norm`` the gradients scaled to at most that norm, as
    ``torch.nn.utils.clip_grad_norm_`` does for plain tensors. Returns the norm before clipping (a plain tensor)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):  # a partial sum of the shards' squares: reduce it to the full norm
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


def _distributed() -> bool:
    """Whether a process group is up (without one, DCP reads and writes as the only process)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load without a process group that it assumes one process: the case it is here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def has_distributed_state(checkpoint: str | Path) -> bool:
    """Whether checkpoint folder ``checkpoint`` holds a DCP model/optimizer state (written by an FSDP run)."""
    return (Path(checkpoint) / DISTRIBUTED_STATE_DIR / ".metadata").is_file()


def save_distributed_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model's and the optimizer's state into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder), no_dist=not _distributed())


def load_distributed_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a :func:`save_distributed_state` folder into ``model`` and ``optimizer`` (collective; sharded as now,
    whatever the process count that wrote it). A missing or extra key is an error naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not _distributed())
    except Exception as e:  # DCP raises a CheckpointException listing every process's error
        raise ValueError(
            f"{folder}: the sharded checkpoint does not match the model and optimizer "
            f"({' '.join(str(e).split())[:300]}); was it saved from another model or stage?"
        ) from None
    set_model_state_dict(model, state["model"])
    # not strict: a trainable parameter that never got a gradient has no optimizer state (nor had it when saved)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU, on process 0; the other processes get ``{}`` (collective). A tied
    parameter appears once, under its first name (the gathered copies no longer share memory, by which
    ``save_pretrained`` would otherwise find the tie), as in the folders of unsharded runs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(param), name) != name:
            full.pop(name, None)
    return full
