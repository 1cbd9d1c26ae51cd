"""Configuration of the RWKV-7 language model (SPEC section 2)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ...layers.rwkv7 import lora_ranks
from ...ops.wkv7.dispatch import IMPLS as WKV_IMPLS

__all__ = ["RWKV7Config"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RWKV7Config(PretrainedConfig):
    r"""Configuration of :class:`~wuneng.RWKV7ForCausalLM` (BlinkDL RWKV-LM x070).

    Args:
        vocab_size: number of tokens V.
        hidden_size: model width C.
        num_hidden_layers: number of blocks L.
        head_size: WKV head size N (default 64); must divide ``hidden_size`` (H = C / N heads).
        intermediate_size: channel-mix width (default 4 C).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: LoRA ranks D_w, D_a, D_v,
            D_g; ``None`` uses the RWKV-LM formula (SPEC section 2; 64/64/32/128 at C = 768, N = 64). Resolved to
            integers at construction, so a saved config is explicit.
        layer_norm_eps: LayerNorm epsilon (1e-5). The GroupNorm after the WKV uses 1e-5 * 8^2 = 64e-5.
        tie_word_embeddings: RWKV-7 does not tie the head to the embedding (False).
        wkv_impl: WKV-7 form for sequences: "auto" (chunked on CPU, fla on CUDA when available), "chunked",
            "reference" or "fla".
        use_cache: return the recurrent state cache from ``forward`` (used by ``generate``).
    """

    model_type = "wuneng_rwkv7"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    head_size: int = 64
    intermediate_size: int | None = None
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
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"RWKV7Config: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.head_size != 0:
            raise ValueError(
                f"RWKV7Config: head_size ({self.head_size}) must divide hidden_size ({self.hidden_size}); "
                f"the width is split into hidden_size / head_size heads"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        ranks = lora_ranks(self.hidden_size, self.head_size)
        for name, key in (
            ("intermediate_size", None),
            ("decay_low_rank_dim", "w"),
            ("a_low_rank_dim", "a"),
            ("v_low_rank_dim", "v"),
            ("gate_low_rank_dim", "g"),
        ):
            if key is not None and getattr(self, name) is None:
                setattr(self, name, ranks[key])
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"RWKV7Config: {name} must be a positive int (or None for the default), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"RWKV7Config: layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"RWKV7Config: wkv_impl must be one of {WKV_IMPLS}, got {self.wkv_impl!r}")
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        """H = hidden_size / head_size."""
        return self.hidden_size // self.head_size

    @property
    def layer_types(self):
        """Every layer is a recurrent (linear-attention-like) layer; transformers uses this for cache layouts."""
        return ["linear_attention"] * self.num_hidden_layers
