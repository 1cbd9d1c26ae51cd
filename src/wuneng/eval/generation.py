"""Greedy decoding for any causal LM whose forward returns ``.logits``: the simple reference used by
the generation tasks (arithmetic, passkey) when a model has no ``generate``.

Each step re-runs the model on the whole prefix (no cache), so it costs O(steps * prompt) forwards;
that is fine for short answers (an arithmetic answer, 5 passkey digits). Prompts of equal length are
batched together and never padded, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from wuneng.eval._model import evaluating, model_device


@torch.no_grad()
def greedy_generate(
    model: Callable[..., Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Optional[Union[int, Sequence[int]]] = None,
    batch_size: int = 32,
    device: Optional[Union[str, torch.device]] = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt.

    Args:
        model: callable ``model(input_ids=[B, T]) -> .logits [B, T, V]``.
        prompts: token id lists (non-empty).
        max_new_tokens: tokens to generate at most per prompt.
        stop_ids: a token (or tokens) that ends a continuation; the stop token is kept in the output.
        batch_size: prompts of equal length per forward pass.

    Returns:
        The generated ids for each prompt (without the prompt), in input order.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = (
        set() if stop_ids is None else ({int(stop_ids)} if isinstance(stop_ids, int) else {int(s) for s in stop_ids})
    )
    device = model_device(model, device)
    outputs: list[list[int]] = [[] for _ in prompts]
    with evaluating(model):
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; greedy generation needs at least one token")
            by_len.setdefault(len(p), []).append(i)
        for idx in by_len.values():
            for start in range(0, len(idx), batch_size):
                rows = idx[start : start + batch_size]
                seq = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)  # [B, T]
                done = torch.zeros(len(rows), dtype=torch.bool, device=device)
                for _ in range(max_new_tokens):
                    nxt = model(input_ids=seq).logits[:, -1].argmax(dim=-1)  # [B]
                    for r, token in enumerate(nxt.tolist()):
                        if not done[r]:
                            outputs[rows[r]].append(token)
                            if token in stops:
                                done[r] = True
                    if bool(done.all()):
                        break
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
    return outputs


def generate_text(
    model: Callable[..., Any],
    prompts: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    max_new_tokens: int,
    stop_ids: Optional[Union[int, Sequence[int]]] = None,
    batch_size: int = 32,
) -> list[str]:
    """:func:`greedy_generate` on strings: encode prompts, generate, decode the continuations."""
    ids = greedy_generate(model, [list(encode(p)) for p in prompts], max_new_tokens, stop_ids, batch_size)
    return [decode(x) for x in ids]
