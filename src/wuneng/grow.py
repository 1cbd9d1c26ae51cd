"""Meta-State progressive scaling (SPEC section 4): grow the WKV state (more heads) and the parameter tokens of
a trained :class:`~wuneng.MetaStateForCausalLM` without changing what it computes, then keep training.

The rule is one line: **the grown model is a fresh model at the new sizes (SPEC section 2 initialisation),
into which every old tensor is copied as the leading block.** Per tensor that gives exactly SPEC section 4:

=======================================  ====================================  ===================================
tensor                                   new part                              why the function is unchanged
=======================================  ====================================  ===================================
W_r, W_k, W_v  [A', C]                   new rows: orthogonal init             only feed the new heads
w0, a0, v0, k_k, k_a [A'], r_k [H', N]   section-2 values of the new channels  per channel / per head
LoRA outputs w2, a2, v2, g2 [D, A']      new columns: orthogonal, gain 0.1     only feed the new channels
ln_x (GroupNorm, H' groups)              weight ((l+1)/L)^0.7, bias 0          per-head normalisation
W_o [C, A']                              new columns: **zero**                 new heads add nothing
eta [H', N]                              **zero**                              new heads add nothing to the SSE
K_P [M', C]                              new rows: orthogonal, gain 1          (mean squared row norm 1, as at init)
V_P [M', C]                              new rows: **zero**                    new tokens add nothing
=======================================  ====================================  ===================================

The value residual keeps working: v_first grows with A, and its new channels (layer 0's new heads) only mix
into the new channels of later layers. Everything that the old heads compute is untouched because heads are
independent (per-head state, per-head L2 normalisation, per-head GroupNorm, per-head bonus); the new heads'
outputs and the new tokens' values meet the residual stream only through zero columns / rows, which still get
gradients, so the grown model trains from where it was.

Sparse routing (``moe_groups`` > 1): new parameter tokens are appended to every group equally (token j of
group g stays in group g). Routing ranks groups by their mean relu^2 score, which the new tokens change, so
with routing on the growth of parameter tokens is not exact (dense, the default, is).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .saving import check_model_folder, check_output_dir, save_pretrained_atomic

__all__ = ["grow_model", "grow_checkpoint", "state_report", "StateReport"]


def _check_size(name: str, value, current: int) -> int:
    if value is None:
        return current
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"grow: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < current:
        raise ValueError(
            f"grow: cannot shrink {name} from {current} to {value}; growth only adds (use a value >= {current})"
        )
    return value


def _metastate_model(model):
    from .models.metastate import MetaStateForCausalLM

    if not isinstance(model, MetaStateForCausalLM):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise TypeError(
            f"grow: expected a MetaStateForCausalLM (model_type 'wuneng_metastate'), got {type(model).__name__}"
            + (f" (model_type {model_type!r})" if model_type else "")
            + "; only Meta-State models can be grown"
        )
    return model


@torch.no_grad()
def _copy_leading_block(new: torch.Tensor, old: torch.Tensor, name: str, groups: int = 1) -> None:
    """new[:old.shape] = old (dim 0 split into ``groups`` contiguous groups that each keep their leading rows)."""
    if new.dim() != old.dim() or any(n < o for n, o in zip(new.shape, old.shape)):
        raise ValueError(f"grow: {name} cannot grow from {tuple(old.shape)} to {tuple(new.shape)}")
    if groups > 1:
        new, old = new.unflatten(0, (groups, -1)), old.unflatten(0, (groups, -1))
    new[tuple(slice(0, s) for s in old.shape)] = old.to(new.dtype)


def grow_model(
    model, num_heads: Optional[int] = None, num_param_tokens: Optional[int] = None, *, seed: Optional[int] = None
):
    """Grow a Meta-State model's WKV heads (state width H N -> H' N) and/or parameter tokens (M -> M').

    Args:
        model: a :class:`~wuneng.MetaStateForCausalLM`.
        num_heads: new head count H' >= H per layer (None: unchanged). Any count is allowed: heads beyond
            C / N reuse the Self-State Encoder's width blocks (c(h) = h mod C / N).
        num_param_tokens: new parameter-token count M' >= M (None: unchanged); a multiple of ``moe_groups``.
        seed: seed for the random initialisation of the new rows (None: the global generator).

    Returns:
        A new model (same dtype, device and train/eval mode; ``config.num_heads`` and
        ``config.num_param_tokens`` updated) computing the same logits as ``model`` up to float32 round-off.
        The input model is left unchanged.
    """
    model = _metastate_model(model)
    cfg = model.config
    heads = _check_size("num_heads", num_heads, cfg.num_heads)
    tokens = _check_size("num_param_tokens", num_param_tokens, cfg.num_param_tokens)
    if tokens % cfg.moe_groups != 0:
        raise ValueError(f"grow: num_param_tokens={tokens} must be a multiple of moe_groups={cfg.moe_groups}")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_heads, new_cfg.num_param_tokens = heads, tokens
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        grown = type(model)(new_cfg)
    grown.to(device=param.device, dtype=param.dtype)
    old_state = model.state_dict()
    new_state = grown.state_dict()
    if set(old_state) != set(new_state):
        raise ValueError(f"grow: parameter names differ: {sorted(set(old_state) ^ set(new_state))[:6]}")
    for name, new_tensor in new_state.items():
        groups = cfg.moe_groups if name.endswith(("param_keys", "param_values")) else 1
        _copy_leading_block(new_tensor, old_state[name], name, groups)
    grown.train(model.training)
    return grown


@dataclass
class StateReport:
    """Recurrent state size of a Meta-State (or RWKV-7) model: H * N * N WKV entries per layer."""

    per_layer: List[int]
    num_heads: int
    head_size: int
    num_param_tokens: Optional[int]
    num_parameters: int

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    def __str__(self) -> str:
        N, H = self.head_size, self.num_heads
        lines = [f"{'layer':>5}  {'heads':>5}  {'states (H*N*N)':>15}"]
        lines += [f"{i:>5}  {H:>5}  {s:>15,}" for i, s in enumerate(self.per_layer)]
        lines.append(
            f"{'total':>5}  {'':>5}  {self.total:>15,}   (head size {N}, {self.total * 4 / 2**20:.2f} MiB fp32)"
        )
        if self.num_param_tokens is not None:
            lines.append(f"parameter tokens per layer: {self.num_param_tokens:,}; parameters: {self.num_parameters:,}")
        return "\n".join(lines)


def state_report(model) -> StateReport:
    """Per-layer and total WKV state size of ``model`` (a Meta-State or RWKV-7 causal LM)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "head_size") or not hasattr(cfg, "num_hidden_layers"):
        raise TypeError(
            f"state_report: expected a Meta-State or RWKV-7 model with a config, got {type(model).__name__}"
        )
    H, N = int(cfg.num_heads), int(cfg.head_size)
    return StateReport(
        per_layer=[H * N * N] * cfg.num_hidden_layers,
        num_heads=H,
        head_size=N,
        num_param_tokens=getattr(cfg, "num_param_tokens", None),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


# Files of a checkpoint folder that are not the model (copied to the grown one unchanged).
def load_metastate_checkpoint(path: str):
    """A ``save_pretrained`` folder holding a Meta-State model -> MetaStateForCausalLM (clear errors otherwise)."""
    from transformers import AutoConfig

    from .models.metastate import MetaStateConfig, MetaStateForCausalLM

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} is not a model folder (expected config.json + model.safetensors from save_pretrained)"
        )
    import wuneng.models  # noqa: F401  (registers every wuneng model_type with AutoConfig)

    check_model_folder(path)  # one line naming an unreadable config.json / model.safetensors or a mismatch
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{path!r}: cannot read its config.json ({err})") from None
    if not isinstance(config, MetaStateConfig):
        raise TypeError(
            f"{path!r} holds a {getattr(config, 'model_type', '?')!r} model; only Meta-State checkpoints "
            f"(model_type {MetaStateConfig.model_type!r}) can be grown"
        )
    return MetaStateForCausalLM.from_pretrained(path, config=config)


def grow_checkpoint(
    path: str,
    out_dir: str,
    num_heads: Optional[int] = None,
    num_param_tokens: Optional[int] = None,
    *,
    overwrite: bool = False,
    seed: Optional[int] = None,
):
    """Load a Meta-State checkpoint folder, :func:`grow_model` it, and save the result to ``out_dir``.

    The folder is assembled beside ``out_dir`` and moved into place (an interrupted run leaves the old or the new
    folder whole, :mod:`wuneng.saving`); tokenizer files of ``path`` are copied along. ``overwrite`` replaces only
    a wuneng model folder, and ``out_dir`` may not be, hold or lie inside ``path``. Returns (old model, grown model).
    """
    check_output_dir(out_dir, overwrite, inputs=[path])  # fail before the work; never over the input
    model = load_metastate_checkpoint(path)
    grown = grow_model(model, num_heads=num_heads, num_param_tokens=num_param_tokens, seed=seed)
    save_pretrained_atomic(grown, out_dir, overwrite=overwrite, tokenizer_from=path)
    return model, grown
