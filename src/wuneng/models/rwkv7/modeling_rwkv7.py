"""The RWKV-7 language model (SPEC section 2) as Hugging Face ``PreTrainedModel`` classes.

Model: ``emb -> ln0 (layer 0) -> blocks (h += TimeMix(ln1 h); h += ChannelMix(ln2 h)) -> ln_out -> head``,
``v_first`` (the first layer's values) passed from layer 0 to the others. Module names follow RWKV-LM
(``model.emb``, ``model.blocks.{i}.att.x_r``, ..., ``head``) so that RWKV-LM checkpoints map one to one
(:mod:`.convert_rwkv_lm`).

Decoding keeps a :class:`~wuneng.cache.RecurrentStateCache` (``past_key_values``): per layer the time-mix
shift [B, C], the WKV state [B, H, N, N] (float32) and the channel-mix shift [B, C]; its size does not grow
with the context. ``attention_mask`` (1 = token, 0 = padding) keeps padding out of the WKV state and the
token shift. Use left padding when the state is continued (generate): the returned shift states are those of
the last position, which right padding would make a padding position.

Packed rows (docs/training.md, "Document-aware packing"): ``position_ids`` [B, T] restarting at 0 per document
make the token shifts and the WKV states restart at every document, in a forward without padding and without
earlier tokens in the cache (the rule under which transformers makes its attention block-diagonal).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...auto_map import AutoMapMixin
from ...cache import RecurrentStateCache
from ...layers.low_rank import derived_weights_session
from ...layers.rwkv7 import ChannelMix, RWKV7StateHeads, TimeMix, document_starts, head_logits, orthogonal_
from .configuration_rwkv7 import RWKV7Config

__all__ = ["RWKV7Block", "RWKV7PreTrainedModel", "RWKV7Model", "RWKV7ForCausalLM"]

TIME_SHIFT, WKV, CHANNEL_SHIFT = "time_shift", "wkv", "channel_shift"


def time_mix_options(config) -> dict:
    """The keyword arguments of a block's time-mix taken from an RWKV-7-based config (LoRA ranks, WKV form)."""
    return dict(
        decay_rank=config.decay_low_rank_dim,
        a_rank=config.a_low_rank_dim,
        v_rank=config.v_low_rank_dim,
        gate_rank=config.gate_low_rank_dim,
        wkv_impl=config.wkv_impl,
    )


class RWKV7Block(GradientCheckpointingLayer):
    """One RWKV-7 block: ``h += att(ln1 h); h += ffn(ln2 h)``; layer 0 first applies ``ln0``.

    The one block class of the RWKV-7 family: a model whose block differs only in its mixers (Meta-State)
    subclasses it and overrides :meth:`make_time_mix` / :meth:`make_channel_mix`. A time-mix may return a
    fourth value (a state read-out); the block then passes it to the channel-mix before the shift state.
    """

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.layer_idx = layer_idx
        self.ln0 = nn.LayerNorm(C, eps=eps) if layer_idx == 0 else None
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = self.make_time_mix(config, layer_idx)
        self.ffn = self.make_channel_mix(config, layer_idx)

    @staticmethod
    def make_time_mix(config: RWKV7Config, layer_idx: int) -> nn.Module:
        """The block's time-mix (``att``): RWKV-7's :class:`~wuneng.layers.rwkv7.TimeMix`."""
        C, L = config.hidden_size, config.num_hidden_layers
        return TimeMix(C, config.num_heads, config.head_size, layer_idx, L, **time_mix_options(config))

    @staticmethod
    def make_channel_mix(config: RWKV7Config, layer_idx: int) -> nn.Module:
        """The block's channel-mix (``ffn``): RWKV-7's :class:`~wuneng.layers.rwkv7.ChannelMix`."""
        return ChannelMix(config.hidden_size, config.intermediate_size, layer_idx, config.num_hidden_layers)

    def forward(
        self,
        hidden: torch.Tensor,
        v_first: Optional[torch.Tensor] = None,
        time_shift: Optional[torch.Tensor] = None,
        wkv: Optional[torch.Tensor] = None,
        channel_shift: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """hidden [B,T,C]; v_first [B,T,A] (A = H N; None in layer 0); states as in the cache (None = zeros);
        mask [B,T] or None; doc_start: bool [B,T] or None, the documents of packed rows (token shifts and WKV state
        restart there). Returns (hidden, v_first, time_shift, wkv, channel_shift)."""
        if self.ln0 is not None:
            hidden = self.ln0(hidden)
        state = None if time_shift is None and wkv is None else (time_shift, wkv)
        docs = {} if doc_start is None else {"doc_start": doc_start}  # mixers without the keyword keep working
        att_out, v_first, (time_shift, wkv), *readout = self.att(self.ln1(hidden), v_first, state, mask, **docs)
        hidden = hidden + att_out
        ffn_out, channel_shift = self.ffn(self.ln2(hidden), *readout, channel_shift, mask, **docs)
        hidden = hidden + ffn_out
        return hidden, v_first, time_shift, wkv, channel_shift


class RWKV7PreTrainedModel(AutoMapMixin, PreTrainedModel):
    """Weight init (SPEC section 2) and the transformers plumbing shared by the RWKV-7 models."""

    config_class = RWKV7Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV7Block"]
    # generate(): the state cannot be rolled back (no assisted decoding); the model builds its own cache.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def unused_parameter_names(self) -> set[str]:
        """Parameters the forward never uses: the value-residual LoRA (v0, v1, v2) of layer 0, which produces
        v_first instead (RWKV-LM keeps them there too, so checkpoints import unchanged). The training objectives
        keep them frozen, so that DDP needs no ``find_unused_parameters``."""
        return {
            f"{name}.{p}"
            for name, module in self.named_modules()
            if getattr(module, "value_residual", None) is False and hasattr(module, "v0")
            for p in ("v0", "v1", "v2")
        }

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips modules without direct parameters when it treats a model as custom code; our
        # _init_weights checks the loaded flags itself, so every module is visited.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Current RWKV-LM init (SPEC section 2). Parameters loaded by ``from_pretrained`` (flagged
        ``_is_hf_initialized`` by transformers) are never overwritten: a partly loaded layer is re-initialised
        and its loaded tensors restored."""
        if isinstance(module, (TimeMix, ChannelMix)):
            _reset_keeping_loaded(module, module.reset_parameters)
        elif isinstance(module, RWKV7StateHeads):
            _reset_keeping_loaded(module, module.reset_state_parameters)
        elif isinstance(module, nn.LayerNorm):
            _reset_keeping_loaded(module, lambda: (module.weight.fill_(1.0), module.bias.zero_()))
        elif isinstance(module, nn.Embedding):
            _reset_keeping_loaded(module, lambda: module.weight.uniform_(-1e-4, 1e-4))
        elif module is getattr(self, "head", None):
            # gain 0.5 * sqrt(V / C) when V > C, else 0.5: orthogonal_ adds the sqrt(rows / cols) factor itself
            _reset_keeping_loaded(module, lambda: orthogonal_(module.weight, 0.5))
        # Linear / GroupNorm inside TimeMix and ChannelMix are set by their parent's reset (visited after them).


def _reset_keeping_loaded(module: nn.Module, reset) -> None:
    params = dict(module.named_parameters())
    loaded = {n: p.detach().clone() for n, p in params.items() if getattr(p, "_is_hf_initialized", False)}
    if len(loaded) == len(params):
        return
    reset()
    for n, value in loaded.items():
        params[n].copy_(value)


def _check_tensor(name: str, t, *, rank: int, shape_doc: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"RWKV7: {name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"RWKV7: {name} must have shape {shape_doc}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(
            f"RWKV7: {name} is on {t.device} but the model is on {device}; move it with .to({device.type!r})"
        )


class RWKV7Model(RWKV7PreTrainedModel):
    """Embedding, blocks and the final LayerNorm; returns the last hidden state and the state cache.

    ``block_class`` is the block built per layer (a subclass of :class:`RWKV7Block`)."""

    block_class = RWKV7Block

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([self.block_class(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def _validate_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values):
        device = self.emb.weight.device
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RWKV7: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, C]")
        if input_ids is not None:
            _check_tensor("input_ids", input_ids, rank=2, shape_doc="[B, T] of token ids", device=device)
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise TypeError(f"RWKV7: input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
            B, T = input_ids.shape
            if T > 0 and input_ids.device.type == "cpu":
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    raise ValueError(
                        f"RWKV7: token ids must be in [0, {self.config.vocab_size}), got range [{lo}, {hi}]"
                    )
        else:
            C = self.config.hidden_size
            _check_tensor("inputs_embeds", inputs_embeds, rank=3, shape_doc=f"[B, T, {C}]", device=device)
            if inputs_embeds.shape[-1] != C:
                raise ValueError(f"RWKV7: inputs_embeds must have shape [B, T, {C}], got {tuple(inputs_embeds.shape)}")
            if inputs_embeds.dtype != self.emb.weight.dtype:
                raise TypeError(
                    f"RWKV7: inputs_embeds has dtype {inputs_embeds.dtype} but the model is {self.emb.weight.dtype}; "
                    "cast one of them"
                )
            B, T = inputs_embeds.shape[:2]
        if T == 0:
            raise ValueError("RWKV7: the input has no tokens (T = 0)")
        if attention_mask is not None:
            _check_tensor("attention_mask", attention_mask, rank=2, shape_doc="[B, T] of 0/1", device=device)
            if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"RWKV7: attention_mask must have shape [B, T] = [{B}, {T}] (or [B, past + T], as generate() "
                    f"passes it), got {tuple(attention_mask.shape)}"
                )
            if attention_mask.device.type == "cpu" and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("RWKV7: attention_mask must hold only 0 (padding) and 1 (token)")
        if past_key_values is not None:
            if not isinstance(past_key_values, RecurrentStateCache):
                raise TypeError(
                    "RWKV7: past_key_values must be a wuneng.cache.RecurrentStateCache (or None), got "
                    f"{type(past_key_values).__name__}"
                )
            if len(past_key_values.states) != self.config.num_hidden_layers:
                raise ValueError(
                    f"RWKV7: past_key_values has {len(past_key_values.states)} layers, the model has "
                    f"{self.config.num_hidden_layers}"
                )
            cb = past_key_values.batch_size
            if cb not in (-1, B):
                raise ValueError(f"RWKV7: past_key_values holds batch {cb}, but the input has batch {B}")
            for t in past_key_values._tensors():
                if t.device != device:
                    raise ValueError(f"RWKV7: past_key_values is on {t.device} but the model is on {device}")
        return B, T

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values: Optional[RecurrentStateCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        position_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask [B, T] or [B, past + T] (1 = token,
        0 = left padding; its last T columns are used); past_key_values: the state to continue from;
        position_ids [B, T] or [1, T]: only read to find the documents of packed rows (positions restarting at 0,
        :func:`~wuneng.layers.rwkv7.document_starts`), where the token shifts and WKV states restart; ignored when
        the input has padding or the cache holds earlier tokens (a continued row has no new documents).

        Returns ``BaseModelOutputWithPast(last_hidden_state [B, T, C], past_key_values, hidden_states)``.
        """
        _, seq_len = self._validate_inputs(input_ids, inputs_embeds, attention_mask, past_key_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:  # a given cache is always updated; otherwise config.use_cache, off in training
            use_cache = past_key_values is not None or (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = RecurrentStateCache(self.config.num_hidden_layers)

        hidden = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -seq_len:]
            if bool((mask == 1).all()):
                mask = None  # no padding: skip the masking work
        doc_start = None
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        if position_ids is not None and mask is None and past == 0:
            if isinstance(position_ids, torch.Tensor) and position_ids.device != hidden.device:
                raise ValueError(
                    f"RWKV7: position_ids is on {position_ids.device} but the model is on {hidden.device}; move it"
                )
            doc_start = document_starts(position_ids, hidden.shape[0], seq_len)
        all_hidden = () if output_hidden_states else None
        v_first = None
        # weights derived from parameters live for the cache's decoding session, or for this call without one
        with derived_weights_session(None if past_key_values is None else past_key_values.derived_weights):
            for i, block in enumerate(self.blocks):
                if output_hidden_states:
                    all_hidden += (hidden,)
                states = (None, None, None)
                if past_key_values is not None:
                    states = tuple(past_key_values.get_state(i, name) for name in (TIME_SHIFT, WKV, CHANNEL_SHIFT))
                hidden, v_first, *new_states = block(hidden, v_first, *states, mask, doc_start=doc_start)
                if use_cache:
                    for name, t in zip((TIME_SHIFT, WKV, CHANNEL_SHIFT), new_states):
                        past_key_values.set_state(i, name, t)
        hidden = self.ln_out(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        if use_cache:
            past_key_values.advance(seq_len)
        cache_out = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, cache_out, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache_out, hidden_states=all_hidden)


class RWKV7ForCausalLM(RWKV7PreTrainedModel, GenerationMixin):
    """RWKV-7 with the language-model head; ``generate()`` decodes with a constant-size state cache."""

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.emb

    def set_input_embeddings(self, value):
        self.model.emb = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, new_embeddings):
        self.head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values: Optional[RecurrentStateCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        position_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        """As :meth:`RWKV7Model.forward` (``position_ids``: the documents of packed rows), plus ``labels`` [B, T] (next-token cross-entropy, shifted inside,
        -100 ignored; the mean over the labelled tokens, or their sum / ``num_items_in_batch`` when that keyword is
        given, as transformers' Trainer does under gradient accumulation) and ``logits_to_keep`` (int k > 0: logits of
        the last k positions only; 0: all).

        Returns ``CausalLMOutputWithPast(loss, logits [B, T, V] float32, past_key_values, hidden_states)``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
        )
        hidden = out.last_hidden_state
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("RWKV7: labels need the logits of every position; pass logits_to_keep=0 with labels")
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise ValueError(f"RWKV7: logits_to_keep must be >= 0, got {logits_to_keep}")
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        logits = head_logits(self.head, hidden)  # decoding: one multi-threaded C call streaming the weight
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"RWKV7: labels must have the shape of input_ids {tuple(logits.shape[:2])}, got {got}")
            # transformers' Trainer passes num_items_in_batch (the labelled tokens of the whole optimiser step,
            # all accumulated micro-batches) and then does not divide by the accumulation steps itself: the sum
            # over this micro-batch divided by that count is the step's token mean, as its own models compute.
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
                reduction="mean" if num_items is None else "sum",
            )
            if num_items is not None:
                loss = loss / torch.as_tensor(num_items, device=loss.device, dtype=loss.dtype)
        if not return_dict:
            rest = tuple(v for v in (out.past_key_values, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    # -- RWKV-LM checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_rwkv_lm(
        cls,
        path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
        *,
        dtype: Optional[torch.dtype] = None,
        **config_kwargs,
    ) -> "RWKV7ForCausalLM":
        """Build a model from a BlinkDL RWKV-LM x070 ``.pth`` (path, read with ``torch.load(weights_only=True)``)
        or state dict. Sizes, head size and LoRA ranks are read from the shapes; any given in ``config_kwargs``
        (e.g. ``head_size=64``) must agree with them; other config fields (``eos_token_id``...) pass through.

        ``dtype``: the model's dtype; default the checkpoint's (it must then use a single floating dtype).
        Raises ValueError listing missing/unexpected keys and wrong shapes.
        """
        # the converter sits above the model (it builds one): an entry point, imported when called
        from .convert_rwkv_lm import (
            checkpoint_dtype,
            infer_rwkv7_config_kwargs,
            load_rwkv_lm_state_dict,
            rwkv_lm_to_hf_state_dict,
        )

        sd = load_rwkv_lm_state_dict(path_or_state_dict)
        if dtype is None:
            dtype = checkpoint_dtype(sd)
            if dtype is None:
                found = sorted({str(t.dtype) for t in sd.values() if t.is_floating_point()})
                raise TypeError(
                    f"RWKV-LM state dict mixes dtypes {found}; pass dtype=torch.float32 (or another) to convert"
                )
        config = RWKV7Config(**infer_rwkv7_config_kwargs(sd, **config_kwargs))
        hf_sd = rwkv_lm_to_hf_state_dict(sd, config)
        model = cls(config)
        model.to(dtype)
        # strict except the optional first-layer v0/v1/v2 (not used by layer 0)
        result = model.load_state_dict({k: v.to(dtype) for k, v in hf_sd.items()}, strict=False)
        allowed = {f"model.blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
        bad = [k for k in result.missing_keys if k not in allowed] + list(result.unexpected_keys)
        if bad:  # pragma: no cover - the converter has already checked the names
            raise ValueError(f"from_rwkv_lm: state dict does not fit the model: {bad}")
        return model

    def to_rwkv_lm_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict:
        """The weights with RWKV-LM names and shapes ([1, 1, C] vectors), on CPU, for ``torch.save`` (a ``.pth``
        that RWKV-LM and the ``rwkv`` pip package load). ``dtype``: convert floating tensors (default: keep)."""
        from .convert_rwkv_lm import hf_to_rwkv_lm_state_dict

        sd = hf_to_rwkv_lm_state_dict(self.state_dict(), self.config)
        return {k: (v.to(dtype) if dtype is not None else v).cpu() for k, v in sd.items()}

    # -- flash-linear-attention (fla-hub) folders: model_type "rwkv7" (:mod:`.convert_fla`) ----------------
    @classmethod
    def from_fla(
        cls, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, **config_kwargs
    ) -> "RWKV7ForCausalLM":
        """Build a model from a folder of flash-linear-attention's RWKV7ForCausalLM (config.json with
        ``model_type`` "rwkv7" + safetensors, as on fla-hub). Sizes and ranks are the checkpoint's; ``dtype``:
        default the checkpoint's; ``config_kwargs`` (``wkv_impl``...) go to the config. A config our RWKV-7
        cannot represent raises :class:`~.convert_fla.FlaConfigError` naming the key."""
        from .convert_fla import load_fla_model

        return load_fla_model(path, dtype=dtype, **config_kwargs)

    def to_fla(
        self, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, overwrite: bool = False
    ) -> str:
        """Write this model as a folder that flash-linear-attention's RWKV7ForCausalLM loads with strict keys
        (written atomically, :mod:`wuneng.saving`). ``dtype``: convert the weights (default: keep). Returns
        the absolute folder path."""
        from .convert_fla import export_fla_checkpoint

        export_fla_checkpoint(self, path, dtype=dtype, overwrite=overwrite)
        return os.path.abspath(os.fspath(path))
