"""Parameter-efficient options of a stage: LoRA adapters on the teacher-derived linears (through ``peft``), frozen
MLPs or embeddings, and merging the adapters back into plain weights at the end of the run.

The options act on the student in place, after the stage's objective has set its trainable parameters
(:func:`wuneng.train.stages.build_objective`), so the model keeps its class: the objectives still reach
``student.model.layers[i]``, and a merged model saves and loads with its usual ``from_pretrained``.

"Teacher-derived" (``target_modules: teacher-linear``): the ``nn.Linear`` modules whose weight was copied from the
teacher, i.e. is in ``student.teacher_parameter_names()`` of a converted WuNeng/ARWKV model (the attention
projections q/k/v/o of the layers that keep them, and the MLP's gate/up/down), never the output embedding
(``lm_head``). A model without ``teacher_parameter_names()`` (a plain Qwen2/Llama in sft) treats every linear but
the output embedding as such. The new state-head parameters of a converted layer are not adapted: they stay as
trainable as the stage makes them.

``peft`` is imported only when ``lora_r`` is set; it is the ``wuneng[peft]`` extra.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

__all__ = [
    "TEACHER_LINEAR",
    "FREEZABLE",
    "teacher_linear_names",
    "frozen_parameter_names",
    "apply_peft_options",
    "lora_is_active",
    "merge_lora",
    "take_adapter",
    "write_adapter",
    "ADAPTER_DIR",
]

logger = logging.getLogger(__name__)

#: ``peft.target_modules`` value selecting the teacher-derived linears (see the module docstring).
TEACHER_LINEAR = "teacher-linear"
#: What ``peft.freeze`` may name.
FREEZABLE = ("mlp", "embeddings")


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "peft.lora_r is set but the `peft` library is not installed: pip install 'wuneng[peft]' "
            "(or unset peft.lora_r to train without LoRA adapters)"
        ) from None
    return peft


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def teacher_linear_names(model: nn.Module) -> list[str]:
    """Module names (as in ``named_modules()``) of the teacher-derived ``nn.Linear`` layers of ``model``, sorted."""
    teacher_fn = getattr(model, "teacher_parameter_names", None)
    teacher = set(teacher_fn()) if callable(teacher_fn) else None
    head = _output_embedding(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if teacher is None or f"{name}.weight" in teacher:
            names.append(name)
    return sorted(names)


def frozen_parameter_names(model: nn.Module, freeze: list[str]) -> set[str]:
    """Names of the parameters ``freeze`` (a list of :data:`FREEZABLE`) names: ``mlp`` = every parameter inside a
    module named ``mlp``; ``embeddings`` = the input and the output embedding (``embed_tokens``, ``lm_head``; one
    tensor when tied)."""
    out: set[str] = set()
    params = list(model.named_parameters(remove_duplicate=False))
    if "mlp" in freeze:
        mlp = {n for n, _ in params if ".mlp." in f".{n}"}
        if not mlp:
            raise ValueError("peft.freeze names 'mlp' but the model has no parameters named '*.mlp.*'")
        out |= mlp
    if "embeddings" in freeze:
        tensors = set()
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get)() if callable(getattr(model, get, None)) else None
            if module is not None and getattr(module, "weight", None) is not None:
                tensors.add(id(module.weight))
        if not tensors:
            raise ValueError("peft.freeze names 'embeddings' but the model exposes no input/output embeddings")
        out |= {n for n, p in params if id(p) in tensors}
    return out


def lora_is_active(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers injected by :func:`apply_peft_options` (not yet merged)."""
    return any(hasattr(m, "lora_A") and hasattr(m, "get_base_layer") for m in model.modules())


def apply_peft_options(model: nn.Module, options, stage: str) -> None:
    """Apply a stage's :class:`~wuneng.train.config.PeftConfig` to ``model`` in place, after the stage has set its
    trainable parameters: freeze what ``options.freeze`` names, then (``options.lora_r`` set) inject LoRA adapters
    into the targeted linears, whose base weights and biases freeze while the adapter factors train. Other
    parameters keep the ``requires_grad`` the stage gave them. The align stage takes no LoRA (it trains only the
    new parameters; ValueError)."""
    if options is None:
        return
    frozen = frozen_parameter_names(model, list(options.freeze))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in frozen:
        params[name].requires_grad_(False)
    if options.lora_r is None:
        if frozen:
            logger.info("%s: frozen by peft.freeze %s: %d tensors", stage, list(options.freeze), len(frozen))
        return
    if stage == "align":
        raise ValueError(
            "peft.lora_r is set for the align stage, which trains only the new parameters (nothing teacher-derived "
            "to adapt); unset peft.lora_r there and use it in distill or sft"
        )
    peft = _import_peft()
    if options.target_modules == TEACHER_LINEAR:
        targets = teacher_linear_names(model)
    else:
        targets = list(options.target_modules)
    modules = dict(model.named_modules())
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in modules)]
    if unknown or not targets:
        raise ValueError(
            f"peft.target_modules: {unknown or targets} match no module of the model; give module names (or name "
            f"suffixes such as q_proj) of nn.Linear layers, or {TEACHER_LINEAR!r}"
        )
    lora = peft.LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    # peft marks every parameter but the adapters frozen: the stage's own choice is put back afterwards
    stage_trainable = {id(p): p.requires_grad for p in model.parameters()}
    peft.inject_adapter_in_model(lora, model)
    n_adapter = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            n_adapter += p.numel()
        elif ".base_layer." in name:
            p.requires_grad_(False)  # the adapted linear's own weight and bias: LoRA trains a delta instead
        else:
            p.requires_grad_(stage_trainable[id(p)])
    logger.info("%s: LoRA r=%d on %d linears, %d adapter parameters", stage, options.lora_r, len(targets), n_adapter)


def merge_lora(model: nn.Module, merge: bool = True) -> int:
    """Fold every injected LoRA adapter into its base linear (``W += B A * alpha / r``) and put the plain linear back
    in its place, so ``model`` has its original modules and parameter names again. Returns the number of linears.
    ``merge=False``: put the base linears back unchanged (the adapters are dropped: :func:`take_adapter`)."""
    merged = 0
    for name, module in list(model.named_modules()):
        if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
            continue
        if merge:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        merged += 1
    return merged


#: Where the unmerged final model keeps its adapter (a PEFT adapter folder inside ``final/``).
ADAPTER_DIR = "adapter"


def take_adapter(model: nn.Module) -> tuple[dict, object]:
    """Remove the injected LoRA adapters from ``model`` (base linears put back unmerged) and return them as
    ``(state_dict, LoraConfig)`` in the layout of ``peft.PeftModel.save_pretrained`` (keys prefixed
    ``base_model.model.``), for :func:`write_adapter`."""
    peft = _import_peft()
    tensors = peft.get_peft_model_state_dict(model)
    state = {f"base_model.model.{k}": v.detach().contiguous().clone() for k, v in tensors.items()}
    lora_config = model.peft_config["default"]
    merge_lora(model, merge=False)
    del model.peft_config
    return state, lora_config


def write_adapter(folder, state: dict, lora_config) -> None:
    """Write a :func:`take_adapter` result as a PEFT adapter folder (``adapter_model.safetensors`` and
    ``adapter_config.json``): ``peft.PeftModel.from_pretrained(base, folder)`` loads it over the saved base model."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    lora_config.save_pretrained(str(folder))
