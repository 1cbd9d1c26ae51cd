"""Ablations of a trained WuNeng model: its state heads zeroed at evaluation, and their learned magnitudes.

- :func:`state_heads_zeroed`: a context manager under which every
  :class:`~wuneng.layers.hybrid.HybridMixer` of a model computes with Y = 0 (the state heads' output) wherever Y
  is used: the query modulation ``q_h + lambda_h (Y_h W^state)`` (then q_h itself), the fusion with the attention
  output A (gate: ``(1 - gamma rho) A``, add: A, concat: no ``Y W^O_s`` term, hymba: ``RMSNorm_a(A) / 2``) and the
  middle heads (``s A``). The state itself (token shift, WKV state,
  v_first) still advances, so decoding with a cache stays consistent with the full forward.
- :func:`state_head_magnitudes`: per converted layer, the parameters that scale Y: mean and max ``|lambda|``,
  mean ``|rho|`` (gate), mean ``|beta|`` (add), mean ``|W^O_s|`` (concat), mean ``|W^O_m|`` (middle heads).

The accuracy drop under :func:`state_heads_zeroed` measures how much a trained model relies on its state heads
(``wuneng bench-arch`` reports it per WuNeng variant).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from wuneng.layers.hybrid import ARWKVMixer, HybridMixer

logger = logging.getLogger(__name__)

__all__ = ["state_heads_zeroed", "state_head_magnitudes"]

# The two methods of HybridMixer that produce Y (every path of ``HybridMixer._run`` takes its Y from one of them):
# ``state_heads`` (training-mode and no-grad forward) returns (Y, ...), ``_state_one_token`` (the fused one-token
# decoding step) returns (Y, ...) or None when the kernel does not serve the call.
_Y_SOURCES = ("state_heads", "_state_one_token")


def _with_zero_y(produce):
    """``produce`` (a bound Y source) with its Y [B,T,H_q,d] replaced by zeros of the same shape, dtype, device."""

    def zeroed(*args, **kwargs):
        out = produce(*args, **kwargs)
        if out is None:  # the fused kernel declined: _run falls back to state_heads (also zeroed)
            return None
        return (torch.zeros_like(out[0]), *out[1:])

    return zeroed


@contextmanager
def state_heads_zeroed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run every WuNeng hybrid mixer of ``model`` with its state-head output Y = 0, on every path (training-mode
    forward, no-grad prefill, fused one-token decoding); the model is restored exactly on exit, also when the
    body raises. Contexts nest. Yields ``model``.

    Mechanism: instance-level overrides of the two methods that return Y (``state_heads`` and
    ``_state_one_token``), wrapping the originals and replacing their Y by zeros; on exit each instance attribute
    is removed (or the previous one put back), so the class methods serve again. Why this and not something else:
    the Y sources are the single point every use of Y (query modulation, fusion, middle heads) reads from, so
    nothing downstream needs to know; zeroing parameters instead is not equivalent (the middle heads mix
    ``(1 - s) Y`` with no parameter that removes Y alone, and hymba's ``RMSNorm(Y)`` has none either); forward
    hooks cannot reach Y, which lives inside the mixer's forward; and no parameter or buffer changes, so the
    weights (and the per-session plans keyed on them) are untouched.

    Raises ValueError when ``model`` has no hybrid mixer (nothing would be ablated)."""
    targets = [m for m in model.modules() if isinstance(m, HybridMixer)]
    if not targets:
        raise ValueError(
            f"state_heads_zeroed: {type(model).__name__} has no WuNeng hybrid mixer (HybridMixer); "
            "pass a WuNeng model with hybrid layers"
        )
    saved: list[tuple[HybridMixer, str, bool, object]] = []
    try:
        for mixer in targets:
            for name in _Y_SOURCES:
                had = name in mixer.__dict__
                saved.append((mixer, name, had, mixer.__dict__.get(name)))
                # plain attribute (not a Module/Parameter): nn.Module.__setattr__ puts it in the instance __dict__
                mixer.__dict__[name] = _with_zero_y(getattr(mixer, name))
        logger.debug("state heads zeroed in %d hybrid mixers", len(targets))
        yield model
    finally:
        for mixer, name, had, previous in reversed(saved):
            if had:
                mixer.__dict__[name] = previous
            else:
                mixer.__dict__.pop(name, None)


def _mean_abs(t: torch.Tensor) -> float:
    return float(t.detach().to(torch.float64).abs().mean())


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().to(torch.float64).abs().max())


def state_head_magnitudes(model: torch.nn.Module) -> list[dict]:
    """The learned parameters that scale the state heads' output, per converted layer, in layer order.

    Returns one dict per mixer: ``{"layer": index, "kind": "hybrid" | "arwkv", "fusion": the fusion (None for
    ARWKV)}``, and for hybrid layers ``lambda_mean_abs`` / ``lambda_max_abs`` (mean and max of ``|lambda|`` over
    the H_q heads; None without the state-query modulation), plus by fusion: ``rho_mean_abs`` (gate: mean
    ``|rho|`` over [H_q, d]), ``beta_mean_abs`` (add: mean ``|beta|``), ``o_state_mean_abs`` (concat: mean
    ``|W^O_s|``); hymba and none have no such parameter; ``o_middle_mean_abs``: mean ``|W^O_m|`` of the middle heads
    (their ``(1 - s) Y`` enters the output through it; None without middle heads). Layers that kept plain attention
    are not listed."""
    out: list[dict] = []
    for module in model.modules():
        if isinstance(module, ARWKVMixer):
            out.append({"layer": int(module.layer_idx), "kind": "arwkv", "fusion": None})
        elif isinstance(module, HybridMixer):
            row: dict = {"layer": int(module.layer_idx), "kind": "hybrid", "fusion": module.fusion}
            scale: Optional[torch.Tensor] = module.state_query_scale if module.state_query else None
            row["lambda_mean_abs"] = None if scale is None else _mean_abs(scale)
            row["lambda_max_abs"] = None if scale is None else _max_abs(scale)
            if module.fusion == "gate":
                row["rho_mean_abs"] = _mean_abs(module.gate_scale)
            elif module.fusion == "add":
                row["beta_mean_abs"] = _mean_abs(module.fusion_beta)
            elif module.fusion == "concat":
                row["o_state_mean_abs"] = _mean_abs(module.o_state.weight)
            row["o_middle_mean_abs"] = _mean_abs(module.o_middle.weight) if module.num_middle_heads > 0 else None
            out.append(row)
    return sorted(out, key=lambda r: r["layer"])
