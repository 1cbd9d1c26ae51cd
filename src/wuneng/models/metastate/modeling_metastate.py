"""The Meta-State language model (SPEC section 4) as Hugging Face ``PreTrainedModel`` classes.

Model: RWKV-7 (``emb -> ln0 -> blocks -> ln_out -> head``) whose blocks replace the channel-mix by the
Meta-State layer::

    x_att, v_first, state, z = att(ln1 h)     # time-mix; z = S_t q_t, the second read-out of the same WKV call
    h = h + x_att
    h = h + ffn(ln2 h, z)                     # Meta-State layer: relu((x_k + SSE(z)) K_P^T)^2 V_P

Module names follow RWKV-7's (``model.blocks.{i}.att.*``), the Meta-State layer is ``model.blocks.{i}.ffn``
with ``x_k``, ``param_keys`` (K_P), ``param_values`` (V_P) and ``sse.eta``. The embedding, input checks,
forward loop over the blocks, cache handling, loss and ``generate()`` are RWKV-7's
(:mod:`wuneng.models.rwkv7`): the decode state per layer is the same (time-mix shift, WKV state, Meta-State
layer shift) in a :class:`~wuneng.cache.RecurrentStateCache`, whose size does not grow with the context.

:meth:`MetaStateForCausalLM.from_rwkv7` turns an RWKV-7 model into a Meta-State model computing the same
logits (eta = 0, K_P = W_key, V_P = W_value^T): a trained RWKV-7 is a valid starting point.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from ...layers.metastate import MetaStateLayer, MetaStateTimeMix, resolve_sse_heads
from ..rwkv7 import RWKV7ForCausalLM, RWKV7Model
from ..rwkv7.configuration_rwkv7 import RWKV7Config
from ..rwkv7.modeling_rwkv7 import RWKV7Block, RWKV7PreTrainedModel, _reset_keeping_loaded, time_mix_options
from .configuration_metastate import MetaStateConfig

__all__ = ["MetaStateBlock", "MetaStatePreTrainedModel", "MetaStateModel", "MetaStateForCausalLM"]


class MetaStateBlock(RWKV7Block):
    """One Meta-State block: ``h += att(ln1 h); h += ffn(ln2 h, read-out)``; layer 0 first applies ``ln0``.

    :class:`~wuneng.models.rwkv7.RWKV7Block` with other mixers: the time-mix also returns its state read-out
    ``z = S_t q_t`` and the Meta-State layer takes it (same call signature and states, so RWKV-7's model loop
    runs it).
    """

    @staticmethod
    def make_time_mix(config: MetaStateConfig, layer_idx: int) -> nn.Module:
        return MetaStateTimeMix(
            config.hidden_size,
            config.num_heads,
            config.head_size,
            layer_idx,
            config.num_hidden_layers,
            **time_mix_options(config),
            state_readout=resolve_sse_heads(config.sse_heads, config.num_heads) > 0,  # no SSE head: no 2nd query
        )

    @staticmethod
    def make_channel_mix(config: MetaStateConfig, layer_idx: int) -> nn.Module:
        return MetaStateLayer(
            config.hidden_size,
            config.num_heads,
            config.head_size,
            config.num_param_tokens,
            layer_idx,
            config.num_hidden_layers,
            sse_heads=config.sse_heads,
            moe_groups=config.moe_groups,
            moe_top_k=config.moe_top_k,
        )


class MetaStatePreTrainedModel(RWKV7PreTrainedModel):
    """RWKV-7's init and plumbing, plus the Meta-State layer's init (channel-mix init, eta = 0)."""

    config_class = MetaStateConfig
    _no_split_modules = ["MetaStateBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MetaStateLayer):
            _reset_keeping_loaded(module, module.reset_parameters)
        else:
            super()._init_weights(module)


class MetaStateModel(MetaStatePreTrainedModel, RWKV7Model):
    """Embedding, Meta-State blocks and the final LayerNorm (:class:`RWKV7Model` with ``MetaStateBlock``)."""

    block_class = MetaStateBlock


class MetaStateForCausalLM(MetaStatePreTrainedModel, RWKV7ForCausalLM):
    """Meta-State with the language-model head; ``generate()`` decodes with a constant-size state cache.

    ``forward(input_ids, attention_mask, past_key_values, labels, ...)`` is :meth:`RWKV7ForCausalLM.forward`.
    Grow it with :func:`wuneng.grow_model`; report its state size with :func:`wuneng.grow.state_report`.
    """

    def __init__(self, config: MetaStateConfig):
        RWKV7PreTrainedModel.__init__(self, config)
        self.model = MetaStateModel(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def num_states(self) -> int:
        """WKV state entries over all layers, L * H * N * N."""
        return self.config.num_states

    # -- from RWKV-7 ----------------------------------------------------------------------------------
    @classmethod
    def from_rwkv7(cls, rwkv7: RWKV7ForCausalLM, **config_kwargs) -> "MetaStateForCausalLM":
        """A Meta-State model computing the same logits as the RWKV-7 model ``rwkv7``: every time-mix, norm,
        embedding and head weight copied, K_P = W_key, V_P = W_value^T (M = the channel-mix width), eta = 0.

        ``config_kwargs`` set Meta-State options (``sse_heads``...); sizes come from the RWKV-7 config.
        """
        if not isinstance(rwkv7, RWKV7ForCausalLM) or isinstance(rwkv7, MetaStateForCausalLM):
            raise TypeError(f"from_rwkv7: expected an RWKV7ForCausalLM, got {type(rwkv7).__name__}")
        src: RWKV7Config = rwkv7.config
        shared = ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "layer_norm_eps", "wkv_impl")
        shared += ("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")
        shared += ("bos_token_id", "eos_token_id", "pad_token_id")
        kwargs = {name: getattr(src, name) for name in shared}
        kwargs.update(num_heads=src.num_heads, num_param_tokens=src.intermediate_size)
        kwargs.update(config_kwargs)
        param = next(rwkv7.parameters())
        model = cls(MetaStateConfig(**kwargs)).to(device=param.device, dtype=param.dtype)
        state = {}
        for name, tensor in rwkv7.state_dict().items():
            if name.endswith("ffn.key.weight"):
                state[name.replace("ffn.key.weight", "ffn.param_keys")] = tensor  # K_P = W_key [M, C]
            elif name.endswith("ffn.value.weight"):
                state[name.replace("ffn.value.weight", "ffn.param_values")] = tensor.t()  # V_P = W_value^T
            else:
                state[name] = tensor
        missing, unexpected = model.load_state_dict(state, strict=False)
        still_missing = [k for k in missing if not k.endswith("sse.eta")]
        if still_missing or unexpected:
            raise ValueError(f"from_rwkv7: weights do not fit: missing {still_missing}, unexpected {unexpected}")
        return model

    @classmethod
    def from_rwkv_lm(
        cls,
        path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
        *,
        dtype: Optional[torch.dtype] = None,
        **config_kwargs,
    ) -> "MetaStateForCausalLM":
        """A BlinkDL RWKV-LM x070 checkpoint as a Meta-State model (see :meth:`from_rwkv7`). Meta-State options
        (``sse_heads``, ``moe_groups``, ``moe_top_k``) go to the Meta-State config, the rest to
        :meth:`RWKV7ForCausalLM.from_rwkv_lm` (e.g. ``head_size``, checked against the checkpoint)."""
        meta_only = ("sse_heads", "moe_groups", "moe_top_k")
        meta_kwargs = {k: config_kwargs.pop(k) for k in meta_only if k in config_kwargs}
        rwkv7 = RWKV7ForCausalLM.from_rwkv_lm(path_or_state_dict, dtype=dtype, **config_kwargs)
        return cls.from_rwkv7(rwkv7, **meta_kwargs)

    def to_rwkv_lm_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict:
        raise NotImplementedError(
            "MetaStateForCausalLM has no RWKV-LM export: its Meta-State layer (eta, grown heads) has no RWKV-LM "
            "equivalent; save it with save_pretrained"
        )
