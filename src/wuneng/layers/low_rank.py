"""Low-rank maps evaluated together, and weights derived from parameters kept for one decoding session.

An RWKV-7 time-mix has four LoRA-shaped maps (decay, in-context rate, value residual, gate) and a WuNeng hybrid
mixer three more (receptance correction, fusion gate, middle heads), each ``act_out(act_mid(x_i A_i) B_i + c_i)``
on its own token-shift mix ``x_i`` of the input. Evaluated one by one that is ~5 small ops per map, which at one
token per step (decoding) costs more than the arithmetic. :func:`low_rank_bank` evaluates all of them with two
batched matmuls on weights stacked once (adjacent maps of equal rank together; widths zero-padded to the
largest): ``bmm``, the middle activations in place, ``baddbmm`` with the biases, the output sigmoids in place.

It runs without autograd only (inference, decoding); training keeps the plain per-map ops, which are the
reference the tests compare it with.

The rule for derived weights (stacked LoRAs, stacked token-shift mixes; :func:`derived_weight`): they live in
a :class:`DerivedWeights` store for one *decoding session* and nowhere else. A model's forward opens the session
of its cache (``RecurrentStateCache.derived_weights``: the weights are built at the first no-grad call that uses
the cache, reused for every token decoded with it, freed with it); a forward without a cache opens a fresh
session, so every such call (evaluation, a prefill without a cache, a training step's no-grad evaluation)
builds them from the parameters as they are at that call. A layer called outside any session builds them every
call. Within a session an entry is also rebuilt when a source tensor's data pointer, in-place version, dtype or
device changes (optimizer steps, ``load_state_dict``, ``.to()``, a parameter replaced by one in new memory). What a
session does not see is a write through ``.data`` (it bumps no version) *while the session's cache is in use*:
after editing weights that way (EMA swaps, weight averaging, surgery) in the middle of decoding, call
``cache.derived_weights.clear()`` (``cache.reset()`` clears them with the states) or continue with a new cache.
A copied or pickled cache starts with an empty store.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["LowRankMap", "DerivedWeights", "derived_weights_session", "derived_weight", "low_rank_bank"]


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


class DerivedWeights:
    """The derived weights of one decoding session: ``(id(module), slot) -> (module, key, value)``.

    A :class:`~wuneng.cache.RecurrentStateCache` owns one (``cache.derived_weights``); a model's forward makes it
    the current store with :func:`derived_weights_session`. An entry holds its module, so that the module's id
    cannot be reused while the entry lives (a store lives as long as its cache). ``builds`` counts the weights
    built into it."""

    def __init__(self) -> None:
        self._store: Dict[tuple, tuple] = {}
        self.builds = 0

    def get(self, owner: nn.Module, slot: str, key: tuple, build: Callable[[], object]):
        hit = self._store.get((id(owner), slot))
        if hit is None or hit[1] != key:
            hit = self._store[(id(owner), slot)] = (owner, key, build())
            self.builds += 1
        return hit[2]

    def holds(self, owner: nn.Module, slot: str) -> bool:
        """Whether ``owner``'s weight ``slot`` is kept in this store."""
        return (id(owner), slot) in self._store

    def clear(self) -> None:
        """Forget every weight (they are rebuilt at the next use)."""
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)

    def __deepcopy__(self, memo) -> "DerivedWeights":
        # a copied cache (copy.deepcopy(prompt_cache), a common way to reuse a prefix) starts an empty store: the
        # weights are rebuilt on use, and copying the entries would copy the modules they hold
        return DerivedWeights()

    def __getstate__(self) -> dict:
        return {"_store": {}, "builds": 0}  # pickled: empty, for the same reason


_CURRENT: "contextvars.ContextVar[Optional[DerivedWeights]]" = contextvars.ContextVar(
    "wuneng_derived_weights", default=None
)


@contextlib.contextmanager
def derived_weights_session(store: Optional[DerivedWeights] = None) -> Iterator[DerivedWeights]:
    """Make ``store`` (default: a new, empty one) where :func:`derived_weight` keeps what it builds, for the
    duration of the ``with`` block (per thread / async context). Yields the store."""
    store = DerivedWeights() if store is None else store
    token = _CURRENT.set(store)
    try:
        yield store
    finally:
        _CURRENT.reset(token)


def derived_weight(owner: nn.Module, slot: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
    """``build()``, kept under (``owner``, ``slot``) in the current :func:`derived_weights_session` store and
    rebuilt when a source tensor changes (its data pointer, in-place version, dtype or device). Built every call
    outside a session, and when autograd would record through the sources (the result must then be part of the
    graph). See the module docstring for when weights are rebuilt."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    store = _CURRENT.get()
    if store is None:
        return build()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    return store.get(owner, slot, key, build)


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
def low_rank_bank(
    owner: nn.Module, slot: str, maps: Sequence[LowRankMap], inputs: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """All ``maps`` at once: ``inputs`` [M, ..., C] holds map i's input in row i. Returns {name: [..., n_i]}.

    Equal (up to float rounding of the summation order) to evaluating each map with its own matmuls. Adjacent
    maps of equal rank share one ``bmm`` / ``baddbmm`` pair (order maps by rank to get fewer pairs); their
    stacked weights are kept under (``owner``, ``slot``) for the current session (:func:`derived_weight`), output
    widths below the widest of a pair read zero padding."""
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
