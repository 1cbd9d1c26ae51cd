"""Sliding-window perplexity for any causal LM whose forward returns ``.logits`` (HF style).

The stream of ``L`` tokens is cut into windows of ``context_length`` tokens starting every
``stride`` tokens (the Hugging Face "perplexity of fixed-length models" recipe). Every token
``1 .. L-1`` is scored exactly once, by the first window that contains it after the previous
window's end, so with ``stride < context_length`` each scored token sees at least
``context_length - stride`` tokens of context (see :func:`window_plan`). Token 0 has no
prediction and is never scored.

    nll = (1 / #scored) * sum_i -log p(x_i | x_{window(i) start .. i-1}),    ppl = exp(nll)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from wuneng.eval._model import evaluating, model_device

TokenIds = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]], Sequence[torch.Tensor]]


@dataclass
class PerplexityResult:
    """Attributes: ``nll`` mean negative log-likelihood per scored token (nats), ``ppl = exp(nll)``,
    ``num_tokens`` scored tokens."""

    nll: float
    ppl: float
    num_tokens: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise TypeError("tokenizer must be callable (str -> ids) or have .encode")
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _streams(
    token_ids: Optional[TokenIds], texts: Optional[Sequence[str]], tokenizer: Any, concatenate: bool, separator: str
) -> list[torch.Tensor]:
    if (token_ids is None) == (texts is None):
        raise ValueError("pass exactly one of token_ids or texts (with tokenizer)")
    if texts is not None:
        if tokenizer is None:
            raise ValueError("texts need a tokenizer (a callable str -> ids, or an object with .encode)")
        if isinstance(texts, str):
            texts = [texts]
        if concatenate:
            return [torch.tensor(_encode(tokenizer, separator.join(texts)), dtype=torch.long)]
        return [torch.tensor(_encode(tokenizer, t), dtype=torch.long) for t in texts]
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 1:
            return [token_ids.long()]
        if token_ids.dim() == 2:
            return [row.long() for row in token_ids]
        raise ValueError(f"token_ids tensor must be [L] or [N, L], got shape {tuple(token_ids.shape)}")
    seqs = list(token_ids)
    if seqs and all(isinstance(s, (int,)) for s in seqs):
        return [torch.tensor(seqs, dtype=torch.long)]
    return [torch.as_tensor(s, dtype=torch.long) for s in seqs]


def window_plan(length: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` over a stream of ``length`` tokens.

    The window feeds tokens ``[begin, end)`` and scores tokens ``[first_scored, end)``. The first
    window is ``[0, min(W, L))`` and scores tokens ``1 ..``; each later window scores the next
    ``stride`` tokens and ends on the last of them, starting ``W`` tokens earlier, so every scored
    token sees at least ``W - stride`` tokens of context. Across windows the scored ranges tile
    ``[1, length)``. (This is the Hugging Face recipe, except that the final window keeps the full
    ``W`` tokens instead of shrinking, which gives its tokens more context.)
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if not 1 <= stride < context_length:
        raise ValueError(
            f"stride must lie in [1, context_length - 1] = [1, {context_length - 1}] so that every scored token "
            f"has context (context_length - 1 gives almost disjoint windows), got {stride}"
        )
    if length < 2:
        return []
    end = min(context_length, length)
    plan = [(0, end, 1)]
    while end < length:
        prev_end, end = end, min(end + stride, length)
        plan.append((end - context_length, end, prev_end))
    return plan


@torch.no_grad()
def perplexity(
    model: Callable[..., Any],
    token_ids: Optional[TokenIds] = None,
    *,
    texts: Optional[Sequence[str]] = None,
    tokenizer: Any = None,
    context_length: int = 1024,
    stride: Optional[int] = None,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    concatenate: bool = True,
    separator: str = "\n\n",
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on a token stream (or on texts through a tokenizer).

    Args:
        model: callable ``model(input_ids=[B, W]) -> object with .logits [B, W, V]`` (HF causal LM).
        token_ids: one stream ``[L]`` (tensor or list of ints) or several (``[N, L]`` tensor or a list of
            sequences), each evaluated independently.
        texts, tokenizer: alternatively, texts and a tokenizer (``.encode`` or a callable ``str -> ids``).
            With ``concatenate`` (default) the texts are joined with ``separator`` into one stream.
        context_length: window length W.
        stride: new tokens scored per window after the first (default ``context_length // 2``); must be
            in ``[1, context_length - 1]``.
        batch_size: windows of equal length per forward pass.
        device: where to run (default: the model's parameters' device, else CPU).

    Returns:
        :class:`PerplexityResult` (mean NLL per scored token, its exp, and the token count).
    """
    stride = max(1, context_length // 2) if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    streams = _streams(token_ids, texts, tokenizer, concatenate, separator)
    device = model_device(model, device)
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    with evaluating(model):
        # group windows of equal length (full windows; streams shorter than W give one short window)
        by_len: dict[int, list[tuple[torch.Tensor, int]]] = {}
        for ids in streams:
            if ids.dim() != 1:
                raise ValueError(f"each token stream must be 1-D, got shape {tuple(ids.shape)}")
            for begin, end, first in window_plan(int(ids.numel()), context_length, stride):
                by_len.setdefault(end - begin, []).append((ids[begin:end], first - begin))
        for windows in by_len.values():
            for i in range(0, len(windows), batch_size):
                chunk = windows[i : i + batch_size]
                inputs = torch.stack([w for w, _ in chunk]).to(device)  # [B, W]
                logits = model(input_ids=inputs).logits  # [B, W, V]
                if logits.shape[:2] != inputs.shape:
                    raise ValueError(f"model returned logits {tuple(logits.shape)} for inputs {tuple(inputs.shape)}")
                # position t predicts token t+1; keep only targets at or after each window's first scored token
                targets = inputs[:, 1:].clone()
                for row, (_, offset) in enumerate(chunk):
                    targets[row, : offset - 1] = -100
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total_nll += nll.cpu()
                total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ValueError("nothing to score: every stream has fewer than 2 tokens")
    mean_nll = float(total_nll) / total_tokens
    return PerplexityResult(mean_nll, math.exp(mean_nll), total_tokens)
