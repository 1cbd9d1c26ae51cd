"""Low-rank maps evaluated together, and weights derived from parameters kept between calls.

An RWKV-7 time-mix has four LoRA-shaped maps (decay, in-context rate, value residual, gate) and a WuNeng hybrid
mixer three more (receptance correction, fusion gate, middle heads), each ``act_out(act_mid(x_i A_i) B_i + c_i)``
on its own token-shift mix ``x_i`` of the input. Evaluated one by one that is ~5 small ops per map, which at one
token per step (decoding) costs more than the arithmetic. :func:`low_rank_bank` evaluates all of them with two
batched matmuls on weights stacked once (adjacent maps of equal rank together; widths zero-padded to the
largest): ``bmm``, the middle activations in place, ``baddbmm`` with the biases, the output sigmoids in place.

It runs without autograd only (inference, decoding); training keeps the plain per-map ops, which are the
reference the tests compare it with. The stacked weights live on the owning module until one of the source
parameters changes (:func:`derived_weight`) or :func:`clear_derived_weights` drops them.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["LowRankMap", "derived_weight", "low_rank_bank", "clear_derived_weights"]


class LowRankMap(NamedTuple):
    """One map ``out(mid(x @ first) @ second + bias)`` of a :func:`low_rank_bank`.

    first [C, r], second [r, n], bias [n] or None; mid: None | "tanh" | "sigmoid"; out_sigmoid: apply a sigmoid
    to the output."""

    name: str
    first: torch.Tensor
    second: torch.Tensor
    bias: Optional[torch.Tensor] = None
    mid: Optional[str] = None
    out_sigmoid: bool = False


_MID = {None: None, "tanh": torch.Tensor.tanh_, "sigmoid": torch.Tensor.sigmoid_}


def derived_weight(owner: nn.Module, slot: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
    """``build()``, cached on ``owner`` under ``slot`` until a source tensor changes (its data pointer or in-place
    version: optimizer steps, ``load_state_dict``, ``.to()``) or its dtype/device. Without caching when autograd
    would record through the sources (the result must then be part of the graph)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cache = owner.__dict__.setdefault("_derived_weights", {})
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        hit = (key, build())
        cache[slot] = hit
    return hit[1]


def clear_derived_weights(module: nn.Module) -> int:
    """Drop every cached derived weight in ``module`` and its submodules (e.g. after inference, before training
    a large model: the stacked copies hold about as much memory as the LoRAs themselves). Returns how many
    modules held some. They are rebuilt on the next no-grad call."""
    cleared = 0
    for sub in module.modules():
        if sub.__dict__.pop("_derived_weights", None):
            cleared += 1
    return cleared


def _runs(flags) -> tuple:
    """[(start, stop)] of the maximal runs of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


def _stack(maps: Sequence[LowRankMap]):
    """The maps split into runs of equal rank (no padding of the rank within a run); per run (start, stop,
    first [m, C, r], second [m, r, W] and bias [m, 1, W], widths zero-padded to the run's widest, and the
    sub-runs with an output sigmoid)."""
    groups = []
    ranks = [m.first.shape[1] for m in maps]
    start = 0
    while start < len(maps):
        stop = start + 1
        while stop < len(maps) and ranks[stop] == ranks[start]:
            stop += 1
        run = maps[start:stop]
        C, r = run[0].first.shape
        W = max(m.second.shape[1] for m in run)
        first = torch.stack([m.first for m in run])
        second = run[0].first.new_zeros(len(run), r, W)
        bias = run[0].first.new_zeros(len(run), 1, W)
        for i, m in enumerate(run):
            second[i, :, : m.second.shape[1]] = m.second
            if m.bias is not None:
                bias[i, 0, : m.bias.shape[0]] = m.bias
        groups.append((start, stop, first, second, bias, _runs([m.out_sigmoid for m in run])))
        start = stop
    return groups


@torch.no_grad()
def low_rank_bank(owner: nn.Module, slot: str, maps: Sequence[LowRankMap], inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """All ``maps`` at once: ``inputs`` [M, ..., C] holds map i's input in row i. Returns {name: [..., n_i]}.

    Equal (up to float rounding of the summation order) to evaluating each map with its own matmuls. Adjacent
    maps of equal rank share one ``bmm`` / ``baddbmm`` pair (order maps by rank to get fewer pairs); their
    stacked weights are cached on ``owner`` under ``slot`` (:func:`derived_weight`), output widths below the
    widest of a pair read zero padding."""
    if inputs.shape[0] != len(maps):
        raise ValueError(f"low_rank_bank: inputs has {inputs.shape[0]} rows for {len(maps)} maps")
    sources = [t for m in maps for t in (m.first, m.second, m.bias) if t is not None]
    groups = derived_weight(owner, slot, sources, lambda: _stack(maps))
    lead, C = inputs.shape[1:-1], inputs.shape[-1]
    flat = inputs.reshape(len(maps), -1, C)
    out = {}
    for start, stop, first, second, bias, runs in groups:
        h = torch.bmm(flat[start:stop], first)  # [m, P, r]
        for i in range(start, stop):
            if maps[i].mid is not None:
                _MID[maps[i].mid](h[i - start])
        z = torch.baddbmm(bias, h, second)  # [m, P, W]
        for a, b in runs:
            z[a:b].sigmoid_()
        for i in range(start, stop):
            n = maps[i].second.shape[1]
            out[maps[i].name] = z[i - start, :, :n].view(*lead, n)
    return out
