"""AdamW parameter groups and learning-rate schedules (SPEC section 5, RWKV-LM conventions).

Groups, by RWKV-LM's rule (``configure_optimizers`` of RWKV-v7): ``decay`` (the ``.weight`` matrices of
Linear/Embedding-like layers: the name's last part is ``weight`` and the tensor has at least two dimensions
of size > 1), ``no_decay`` (everything else: norms, biases, token-shift mixes, LoRA factors ``w1``/``a1``/
``receptance_lora_a``..., ``r_k``, WuNeng's per-channel fusion tables ``gate_bias``/``gate_scale``/
``fusion_beta`` stored as [H, d] matrices, Meta-State's parameter tokens), ``w0`` (names ending in ``w0``:
RWKV-7 decay biases, ``w0_lr_scale`` x lr, no decay).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["is_decayed", "param_groups", "build_optimizer", "lr_factor", "build_scheduler"]


def is_decayed(name: str, p: torch.Tensor) -> bool:
    """RWKV-LM's weight-decay rule: a ``.weight`` tensor with >= 2 dimensions of size > 1 (a 1 x C "matrix" is a
    vector). Low-rank factors and per-channel tables are not named ``weight`` and are not decayed."""
    return name.rsplit(".", 1)[-1] == "weight" and p.squeeze().ndim >= 2


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters (``requires_grad``), each with a ``name``.

    The group lr already includes its scale, so a ``LambdaLR`` factor applies to all groups alike.
    """
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "w0": []}
    seen: set[int] = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if name.endswith("w0"):
            buckets["w0"].append(p)
        elif is_decayed(name, p):
            buckets["decay"].append(p)
        else:
            buckets["no_decay"].append(p)
    settings = {
        "decay": dict(lr=cfg.lr, weight_decay=cfg.weight_decay),
        "no_decay": dict(lr=cfg.lr, weight_decay=0.0),
        "w0": dict(lr=cfg.lr * cfg.w0_lr_scale, weight_decay=0.0),
    }
    groups = [dict(params=ps, name=k, **settings[k]) for k, ps in buckets.items() if ps]
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with the groups of :func:`param_groups`."""
    return torch.optim.AdamW(
        param_groups(model.named_parameters(), cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    Warm-up (ARWKV): ``0.01 + 0.99 * step / warmup_steps`` for ``step < warmup_steps``; then over the
    remaining steps, progress ``p`` from 0 to 1: exponential ``(min_lr/lr) ** p``, cosine
    ``m + (1 - m) (1 + cos(pi p)) / 2`` with ``m = min_lr/lr``, or constant 1.
    """
    if step < cfg.warmup_steps:
        return 0.01 + 0.99 * step / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    ratio = cfg.min_lr / cfg.lr
    if cfg.schedule == "exponential":
        return ratio**p
    if cfg.schedule == "cosine":
        return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`lr_factor`. Its ``state_dict`` holds only numbers (the lambda is a
    plain function, which ``LambdaLR`` does not serialise), so it loads with ``weights_only=True``."""

    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
