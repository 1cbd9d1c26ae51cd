"""Configuration of the Meta-State language model (SPEC section 4)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ...layers.metastate import resolve_sse_heads
from ..rwkv7.configuration_rwkv7 import _is_int, check_positive_ints, validate_rwkv7_core

__all__ = ["MetaStateConfig"]


class MetaStateConfig(PretrainedConfig):
    r"""Configuration of :class:`~wuneng.MetaStateForCausalLM`: RWKV-7 blocks whose channel-mix is replaced by
    the Meta-State layer (Self-State Encoder + relu^2 parameter tokens).

    Args:
        vocab_size: number of tokens V.
        hidden_size: model width C.
        num_hidden_layers: number of blocks L.
        head_size: WKV head size N (default 64); must divide ``hidden_size`` (the SSE ties head h to the
            width block h mod (C / N)).
        num_heads: WKV heads H (default C / N). The state width H * N may exceed C after growth
            (:func:`wuneng.grow_model`); the time-mix projections are then (H N) x C and C x (H N).
        num_param_tokens: parameter tokens M per layer (default 4 C: with eta = 0 the layer is then exactly
            RWKV-7's channel-mix of width 4 C).
        sse_heads: heads whose state feeds the Self-State Encoder: None (all), an int k (the first k heads)
            or a float fraction in (0, 1]. 0 turns the encoder off (no second WKV read-out).
        moe_groups: sparse routing: split the M parameter tokens into E groups (1 = dense, the default).
        moe_top_k: groups each token uses when ``moe_groups`` > 1 (ranked by the mean relu^2 score).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: LoRA ranks D_w, D_a, D_v,
            D_g; None uses the RWKV-LM formula of C and N (SPEC section 2), resolved at construction.
        layer_norm_eps: LayerNorm epsilon (1e-5); the GroupNorm after the WKV uses 64e-5.
        wkv_impl: WKV-7 form for sequences ("auto", "chunked", "reference", "fla").
        use_cache: return the recurrent state cache from ``forward`` (used by ``generate``).
        tie_word_embeddings: False (as RWKV-7).
    """

    model_type = "wuneng_metastate"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    head_size: int = 64
    num_heads: int | None = None
    num_param_tokens: int | None = None
    sse_heads: int | float | None = None
    moe_groups: int = 1
    moe_top_k: int = 1
    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    layer_norm_eps: float = 1e-5
    wkv_impl: str = "auto"
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        validate_rwkv7_core(
            self, "MetaStateConfig", "the Self-State Encoder ties each head to a block of head_size channels"
        )
        if self.num_heads is None:
            self.num_heads = self.hidden_size // self.head_size
        if self.num_param_tokens is None:
            self.num_param_tokens = 4 * self.hidden_size
        check_positive_ints(self, ("num_heads", "num_param_tokens"), "MetaStateConfig", default_hint=True)
        try:
            resolve_sse_heads(self.sse_heads, self.num_heads)
        except (TypeError, ValueError) as err:
            raise type(err)(f"MetaStateConfig: {err}") from None
        if not _is_int(self.moe_groups) or self.moe_groups < 1 or self.num_param_tokens % self.moe_groups != 0:
            raise ValueError(
                f"MetaStateConfig: moe_groups must be a positive int dividing num_param_tokens={self.num_param_tokens}, "
                f"got {self.moe_groups!r}"
            )
        if not _is_int(self.moe_top_k) or not 1 <= self.moe_top_k <= self.moe_groups:
            raise ValueError(
                f"MetaStateConfig: moe_top_k must be an int in [1, moe_groups={self.moe_groups}], got {self.moe_top_k!r}"
            )
        super().__post_init__(**kwargs)

    @property
    def state_size(self) -> int:
        """Time-mix state width A = H * N."""
        return self.num_heads * self.head_size

    @property
    def num_states(self) -> int:
        """Recurrent WKV state entries of the model: L * H * N * N ("millions of states")."""
        return self.num_hidden_layers * self.num_heads * self.head_size * self.head_size

    @property
    def layer_types(self):
        return ["linear_attention"] * self.num_hidden_layers
