"""Scorers shared by the evaluation tasks.

Two families:

* token-level scorers for synthetic sequence tasks (MQAR, state tracking): accuracy on labelled
  positions, given either logits ``[N, T, V]`` or predicted ids ``[N, T]`` and labels ``[N, T]``
  with ``ignore_index`` (-100) at unlabelled positions;
* text scorers for generation tasks (arithmetic, passkey): exact match of a generated string and
  robust parsing of a GSM8K-style final answer ``#### N``.

Every function validates its input and raises ``ValueError``/``TypeError`` naming what it expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch

from ..labels import IGNORE_INDEX

ArrayLike = Union[torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------------------------
# token-level scorers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def predictions_from(logits_or_predictions: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn logits ``[..., V]`` or predicted ids ``[...]`` into predicted ids shaped like ``labels``.

    A floating-point input with one more dimension than ``labels`` is read as logits and reduced by
    argmax over its last dimension; an integer input with the same shape as ``labels`` is read as
    predicted ids. Returns ``(predictions, labels)`` as int64 tensors on the CPU.
    """
    preds = _as_tensor(logits_or_predictions, "logits_or_predictions")
    labs = _as_tensor(labels, "labels")
    if labs.is_floating_point() or labs.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labs.dtype}")
    if preds.is_floating_point():
        if preds.dim() != labs.dim() + 1 or preds.shape[:-1] != labs.shape:
            raise ValueError(
                f"logits must have shape labels.shape + (vocab,) = {tuple(labs.shape)} + (V,), got {tuple(preds.shape)}"
            )
        preds = preds.argmax(dim=-1)
    elif preds.shape != labs.shape:
        raise ValueError(
            f"integer predictions must have the labels' shape {tuple(labs.shape)}, got {tuple(preds.shape)}"
        )
    return preds.detach().to("cpu", torch.int64), labs.detach().to("cpu", torch.int64)


def labelled_accuracy(logits_or_predictions: ArrayLike, labels: ArrayLike, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of labelled positions predicted correctly.

    Args:
        logits_or_predictions: logits ``[N, T, V]`` (argmax is taken) or predicted ids ``[N, T]``.
        labels: ``[N, T]`` int, ``ignore_index`` where nothing is scored.

    Returns:
        correct / labelled over all labelled positions (Zoology's MQAR accuracy).
    """
    preds, labs = predictions_from(logits_or_predictions, labels)
    mask = labs != ignore_index
    total = int(mask.sum())
    if total == 0:
        raise ValueError("labels contain no labelled position (all equal ignore_index)")
    return int(((preds == labs) & mask).sum()) / total


def sequence_accuracy(logits_or_predictions: ArrayLike, labels: ArrayLike, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of sequences whose labelled positions are all correct (rows with no label are skipped).

    Shapes as in :func:`labelled_accuracy`; the sequence axis is dim 0 and positions are dim 1.
    """
    preds, labs = predictions_from(logits_or_predictions, labels)
    if labs.dim() != 2:
        raise ValueError(f"labels must be [N, T], got shape {tuple(labs.shape)}")
    mask = labs != ignore_index
    has_label = mask.any(dim=1)
    if not bool(has_label.any()):
        raise ValueError("labels contain no labelled position (all equal ignore_index)")
    all_right = ((preds == labs) | ~mask).all(dim=1)
    return int((all_right & has_label).sum()) / int(has_label.sum())


def accuracy_per_position(
    logits_or_predictions: ArrayLike, labels: ArrayLike, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Accuracy at each position ``t`` over the batch: float64 ``[T]``, NaN where nothing is labelled."""
    preds, labs = predictions_from(logits_or_predictions, labels)
    if labs.dim() != 2:
        raise ValueError(f"labels must be [N, T], got shape {tuple(labs.shape)}")
    mask = labs != ignore_index
    correct = ((preds == labs) & mask).sum(dim=0).to(torch.float64)
    count = mask.sum(dim=0).to(torch.float64)
    return torch.where(count > 0, correct / count.clamp_min(1), torch.full_like(count, math.nan))


def accuracy_per_length(
    logits_or_predictions: ArrayLike, labels: ArrayLike, ignore_index: int = IGNORE_INDEX
) -> dict[int, float]:
    """State-tracking view of :func:`accuracy_per_position`: ``{k: accuracy of the length-k prefix product}``.

    Position ``t`` (0-based) holds the product of the first ``k = t + 1`` elements; positions with no
    label are left out.
    """
    acc = accuracy_per_position(logits_or_predictions, labels, ignore_index)
    return {t + 1: float(a) for t, a in enumerate(acc.tolist()) if not math.isnan(a)}


def min_depth_reaching(
    results: Mapping[int, Union[float, Mapping[int, float]]], threshold: float = 0.95
) -> Union[Optional[int], dict[int, Optional[int]]]:
    """Smallest depth (number of layers) whose accuracy is strictly above ``threshold``.

    Args:
        results: ``{num_layers: accuracy}`` or ``{num_layers: {length k: accuracy}}`` (as returned by
            :func:`accuracy_per_length` for a model of that depth).
        threshold: accuracy to exceed (Illusion of State uses 0.95).

    Returns:
        For scalar results, the smallest depth above the threshold or ``None`` if no depth reaches it.
        For per-length results, ``{k: smallest depth or None}`` for every length seen at any depth
        (the literature's "minimum number of layers reaching > 95% at each k").
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping {num_layers: accuracy or {k: accuracy}}")
    for depth in results:
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
            raise TypeError(f"results keys must be non-negative int depths, got {depth!r}")
    values = list(results.values())
    if all(isinstance(v, Mapping) for v in values):
        lengths = sorted({int(k) for v in values for k in v})
        out: dict[int, Optional[int]] = {}
        for k in lengths:
            passing = [int(d) for d, v in results.items() if k in v and float(v[k]) > threshold]
            out[k] = min(passing) if passing else None
        return out
    if any(isinstance(v, Mapping) for v in values):
        raise TypeError("results must be all scalars or all {k: accuracy} mappings, not a mix")
    passing = [int(d) for d, v in results.items() if float(v) > threshold]
    return min(passing) if passing else None


# --------------------------------------------------------------------------------------------
# text scorers
# --------------------------------------------------------------------------------------------

_FINAL_RE = re.compile(r"####\s*([-+]?\s*[\d,]*\.?\d+)")
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def truncate_at(text: str, stop: Optional[Union[str, Sequence[str]]]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string; unchanged if none."""
    if stop is None:
        return text
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = len(text)
    for s in stops:
        if not s:
            raise ValueError("stop strings must be non-empty")
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def normalize_text(text: str) -> str:
    """Strip the ends and collapse runs of whitespace to one space."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, stop: Optional[Union[str, Sequence[str]]] = "\n") -> bool:
    """Whole-answer match: the generation up to the first ``stop`` equals the reference, both
    whitespace-normalised (a model that keeps generating after its answer line is not penalised)."""
    return normalize_text(truncate_at(prediction, stop)) == normalize_text(reference)


def _to_number(token: str) -> Union[int, float]:
    token = token.replace(",", "").replace(" ", "")
    if token in {"", "+", "-", "."}:
        raise ValueError(token)
    value = float(token)
    return int(value) if value.is_integer() and "." not in token else value


def parse_final_number(text: str, fallback_last_number: bool = False) -> Optional[Union[int, float]]:
    """The number after the first ``####`` in ``text`` (GSM8K answer format), or ``None``.

    Tolerates ``#### 1,234``, ``####-3``, ``#### 8.`` and trailing text. With
    ``fallback_last_number`` a text without ``####`` yields its last number instead (lm-eval's
    "flexible-extract"); by default such a text yields ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    m = _FINAL_RE.search(text)
    if m is not None:
        try:
            return _to_number(m.group(1))
        except ValueError:
            return None
    if fallback_last_number:
        numbers = _NUMBER_RE.findall(text)
        for tok in reversed(numbers):
            try:
                return _to_number(tok)
            except ValueError:
                continue
    return None


def final_number_match(prediction: str, reference: str, fallback_last_number: bool = False) -> bool:
    """True when the ``#### N`` number of the prediction equals that of the reference."""
    ref = parse_final_number(reference)
    if ref is None:
        raise ValueError(f"reference has no '#### N' final answer: {reference!r}")
    pred = parse_final_number(prediction, fallback_last_number=fallback_last_number)
    return pred is not None and pred == ref


def mean(values: Sequence[Union[bool, float]]) -> float:
    """Arithmetic mean of a non-empty sequence (bools count as 0/1)."""
    if len(values) == 0:
        raise ValueError("cannot average an empty sequence")
    return float(sum(float(v) for v in values) / len(values))
