"""Key mapping between BlinkDL RWKV-LM x070 ``.pth`` state dicts and :class:`RWKV7ForCausalLM`.

Our module tree keeps RWKV-LM's names, so the mapping is: RWKV-LM ``K`` <-> ours ``model.K``, except
``head.weight`` (the same name in both), and the per-channel vectors that RWKV-LM stores as [1, 1, C]
(``att.x_r ... att.x_g``, ``att.w0/a0/v0``, ``att.k_k/k_a``, ``ffn.x_k``) are flat [C] here.

RWKV-LM names per layer i (implementations.md 1.2): ``blocks.i.ln1/ln2.{weight,bias}``, ``blocks.0.ln0.*``,
``blocks.i.att.{x_r,x_w,x_k,x_v,x_a,x_g,w0,w1,w2,a0,a1,a2,v0,v1,v2,g1,g2,k_k,k_a,r_k}``,
``blocks.i.att.{receptance,key,value,output}.weight``, ``blocks.i.att.ln_x.{weight,bias}``,
``blocks.i.ffn.{x_k,key.weight,value.weight}``; ``emb.weight``, ``ln_out.*``, ``head.weight``.
``blocks.0.att.v0/v1/v2`` (unused by the first layer) are optional on import and always exported.

Everything here works on plain dicts of tensors and the config; the model classes call it.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "infer_rwkv7_config_kwargs",
    "load_rwkv_lm_state_dict",
    "rwkv_lm_to_hf_state_dict",
    "hf_to_rwkv_lm_state_dict",
    "import_rwkv_lm_checkpoint",
    "RWKV_LM_VECTOR_KEYS",
]

# Per-layer parameters stored as [1, 1, C] in RWKV-LM and [C] here.
RWKV_LM_VECTOR_KEYS = (
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k",
)  # fmt: skip
_LAYER_MATRIX_KEYS = (
    "att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2", "att.r_k",
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
    "att.ln_x.weight", "att.ln_x.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "ffn.key.weight", "ffn.value.weight",
)  # fmt: skip
# The first layer has no value residual: RWKV-LM still stores these, some exports drop them.
_OPTIONAL_LAYER0_KEYS = ("att.v0", "att.v1", "att.v2")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def load_rwkv_lm_state_dict(
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
) -> Dict[str, torch.Tensor]:
    """A path to a ``.pth`` (read with ``torch.load(weights_only=True)`` on CPU) or a state dict -> dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"RWKV-LM checkpoint not found: {path!r} (expected a .pth state dict)")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (
            Exception
        ) as err:  # truncated, corrupt, or objects weights_only refuses (UnpicklingError, RuntimeError, OSError)
            detail = " ".join(str(err).split())
            raise ValueError(
                f"{path}: not a readable RWKV-LM .pth state dict ({type(err).__name__}: {detail[:160]}"
                f"{'...' if len(detail) > 160 else ''}); it is truncated, corrupt or not a weights-only state dict: "
                "copy or save it again"
            ) from None
    else:
        sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        raise TypeError(
            f"RWKV-LM checkpoint must be a state dict (a mapping of names to tensors), got {type(sd).__name__}"
        )
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"RWKV-LM state dict must map str -> torch.Tensor; bad entries: {bad[:10]}")
    return dict(sd)


def _num_layers(sd: Mapping[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    if not idx:
        raise ValueError("RWKV-LM state dict has no 'blocks.{i}.*' keys; is this an RWKV-LM x070 checkpoint?")
    n = max(idx) + 1
    missing = sorted(set(range(n)) - idx)
    if missing:
        raise ValueError(f"RWKV-LM state dict: blocks {missing} are missing (found blocks up to {n - 1})")
    return n


def _shape(sd: Mapping[str, torch.Tensor], key: str, rank: int) -> Tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"RWKV-LM state dict: missing key {key!r}, needed to read the model sizes")
    t = sd[key]
    if t.dim() != rank:
        raise ValueError(f"RWKV-LM state dict: {key!r} must have rank {rank}, got shape {tuple(t.shape)}")
    return tuple(t.shape)


def infer_rwkv7_config_kwargs(sd: Mapping[str, torch.Tensor], **given) -> dict:
    """Read vocab_size, hidden_size, num_hidden_layers, head_size, intermediate_size and the LoRA ranks from
    the shapes of an RWKV-LM state dict. Values in ``given`` must agree with the shapes (else ValueError)."""
    vocab_size, hidden_size = _shape(sd, "emb.weight", 2)
    num_heads, head_size = _shape(sd, "blocks.0.att.r_k", 2)
    # Ranks and widths from the last layer: v1 of the first layer is optional.
    last = _num_layers(sd) - 1
    found = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": last + 1,
        "head_size": head_size,
        "intermediate_size": _shape(sd, f"blocks.{last}.ffn.key.weight", 2)[0],
        "decay_low_rank_dim": _shape(sd, f"blocks.{last}.att.w1", 2)[1],
        "a_low_rank_dim": _shape(sd, f"blocks.{last}.att.a1", 2)[1],
        "v_low_rank_dim": _shape(sd, f"blocks.{last}.att.v1", 2)[1],
        "gate_low_rank_dim": _shape(sd, f"blocks.{last}.att.g1", 2)[1],
    }
    if num_heads * head_size != hidden_size:
        raise ValueError(
            f"RWKV-LM state dict: r_k has shape [{num_heads}, {head_size}] (heads x head size), whose product must "
            f"equal the width {hidden_size} of emb.weight"
        )
    conflicts = {k: (v, found[k]) for k, v in given.items() if k in found and v is not None and v != found[k]}
    if conflicts:
        detail = ", ".join(f"{k}: given {g}, checkpoint has {c}" for k, (g, c) in conflicts.items())
        raise ValueError(f"RWKV-LM state dict disagrees with the given sizes: {detail}")
    return {**{k: v for k, v in given.items() if v is not None}, **found}


def _expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """RWKV-LM key -> shape for a config (the export layout)."""
    C, V, L, N = config.hidden_size, config.vocab_size, config.num_hidden_layers, config.head_size
    H, F = C // N, config.intermediate_size
    dw, da, dv, dg = config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim
    shapes = {"emb.weight": (V, C), "head.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,)}
    shapes.update({"blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)})
    per_layer = {
        "att.w1": (C, dw), "att.w2": (dw, C), "att.a1": (C, da), "att.a2": (da, C),
        "att.v1": (C, dv), "att.v2": (dv, C), "att.g1": (C, dg), "att.g2": (dg, C), "att.r_k": (H, N),
        "att.receptance.weight": (C, C), "att.key.weight": (C, C), "att.value.weight": (C, C),
        "att.output.weight": (C, C), "att.ln_x.weight": (C,), "att.ln_x.bias": (C,),
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "ffn.key.weight": (F, C), "ffn.value.weight": (C, F),
    }  # fmt: skip
    per_layer.update({k: (1, 1, C) for k in RWKV_LM_VECTOR_KEYS})
    for i in range(L):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def _hf_name(rwkv_key: str) -> str:
    return rwkv_key if rwkv_key == "head.weight" else f"model.{rwkv_key}"


def _is_vector_key(rwkv_key: str) -> bool:
    m = _BLOCK_RE.match(rwkv_key)
    return m is not None and rwkv_key[m.end() :] in RWKV_LM_VECTOR_KEYS


def rwkv_lm_to_hf_state_dict(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """RWKV-LM state dict -> our state dict (names prefixed, [1,1,C] vectors flattened).

    Raises ValueError listing missing keys, unexpected keys and shape mismatches, all at once.
    ``blocks.0.att.v0/v1/v2`` may be absent (the first layer does not use them).
    """
    expected = _expected_shapes(config)
    optional = {f"blocks.0.{k}" for k in _OPTIONAL_LAYER0_KEYS}
    missing = sorted(k for k in expected if k not in sd and k not in optional)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = sorted(
        f"{k}: expected {list(expected[k])}, got {list(sd[k].shape)}"
        for k in sd
        if k in expected
        and tuple(sd[k].shape) != expected[k]
        # accept flat [C] vectors too (our own layout)
        and not (_is_vector_key(k) and tuple(sd[k].shape) == expected[k][-1:])
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {wrong}")
        raise ValueError(
            f"RWKV-LM state dict does not match an RWKV-7 model with L={config.num_hidden_layers}, "
            f"C={config.hidden_size}, V={config.vocab_size}, N={config.head_size}: " + "; ".join(parts)
        )
    out = {}
    for k, t in sd.items():
        out[_hf_name(k)] = t.reshape(-1) if _is_vector_key(k) else t
    return out


def hf_to_rwkv_lm_state_dict(state_dict: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Our state dict -> RWKV-LM names and shapes ([1, 1, C] vectors), loadable by RWKV-LM and ``rwkv`` pip."""
    out = {}
    for k, shape in _expected_shapes(config).items():
        name = _hf_name(k)
        if name not in state_dict:
            raise ValueError(f"hf_to_rwkv_lm_state_dict: the model state dict has no {name!r} (for RWKV-LM {k!r})")
        t = state_dict[name]
        if t.numel() != int(torch.Size(shape).numel()):
            raise ValueError(f"hf_to_rwkv_lm_state_dict: {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        out[k] = t.detach().reshape(shape).contiguous()
    return out


def checkpoint_dtype(sd: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The single floating dtype of a state dict, or None if it mixes several."""
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def import_rwkv_lm_checkpoint(
    path: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    **config_kwargs,
):
    """Convert an RWKV-LM ``.pth`` into a transformers directory (config.json + model.safetensors).

    The directory is written beside ``out_dir`` first and moved into place, so an interrupted run leaves the old
    or the new folder whole (:mod:`wuneng.saving`). An existing non-empty ``out_dir`` is an error unless
    ``overwrite``, which replaces only a wuneng model folder; ``out_dir`` may not hold the checkpoint file.
    Returns the model.
    """
    from ...saving import check_output_dir, save_pretrained_atomic
    from .modeling_rwkv7 import RWKV7ForCausalLM

    inputs = [path] if isinstance(path, (str, os.PathLike)) else []
    check_output_dir(out_dir, overwrite, inputs)  # fail before reading the checkpoint
    model = RWKV7ForCausalLM.from_rwkv_lm(path, dtype=dtype, **config_kwargs)
    save_pretrained_atomic(model, out_dir, overwrite=overwrite, inputs=inputs)
    return model
