"""RWKV-7 in the Hugging Face layout of flash-linear-attention (fla-hub checkpoints) <-> :class:`RWKV7ForCausalLM`.

fla's folders hold a config.json with ``model_type`` "rwkv7" (fla's field names: ``head_dim``, ``norm_eps``,
``norm_first``, ``value_dim``, ...) and safetensors weights named ``model.embeddings.weight``,
``model.layers.{i}.{pre_norm,attn_norm,ffn_norm}.*``, ``model.layers.{i}.attn.*``, ``model.layers.{i}.ffn.*``,
``model.norm.*`` and ``lm_head.weight``. The mapping to our (RWKV-LM) names, per layer i (fla -> ours):

- ``layers.0.pre_norm`` / ``layers.i.attn_norm`` / ``ffn_norm`` -> ``blocks.0.ln0`` / ``blocks.i.ln1`` / ``ln2``;
- ``attn.x_r ... attn.x_g`` [1, 1, C] -> ``att.x_r ... att.x_g`` [C] (flattened);
- ``attn.k_k``, ``attn.k_a`` [C], ``attn.r_k`` [H, N] -> the same names;
- ``attn.{r,k,v,o}_proj.weight`` -> ``att.{receptance,key,value,output}.weight``;
- ``attn.w_lora.lora.0.weight`` [D, C] -> ``att.w1`` [C, D] and ``lora.2.weight`` [C, D] -> ``att.w2`` [D, C]
  (transposed: fla stores ``nn.Linear`` weights), ``lora.2.bias`` [C] -> ``att.w0``; ``a_lora`` -> ``a0/a1/a2``,
  ``v_lora`` (layers > 0) -> ``v0/v1/v2`` alike; ``g_lora`` -> ``g1/g2`` (no bias);
- ``attn.g_norm`` -> ``att.ln_x``; ``ffn.x_k``, ``ffn.key``, ``ffn.value`` -> the same names;
- ``model.embeddings`` / ``model.norm`` / ``lm_head`` -> ``model.emb`` / ``model.ln_out`` / ``head``.

fla's first layer has no ``v_lora`` (it produces ``v_first``); ours keeps the unused ``v0/v1/v2`` there as
RWKV-LM does: import sets them to zeros, export leaves them out. The equations are the same (fla's
``w = -e^{-1/2} sigmoid(w_lora(x_w))`` is our log decay, its ``g_norm`` our ``ln_x``); the GroupNorm epsilon is
``head_dim * norm_eps`` in fla and 64e-5 here, so a checkpoint is representable only where the two agree.
Checkpoints hold no WKV state, so the transposed state layout of fla's kernels plays no part here.

Only config.json and safetensors are read; fla itself is not needed for either direction.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "FLA_MODEL_TYPE",
    "FlaConfigError",
    "fla_key_map",
    "read_fla_folder",
    "fla_config_to_kwargs",
    "split_stacked_mixes",
    "fla_to_wuneng_state_dict",
    "wuneng_to_fla_state_dict",
    "fla_config_dict",
    "load_fla_model",
    "save_fla_folder",
    "import_fla_checkpoint",
    "export_fla_checkpoint",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FLA_MODEL_TYPE = "rwkv7"
# our ln_x (GroupNorm) epsilon; fla's is head_dim * norm_eps
_LN_X_EPS = 64e-5
_TOKEN_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
# fla LoRA module -> our (bias vector, first matrix, second matrix)
_LORAS = {
    "w_lora": ("w0", "w1", "w2"),
    "a_lora": ("a0", "a1", "a2"),
    "v_lora": ("v0", "v1", "v2"),
    "g_lora": (None, "g1", "g2"),
}
_PROJECTIONS = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
# how a tensor is carried over: the same, transposed (LoRA matrices) or [1, 1, C] <-> [C] (token-shift mixes)
SAME, TRANSPOSE, FLAT = "same", "transpose", "flat"


class FlaConfigError(ValueError):
    """An fla RWKV-7 config.json that wuneng's RWKV-7 cannot represent, or a wuneng model that fla's cannot.
    The message is one line naming the key."""


def fla_key_map(num_layers: int, norm_bias: bool = True) -> List[Tuple[str, str, str]]:
    """(fla key, our key, how) for every tensor of an fla RWKV7ForCausalLM with ``num_layers`` layers (``how``:
    ``SAME``, ``TRANSPOSE`` or ``FLAT``). LayerNorm biases are left out when ``norm_bias`` is False; layer 0 has
    no ``v_lora``."""
    rows = [("model.embeddings.weight", "model.emb.weight", SAME)]
    norm_params = ("weight", "bias") if norm_bias else ("weight",)
    for i in range(num_layers):
        fla, ours = f"model.layers.{i}.", f"model.blocks.{i}."
        norms = [("attn_norm", "ln1"), ("ffn_norm", "ln2")] + ([("pre_norm", "ln0")] if i == 0 else [])
        for fla_norm, our_norm in norms:
            rows += [(f"{fla}{fla_norm}.{p}", f"{ours}{our_norm}.{p}", SAME) for p in norm_params]
        rows += [(f"{fla}attn.{x}", f"{ours}att.{x}", FLAT) for x in _TOKEN_MIXES]
        rows += [(f"{fla}attn.{x}", f"{ours}att.{x}", SAME) for x in ("k_k", "k_a", "r_k")]
        rows += [(f"{fla}attn.{p}.weight", f"{ours}att.{q}.weight", SAME) for p, q in _PROJECTIONS.items()]
        for lora, (bias, first, second) in _LORAS.items():
            if lora == "v_lora" and i == 0:
                continue
            rows.append((f"{fla}attn.{lora}.lora.0.weight", f"{ours}att.{first}", TRANSPOSE))
            rows.append((f"{fla}attn.{lora}.lora.2.weight", f"{ours}att.{second}", TRANSPOSE))
            if bias is not None:
                rows.append((f"{fla}attn.{lora}.lora.2.bias", f"{ours}att.{bias}", SAME))
        rows += [(f"{fla}attn.g_norm.{p}", f"{ours}att.ln_x.{p}", SAME) for p in ("weight", "bias")]
        rows.append((f"{fla}ffn.x_k", f"{ours}ffn.x_k", SAME))
        rows += [(f"{fla}ffn.{p}.weight", f"{ours}ffn.{p}.weight", SAME) for p in ("key", "value")]
    rows += [(f"model.norm.{p}", f"model.ln_out.{p}", SAME) for p in norm_params]
    rows.append(("lm_head.weight", "head.weight", SAME))
    return rows


def _to_ours(t: torch.Tensor, how: str) -> torch.Tensor:
    return t.t() if how == TRANSPOSE else t.reshape(-1) if how == FLAT else t


def _to_fla(t: torch.Tensor, how: str) -> torch.Tensor:
    return t.t() if how == TRANSPOSE else t.reshape(1, 1, -1) if how == FLAT else t


# ------------------------------------------------------------------------------------------ reading a folder
def read_fla_folder(path: PathLike) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """config.json (a dict) and the safetensors weights (``model.safetensors`` or the shards of its index) of
    an fla RWKV-7 folder. FileNotFoundError for a path without config.json;
    :class:`~wuneng.saving.ModelFolderError` for unreadable JSON or weights, or a folder without safetensors;
    :class:`FlaConfigError` when ``model_type`` is not "rwkv7"."""
    from safetensors.torch import load_file

    from ...saving import ModelFolderError, check_weight_files, read_folder_config

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    config = read_folder_config(path, "fla checkpoint", "an fla-hub folder", "fla's config.json")
    if config.get("model_type") != FLA_MODEL_TYPE:
        raise FlaConfigError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'rwkv7' (flash-linear-attention's "
            "RWKV-7); a wuneng folder loads with from_pretrained, an RWKV-LM .pth with import-rwkv"
        )
    files = check_weight_files(path)
    if not files:
        raise ModelFolderError(
            f"{path}: no model.safetensors (or model.safetensors.index.json); only safetensors weights are read: "
            "save the fla model with save_pretrained(safe_serialization=True)"
        )
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(os.path.join(path, name), device="cpu"))
    return config, weights


# ------------------------------------------------------------------------------------------ configs
def _fla_heads(config: Mapping) -> Tuple[int, int]:
    """(num_heads, head_dim) as fla's RWKV7Attention derives them (head_dim wins)."""
    C = config.get("hidden_size")
    head_dim, num_heads = config.get("head_dim", 64), config.get("num_heads")
    if not isinstance(C, int) or C <= 0:
        raise FlaConfigError(f"fla config: hidden_size must be a positive int, got {C!r}")
    if head_dim is None and num_heads is None:
        raise FlaConfigError("fla config: head_dim and num_heads are both null; one of them gives the head size")
    if head_dim is None:
        if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
            raise FlaConfigError(f"fla config: num_heads {num_heads!r} must be a positive int dividing hidden_size {C}")
        return num_heads, C // num_heads
    if not isinstance(head_dim, int) or head_dim <= 0 or C % head_dim:
        raise FlaConfigError(f"fla config: head_dim {head_dim!r} must be a positive int dividing hidden_size {C}")
    return C // head_dim, head_dim


def _shape_of(weights: Mapping[str, torch.Tensor], key: str, dim: int) -> int:
    if key not in weights:
        raise FlaConfigError(f"fla checkpoint: missing tensor {key!r}, needed to read the model sizes")
    t = weights[key]
    if t.dim() != 2:
        raise FlaConfigError(f"fla checkpoint: {key!r} must be a matrix, got shape {list(t.shape)}")
    return int(t.shape[dim])


def fla_config_to_kwargs(config: Mapping, weights: Mapping[str, torch.Tensor]) -> dict:
    """Our :class:`RWKV7Config` keyword arguments for an fla RWKV-7 config.json (a dict) and its weights (the
    intermediate size and LoRA ranks are read from the tensor shapes, so a config with null ranks works too).

    Raises :class:`FlaConfigError` (one line naming the key) for what our RWKV-7 cannot represent: hybrid
    attention layers (``attn``), ``norm_first`` false (no LayerNorm before the first layer), a ``hidden_act``
    other than sqrelu, a ``value_dim`` other than hidden_size, or a GroupNorm epsilon ``head_dim * norm_eps``
    other than our 64e-5."""
    C, L, V = config.get("hidden_size"), config.get("num_hidden_layers"), config.get("vocab_size")
    for name, value in (("num_hidden_layers", L), ("vocab_size", V)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FlaConfigError(f"fla config: {name} must be a positive int, got {value!r}")
    H, N = _fla_heads(config)
    if config.get("attn"):
        raise FlaConfigError(
            f"fla config: attn = {config['attn']!r} makes some layers softmax attention (a hybrid); wuneng's RWKV-7 "
            "has RWKV-7 layers only"
        )
    if config.get("norm_first", True) is not True:
        raise FlaConfigError(
            "fla config: norm_first is false (no LayerNorm before the first layer); wuneng's RWKV-7 always has it (ln0)"
        )
    if config.get("hidden_act", "sqrelu") != "sqrelu":
        raise FlaConfigError(
            f"fla config: hidden_act is {config['hidden_act']!r}; wuneng's RWKV-7 channel mix uses sqrelu (relu squared)"
        )
    value_dim = config.get("value_dim")
    dims = [value_dim] * L if isinstance(value_dim, int) else value_dim
    if dims is not None and (not isinstance(dims, list) or any(d != C for d in dims)):
        raise FlaConfigError(
            f"fla config: value_dim is {value_dim!r}; wuneng's RWKV-7 needs value_dim = hidden_size ({C}) in every layer"
        )
    eps = config.get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise FlaConfigError(f"fla config: norm_eps must be a positive number, got {eps!r}")
    if not math.isclose(N * eps, _LN_X_EPS, rel_tol=1e-6):
        raise FlaConfigError(
            f"fla config: norm_eps {eps} gives the GroupNorm epsilon head_dim * norm_eps = {N * eps:g}; wuneng's RWKV-7 "
            f"uses {_LN_X_EPS:g} (RWKV-LM's), so only head_dim * norm_eps = 64e-5 is representable"
        )
    last = L - 1
    kwargs = {
        "vocab_size": V,
        "hidden_size": C,
        "num_hidden_layers": L,
        "head_size": N,
        "layer_norm_eps": float(eps),
        "intermediate_size": _shape_of(weights, f"model.layers.{last}.ffn.key.weight", 0),
        "decay_low_rank_dim": _shape_of(weights, f"model.layers.{last}.attn.w_lora.lora.0.weight", 0),
        "a_low_rank_dim": _shape_of(weights, f"model.layers.{last}.attn.a_lora.lora.0.weight", 0),
        "gate_low_rank_dim": _shape_of(weights, f"model.layers.{last}.attn.g_lora.lora.0.weight", 0),
        "tie_word_embeddings": False,
    }
    if L > 1:
        kwargs["v_low_rank_dim"] = _shape_of(weights, f"model.layers.{last}.attn.v_lora.lora.0.weight", 0)
    elif isinstance(config.get("v_low_rank_dim"), int):  # one layer: no v_lora anywhere, the rank is unused
        kwargs["v_low_rank_dim"] = config["v_low_rank_dim"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if name in config:
            kwargs[name] = config[name]
    return kwargs


def fla_config_dict(config, dtype: Optional[torch.dtype] = None, ln_x_eps: float = _LN_X_EPS) -> dict:
    """fla's config.json (a dict) for our :class:`RWKV7Config` ``config``: the fields fla's ``RWKV7Config``
    reads, with its defaults for the kernels and the loss (``fuse_norm``, ``fuse_cross_entropy``, ...).
    Raises :class:`FlaConfigError` when fla's single ``norm_eps`` cannot give both our LayerNorm epsilon and our
    GroupNorm epsilon ``ln_x_eps`` (fla's GroupNorm uses ``head_dim * norm_eps``)."""
    C, N, L = config.hidden_size, config.head_size, config.num_hidden_layers
    eps = config.layer_norm_eps
    if not math.isclose(N * eps, ln_x_eps, rel_tol=1e-6):
        raise FlaConfigError(
            f"layer_norm_eps {eps} with head_size {N}: fla's GroupNorm epsilon would be head_size * layer_norm_eps = "
            f"{N * eps:g}, the model's is {ln_x_eps:g}; fla can represent only models with head_size * layer_norm_eps "
            "equal to the GroupNorm epsilon (head_size 64 with layer_norm_eps 1e-5)"
        )
    out = {
        "model_type": FLA_MODEL_TYPE,
        "architectures": ["RWKV7ForCausalLM"],
        "attn_mode": "chunk",
        "hidden_size": C,
        "hidden_ratio": 4,  # unused by fla when intermediate_size is given
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": L,
        "head_dim": N,
        "num_heads": C // N,
        "decay_low_rank_dim": config.decay_low_rank_dim,
        "gate_low_rank_dim": config.gate_low_rank_dim,
        "a_low_rank_dim": config.a_low_rank_dim,
        "v_low_rank_dim": config.v_low_rank_dim,
        "hidden_act": "sqrelu",
        "max_position_embeddings": 2048,
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": eps,
        "attn": None,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "fuse_norm": True,
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": True,
        "vocab_size": config.vocab_size,
        "value_dim": [C] * L,
    }
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


# ------------------------------------------------------------------------------------------ state dicts
def split_stacked_mixes(weights: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fla's first RWKV-7 layout stored the six token-shift mixes of a layer stacked as ``attn.x_x`` [6, C] (fla
    migrates it when loading): split into ``attn.x_r ... attn.x_g`` [1, 1, C]. Other weights pass unchanged."""
    out = {}
    for key, t in weights.items():
        if key.endswith(".attn.x_x") and t.dim() >= 1 and t.shape[0] == len(_TOKEN_MIXES):
            prefix = key[: -len("x_x")]
            out.update({prefix + name: t[j].reshape(1, 1, -1) for j, name in enumerate(_TOKEN_MIXES)})
        else:
            out[key] = t
    return out


def fla_to_wuneng_state_dict(
    weights: Mapping[str, torch.Tensor], config, fla_config: Mapping
) -> Dict[str, torch.Tensor]:
    """fla weights -> our state dict for ``config`` (our :class:`RWKV7Config`), shapes checked.

    Raises :class:`FlaConfigError` listing missing keys, unexpected keys and wrong shapes at once. Without
    ``norm_bias`` the LayerNorm biases are zeros; with ``tie_word_embeddings`` (or no ``lm_head.weight`` in a
    tied checkpoint) the head is a copy of the embedding; layer 0's unused ``v0/v1/v2`` are zeros."""
    norm_bias = fla_config.get("norm_bias", True) is not False
    tied = bool(fla_config.get("tie_word_embeddings", False))
    rows = fla_key_map(config.num_hidden_layers, norm_bias)
    expected = _expected_fla_shapes(config, norm_bias)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(k for k, _, _ in rows if k not in weights and k not in optional)
    unexpected = sorted(k for k in weights if k not in expected)
    wrong = sorted(
        f"{k}: expected {list(expected[k])}, got {list(weights[k].shape)}"
        for k in weights
        if k in expected and tuple(weights[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [
            f"{what} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
            if keys
        ]
        raise FlaConfigError(
            f"fla checkpoint does not match an RWKV-7 model with L={config.num_hidden_layers}, C={config.hidden_size}, "
            f"V={config.vocab_size}, head_dim={config.head_size}: " + "; ".join(parts)
        )
    out = {ours: _to_ours(weights[fla], how) for fla, ours, how in rows if fla in weights}
    if tied and "lm_head.weight" not in weights:
        out["head.weight"] = weights["model.embeddings.weight"]
    if not norm_bias:
        for _, ours, _ in fla_key_map(config.num_hidden_layers, True):
            if ours not in out and ours.endswith(".bias"):
                out[ours] = torch.zeros_like(out[ours[: -len("bias")] + "weight"])
    A, dv = config.hidden_size, config.v_low_rank_dim
    ref = out["model.blocks.0.att.w0"]
    out.update({
        "model.blocks.0.att.v0": ref.new_zeros(A),
        "model.blocks.0.att.v1": ref.new_zeros(config.hidden_size, dv),
        "model.blocks.0.att.v2": ref.new_zeros(dv, A),
    })  # fmt: skip
    return out


def _expected_fla_shapes(config, norm_bias: bool = True) -> Dict[str, Tuple[int, ...]]:
    """fla key -> shape for our config (fla's layout)."""
    C, V, N, F = config.hidden_size, config.vocab_size, config.head_size, config.intermediate_size
    ranks = {
        "w_lora": config.decay_low_rank_dim,
        "a_lora": config.a_low_rank_dim,
        "v_lora": config.v_low_rank_dim,
        "g_lora": config.gate_low_rank_dim,
    }
    shapes = {}
    for fla, _, how in fla_key_map(config.num_hidden_layers, norm_bias):
        leaf = fla.split(".")
        if fla in ("model.embeddings.weight", "lm_head.weight"):
            shape = (V, C)
        elif how == FLAT:
            shape = (1, 1, C)
        elif leaf[-1] == "r_k":
            shape = (C // N, N)
        elif "lora" in fla:
            D = ranks[leaf[-4]]
            shape = (D, C) if leaf[-2] == "0" else (C,) if leaf[-1] == "bias" else (C, D)
        elif fla.endswith("ffn.key.weight"):
            shape = (F, C)
        elif fla.endswith("ffn.value.weight"):
            shape = (C, F)
        elif fla.endswith("proj.weight"):
            shape = (C, C)
        else:  # norms, k_k, k_a, ffn.x_k
            shape = (C,)
        shapes[fla] = shape
    return shapes


def wuneng_to_fla_state_dict(state_dict: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Our state dict -> fla's names and shapes (contiguous tensors; layer 0's unused v0/v1/v2 left out)."""
    out = {}
    for fla, ours, how in fla_key_map(config.num_hidden_layers, True):
        if ours not in state_dict:
            raise ValueError(f"wuneng_to_fla_state_dict: the model state dict has no {ours!r} (for fla's {fla!r})")
        out[fla] = _to_fla(state_dict[ours].detach(), how).contiguous()
    return out


# ------------------------------------------------------------------------------------------ models and folders
def _single_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = sorted({str(t.dtype) for t in weights.values() if t.is_floating_point()})
    if len(dtypes) != 1:
        raise TypeError(
            f"fla checkpoint mixes dtypes {dtypes}; pass dtype=torch.float32 (CLI: --dtype float32) to convert"
        )
    return getattr(torch, dtypes[0].removeprefix("torch."))


def load_fla_model(path: PathLike, *, dtype: Optional[torch.dtype] = None, **config_kwargs):
    """Our :class:`RWKV7ForCausalLM` from an fla RWKV-7 folder (see :func:`read_fla_folder`). ``dtype``: the
    model's (default: the checkpoint's single floating dtype). ``config_kwargs`` (``wkv_impl``, ...) go to
    :class:`RWKV7Config`; the sizes are the checkpoint's."""
    from .configuration_rwkv7 import RWKV7Config
    from .modeling_rwkv7 import RWKV7ForCausalLM

    fla_config, weights = read_fla_folder(path)
    weights = split_stacked_mixes(weights)
    kwargs = fla_config_to_kwargs(fla_config, weights)
    clash = sorted(
        k for k in config_kwargs if k in kwargs and k not in ("bos_token_id", "eos_token_id", "pad_token_id")
    )
    if clash:
        raise ValueError(f"from_fla: {clash} are read from the checkpoint and cannot be given")
    config = RWKV7Config(**{**kwargs, **config_kwargs})
    dtype = dtype or _single_dtype(weights)
    state = fla_to_wuneng_state_dict(weights, config, fla_config)
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    # own, contiguous tensors: the transposed LoRA matrices are views, a tied head shares the embedding's storage
    model.load_state_dict(
        {k: v.to(dtype, copy=True, memory_format=torch.contiguous_format) for k, v in state.items()},
        strict=True,
        assign=True,
    )
    model.eval()
    logger.info(
        "read fla RWKV-7 %s: L=%d C=%d V=%d",
        os.fspath(path),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
    )
    return model


def save_fla_folder(model, folder: PathLike, dtype: Optional[torch.dtype] = None) -> None:
    """Write config.json and model.safetensors of fla's layout for our ``model`` into the existing ``folder``
    (no atomicity here: :func:`export_fla_checkpoint` writes into a temporary folder)."""
    from safetensors.torch import save_file

    ln_x_eps = model.model.blocks[0].att.ln_x.eps
    config_dict = fla_config_dict(model.config, dtype or model.dtype, ln_x_eps)
    state = wuneng_to_fla_state_dict(model.state_dict(), model.config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.cpu() for k, v in state.items()}
    folder = os.fspath(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")


def _tokenizer_source(path: str) -> Optional[str]:
    """``path`` if its tokenizer files can be copied alone (no tokenizer code named by an ``auto_map``), else
    None (with a warning: fla-hub's RWKV tokenizer is remote code with its own vocabulary file)."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return path
    try:
        with open(config, encoding="utf-8") as f:
            custom = "auto_map" in json.load(f)
    except (OSError, ValueError, TypeError):
        custom = True
    if custom:
        logger.warning(
            "%s: the tokenizer is custom code (auto_map); its files are not copied: load the tokenizer from %s",
            config,
            path,
        )
        return None
    return path


def import_fla_checkpoint(
    src: PathLike, out_dir: PathLike, *, dtype: Optional[torch.dtype] = None, overwrite: bool = False, **config_kwargs
):
    """Convert an fla RWKV-7 folder into a wuneng folder (config.json + model.safetensors, written beside
    ``out_dir`` first and moved into place: :mod:`wuneng.saving`); tokenizer files that need no custom code are
    copied. An existing non-empty ``out_dir`` is an error unless ``overwrite`` (a wuneng model folder only).
    Returns the model."""
    from ...saving import check_output_dir, save_pretrained_atomic

    check_output_dir(out_dir, overwrite, [src])
    model = load_fla_model(src, dtype=dtype, **config_kwargs)
    save_pretrained_atomic(
        model, out_dir, overwrite=overwrite, inputs=[src], tokenizer_from=_tokenizer_source(os.fspath(src))
    )
    return model


def export_fla_checkpoint(
    model_or_path, out_dir: PathLike, *, dtype: Optional[torch.dtype] = None, overwrite: bool = False
):
    """Write our RWKV-7 (a model, or the path of a wuneng RWKV-7 folder, whose tokenizer files are copied) as an
    fla RWKV-7 folder, atomically (:func:`~wuneng.saving.save_pretrained_atomic`). ``overwrite`` replaces only a
    wuneng model folder (not an earlier fla export: delete that first). Returns the model."""
    from ...saving import check_model_folder, check_output_dir, save_pretrained_atomic
    from .configuration_rwkv7 import RWKV7Config
    from .modeling_rwkv7 import RWKV7ForCausalLM

    inputs, tokenizer_from = [], None
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        inputs = [model_or_path]
        tokenizer_from = _tokenizer_source(os.fspath(model_or_path))
        check_output_dir(out_dir, overwrite, inputs)
        model_type = check_model_folder(model_or_path, "wuneng RWKV-7").get("model_type")
        if model_type != RWKV7Config.model_type:
            raise FlaConfigError(
                f"{os.path.join(os.fspath(model_or_path), 'config.json')}: model_type is {model_type!r}, expected "
                f"{RWKV7Config.model_type!r}: only a plain RWKV-7 model exists in fla's layout"
            )
        model = RWKV7ForCausalLM.from_pretrained(model_or_path)
    if not isinstance(model, RWKV7ForCausalLM):
        raise TypeError(
            f"to_fla: expected a wuneng RWKV7ForCausalLM, got {type(model).__name__} (only plain RWKV-7 exists in fla's layout)"
        )
    fla_config_dict(model.config, None, model.model.blocks[0].att.ln_x.eps)  # refuse before writing anything
    save_pretrained_atomic(
        model,
        out_dir,
        overwrite=overwrite,
        inputs=inputs,
        tokenizer_from=tokenizer_from,
        write=lambda folder: save_fla_folder(model, folder, dtype),
    )
    return model
