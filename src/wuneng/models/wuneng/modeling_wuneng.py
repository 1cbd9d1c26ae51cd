"""The WuNeng language model: a teacher's transformers decoder whose attention is augmented by RWKV-7 state heads.

A :class:`WuNengForCausalLM` is built from its config's ``teacher_config``: the teacher's own transformers classes
(``Qwen2ForCausalLM``, ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``, ...) make the embeddings, decoder layers,
norms, rotary embeddings and LM head, and then each layer's ``self_attn`` becomes what ``config.layer_kinds[l]``
says (:mod:`wuneng.layers.hybrid`): ``"hybrid"`` (the teacher's attention module wrapped in place,
:func:`~wuneng.layers.hybrid.wrap_attention`), ``"arwkv"`` (replaced by an
:class:`~wuneng.layers.hybrid.ARWKVMixer`) or ``"attention"`` (unchanged). The forward is the teacher's forward
(masks, positions, softcapping, loss): the model adds only the cache and a :class:`~wuneng.layers.hybrid.HybridContext`
(2-D padding mask, v_first) that reaches every mixer as the keyword ``wuneng_context``. Parameter names are the
teacher's wherever the teacher has the parameter, so a converted model loads the teacher's state dict directly.

Inference state: a :class:`wuneng.cache.RecurrentStateCache` holding, per layer, the teacher's kind of key/value
layer (a :class:`wuneng.cache.GrowingKVLayer` for full attention, transformers' sliding-window layer for sliding
layers, none for ARWKV layers) and the RWKV states ``time_shift`` [B, C] and ``wkv`` [B, H, N, N] (none in
attention layers). ``generate()`` creates it; beam search reorders it.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...auto_map import AutoMapMixin
from ...cache import DummyLayer, GrowingKVLayer, RecurrentStateCache
from ...layers.hybrid import ARWKVMixer, HybridContext, HybridMixer, wrap_attention
from ...layers.low_rank import derived_weights_session
from ...layers.rwkv7 import RWKV7StateHeads, TimeMix, document_starts
from ...saving import checkpoint_mismatches, describe_loading_problems
from . import report
from .configuration_wuneng import WuNengConfig, teacher_model_class

__all__ = ["WuNengPreTrainedModel", "WuNengModel", "WuNengForCausalLM", "convert_layers", "new_hybrid_cache"]


def _first_layer_of_kind(config: WuNengConfig, layer_idx: int) -> bool:
    kind = config.layer_kinds[layer_idx]
    return config.layer_kinds.index(kind) == layer_idx


def convert_layers(base_model: nn.Module, config: WuNengConfig) -> None:
    """Give each decoder layer of the teacher's base model (``base_model.layers``) the mixer of its kind in
    ``config.layer_kinds``: wrap the attention (hybrid), replace it (ARWKV) or keep it (attention); and give the
    base model the forward that brings the cache and the mixers' context (:func:`_hybrid_base_forward`)."""
    layers = getattr(base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != config.num_hidden_layers:
        raise ValueError(
            f"the teacher's base model {type(base_model).__name__} has no list of {config.num_hidden_layers} decoder "
            "layers in .layers; WuNeng converts decoder-only models whose layers each have a self_attn module"
        )
    base_model.__dict__["_wuneng_config"] = config
    base_model.forward = types.MethodType(_hybrid_base_forward, base_model)
    C, L = config.hidden_size, config.num_hidden_layers
    for i, kind in enumerate(config.layer_kinds):
        layer = layers[i]
        if not isinstance(getattr(layer, "self_attn", None), nn.Module):
            raise ValueError(
                f"decoder layer {i} ({type(layer).__name__}) of the teacher has no self_attn module; WuNeng wraps "
                "the attention module of each layer"
            )
        if kind == "attention":
            continue
        # the first layer of a kind produces v_first; the later ones mix their values towards it
        value_residual = not _first_layer_of_kind(config, i)
        if kind == "hybrid":
            wrap_attention(
                layer.self_attn,
                C,
                i,
                L,
                fusion=config.fusion,
                middle_heads=config.middle_heads,
                state_query=config.state_query,
                state_query_init=config.state_query_init,
                receptance_rank=config.receptance_rank,
                gate_rank=config.gate_rank,
                middle_rank=config.middle_rank,
                value_residual=value_residual,
                decay_rank=config.decay_low_rank_dim,
                a_rank=config.a_low_rank_dim,
                v_rank=config.v_low_rank_dim,
                hymba_eps=config.rms_norm_eps,
                wkv_impl=config.wkv_impl,
            )
        else:
            layer.self_attn = ARWKVMixer(
                C,
                config.arwkv_num_heads,
                config.arwkv_head_size,
                i,
                L,
                value_residual=value_residual,
                wkv_impl=config.wkv_impl,
            )


def new_hybrid_cache(config: WuNengConfig) -> RecurrentStateCache:
    """An empty inference cache: per layer the teacher's kind of key/value layer (full attention: a
    :class:`GrowingKVLayer`; sliding window: transformers' own layer, as ``DynamicCache(config=teacher)`` makes
    it), nothing for ARWKV layers, beside the recurrent states."""
    template = DynamicCache(config=config.teacher_config)
    layers = []
    for kind, layer in zip(config.layer_kinds, template.layers):
        if kind == "arwkv":
            layers.append(DummyLayer())
        elif type(layer) is DynamicLayer:
            layers.append(GrowingKVLayer())
        else:
            layers.append(layer)
    return RecurrentStateCache(config.num_hidden_layers, layers=layers)


def _hybrid_base_forward(
    self: PreTrainedModel,
    input_ids=None,
    attention_mask=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    wuneng_context: Optional[HybridContext] = None,
    **kwargs,
):
    """The forward of a WuNeng student's base model (the teacher's base model class, e.g. ``Qwen2Model``): its own
    forward with this model's cache and the mixers' :class:`HybridContext`, so that the base model runs on its
    own too (``model.base_model(...)``, as TRL calls it). Installed as the instance's ``forward`` by
    :func:`convert_layers` (a bound method: ``copy.deepcopy`` rebinds it to the copy)."""
    name = type(self).__name__
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{name}: give exactly one of input_ids or inputs_embeds")
    B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    config = self.__dict__["_wuneng_config"]
    if use_cache is None:  # a training forward does not need (or keep alive) an inference cache
        use_cache = config.use_cache and not self.training
    # transformers 5.23 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    on = getattr(self, "is_activation_checkpointing", None)
    checkpointing = self.training and bool(self.is_gradient_checkpointing if on is None else on)
    if checkpointing and use_cache:
        use_cache = False  # recomputation would write the cache twice
    if past_key_values is not None and not isinstance(past_key_values, RecurrentStateCache):
        raise TypeError(
            f"WuNeng model: past_key_values must be a RecurrentStateCache from model.new_cache(), got "
            f"{type(past_key_values).__name__}"
        )
    if use_cache and past_key_values is None:
        past_key_values = new_hybrid_cache(config)
    # a given cache is read and updated even with use_cache=False, as transformers' Llama does (use_cache only
    # decides whether a new one is made); not under activation checkpointing, which runs the layers twice
    cache = None if checkpointing else past_key_values
    past = cache.get_seq_length() if cache is not None else 0
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != past + T:
            raise ValueError(
                f"WuNeng model: attention_mask must be a 2-D padding mask [B, past + T] = [{B}, {past + T}], got "
                f"shape {tuple(attention_mask.shape)}"
            )
        if not bool(attention_mask.all()):
            padding = attention_mask
    # packed rows: the state side restarts at the documents under the rule by which transformers makes the
    # teacher's attention block-diagonal (position_ids given, no attention mask, no cache; masking_utils)
    doc_start = None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and attention_mask is None and cache is None and position_ids.dim() == 2:
        doc_start = document_starts(position_ids, B, T)
    context = HybridContext(padding, doc_start=doc_start) if wuneng_context is None else wuneng_context
    # weights derived from parameters live for the cache's decoding session, or for this call without one
    with derived_weights_session(None if cache is None else cache.derived_weights):
        outputs = type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            wuneng_context=context,
            **kwargs,
        )
    if cache is not None:
        cache.advance(T)
    return outputs


class WuNengPreTrainedModel(AutoMapMixin, PreTrainedModel):
    config_class = WuNengConfig
    config: WuNengConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted generation

    def _adopt_teacher(self, teacher: PreTrainedModel) -> None:
        """Keep the teacher's model object (not as a submodule: its modules are this model's) to run its forward
        and its weight init."""
        self.__dict__["_teacher"] = teacher
        self.__dict__["_teacher_init"] = type(teacher)._init_weights.__get__(teacher)
        self._no_split_modules = list(getattr(teacher, "_no_split_modules", None) or [])
        # transformers initialises a sub-model (the teacher's base model) with that sub-model's own _init_weights:
        # route it here, so that the WuNeng mixers inside get their own init there too
        for module in teacher.modules():
            if isinstance(module, PreTrainedModel):
                module.__dict__["_init_weights"] = self._init_weights

    def _init_weights(self, module: nn.Module) -> None:
        # Modules are visited children first: the RWKV modules re-apply their own init after their children's
        # (the teacher's) init; every other module gets the teacher's own init.
        if isinstance(module, HybridMixer):
            module.reset_new_parameters()
        elif isinstance(module, TimeMix):
            module.reset_parameters()
        elif isinstance(module, RWKV7StateHeads):
            module.reset_state_parameters()
        elif "_teacher_init" in self.__dict__:
            self.__dict__["_teacher_init"](module)
        else:
            super()._init_weights(module)

    def new_cache(self) -> RecurrentStateCache:
        """An empty inference cache (:func:`new_hybrid_cache`)."""
        return new_hybrid_cache(self.config)


class WuNengModel(WuNengPreTrainedModel):
    """The teacher's base model (embeddings, decoder layers, final norm) with the WuNeng mixers; what
    ``AutoModel`` loads from a WuNeng folder. Returns the teacher's base-model output (last hidden state
    [B, T, C], the cache)."""

    def __init__(self, config: WuNengConfig):
        super().__init__(config)
        base = teacher_model_class(config.teacher_config, causal_lm=False)(config.teacher_config)
        convert_layers(base, config)
        for name, child in base.named_children():
            self.add_module(name, child)
        self._adopt_teacher(base)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.__dict__["_teacher"].get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.__dict__["_teacher"].set_input_embeddings(value)
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, **kwargs):
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask: 2-D padding mask [B, past + T]."""
        return self.__dict__["_teacher"](
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class WuNengForCausalLM(WuNengPreTrainedModel, GenerationMixin):
    """WuNeng language model: the teacher's causal LM with WuNeng mixers. Conversion: :meth:`from_teacher`;
    inference: ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: WuNengConfig):
        super().__init__(config)
        teacher = teacher_model_class(config.teacher_config)(config.teacher_config)
        for name in ("model", "lm_head"):
            if not isinstance(getattr(teacher, name, None), nn.Module):
                raise ValueError(
                    f"the teacher class {type(teacher).__name__} has no .{name}; WuNeng converts causal LMs laid out "
                    "as .model (the decoder) and .lm_head"
                )
        convert_layers(teacher.model, config)
        self.model = teacher.model
        self.lm_head = teacher.lm_head
        self.vocab_size = config.vocab_size
        self._adopt_teacher(teacher)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value
        self.__dict__["_teacher"].lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[RecurrentStateCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The teacher's causal-LM forward: logits [B, T, V] (the last ``logits_to_keep`` positions when > 0, the
        teacher's final softcapping if it has one); ``loss`` (next-token cross-entropy, labels shifted inside,
        -100 ignored) when ``labels`` [B, T] is given. attention_mask: 2-D padding mask [B, past + T];
        position_ids as the teacher takes them (default ``past + arange(T)``); past_key_values: a
        :class:`RecurrentStateCache` from :meth:`new_cache`."""
        return self.__dict__["_teacher"](
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            position_ids=position_ids,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    # -- generation --------------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a transformers DynamicCache; this model needs its hybrid recurrent cache.
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"WuNengForCausalLM: cache_implementation={generation_config.cache_implementation!r} is not supported; "
                "the model uses its own hybrid cache (leave cache_implementation unset)"
            )
        model_kwargs["past_key_values"] = self.new_cache()

    # -- conversion and bookkeeping ----------------------------------------------------------------------
    @classmethod
    def from_teacher(
        cls,
        teacher,
        fusion: str = "gate",
        middle_heads: Optional[int] = None,
        state_query: bool = True,
        hybrid_layers=None,
        **options,
    ) -> "WuNengForCausalLM":
        """Convert a teacher (an in-memory transformers causal LM, e.g. ``Qwen2ForCausalLM``, or a local checkpoint
        directory). See :func:`wuneng.convert.convert_teacher` for every option."""
        from ...convert import convert_teacher  # conversion sits above the model package

        return convert_teacher(
            teacher,
            fusion=fusion,
            middle_heads=middle_heads,
            state_query=state_query,
            hybrid_layers=hybrid_layers,
            **options,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose weights do not match its config
        (missing, unexpected or differently shaped tensors, all named) instead of re-initialising them. With
        ``ignore_mismatched_sizes=True`` differently shaped tensors are re-initialised and reported, as
        transformers does (e.g. ``vocab_size=`` a new size); missing or unexpected tensors are still refused."""
        path = os.fspath(pretrained_model_name_or_path)
        ignore_sizes = bool(kwargs.get("ignore_mismatched_sizes", False))
        if os.path.isdir(path) and kwargs.get("config") is None:
            check_checkpoint_matches_config(path, ignore_sizes)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # with ignore_mismatched_sizes the mismatched tensors were re-initialised on request (still in ``info``)
        checked = {k: v for k, v in dict(info).items() if not (ignore_sizes and k == "mismatched_keys")}
        problems = describe_loading_problems(checked, model.config.tie_word_embeddings)
        if problems:
            raise ValueError(
                f"WuNengForCausalLM.from_pretrained: the checkpoint's weights do not match its config.json ({problems})"
            )
        return (model, info) if want_info else model

    def converted_layer_indices(self) -> List[int]:
        """Indices of the layers whose mixer is hybrid or ARWKV (not the teacher's attention)."""
        return [i for i, kind in enumerate(self.config.layer_kinds) if kind != "attention"]

    def teacher_parameter_names(self) -> Set[str]:
        """Names (as in ``named_parameters()``) of the parameters that come from the teacher: all but the state
        side of hybrid layers and the whole of ARWKV layers."""
        new = set()
        for i, layer in enumerate(self.model.layers):
            mixer = layer.self_attn
            prefix = f"model.layers.{i}.self_attn."
            if isinstance(mixer, HybridMixer):
                new.update(prefix + n for n in mixer.new_parameter_names())
            elif isinstance(mixer, ARWKVMixer):
                new.update(prefix + n for n, _ in mixer.named_parameters())
        return {n for n, _ in self.named_parameters()} - new

    def new_parameter_names(self) -> Set[str]:
        """Names of the parameters that are new (not copied from the teacher)."""
        teacher = self.teacher_parameter_names()
        return {n for n, _ in self.named_parameters() if n not in teacher}

    def unused_parameter_names(self, align: bool = False) -> Set[str]:
        """New parameters the forward never uses: the value-residual LoRA (v0, v1, v2, and in a hybrid layer the
        x_v mix that only feeds it) of the first layer of each kind, which produces v_first instead (RWKV-LM keeps
        them in layer 0 too); and the whole state side (``state.*``, ``receptance_lora_*``) of a hybrid layer whose
        output does not read the state (the ablation ``fusion="none"``, ``state_query=False``, ``middle_heads=0``).
        They get no gradient. ``align=True``: those that ``align_forward`` never uses (its state term still trains
        the state side of such a layer)."""
        names = set()
        for i, layer in enumerate(self.model.layers):
            mixer = layer.self_attn
            prefix = f"model.layers.{i}.self_attn."
            reads_state = isinstance(mixer, HybridMixer) and (
                mixer.fusion != "none" or mixer.state_query or mixer.num_middle_heads > 0
            )
            if isinstance(mixer, HybridMixer) and not reads_state and not align:
                names.update(
                    n
                    for n, _ in self.named_parameters()
                    if n.startswith((prefix + "state.", prefix + "receptance_lora_"))
                )
            if isinstance(mixer, HybridMixer) and not mixer.state.value_residual:
                names.update(prefix + "state." + n for n in ("x_v", "v0", "v1", "v2"))
            elif isinstance(mixer, ARWKVMixer) and not mixer.value_residual:
                names.update(prefix + n for n in ("v0", "v1", "v2"))
        return names

    def freeze_teacher_parameters(self, frozen: bool = True) -> int:
        """Set ``requires_grad = not frozen`` on every teacher parameter; returns how many tensors changed."""
        teacher = self.teacher_parameter_names()
        count = 0
        for name, p in self.named_parameters():
            if name in teacher:
                p.requires_grad_(not frozen)
                count += 1
        return count

    # -- parameter accounting: thin entry points to wuneng.models.wuneng.report ---------------------------
    def teacher_num_parameters(self) -> int:
        """Parameter count of the teacher this model was converted from (computed from the config)."""
        return report.teacher_num_parameters(self.config)

    def num_extra_parameters(self) -> int:
        """Parameters of this model minus those of its teacher (:func:`report.num_extra_parameters`)."""
        return report.num_extra_parameters(self)

    def parameter_breakdown(self) -> Dict[str, int]:
        """Parameter counts per component (:func:`report.parameter_breakdown`)."""
        return report.parameter_breakdown(self)

    def format_parameter_breakdown(self) -> str:
        """The breakdown as a text table with shares of the teacher's parameter count."""
        return report.format_parameter_breakdown(self)

    def print_parameter_breakdown(self) -> None:
        """Log :meth:`format_parameter_breakdown` at INFO through ``logging`` (the library never prints; the CLI
        shows it after ``wuneng convert``)."""
        logging.getLogger(__name__).info("parameters:\n%s", self.format_parameter_breakdown())


def check_checkpoint_matches_config(path: str, ignore_sizes: bool = False) -> None:
    """ValueError naming every tensor that is missing, unexpected or (unless ``ignore_sizes``) shaped differently
    in the WuNeng safetensors checkpoint ``path`` compared with the model its config.json describes (built on the
    meta device)."""
    config = WuNengConfig.from_pretrained(path)
    with torch.device("meta"):
        model = WuNengForCausalLM(config)
    problems = checkpoint_mismatches(path, model, config.tie_word_embeddings, ignore_sizes)
    if problems:
        raise ValueError(f"checkpoint {path!r}: the weights do not match its config.json ({problems})")
