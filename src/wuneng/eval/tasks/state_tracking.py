"""State tracking: group word problems (Merrill, Petty, Sabharwal, "The Illusion of State in State-Space
Models", arXiv 2404.08819; data generator ``jopetty/word-problem``).

An example is a sequence of ``k`` group elements ``x_1 ... x_k`` (token = element index) and the
labels are all prefix products ``y_1 ... y_k`` (``y_t = x_1 · x_2 · ... · x_t``), so one sequence of
length k scores every length 1..k at once. The vocabulary is the group's elements, for both inputs
and labels.

Groups (``make_group``):

* ``"S5"``: the symmetric group on 5 points (order 120, non-solvable: NC¹-complete word problem);
* ``"A5"``: its even permutations (order 60, non-solvable);
* ``"Z60"``: the **cyclic group of order 60**, i.e. addition mod 60 (abelian, TC⁰). The literature
  also uses ``"A4xZ5"`` (solvable, non-abelian, order 60), available here as well;
* generally ``"Sn"``, ``"An"`` (n <= 7), ``"Zn"`` and direct products ``"GxH"`` (e.g. ``"Z2"`` for parity).

Conventions (deterministic and documented, since the literature leaves them implicit):

* a permutation ``p`` of ``{0..n-1}`` is the tuple of images, ``p[i]`` = where ``i`` goes;
* elements are numbered in lexicographic order of those tuples (index 0 is the identity); for ``An``
  the even permutations keep their lexicographic order; ``Zn`` element ``i`` is the integer ``i``;
  a product ``GxH`` numbers ``(g, h)`` as ``g * |H| + h``;
* the product ``a · b`` means "apply a, then b": ``(a · b)[i] = b[a[i]]`` (function composition
  ``b ∘ a``); for ``Zn`` it is ``(a + b) mod n``;
* so ``y_t = y_{t-1} · x_t`` and ``y_t[i] = x_t[y_{t-1}[i]]``: the running state is updated by the
  newest element (a left fold, as ``functools.reduce`` in ``jopetty/word-problem``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache
from typing import Optional

import numpy as np
import torch

from wuneng.eval.scoring import IGNORE_INDEX, accuracy_per_length, labelled_accuracy, min_depth_reaching
from wuneng.eval.tasks.mqar import make_rng

__all__ = [
    "FiniteGroup",
    "StateTrackingConfig",
    "StateTrackingData",
    "make_group",
    "generate_word_problems",
    "prefix_products",
    "state_tracking_report",
    "accuracy_per_length",
    "min_depth_reaching",
]


@dataclass(frozen=True)
class FiniteGroup:
    """A finite group given by its multiplication (Cayley) table.

    Attributes:
        name: e.g. ``"A5"``.
        elements: a readable form of each element (permutation tuple, integer, or pair), by index.
        table: int64 ``[G, G]``, ``table[a, b]`` = index of ``a · b`` ("a then b").
        identity: index of the identity element.
    """

    name: str
    elements: tuple
    table: np.ndarray
    identity: int

    @property
    def order(self) -> int:
        return int(self.table.shape[0])


def _check_n(n: int, kind: str) -> None:
    if kind in "SA" and not 1 <= n <= 7:
        raise ValueError(f"{kind}{n}: permutation groups are supported for 1 <= n <= 7 (order n!), got n={n}")
    if kind == "Z" and not 1 <= n <= 100_000:
        raise ValueError(f"Z{n}: cyclic groups are supported for 1 <= n <= 100000, got n={n}")


def _is_even(perm: tuple) -> bool:
    inversions = sum(1 for i in range(len(perm)) for j in range(i + 1, len(perm)) if perm[i] > perm[j])
    return inversions % 2 == 0


def _permutation_group(name: str, n: int, even_only: bool) -> FiniteGroup:
    perms = [p for p in itertools.permutations(range(n)) if not even_only or _is_even(p)]
    arr = np.array(perms, dtype=np.int64)  # [G, n], lexicographic
    G = arr.shape[0]
    # (a · b)[i] = b[a[i]] for all pairs at once: composed[a, b, i] = arr[b, arr[a, i]]
    composed = arr[np.arange(G)[None, :, None], arr[:, None, :]]  # [G, G, n]
    # index of each composed permutation by its rank in a base-n encoding (perms sorted lexicographically)
    codes = arr @ (n ** np.arange(n - 1, -1, -1, dtype=np.int64))
    composed_codes = composed @ (n ** np.arange(n - 1, -1, -1, dtype=np.int64))
    table = np.searchsorted(codes, composed_codes).astype(np.int64)
    if not np.array_equal(codes[table], composed_codes):
        raise RuntimeError(f"{name}: the set of permutations is not closed under composition")
    return FiniteGroup(name, tuple(perms), table, identity=0)


def _cyclic_group(n: int) -> FiniteGroup:
    idx = np.arange(n, dtype=np.int64)
    return FiniteGroup(f"Z{n}", tuple(range(n)), (idx[:, None] + idx[None, :]) % n, identity=0)


def _direct_product(g: FiniteGroup, h: FiniteGroup) -> FiniteGroup:
    H = h.order
    # (g1, h1) · (g2, h2) = (g1 g2, h1 h2); index (g, h) -> g * H + h
    table = (g.table[:, None, :, None] * H + h.table[None, :, None, :]).reshape(g.order * H, g.order * H)
    elements = tuple((a, b) for a in g.elements for b in h.elements)
    return FiniteGroup(f"{g.name}x{h.name}", elements, table.astype(np.int64), identity=g.identity * H + h.identity)


@cache
def make_group(name: str) -> FiniteGroup:
    """Build a group by name: ``"S5"``, ``"A5"``, ``"Z60"``, ``"A4xZ5"``, ``"Z2"``, ... (see module doc)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"group name must be a non-empty str like 'S5', 'A5', 'Z60' or 'A4xZ5', got {name!r}")
    factors = re.split(r"_?[x×]_?", name)
    groups = []
    for f in factors:
        m = re.fullmatch(r"([SAZ])(\d+)", f)
        if m is None:
            raise ValueError(f"unknown group {f!r} in {name!r}: expected Sn, An, Zn or products like A4xZ5")
        kind, n = m.group(1), int(m.group(2))
        _check_n(n, kind)
        groups.append(_cyclic_group(n) if kind == "Z" else _permutation_group(f"{kind}{n}", n, even_only=kind == "A"))
    group = groups[0]
    for other in groups[1:]:
        group = _direct_product(group, other)
    return group


@dataclass(frozen=True)
class StateTrackingConfig:
    """One group word-problem setting.

    Attributes:
        group: group name (``"S5"``, ``"A5"``, ``"Z60"``, ``"A4xZ5"``, ...).
        seq_len: k, elements per sequence (the literature sweeps k = 2..20).
        label_all_prefixes: label every prefix product (default); if False only the last position
            (the full product, as in the ``word-problem`` CSVs) is labelled and the rest are -100.
    """

    group: str = "A5"
    seq_len: int = 16
    label_all_prefixes: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, (int, np.integer)) or self.seq_len < 1:
            raise ValueError(f"StateTrackingConfig.seq_len must be a positive int, got {self.seq_len!r}")
        make_group(self.group)  # validates the name

    @property
    def vocab_size(self) -> int:
        """Number of tokens = group order (inputs and labels share the element vocabulary)."""
        return make_group(self.group).order

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the group's elements: ``1 / |G|``."""
        return 1.0 / make_group(self.group).order


@dataclass
class StateTrackingData:
    """A batch of word problems.

    Attributes:
        input_ids: int64 ``[N, k]``, element indices.
        labels: int64 ``[N, k]``, prefix products (-100 at unlabelled positions).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def prefix_products(group: FiniteGroup, elements: np.ndarray) -> np.ndarray:
    """Running products ``y_t = x_1 · ... · x_t`` along the last axis: int64 ``[..., k] -> [..., k]``."""
    x = np.asarray(elements, dtype=np.int64)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"elements must have a non-empty last axis, got shape {x.shape}")
    if x.min() < 0 or x.max() >= group.order:
        raise ValueError(f"element ids must lie in [0, {group.order}) for {group.name}")
    y = np.empty_like(x)
    y[..., 0] = x[..., 0]
    for t in range(1, x.shape[-1]):  # vectorised over the batch; sequential over k (k is small)
        y[..., t] = group.table[y[..., t - 1], x[..., t]]
    return y


def generate_word_problems(
    config: StateTrackingConfig, num_examples: int, seed: int, epoch: int = 0
) -> StateTrackingData:
    """Sample ``num_examples`` sequences of i.i.d. uniform group elements and their prefix products.

    Returns:
        :class:`StateTrackingData`, ``input_ids``/``labels`` int64 ``[N, k]``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    group = make_group(config.group)
    rng = make_rng(seed, epoch)
    x = rng.integers(0, group.order, size=(int(num_examples), config.seq_len), dtype=np.int64)
    y = prefix_products(group, x)
    if not config.label_all_prefixes:
        y[:, :-1] = IGNORE_INDEX
    return StateTrackingData(torch.from_numpy(x), torch.from_numpy(y))


def state_tracking_report(logits_or_predictions: torch.Tensor, labels: torch.Tensor, threshold: float = 0.95) -> dict:
    """Accuracy per length ``{k: acc}``, overall labelled accuracy, and the longest prefix length
    ``k*`` such that every length ``<= k*`` is above ``threshold`` (``0`` if length 1 is not)."""
    per_len = accuracy_per_length(logits_or_predictions, labels)
    longest: Optional[int] = 0
    for k in sorted(per_len):
        if per_len[k] > threshold and k == longest + 1:
            longest = k
        else:
            break
    return {
        "accuracy": labelled_accuracy(logits_or_predictions, labels),
        "per_length": per_len,
        "solved_up_to": longest,
    }
