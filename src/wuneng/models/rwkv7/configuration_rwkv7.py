"""Configuration of the RWKV-7 language model (SPEC section 2)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ...layers.rwkv7 import lora_ranks
from ...ops.wkv7.dispatch import IMPLS as WKV_IMPLS

__all__ = ["RWKV7Config", "validate_rwkv7_core"]

#: LoRA rank fields of an RWKV-7 config -> key of :func:`~wuneng.layers.rwkv7.lora_ranks`
LORA_RANK_FIELDS = (
    ("decay_low_rank_dim", "w"),
    ("a_low_rank_dim", "a"),
    ("v_low_rank_dim", "v"),
    ("gate_low_rank_dim", "g"),
)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_positive_ints(config, names, what: str, default_hint: bool = False) -> None:
    """Raise ValueError naming the field unless each of ``names`` is a positive int."""
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value <= 0:
            hint = " (or None for the default)" if default_hint else ""
            raise ValueError(f"{what}: {name} must be a positive int{hint}, got {value!r}")


def validate_rwkv7_core(config, what: str, head_reason: str) -> None:
    """The checks and defaults every RWKV-7-based config shares (RWKV7Config, MetaStateConfig): positive
    vocab_size / hidden_size / num_hidden_layers / head_size, head_size dividing hidden_size (``head_reason``
    says why), the LoRA ranks (None -> the RWKV-LM formula, then checked), layer_norm_eps and wkv_impl.
    Messages start with ``what`` (the config class)."""
    check_positive_ints(config, ("vocab_size", "hidden_size", "num_hidden_layers", "head_size"), what)
    if config.hidden_size % config.head_size != 0:
        raise ValueError(
            f"{what}: head_size ({config.head_size}) must divide hidden_size ({config.hidden_size}); {head_reason}"
        )
    ranks = lora_ranks(config.hidden_size, config.head_size)
    for name, key in LORA_RANK_FIELDS:
        if getattr(config, name) is None:
            setattr(config, name, ranks[key])
    check_positive_ints(config, [name for name, _ in LORA_RANK_FIELDS], what, default_hint=True)
    if not isinstance(config.layer_norm_eps, (int, float)) or not config.layer_norm_eps > 0:
        raise ValueError(f"{what}: layer_norm_eps must be a positive float, got {config.layer_norm_eps!r}")
    if config.wkv_impl not in WKV_IMPLS:
        raise ValueError(f"{what}: wkv_impl must be one of {WKV_IMPLS}, got {config.wkv_impl!r}")


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
        validate_rwkv7_core(self, "RWKV7Config", "the width is split into hidden_size / head_size heads")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        check_positive_ints(self, ("intermediate_size",), "RWKV7Config", default_hint=True)
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        """H = hidden_size / head_size."""
        return self.hidden_size // self.head_size

    @property
    def layer_types(self):
        """Every layer is a recurrent (linear-attention-like) layer; transformers uses this for cache layouts."""
        return ["linear_attention"] * self.num_hidden_layers
