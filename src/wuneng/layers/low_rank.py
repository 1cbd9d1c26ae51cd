"""Low-rank maps evaluated together, and weights derived from parameters kept between calls.

An RWKV-7 time-mix has four LoRA-shaped maps (decay, in-context rate, value residual, gate) and a WuNeng hybrid
mixer three more (receptance correction, fusion gate, middle heads), each ``act_out(act_mid(x_i A_i) B_i + c_i)``
on its own token-shift mix ``x_i`` of the input. Evaluated one by one that is ~5 small ops per map, which at one
token per step (decoding) costs more than the arithmetic. :func:`low_rank_bank` evaluates all of them with two
batched matmuls on weights stacked once (ranks and widths zero-padded to the largest): ``bmm``, the middle
activations in place, ``baddbmm`` with the biases, the output sigmoids in place.

It runs without autograd only (inference, decoding); training keeps the plain per-map ops, which are the
reference the tests compare it with. The stacked weights live on the owning module until one of the source
parameters changes (:func:`derived_weight`).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["LowRankMap", "derived_weight", "low_rank_bank"]


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


def _stack(maps: Sequence[LowRankMap]):
    """first [M, C, R], second [M, R, W], bias [M, 1, W] (zero-padded), and the runs of the activations."""
    C = maps[0].first.shape[0]
    R = max(m.first.shape[1] for m in maps)
    W = max(m.second.shape[1] for m in maps)
    ref = maps[0].first
    first = ref.new_zeros(len(maps), C, R)
    second = ref.new_zeros(len(maps), R, W)
    bias = ref.new_zeros(len(maps), 1, W)
    for i, m in enumerate(maps):
        r, n = m.second.shape
        first[i, :, :r] = m.first
        second[i, :r, :n] = m.second
        if m.bias is not None:
            bias[i, 0, :n] = m.bias
    # contiguous runs of rows with an output sigmoid: one in-place op per run
    runs, start = [], None
    for i, m in enumerate(list(maps) + [None]):
        if m is not None and m.out_sigmoid:
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    return first, second, bias, tuple(runs)


@torch.no_grad()
def low_rank_bank(owner: nn.Module, slot: str, maps: Sequence[LowRankMap], inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """All ``maps`` at once: ``inputs`` [M, ..., C] holds map i's input in row i. Returns {name: [..., n_i]}.

    Equal (up to float rounding of the summation order) to evaluating each map with its own matmuls. The stacked
    weights are cached on ``owner`` under ``slot`` (:func:`derived_weight`); a map with rank or width below the
    largest reads zero padding."""
    if inputs.shape[0] != len(maps):
        raise ValueError(f"low_rank_bank: inputs has {inputs.shape[0]} rows for {len(maps)} maps")
    sources = [t for m in maps for t in (m.first, m.second, m.bias) if t is not None]
    first, second, bias, runs = derived_weight(owner, slot, sources, lambda: _stack(maps))
    M, lead, C = inputs.shape[0], inputs.shape[1:-1], inputs.shape[-1]
    h = torch.bmm(inputs.reshape(M, -1, C), first)  # [M, P, R]
    for i, m in enumerate(maps):
        if m.mid is not None:
            _MID[m.mid](h[i])
    z = torch.baddbmm(bias, h, second)  # [M, P, W]
    for start, stop in runs:
        z[start:stop].sigmoid_()
    return {m.name: z[i, :, : m.second.shape[1]].view(*lead, m.second.shape[1]) for i, m in enumerate(maps)}
