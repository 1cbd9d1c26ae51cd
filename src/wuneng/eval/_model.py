"""Model handling shared by the evaluators that call a model (perplexity, greedy generation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch


def model_device(model: Any, device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else the CPU."""
    if device is not None:
        return torch.device(device)
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode (if it has one) and restore its training flag afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
