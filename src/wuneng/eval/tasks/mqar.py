"""MQAR: multi-query associative recall (Zoology, Arora, Eyuboglu et al. 2023, arXiv 2312.04927).

The definition follows ``zoology/data/multiquery_ar.py`` (``multiquery_ar``, ``num_passes=1``):

* vocabulary ``V`` (Zoology default 8192); keys are drawn from ``[1, V/2)``, values from ``[V/2, V)``;
  each example uses ``n`` distinct keys and ``n`` distinct values (without replacement);
* the context is ``K1 V1 K2 V2 ... Kn Vn`` (``2n`` tokens); the remaining ``T - 2n`` tokens form the
  query region;
* every key appears once as a query, at position ``2n + 2*gap`` where the gaps are drawn without
  replacement from ``{0, ..., S-1}`` (``S = (T - 2n) // 2``) with probability ``p_i ∝ a * (i+1)**(a-1)``
  (power law, ``a = power_a = 0.01``); the j-th key of the context gets the j-th gap drawn;
* the label at a query position is that key's value (the model sees the key and must emit the value
  at the same position); all other labels are -100;
* every other token of the query region is filler: uniform over ``[0, V)`` by default (Zoology's
  ``random_non_queries=True``), or 0 (``filler="zero"``, Zoology's figure-2 setting).

Zoology asserts ``V > T`` and ``4n <= T``; so do we, with a ValueError.

Vectorised: distinct keys/values by rejection (redrawing only rows with a repeat) and the weighted
gaps without replacement by Gumbel-top-k, which has the same joint law (set and order) as numpy's
sequential ``choice(replace=False, p=p)``. 20 k examples of (T, n) = (64, 4) take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from wuneng.eval.scoring import IGNORE_INDEX, labelled_accuracy


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting.

    Attributes:
        vocab_size: V, total token vocabulary (keys use [1, V/2), values [V/2, V)). Zoology: 8192.
        seq_len: T, tokens per example. Zoology settings (T, n): (64, 4), (128, 8), (256, 16).
        num_kv_pairs: n, key-value pairs per example (every key is queried once).
        power_a: a, power-law exponent of the query gaps (p_i ∝ a * i**(a-1)); 1.0 is uniform.
        filler: "random" (uniform over [0, V), Zoology's default) or "zero".
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    filler: Literal["random", "zero"] = "random"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MQARConfig.{name} must be a positive int, got {value!r}")
        if not self.vocab_size > self.seq_len:
            raise ValueError(
                f"MQAR needs vocab_size > seq_len (Zoology's assert), got V={self.vocab_size}, T={self.seq_len}"
            )
        if not 4 * self.num_kv_pairs <= self.seq_len:
            raise ValueError(
                f"MQAR needs 4 * num_kv_pairs <= seq_len (context 2n plus a query region of >= 2n), "
                f"got n={self.num_kv_pairs}, T={self.seq_len}"
            )
        if not self.power_a > 0:
            raise ValueError(f"MQARConfig.power_a must be > 0, got {self.power_a}")
        if self.filler not in ("random", "zero"):
            raise ValueError(f"MQARConfig.filler must be 'random' or 'zero', got {self.filler!r}")

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the ``V - V//2`` value tokens (the labels are values):
        ``1 / (V - V//2)``."""
        return 1.0 / (self.vocab_size - self.vocab_size // 2)

    @property
    def num_gap_slots(self) -> int:
        """S = (T - 2n) // 2, the number of possible query slots (even offsets in the query region)."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probabilities(self) -> np.ndarray:
        """Power law over gap slots ``i = 0..S-1``: ``p_i ∝ a * (i + 1) ** (a - 1)``, float64 ``[S]``."""
        a = self.power_a
        p = a * np.arange(1, self.num_gap_slots + 1, dtype=np.float64) ** (a - 1.0)
        return p / p.sum()


@dataclass
class MQARData:
    """A batch of MQAR examples.

    Attributes:
        input_ids: int64 ``[N, T]``.
        labels: int64 ``[N, T]``; the value at each query position, -100 elsewhere (n per row).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def make_rng(seed: int, epoch: int = 0) -> np.random.Generator:
    """numpy Generator for (seed, epoch): a fresh, independent stream per epoch.

    ``SeedSequence([seed, epoch])`` mixes both numbers, so (seed=0, epoch=1) and (seed=1, epoch=0)
    give unrelated data (a plain ``seed + epoch`` would collide).
    """
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def sample_distinct_rows(rng: np.random.Generator, num_rows: int, low: int, high: int, k: int) -> np.ndarray:
    """Uniform random ordered k-subsets of ``[low, high)``, one per row: int64 ``[num_rows, k]``.

    Small k relative to the pool: draw with replacement and redraw rows that repeat a value (exact
    rejection sampling). Large k: Gumbel-top-k over the whole pool (cost ``num_rows * pool``).
    """
    pool = high - low
    if k > pool:
        raise ValueError(f"cannot draw {k} distinct values from a pool of {pool}")
    if k * k <= pool:  # collision probability per row <= ~1/2, so a few rounds suffice
        out = rng.integers(low, high, size=(num_rows, k), dtype=np.int64)
        todo = np.arange(num_rows)
        for _ in range(200):
            s = np.sort(out[todo], axis=1)
            bad = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)] if k > 1 else todo[:0]
            if bad.size == 0:
                return out
            out[bad] = rng.integers(low, high, size=(bad.size, k), dtype=np.int64)
            todo = bad
        # pathological luck: finish the stragglers exactly with the top-k method
        out[todo] = low + _uniform_topk(rng, todo.size, pool, k)
        return out
    return low + _uniform_topk(rng, num_rows, pool, k)


def _uniform_topk(rng: np.random.Generator, num_rows: int, pool: int, k: int) -> np.ndarray:
    """k distinct indices of ``range(pool)`` per row, uniformly random set and order: ``[num_rows, k]``.

    The k smallest of iid uniforms form a uniform k-subset; sorting them by value gives a uniform order.
    """
    u = rng.random((num_rows, pool))
    top = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(u, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def _random_topk(rng: np.random.Generator, log_weights: np.ndarray, k: int) -> np.ndarray:
    """Gumbel-top-k: k indices per row drawn without replacement with probabilities ∝ exp(log_weights),
    in draw order (same law as sequential sampling without replacement). ``[R, P] -> [R, k]``."""
    scores = log_weights + rng.gumbel(size=log_weights.shape)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def generate_mqar(config: MQARConfig, num_examples: int, seed: int, epoch: int = 0) -> MQARData:
    """Generate ``num_examples`` MQAR examples.

    Args:
        config: the setting (V, T, n, power_a, filler).
        num_examples: N.
        seed: base seed; use different seeds for train and test.
        epoch: pass the epoch number to get fresh training data every epoch from one seed.

    Returns:
        :class:`MQARData` with ``input_ids`` and ``labels``, int64 ``[N, T]``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    rng = make_rng(seed, epoch)
    n_ex, T, n, V = int(num_examples), config.seq_len, config.num_kv_pairs, config.vocab_size
    half = V // 2
    keys = sample_distinct_rows(rng, n_ex, 1, half, n)  # [N, n], Zoology: keys in [1, V/2)
    values = sample_distinct_rows(rng, n_ex, half, V, n)  # [N, n], values in [V/2, V)
    log_p = np.log(config.gap_probabilities())
    gaps = _random_topk(rng, np.broadcast_to(log_p, (n_ex, log_p.size)), n)  # [N, n], j-th key -> j-th gap

    if config.filler == "random":
        inputs = rng.integers(0, V, size=(n_ex, T), dtype=np.int64)
    else:
        inputs = np.zeros((n_ex, T), dtype=np.int64)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    query_pos = 2 * n + 2 * gaps  # [N, n]
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n_ex, T), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    return MQARData(torch.from_numpy(inputs), torch.from_numpy(labels))


def mqar_accuracy(logits_or_predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """MQAR accuracy: fraction of query positions whose value is predicted (logits ``[N, T, V]`` or ids ``[N, T]``)."""
    return labelled_accuracy(logits_or_predictions, labels)
