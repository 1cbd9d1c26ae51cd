"""The WuNeng language model: a Llama/Qwen2 decoder whose attention is augmented by RWKV-7 state heads.

Layer l of a :class:`WuNengModel` is the teacher's decoder layer (pre-norm RMSNorm, residuals, SwiGLU MLP) with
``self_attn`` one of three mixers (``config.layer_kinds[l]``, see :mod:`wuneng.layers.hybrid`):
``"hybrid"`` (:class:`~wuneng.layers.hybrid.HybridMixer`), ``"arwkv"`` (:class:`~wuneng.layers.hybrid.ARWKVMixer`)
or ``"attention"`` (the teacher's attention, unchanged). Parameter names are the teacher's wherever the teacher
has the parameter, so a converted model loads the teacher's state dict directly.

Inference state: a :class:`wuneng.cache.RecurrentStateCache` holding, per layer, the attention keys/values (a
:class:`wuneng.cache.GrowingKVLayer`, appended in place; none in ARWKV layers) and the RWKV state ``time_shift`` [B, C] and ``wkv``
[B, H, N, N] (none in attention layers). ``generate()`` creates it; beam search reorders it.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ...auto_map import AutoMapMixin
from ...cache import DummyLayer, GrowingKVLayer, RecurrentStateCache
from ...layers.hybrid import ARWKVMixer, Attention, HybridMixer, RMSNorm
from ...layers.low_rank import derived_weights_session
from ...layers.rwkv7 import RWKV7StateHeads, TimeMix
from ...saving import checkpoint_mismatches, describe_loading_problems
from . import report
from .configuration_wuneng import WuNengConfig

__all__ = ["WuNengPreTrainedModel", "WuNengModel", "WuNengForCausalLM", "WuNengDecoderLayer", "WuNengMLP"]

# Per-layer teacher parameters kept by every layer kind, and those of the teacher's attention.
_TEACHER_LAYER_PARAMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_TEACHER_ATTENTION_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")


class WuNengMLP(nn.Module):
    """The teacher's SwiGLU MLP: ``down(act(gate(x)) * up(x))``. [B,T,C] -> [B,T,C]."""

    def __init__(self, config: WuNengConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _first_layer_of_kind(config: WuNengConfig, layer_idx: int) -> bool:
    kind = config.layer_kinds[layer_idx]
    return config.layer_kinds.index(kind) == layer_idx


def build_mixer(config: WuNengConfig, layer_idx: int) -> nn.Module:
    """The ``self_attn`` module of layer ``layer_idx`` for its kind in ``config.layer_kinds``."""
    kind = config.layer_kinds[layer_idx]
    C, L = config.hidden_size, config.num_hidden_layers
    common = dict(qkv_bias=config.attention_bias, out_bias=config.attention_out_bias)
    if kind == "attention":
        return Attention(
            C, config.num_attention_heads, config.num_key_value_heads, config.head_dim, layer_idx, **common
        )
    # the first layer of a kind produces v_first; the later ones mix their values towards it
    value_residual = not _first_layer_of_kind(config, layer_idx)
    if kind == "hybrid":
        return HybridMixer(
            C,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
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
            **common,
        )
    return ARWKVMixer(
        C,
        config.arwkv_num_heads,
        config.arwkv_head_size,
        layer_idx,
        L,
        value_residual=value_residual,
        wkv_impl=config.wkv_impl,
    )


class WuNengDecoderLayer(nn.Module):
    """``h = h + mixer(RMSNorm(h)); h = h + MLP(RMSNorm(h))`` (the teacher's layer, its attention swapped)."""

    def __init__(self, config: WuNengConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = build_mixer(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = WuNengMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[RecurrentStateCache] = None,
        v_first: Optional[torch.Tensor] = None,
    ):
        """hidden_states [B,T,C] -> (hidden_states [B,T,C], v_first of this layer's kind)."""
        mixed, v_first = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, v_first
        )
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, v_first


class WuNengPreTrainedModel(AutoMapMixin, PreTrainedModel):
    config_class = WuNengConfig
    config: WuNengConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["WuNengDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted generation

    def _init_weights(self, module: nn.Module) -> None:
        # Modules are visited children first: the RWKV modules re-apply their own init after their children's
        # generic (normal / ones) init.
        if isinstance(module, HybridMixer):
            module.reset_new_parameters()
        elif isinstance(module, TimeMix):
            module.reset_parameters()
        elif isinstance(module, RWKV7StateHeads):
            module.reset_state_parameters()
        else:
            super()._init_weights(module)


class WuNengModel(WuNengPreTrainedModel):
    """Embeddings, the decoder layers and the final norm. Returns the last hidden state [B, T, C]."""

    def __init__(self, config: WuNengConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([WuNengDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # v_first of the first layer of each kind, shared by the mixers' align_forward (stage-1 alignment)
        self.v_first_store: Dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer.kind != "attention":
                layer.self_attn.v_first_store = self.v_first_store
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self) -> RecurrentStateCache:
        """An empty inference cache: a KV layer per attention/hybrid layer, a dummy per ARWKV layer."""
        layers = [DummyLayer() if kind == "arwkv" else GrowingKVLayer() for kind in self.config.layer_kinds]
        return RecurrentStateCache(self.config.num_hidden_layers, layers=layers)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[RecurrentStateCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask [B, past + T] 2-D padding mask;
        position_ids [B or 1, T] (default: from the attention mask, so left padding does not shift positions,
        else ``past + arange(T)``); past_key_values: a :class:`RecurrentStateCache` from :meth:`new_cache`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("WuNengModel: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if use_cache is None:  # a training forward does not need (or keep alive) an inference cache
            use_cache = self.config.use_cache and not self.training
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing and use_cache:
            use_cache = False  # recomputation would write the cache twice
        if past_key_values is not None and not isinstance(past_key_values, RecurrentStateCache):
            raise TypeError(
                f"WuNengModel: past_key_values must be a RecurrentStateCache from model.new_cache(), got "
                f"{type(past_key_values).__name__}"
            )
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        # a given cache is read and updated even with use_cache=False, as transformers' Llama does (use_cache only
        # decides whether a new one is made); not under activation checkpointing, which runs the layers twice
        cache = None if checkpointing else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != past + T:
                raise ValueError(
                    f"WuNengModel: attention_mask must be a 2-D padding mask [B, past + T] = [{B}, {past + T}], got "
                    f"shape {tuple(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: the fast causal path
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        v_first: Dict[str, Optional[torch.Tensor]] = {}
        # weights derived from parameters live for the cache's decoding session, or for this call without one
        with derived_weights_session(None if cache is None else cache.derived_weights):
            for layer in self.layers:
                if checkpointing:
                    hidden_states, vf = self._gradient_checkpointing_func(
                        layer.__call__,
                        hidden_states,
                        position_embeddings,
                        attention_mask,
                        None,
                        v_first.get(layer.kind),
                    )
                else:
                    hidden_states, vf = layer(
                        hidden_states, position_embeddings, attention_mask, cache, v_first.get(layer.kind)
                    )
                if layer.kind not in v_first and vf is not None:
                    v_first[layer.kind] = vf
                if all_hidden is not None:
                    all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        if cache is not None:
            cache.advance(T)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class WuNengForCausalLM(WuNengPreTrainedModel, GenerationMixin):
    """WuNeng language model with an LM head. Conversion: :meth:`from_teacher`; inference: ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: WuNengConfig):
        super().__init__(config)
        self.model = WuNengModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> RecurrentStateCache:
        """An empty inference cache (see :meth:`WuNengModel.new_cache`)."""
        return self.model.new_cache()

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
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V] (the last ``logits_to_keep`` positions when > 0); ``loss`` (next-token cross-entropy,
        labels shifted inside, -100 ignored) when ``labels`` [B, T] is given."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
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
        """Convert a Llama/Qwen2 teacher (an in-memory ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` or a local
        checkpoint directory). See :func:`wuneng.convert.convert_teacher` for every option."""
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
        """Names (as in ``named_parameters()``) of the parameters that come from the teacher."""
        names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        for i, kind in enumerate(self.config.layer_kinds):
            prefix = f"model.layers.{i}."
            names.update(prefix + n for n in _TEACHER_LAYER_PARAMS)
            names.update(f"{prefix}mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj"))
            if kind != "arwkv":
                for proj in _TEACHER_ATTENTION_PARAMS:
                    names.update((f"{prefix}self_attn.{proj}.weight", f"{prefix}self_attn.{proj}.bias"))
        return names & {n for n, _ in self.named_parameters()}

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
