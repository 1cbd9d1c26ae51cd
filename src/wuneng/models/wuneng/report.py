"""Parameter accounting of a WuNeng model against the teacher it was converted from.

Kept out of :mod:`~wuneng.models.wuneng.modeling_wuneng` so that the modeling file reads as the model. The
model's methods (``teacher_num_parameters``, ``num_extra_parameters``, ``parameter_breakdown``,
``format_parameter_breakdown``, ``print_parameter_breakdown``) are thin entry points to these functions.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict, Tuple

import torch

from .configuration_wuneng import WuNengConfig, teacher_model_class

if TYPE_CHECKING:
    from .modeling_wuneng import WuNengForCausalLM

__all__ = [
    "attention_params",
    "teacher_num_parameters",
    "num_extra_parameters",
    "parameter_breakdown",
    "format_parameter_breakdown",
]

#: parameter-name prefix inside a hybrid layer's ``self_attn`` -> component label (first match wins)
HYBRID_COMPONENTS = (
    ("state.", "state heads (decay/alpha/value LoRAs, k_k, k_a, r_k, GroupNorm)"),
    ("receptance_lora_", "receptance correction R1 R2"),
    ("state_query_", "state-query modulation (W^state, lambda)"),
    ("middle_lora_", "middle heads (P, W^O_m)"),
    ("o_middle.", "middle heads (P, W^O_m)"),
    ("", "fusion"),
)


@functools.lru_cache(maxsize=16)
def _teacher_counts(teacher_config_json: str) -> Tuple[int, Tuple[int, ...]]:
    """(total parameters, attention parameters per layer) of the teacher described by a config's JSON, counted on
    a meta-device skeleton of its own transformers class (tied embeddings counted once)."""
    import json

    from transformers import CONFIG_MAPPING

    data = json.loads(teacher_config_json)
    config = CONFIG_MAPPING[data.pop("model_type")](**data)
    with torch.device("meta"):
        teacher = teacher_model_class(config)(config)
    total = sum(p.numel() for p in teacher.parameters())
    per_layer = tuple(sum(p.numel() for p in layer.self_attn.parameters()) for layer in teacher.model.layers)
    return total, per_layer


def _counts(config: WuNengConfig) -> Tuple[int, Tuple[int, ...]]:
    return _teacher_counts(config.teacher_config.to_json_string(use_diff=False))


def attention_params(config: WuNengConfig, layer_idx: int = 0) -> int:
    """Parameters of the teacher's attention in layer ``layer_idx`` (projections, biases, q/k norms)."""
    return _counts(config)[1][layer_idx]


def teacher_num_parameters(config: WuNengConfig) -> int:
    """Parameter count of the teacher a model of ``config`` was converted from (its own classes on the meta
    device)."""
    return _counts(config)[0]


def num_extra_parameters(model: "WuNengForCausalLM") -> int:
    """Parameters of ``model`` minus those of its teacher (ARWKV layers drop the teacher's attention)."""
    return sum(p.numel() for p in model.parameters()) - teacher_num_parameters(model.config)


def parameter_breakdown(model: "WuNengForCausalLM") -> Dict[str, int]:
    """Parameter counts per component: the teacher's parts ("teacher: ..."), the new ones ("new: ...") and the
    teacher attention dropped by ARWKV layers ("dropped: ...", negative). The teacher and new entries sum to
    the model's parameter count; the new and dropped entries sum to :func:`num_extra_parameters`."""
    teacher = model.teacher_parameter_names()
    out: Dict[str, int] = {}

    def add(key, n):
        out[key] = out.get(key, 0) + n

    for name, p in model.named_parameters():
        n = p.numel()
        if name in teacher:
            if "embed_tokens" in name or name.startswith("lm_head"):
                add("teacher: embeddings and LM head", n)
            elif ".self_attn." in name:
                add("teacher: attention", n)
            elif ".mlp." in name:
                add("teacher: MLP", n)
            else:
                add("teacher: norms", n)
            continue
        layer_idx = int(name.split(".")[2])
        if model.config.layer_kinds[layer_idx] == "arwkv":
            add("new: ARWKV time-mix", n)
            continue
        local = name.split(".self_attn.", 1)[1]
        for prefix, label in HYBRID_COMPONENTS:
            if local.startswith(prefix):
                add("new: " + label, n)
                break
    dropped = sum(attention_params(model.config, i) for i in model.config.arwkv_layers)
    if dropped:
        out["dropped: teacher attention of ARWKV layers"] = -dropped
    order = ("teacher", "new", "dropped")
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0].split(":")[0])))


def format_parameter_breakdown(model: "WuNengForCausalLM") -> str:
    """:func:`parameter_breakdown` as a text table with shares of the teacher's parameter count."""
    teacher_total = teacher_num_parameters(model.config)
    rows = parameter_breakdown(model)
    width = max(len(k) for k in rows) + 2
    lines = [f"{'component':<{width}}{'parameters':>16}{'% of teacher':>14}"]
    for key, n in rows.items():
        lines.append(f"{key:<{width}}{n:>16,}{100.0 * n / teacher_total:>13.3f}%")
    extra = num_extra_parameters(model)
    lines.append(f"{'teacher total':<{width}}{teacher_total:>16,}{100.0:>13.3f}%")
    lines.append(f"{'extra (student - teacher)':<{width}}{extra:>16,}{100.0 * extra / teacher_total:>13.3f}%")
    return "\n".join(lines)
