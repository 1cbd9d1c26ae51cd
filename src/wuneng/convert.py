"""Conversion of a transformers decoder (the teacher) into a WuNeng model (SPEC sections 3 and 5), and
``wuneng convert``.

``convert_teacher(teacher, ...)`` builds a :class:`~wuneng.models.wuneng.WuNengForCausalLM` from the teacher's own
config on the ``meta`` device (no memory): the teacher's transformers classes with the chosen layers' attention
wrapped (hybrid) or replaced (ARWKV). It gives it every teacher tensor the student keeps (the names are the
teacher's; copied, or shared with ``share_teacher_weights``), the teacher's buffers (rotary frequencies, embedding
scales) and materialises only the new parameters, at their function-preserving initialisation, so that the
converted model's logits equal the teacher's (every fusion but ``hymba``). Peak memory is the teacher plus the
student's new parameters (plus a copy of the teacher's tensors when they are not shared). ARWKV replacement
layers drop the teacher's attention (or, with ``arwkv_init="radlads"``, start from copies of it).

Any causal LM of transformers whose decoder layers have a ``self_attn`` with ``q_proj``/``k_proj``/``v_proj``
(or a fused ``qkv_proj``) and ``o_proj`` can be converted; :data:`TESTED_TEACHERS` are the families the tests
convert exactly. Anything else is refused with one line naming what is missing.

``convert_checkpoint(teacher_dir, out_dir, ...)`` does the same from a local checkpoint directory, saves the
result with ``save_pretrained`` (safetensors) atomically, and copies the tokenizer files.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .layers.hybrid import STATE_HEAD_MULTIPLE, attention_shapes
from .models.wuneng import WuNengConfig, WuNengForCausalLM
from .models.wuneng.configuration_wuneng import default_middle_heads, teacher_model_class
from .saving import check_output_dir, load_causal_lm, save_pretrained_atomic

__all__ = [
    "TESTED_TEACHERS",
    "WUNENG_OPTIONS",
    "check_teacher",
    "config_from_teacher",
    "load_teacher",
    "convert_teacher",
    "convert_checkpoint",
]

#: teacher model_types whose conversion the tests check exactly (tests/test_teacher_families.py)
TESTED_TEACHERS = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "qwen3_moe")

#: WuNeng options ``from_teacher`` accepts (besides fusion, middle_heads, state_query and the layer selection)
WUNENG_OPTIONS = (
    "state_query_init",
    "receptance_rank",
    "gate_rank",
    "middle_rank",
    "decay_low_rank_dim",
    "a_low_rank_dim",
    "v_low_rank_dim",
    "arwkv_head_size",
    "arwkv_init",
    "wkv_impl",
)

#: the ARWKV head size RWKV-7 models use; another is chosen when it does not divide the teacher's width
DEFAULT_ARWKV_HEAD_SIZE = 64

logger = logging.getLogger(__name__)


def check_teacher(teacher) -> str:
    """The teacher's model_type when WuNeng can convert it; ValueError naming what is missing otherwise (not a
    transformers causal LM of its config's class, no ``.model.layers[i].self_attn``, an attention without the
    projections the wrapper needs)."""
    name = type(teacher).__name__
    config = getattr(teacher, "config", None)
    what = f"unsupported teacher architecture {name} (model_type {getattr(config, 'model_type', None)!r})"
    if config is None:
        raise ValueError(f"{what}: not a transformers model (it has no config)")
    try:
        expected = teacher_model_class(config)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if not isinstance(teacher, expected):
        raise ValueError(f"{what}: WuNeng converts the causal LM class of the teacher's config, {expected.__name__}")
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{what}: it has no decoder layers in .model.layers; WuNeng converts decoder-only models whose layers "
            "each have a self_attn module with q_proj, k_proj, v_proj (or qkv_proj) and o_proj"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, nn.Module):
            raise ValueError(f"{what}: decoder layer {i} has no self_attn module")
        try:
            attention_shapes(attn)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    return config.model_type


def _arwkv_head_size(teacher_config, given: Optional[int]) -> int:
    """The ARWKV head size: the one given, else 64 when it divides the width, else the teacher's head_dim or the
    largest multiple of 8 below 64 that does (logged)."""
    if given is not None:
        return given
    C = teacher_config.hidden_size
    if C % DEFAULT_ARWKV_HEAD_SIZE == 0:
        return DEFAULT_ARWKV_HEAD_SIZE
    head_dim = getattr(teacher_config, "head_dim", None) or C // teacher_config.num_attention_heads
    candidates = [head_dim] + list(range(DEFAULT_ARWKV_HEAD_SIZE, 0, -STATE_HEAD_MULTIPLE))
    for n in candidates:
        if n % STATE_HEAD_MULTIPLE == 0 and C % n == 0:
            logger.info("arwkv_head_size=%d (64 does not divide the teacher's hidden_size %d)", n, C)
            return n
    raise ValueError(
        f"no ARWKV head size fits the teacher's hidden_size {C}: it must be divisible by a multiple of "
        f"{STATE_HEAD_MULTIPLE}; convert with attention kept (hybrid layers) instead"
    )


def config_from_teacher(
    teacher_config,
    *,
    fusion: str = "gate",
    middle_heads: Optional[int] = None,
    state_query: bool = True,
    hybrid_layers: Optional[Sequence[int]] = None,
    attention: bool = True,
    arwkv_layers: Optional[Sequence[int]] = None,
    layer_kinds: Optional[Sequence[str]] = None,
    keep_attention: Optional[Sequence[int]] = None,
    untie_embeddings: bool = False,
    **options,
) -> WuNengConfig:
    """A :class:`WuNengConfig` around a copy of the teacher's config, with the options.

    ``keep_attention``: the layers that keep the teacher's attention, every other layer converted (hybrid, or ARWKV
    with ``attention=False``): the complement form of ``hybrid_layers`` (fla's ``attn.layers``). ``untie_embeddings``:
    a teacher with tied input/output embeddings gives the student an LM head of its own (a copy).

    Defaults adapt to the teacher and are stored in the config and logged: ``middle_heads=None`` chooses
    :func:`~wuneng.models.wuneng.configuration_wuneng.default_middle_heads` of the teacher's attention heads (4, or
    fewer for a teacher with fewer heads); the ARWKV head size is 64, or a multiple of 8 that divides the width."""
    teacher_model_class(teacher_config)  # one line for a config transformers has no causal LM for
    unknown = sorted(set(options) - set(WUNENG_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown conversion option(s) {unknown}; accepted: fusion, middle_heads, state_query, "
            f"hybrid_layers, attention, arwkv_layers, layer_kinds, keep_attention, untie_embeddings, dtype, "
            f"{', '.join(WUNENG_OPTIONS)}"
        )
    c = copy.deepcopy(teacher_config)
    if untie_embeddings:
        c.tie_word_embeddings = False
    if keep_attention is not None:
        if hybrid_layers is not None or layer_kinds is not None:
            raise ValueError(
                "give either keep_attention (the layers that stay attention) or hybrid_layers/layer_kinds, not both"
            )
        kept = _checked_layers(keep_attention, c.num_hidden_layers, "keep_attention")
        overlap = sorted(kept & set(_checked_layers(arwkv_layers or [], c.num_hidden_layers, "arwkv_layers")))
        if overlap:
            raise ValueError(f"layers {overlap} are both in keep_attention and in arwkv_layers; choose one for each")
        hybrid_layers = [i for i in range(c.num_hidden_layers) if i not in kept]
    if middle_heads is None:
        middle_heads = default_middle_heads(c.num_attention_heads)
        logger.info(
            "middle_heads=%d (the default, at most the teacher's %d attention heads)",
            middle_heads,
            c.num_attention_heads,
        )
    converts_to_arwkv = not attention or bool(arwkv_layers) or "arwkv" in (layer_kinds or [])
    if converts_to_arwkv and options.get("arwkv_init", "rwkv7") != "radlads":
        options["arwkv_head_size"] = _arwkv_head_size(c, options.get("arwkv_head_size"))
    config = WuNengConfig(
        teacher_config=c,
        fusion=fusion,
        middle_heads=middle_heads,
        state_query=state_query,
        hybrid_layers=hybrid_layers,
        attention=attention,
        arwkv_layers=arwkv_layers,
        layer_kinds=list(layer_kinds) if layer_kinds is not None else None,
        use_cache=bool(getattr(c, "use_cache", True)),
        pad_token_id=getattr(c, "pad_token_id", None),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        **options,
    )
    # the teacher's attention implementation (eager, sdpa, flash, flex) runs in the student too; transformers
    # does not save it in config.json, so a loaded student takes the default unless from_pretrained is told
    implementation = getattr(teacher_config, "_attn_implementation", None)
    if implementation is not None:
        config._attn_implementation = implementation
    return config


def _checked_layers(values: Sequence[int], num_layers: int, name: str) -> set:
    """``values`` as a set of layer indices in [0, num_layers) (negative ones count from the end); ValueError naming
    ``name`` for an index out of range."""
    out = set()
    for i in values:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise ValueError(f"{name}: layer index {i!r} is out of range for a teacher of {num_layers} layers")
        out.add(i % num_layers)
    return out


def load_teacher(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None):
    """A teacher WuNeng can convert, from a local checkpoint folder (nothing is downloaded):
    :func:`wuneng.saving.load_causal_lm` (the folder's checks, one line naming the file) with
    :func:`check_teacher` as its structure check, run on a meta-device skeleton before any weight is read and
    on the loaded model. ``dtype`` None keeps the checkpoint's own."""
    return load_causal_lm(path, dtype, "teacher", check=check_teacher)


def _radlads_init(student: WuNengForCausalLM, teacher) -> None:
    """ARWKV layers from the teacher's attention: W_r <- W_q, W_k <- repeat_kv(W_k), W_v <- repeat_kv(W_v),
    W_o <- W_o (biases dropped; the time-mix has none). A fused ``qkv_proj`` (Phi-3) is split first."""
    for i in student.config.arwkv_layers:
        attn = teacher.model.layers[i].self_attn
        H, H_kv, d, fused = attention_shapes(attn)
        if fused:
            w_q, w_k, w_v = attn.qkv_proj.weight.split([H * d, H_kv * d, H_kv * d], dim=0)
        else:
            w_q, w_k, w_v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        n_rep = H // H_kv
        # [H_kv d, C] -> [H_q d, C], kv head j serving query heads j n_rep .. (j+1) n_rep - 1
        w_k, w_v = (w.view(H_kv, 1, d, -1).expand(-1, n_rep, -1, -1).reshape(H * d, -1) for w in (w_k, w_v))
        mixer = student.model.layers[i].self_attn
        with torch.no_grad():
            mixer.receptance.weight.copy_(w_q)
            mixer.key.weight.copy_(w_k)
            mixer.value.weight.copy_(w_v)
            mixer.output.weight.copy_(attn.o_proj.weight)


def convert_teacher(
    teacher,
    fusion: str = "gate",
    middle_heads: Optional[int] = None,
    state_query: bool = True,
    hybrid_layers: Optional[Sequence[int]] = None,
    *,
    attention: bool = True,
    arwkv_layers: Optional[Sequence[int]] = None,
    layer_kinds: Optional[Sequence[str]] = None,
    keep_attention: Optional[Sequence[int]] = None,
    untie_embeddings: bool = False,
    dtype: Optional[torch.dtype] = None,
    share_teacher_weights: bool = False,
    **options,
) -> WuNengForCausalLM:
    """Convert a teacher into a WuNeng model.

    Args:
        teacher: a transformers causal LM (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``, ...;
            see :func:`check_teacher`), or a local checkpoint directory.
        fusion: "gate" (default) | "add" | "concat" | "hymba" | "none".
        middle_heads: H_m (default None: 4, at most the teacher's attention heads; 0 = no middle heads).
        state_query: state-query modulation q += lambda Y W^state (default True).
        hybrid_layers: indices of the converted layers (default: all); the others keep the teacher's attention.
        attention: False turns the converted layers into ARWKV replacements (pure RWKV-7 time-mix).
        arwkv_layers: layers that become ARWKV replacements (beside hybrid ones).
        layer_kinds: explicit per-layer "hybrid" | "arwkv" | "attention" (instead of the three above).
        keep_attention: the layers that keep the teacher's attention; all others are converted (hybrid, or ARWKV
            with ``attention=False``). The complement form of ``hybrid_layers``, as fla's ``attn.layers``.
        untie_embeddings: for a teacher with tied embeddings (``tie_word_embeddings``), give the student an LM
            head of its own, a copy of the embedding (default False: tied as the teacher). Either way the
            student's logits are the teacher's.
        dtype: dtype of the result (default: the teacher's).
        share_teacher_weights: the student's teacher parameters use the teacher's tensors themselves (no copy)
            where dtype and device agree, so the conversion needs memory only for the new parameters; the
            teacher must then not be trained or used as a reference any more (its tensors are the student's).
            Default False: copies (a teacher object given here stays independent of the student).
        **options: any of :data:`WUNENG_OPTIONS` (ranks, ``state_query_init``, ``arwkv_head_size``,
            ``arwkv_init`` = "rwkv7" | "radlads", ``wkv_impl``).

    The student is built on the ``meta`` device and only its new parameters are materialised (on the teacher's
    device, initialised in float32 by the layers' own init, then cast to ``dtype``): no float32 copy of the
    whole model is ever made. Returns the student in eval mode if the teacher was, on the teacher's device.
    """
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(teacher)
    check_teacher(teacher)
    config = config_from_teacher(
        teacher.config,
        fusion=fusion,
        middle_heads=middle_heads,
        state_query=state_query,
        hybrid_layers=hybrid_layers,
        attention=attention,
        arwkv_layers=arwkv_layers,
        layer_kinds=layer_kinds,
        keep_attention=keep_attention,
        untie_embeddings=untie_embeddings,
        **options,
    )
    teacher_sd = teacher.state_dict()
    ref = teacher.get_input_embeddings().weight
    device, dtype = ref.device, dtype or ref.dtype
    with torch.device("meta"):  # shapes only; every tensor is given or materialised below
        student = WuNengForCausalLM(config)
    student_params = dict(student.named_parameters())
    student_buffers = dict(student.named_buffers())
    teacher_names = student.teacher_parameter_names()
    dropped = tuple(f"model.layers.{i}.self_attn." for i in config.arwkv_layers)
    given, given_buffers, problems = {}, {}, []
    for name, tensor in teacher_sd.items():
        if name.startswith(dropped):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embedding
        if name in student_buffers:  # a persistent buffer of the teacher's modules
            given_buffers[name] = tensor
            continue
        target = student_params.get(name)
        if target is None or name not in teacher_names:
            problems.append(f"teacher tensor {name} has no place in the student")
            continue
        if target.shape != tensor.shape:
            problems.append(f"{name}: teacher {tuple(tensor.shape)} vs student {tuple(target.shape)}")
            continue
        given[name] = tensor
    missing = sorted(teacher_names - set(given) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        problems.append(f"student tensors the teacher did not provide: {', '.join(missing[:12])}")
    if problems:
        raise ValueError("conversion failed: " + "; ".join(problems))
    placed = set()  # storages already given to a student parameter
    for name, tensor in given.items():
        value = tensor.detach().to(device=device, dtype=dtype)
        # a copy unless sharing; and always for a storage given twice (a tied teacher's LM head, untied here)
        if (not share_teacher_weights and value.data_ptr() == tensor.data_ptr()) or value.data_ptr() in placed:
            value = value.clone()
        placed.add(value.data_ptr())
        _set_parameter(student, name, value)
    if config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    _buffers_from_teacher(student, teacher, given_buffers, device)
    _materialise_new_parameters(student, device, dtype)
    if config.arwkv_init == "radlads" and config.arwkv_layers:
        _radlads_init(student, teacher)
    left = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if left:  # a part of the student that neither the teacher nor an init provides: a bug here, not bad input
        raise RuntimeError(f"conversion left tensors without data: {', '.join(left[:12])}")
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config.__class__.from_dict(teacher.generation_config.to_dict())
    student.train(teacher.training)
    return student


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the parameter ``name`` of ``model`` (a new Parameter on its storage, requires_grad)."""
    owner, _, attr = name.rpartition(".")
    owner_module = model.get_submodule(owner)
    owner_module._parameters[attr] = nn.Parameter(value, requires_grad=True)


def _materialise_new_parameters(student: WuNengForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Give data to the tensors of a meta-built student that the teacher does not provide: the mixers' new
    parameters and buffers, initialised in float32 on ``device`` by the model's own init (the RWKV-7 / WuNeng
    init, :meth:`~wuneng.models.wuneng.WuNengPreTrainedModel._init_weights`) and then cast to ``dtype``, one layer
    at a time."""
    for layer_idx, layer in enumerate(student.model.layers):
        mixer = layer.self_attn
        tensors = [(m, n, t, True) for m in mixer.modules() for n, t in m._parameters.items() if t is not None]
        tensors += [(m, n, t, False) for m in mixer.modules() for n, t in m._buffers.items() if t is not None]
        fresh = [(m, n, t.is_floating_point(), is_param) for m, n, t, is_param in tensors if t.is_meta]
        if not fresh:
            continue  # an attention layer: the teacher's tensors only
        for module, name, floating, is_param in fresh:
            meta = getattr(module, name)
            value = torch.empty(meta.shape, dtype=torch.float32 if floating else meta.dtype, device=device)
            if floating:
                value.fill_(float("nan"))  # so that a tensor the init does not set is caught below
            if is_param:
                module._parameters[name] = nn.Parameter(value, requires_grad=True)
            else:
                module._buffers[name] = value
        student._init_weights(mixer)
        unset = [
            f"{type(module).__name__}.{name}"
            for module, name, floating, _ in fresh
            if floating and bool(getattr(module, name).isnan().any())
        ]
        if unset:  # a bug of the model's init, not bad input
            raise RuntimeError(f"conversion: the init of layer {layer_idx} left {', '.join(unset)} unset")
        with torch.no_grad():
            for module, name, floating, is_param in fresh:
                if floating and dtype != torch.float32:
                    value = getattr(module, name).detach().to(dtype)
                    if is_param:
                        module._parameters[name] = nn.Parameter(value, requires_grad=True)
                    else:
                        module._buffers[name] = value


def _buffers_from_teacher(
    student: WuNengForCausalLM, teacher, persistent: Dict[str, torch.Tensor], device: torch.device
) -> None:
    """The teacher's buffers for the meta-built student, by name: its persistent ones (``persistent``, from the
    state dict) and the others (rotary frequencies, embedding scales: their values and dtype, e.g. float32 in a
    teacher loaded in bf16), so that positions and scales are exactly the teacher's."""
    theirs = dict(teacher.named_buffers())
    theirs.update(persistent)
    for name, buffer in list(student.named_buffers()):
        value = theirs.get(name)
        if isinstance(value, torch.Tensor) and value.shape == buffer.shape:
            owner, _, attr = name.rpartition(".")
            student.get_submodule(owner)._buffers[attr] = value.detach().to(device).clone()


def convert_checkpoint(
    teacher_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
    **kwargs,
) -> WuNengForCausalLM:
    """``wuneng convert``: load the teacher in ``teacher_dir``, convert it (``kwargs`` as :func:`convert_teacher`),
    write ``out_dir`` (config.json, model.safetensors, generation_config.json and the teacher's tokenizer files,
    :data:`wuneng.saving.TOKENIZER_FILES`).

    The directory is assembled beside ``out_dir`` and moved into place, so an interrupted run leaves nothing
    half-written. A non-empty ``out_dir`` is an error unless ``overwrite``. Returns the converted model."""
    teacher_dir = os.fspath(teacher_dir)
    check_output_dir(
        out_dir, overwrite, inputs=[teacher_dir]
    )  # fail before the (slow) conversion; never over the teacher
    teacher = load_teacher(teacher_dir, dtype=dtype)
    # the teacher was loaded here and is dropped right after: the student takes its tensors without a copy
    student = convert_teacher(teacher, dtype=dtype, share_teacher_weights=True, **kwargs)
    del teacher
    save_pretrained_atomic(student, out_dir, overwrite=overwrite, tokenizer_from=teacher_dir)
    return student


# ------------------------------------------------------------------------------------ layer selections
#: the key of flash-linear-attention's hybrid-model configs that lists the layers keeping softmax attention:
#: ``attn: {layers: [...], num_heads, num_kv_heads, qkv_bias, rope_theta, window_size}`` (or a list of such
#: mappings, one per attention setting)
FLA_ATTN_KEY = "attn"


def parse_layer_list(text: str, option: str = "layer list") -> list:
    """Layer indices from ``"0,2,5"``, ranges ``"0-3"`` (both ends included) and negative indices ``"-1"`` (from
    the end), sorted without repeats; ValueError naming ``option`` for anything else."""
    import re

    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if re.fullmatch(r"-?\d+", part):
            out.append(int(part))
            continue
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        if match is None or int(match.group(1)) > int(match.group(2)):
            raise ValueError(
                f"{option}: {part!r} is not a layer index or range; expected comma-separated indices and ranges "
                "such as 0,2,5 or 0-3 (or a JSON/YAML file with fla's `attn: {layers: [...]}`)"
            )
        out.extend(range(int(match.group(1)), int(match.group(2)) + 1))
    if not out:
        raise ValueError(f"{option}: no layer index in {text!r}; expected e.g. 0,2,5 or 0-3")
    return sorted(set(out))


def read_layer_file(path: Union[str, os.PathLike]) -> list:
    """The layers that keep softmax attention, from a file in flash-linear-attention's hybrid format (JSON or YAML
    with ``attn: {layers: [...]}``, or ``attn: [{layers: [...]}, ...]``: the union; a whole fla ``config.json``
    works too; ``attn: null`` there means none), or from a WuNeng model folder / its ``config.json`` (its
    ``attention`` layers). Checked against the
    file's ``num_hidden_layers`` when it has one. ValueError naming the file and the key otherwise."""
    import json

    import yaml

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"layer selection file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"layer selection file {path}: not valid JSON/YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"layer selection file {path}: expected a mapping with `{FLA_ATTN_KEY}: {{layers: [...]}}`")
    num_layers = data.get("num_hidden_layers")
    if FLA_ATTN_KEY not in data and isinstance(data.get("layer_kinds"), list):  # a WuNeng config
        layers = [i for i, kind in enumerate(data["layer_kinds"]) if kind == "attention"]
    elif FLA_ATTN_KEY in data and data[FLA_ATTN_KEY] is None:  # an fla config without attention layers
        layers = []
    else:
        specs = data.get(FLA_ATTN_KEY)
        specs = [specs] if isinstance(specs, dict) else specs
        if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and "layers" in s for s in specs):
            raise ValueError(
                f"layer selection file {path}: expected `{FLA_ATTN_KEY}: {{layers: [...]}}` (flash-linear-attention's "
                f"hybrid format) or a list of such mappings; found {FLA_ATTN_KEY}={data.get(FLA_ATTN_KEY)!r}"
            )
        layers = []
        for k, spec in enumerate(specs):
            values = spec["layers"]
            if not isinstance(values, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
                where = (
                    FLA_ATTN_KEY if len(specs) == 1 and isinstance(data[FLA_ATTN_KEY], dict) else f"{FLA_ATTN_KEY}[{k}]"
                )
                raise ValueError(
                    f"layer selection file {path}: {where}.layers must be a list of layer indices, got {values!r}"
                )
            layers.extend(values)
    if isinstance(num_layers, int) and any(not -num_layers <= i < num_layers for i in layers):
        raise ValueError(
            f"layer selection file {path}: layer indices {sorted(layers)} out of range for its "
            f"num_hidden_layers={num_layers}"
        )
    return sorted(set(layers))


def layer_selection(value: Optional[str], option: str = "layer list") -> Optional[list]:
    """A command-line layer selection: None for ``None`` / ``""`` / ``"all"``, the layers of a file or folder
    (:func:`read_layer_file`) when ``value`` names one (or ends in .json/.yaml/.yml), else
    :func:`parse_layer_list`."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    if is_layer_file(value):
        return read_layer_file(value)
    return parse_layer_list(value, option)


def is_layer_file(value: str) -> bool:
    """Whether a command-line layer selection names a file or folder (rather than a list of indices)."""
    return os.path.exists(value) or value.lower().endswith((".json", ".yaml", ".yml"))


def attention_layers(config) -> list:
    """The layers of a WuNeng config that keep plain softmax attention (fla's ``attn.layers``)."""
    return [i for i, kind in enumerate(config.layer_kinds) if kind == "attention"]


def fla_attn_spec(config, layers: Optional[Sequence[int]] = None) -> dict:
    """flash-linear-attention's ``attn`` mapping for ``layers`` (default: :func:`attention_layers` of a WuNeng
    config), with the attention shapes of ``config`` (a WuNeng or a Llama/Qwen2 teacher config)."""
    if layers is None:
        layers = attention_layers(config)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return {
        "layers": sorted(int(i) for i in layers),
        "num_heads": config.num_attention_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "qkv_bias": bool(getattr(config, "attention_bias", False))
        or getattr(config, "model_type", None) == "qwen2"
        or getattr(config, "teacher_model_type", None) == "qwen2",
        "rope_theta": float(theta) if theta is not None else None,
        "window_size": None,
    }


def write_layer_file(
    path: Union[str, os.PathLike], config, layers: Optional[Sequence[int]] = None, extra: Optional[dict] = None
) -> str:
    """Write ``{attn: fla_attn_spec(config, layers), num_hidden_layers: L, **extra}`` as JSON to ``path`` (a
    temporary name, then renamed); readable by :func:`read_layer_file` (``convert --keep-attention FILE``) and by
    fla's hybrid configs. Returns the path."""
    import json

    path = os.fspath(path)
    data = {FLA_ATTN_KEY: fla_attn_spec(config, layers), "num_hidden_layers": config.num_hidden_layers, **(extra or {})}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
