"""Configuration of the WuNeng hybrid language model (SPEC section 3)."""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

try:  # transformers >= 5.2x: a sub-config's class, default type and optionality in one spec
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.17 (a GPU image's): the older `sub_configs = {name: class}`
    SubConfigSpec = None

from ...layers.hybrid import FUSIONS, MIXER_KINDS, check_state_head_size
from ...ops.wkv7.dispatch import IMPLS as WKV_IMPLS

__all__ = [
    "WuNengConfig",
    "resolve_layer_kinds",
    "ARWKV_INITS",
    "DEFAULT_MIDDLE_HEADS",
    "default_middle_heads",
    "TEACHER_SHAPE_FIELDS",
    "teacher_model_class",
]

#: the paper's number of middle heads H_m; a teacher with fewer attention heads gets one per head
DEFAULT_MIDDLE_HEADS = 4

#: how ARWKV replacement layers are initialised: the RWKV-7 init (SPEC section 2), or RADLADS-style copies of the
#: teacher's attention projections (W_r <- W_q, W_k <- repeat_kv(W_k), W_v <- repeat_kv(W_v), W_o <- W_o)
ARWKV_INITS = ("rwkv7", "radlads")


#: fields of the WuNeng config that mirror the teacher's (read from ``teacher_config``; kept flat so that code
#: reading ``config.hidden_size`` and older saved folders, which have no ``teacher_config``, keep working)
TEACHER_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
)


def teacher_model_class(teacher_config: PretrainedConfig, causal_lm: bool = True) -> type:
    """The transformers class of the teacher's causal LM (or, ``causal_lm=False``, its base model) for
    ``teacher_config``; ValueError naming the config when transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if causal_lm else MODEL_MAPPING
    try:
        return mapping[type(teacher_config)]
    except KeyError:
        raise ValueError(
            f"no transformers {'causal LM' if causal_lm else 'base model'} class for the teacher config "
            f"{type(teacher_config).__name__} (model_type {getattr(teacher_config, 'model_type', None)!r}); WuNeng "
            "converts decoder-only causal LMs (AutoModelForCausalLM)"
        ) from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def default_middle_heads(num_attention_heads: int) -> int:
    """H_m when none is given: :data:`DEFAULT_MIDDLE_HEADS`, at most the number of attention heads H_q."""
    return min(DEFAULT_MIDDLE_HEADS, num_attention_heads)


def _keyed_by_layer_type(rope_parameters, teacher: PretrainedConfig) -> bool:
    """Whether a teacher's ``rope_parameters`` hold one entry per attention layer type (Gemma 3's sliding and full)."""
    layer_types = getattr(teacher, "layer_types", None) or ()
    return isinstance(rope_parameters, dict) and bool(set(rope_parameters) & set(layer_types))


def resolve_layer_kinds(
    num_layers: int,
    hybrid_layers: Optional[Sequence[int]] = None,
    attention: bool = True,
    arwkv_layers: Optional[Sequence[int]] = None,
    layer_kinds: Optional[Sequence[str]] = None,
) -> List[str]:
    """The per-layer mixer kind ("hybrid" | "arwkv" | "attention") from the user-facing options.

    - ``layer_kinds``: explicit list of length L (wins; the other options must then be left at their defaults);
    - ``hybrid_layers``: the converted layers (default: all); the others stay plain attention;
    - ``attention=False``: the converted layers become ARWKV replacements instead of hybrids;
    - ``arwkv_layers``: layers that become ARWKV replacements (taken out of the converted set).
    Negative indices count from the end.
    """
    if not _is_int(num_layers) or num_layers <= 0:
        raise ValueError(f"num_hidden_layers must be a positive int, got {num_layers!r}")

    def indices(name, values):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"{name} must be a list of layer indices, got {values!r}")
        out = []
        for i in values:
            if not _is_int(i) or not -num_layers <= i < num_layers:
                raise ValueError(f"{name}: layer index {i!r} is out of range for {num_layers} layers")
            out.append(i % num_layers)
        return sorted(set(out))

    if layer_kinds is not None:
        if hybrid_layers is not None or arwkv_layers is not None or attention is not True:
            raise ValueError("give either layer_kinds or hybrid_layers/arwkv_layers/attention, not both")
        kinds = list(layer_kinds)
        if len(kinds) != num_layers:
            raise ValueError(f"layer_kinds must have one entry per layer ({num_layers}), got {len(kinds)}")
        for kind in kinds:
            if kind not in MIXER_KINDS:
                raise ValueError(f"layer_kinds: unknown mixer kind {kind!r}; expected one of {MIXER_KINDS}")
        return kinds
    converted = list(range(num_layers)) if hybrid_layers is None else indices("hybrid_layers", hybrid_layers)
    arwkv = set() if arwkv_layers is None else set(indices("arwkv_layers", arwkv_layers))
    kind_converted = "hybrid" if attention else "arwkv"
    kinds = ["attention"] * num_layers
    for i in converted:
        kinds[i] = kind_converted
    for i in arwkv:
        kinds[i] = "arwkv"
    return kinds


class WuNengConfig(PretrainedConfig):
    r"""Configuration of :class:`~wuneng.WuNengForCausalLM`: a teacher's transformers decoder (any family whose
    attention the wrapper serves: Llama, Qwen2/3, Mistral, Gemma 3, Phi-3, Qwen3-MoE, ...) whose attention modules
    are, layer by layer, wrapped as WuNeng hybrid mixers, replaced by ARWKV RWKV-7 time-mixes, or kept.

    Teacher: ``teacher_config``, the teacher's own config (saved inside this one as a nested dictionary with its
    ``model_type``); the student's embeddings, norms, MLPs, rotary embeddings and attention code are the modules
    this config builds. The flat fields :data:`TEACHER_SHAPE_FIELDS` (``hidden_size`` C, ``num_hidden_layers`` L,
    ``num_attention_heads`` H_q, ``num_key_value_heads`` H_kv, ``head_dim`` d_h, ...) mirror it. Without
    ``teacher_config`` (configs written before it existed, or built by hand) a Qwen2 or Llama teacher config is
    made from the flat fields: ``attention_bias`` (q/k/v biases) without ``attention_out_bias`` is Qwen2, equal
    ones are Llama (``attention_bias`` on all four projections), ``mlp_bias`` is Llama's.
    ``teacher_model_type`` records the teacher's model_type.

    WuNeng options (SPEC section 3; defaults are the paper's configuration):
        layer_kinds: per-layer "hybrid" | "arwkv" | "attention" (default: all "hybrid"). The constructor also
            accepts ``hybrid_layers``, ``arwkv_layers`` and ``attention`` (see :func:`resolve_layer_kinds`).
        fusion: cross-head fusion, one of "gate" (default), "add", "concat", "hymba", "none".
        middle_heads: H_m, number of middle heads (default None: 4, or H_q when the teacher has fewer heads,
            :func:`default_middle_heads`; the chosen number is stored; 0 = off).
        state_query: multi-token state processing q_h += lambda_h Y_h W^state (default True).
        state_query_init: initial lambda (default 0.0, function-preserving).
        receptance_rank, gate_rank, middle_rank: ranks of R1 R2, G1 G2, P1 P2 (default 64 each).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim: LoRA ranks of the state heads (None: the RWKV-LM
            formula for C and head size d_h).
        arwkv_head_size: head size of ARWKV replacement layers (default 64; A = C).
        arwkv_init: "rwkv7" (default) or "radlads" (copy the teacher's q/k/v/o; needs head size d_h).
        wkv_impl: WKV-7 form for sequences ("auto", "chunked", "reference", "fla").
    """

    model_type = "wuneng"
    keys_to_ignore_at_inference = ["past_key_values"]
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "teacher_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", optional=True)
        }
    else:
        sub_configs = {"teacher_config": AutoConfig}

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = True
    attention_out_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float | int = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    teacher_model_type: str | None = None
    layer_kinds: list | None = None
    fusion: str = "gate"
    middle_heads: int | None = None
    state_query: bool = True
    state_query_init: float = 0.0
    receptance_rank: int = 64
    gate_rank: int = 64
    middle_rank: int = 64
    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    arwkv_head_size: int = 64
    arwkv_init: str = "rwkv7"
    wkv_impl: str = "auto"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    teacher_config: dict | PretrainedConfig | None = None  # last: see __setattr__

    def __post_init__(self, **kwargs):
        hybrid_layers = kwargs.pop("hybrid_layers", None)
        arwkv_layers = kwargs.pop("arwkv_layers", None)
        attention = kwargs.pop("attention", True)
        self._resolve_teacher_config()
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"WuNengConfig: {name} must be a positive int, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"WuNengConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"WuNengConfig: unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
        if self.middle_heads is None:
            self.middle_heads = default_middle_heads(self.num_attention_heads)
        if not _is_int(self.middle_heads) or not 0 <= self.middle_heads <= self.num_attention_heads:
            raise ValueError(
                f"WuNengConfig: middle_heads must be an int in [0, num_attention_heads={self.num_attention_heads}], "
                f"got {self.middle_heads!r}"
            )
        for name in ("receptance_rank", "gate_rank", "middle_rank", "arwkv_head_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"WuNengConfig: {name} must be a positive int, got {value!r}")
        for name in ("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"WuNengConfig: {name} must be a positive int or None, got {value!r}")
        if self.arwkv_init not in ARWKV_INITS:
            raise ValueError(f"WuNengConfig: arwkv_init must be one of {ARWKV_INITS}, got {self.arwkv_init!r}")
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"WuNengConfig: wkv_impl must be one of {WKV_IMPLS}, got {self.wkv_impl!r}")
        self.layer_kinds = resolve_layer_kinds(
            self.num_hidden_layers, hybrid_layers, attention, arwkv_layers, self.layer_kinds
        )
        if "hybrid" in self.layer_kinds:
            check_state_head_size(self.head_dim, "WuNeng hybrid layers (state heads of the teacher's head_dim)")
        if "arwkv" in self.layer_kinds:
            if self.arwkv_init == "radlads":
                self.arwkv_head_size = self.head_dim
            else:
                check_state_head_size(self.arwkv_head_size, "ARWKV replacement layers")
                if self.hidden_size % self.arwkv_head_size != 0:
                    raise ValueError(
                        f"WuNengConfig: arwkv_head_size ({self.arwkv_head_size}) must divide hidden_size "
                        f"({self.hidden_size}); an ARWKV layer has hidden_size / arwkv_head_size heads"
                    )
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        # a mirrored field set after construction (``from_pretrained(path, vocab_size=...)`` does that) is the
        # teacher's field: the modules are built from teacher_config
        # (teacher_config is the last field: while the dataclass __init__ assigns the mirrored fields it is unset)
        if key in TEACHER_SHAPE_FIELDS:
            teacher = self.__dict__.get("teacher_config")
            if isinstance(teacher, PretrainedConfig) and getattr(teacher, key, None) != value:
                if key == "rope_parameters" and _keyed_by_layer_type(getattr(teacher, key, None), teacher):
                    # transformers 5.17 rewrites this flat copy as one global RoPE (it has no layer_types here);
                    # the teacher's own per-layer-type parameters (Gemma 3) stay as they are
                    return
                setattr(teacher, key, value)

    def _resolve_teacher_config(self) -> None:
        """``teacher_config`` as a config object (from its dictionary, or made from the flat fields), and the flat
        fields mirroring it."""
        teacher = self.teacher_config
        if isinstance(teacher, dict):
            teacher = dict(teacher)
            model_type = teacher.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"WuNengConfig: teacher_config has model_type {model_type!r}, which this transformers does not "
                    "know; install the transformers version the model was converted with"
                )
            teacher = CONFIG_MAPPING[model_type](**teacher)
        elif teacher is None:
            teacher = self._teacher_config_from_fields()
        elif isinstance(teacher, PretrainedConfig):
            teacher = copy.deepcopy(teacher)  # the caller's config object is never changed through this one
        else:
            raise TypeError(
                f"WuNengConfig: teacher_config must be a transformers config or its dictionary, got "
                f"{type(teacher).__name__}"
            )
        self.teacher_config = teacher
        self.teacher_model_type = teacher.model_type
        for name in TEACHER_SHAPE_FIELDS:
            value = getattr(teacher, name, None)
            if name == "num_key_value_heads" and value is None:
                value = teacher.num_attention_heads
            if name == "head_dim" and value is None:
                value = teacher.hidden_size // teacher.num_attention_heads
            if name == "rope_parameters" and value is not None:
                value = dict(value)
            if value is not None or name == "rope_parameters":
                setattr(self, name, value)
        self.tie_word_embeddings = bool(getattr(teacher, "tie_word_embeddings", False))

    def _teacher_config_from_fields(self) -> PretrainedConfig:
        """A Qwen2 / Llama teacher config from the flat fields (see the class docstring)."""
        qkv, out, mlp = bool(self.attention_bias), bool(self.attention_out_bias), bool(self.mlp_bias)
        if qkv and not out and not mlp and self.teacher_model_type in (None, "qwen2"):
            model_type, extra = "qwen2", {}
        elif qkv == out and self.teacher_model_type in (None, "llama"):
            model_type, extra = "llama", {"attention_bias": qkv, "mlp_bias": mlp}
        else:
            raise ValueError(
                f"WuNengConfig: no teacher_config, and the flat fields (attention_bias={qkv}, attention_out_bias="
                f"{out}, mlp_bias={mlp}, teacher_model_type={self.teacher_model_type!r}) describe neither a Qwen2 "
                "nor a Llama teacher; give teacher_config"
            )
        num_kv = self.num_key_value_heads or self.num_attention_heads
        fields = {name: getattr(self, name) for name in TEACHER_SHAPE_FIELDS if name not in ("num_key_value_heads",)}
        if fields["head_dim"] is None:
            fields["head_dim"] = self.hidden_size // self.num_attention_heads
        if fields["rope_parameters"] is None:
            fields.pop("rope_parameters")
        return CONFIG_MAPPING[model_type](
            num_key_value_heads=num_kv,
            attention_dropout=self.attention_dropout,
            use_cache=self.use_cache,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **fields,
            **extra,
        )

    # -- derived views ------------------------------------------------------------------------------------
    @property
    def hybrid_layers(self) -> List[int]:
        """Indices of the hybrid (WuNeng) layers."""
        return [i for i, k in enumerate(self.layer_kinds) if k == "hybrid"]

    @property
    def arwkv_layers(self) -> List[int]:
        """Indices of the ARWKV replacement layers."""
        return [i for i, k in enumerate(self.layer_kinds) if k == "arwkv"]

    @property
    def arwkv_num_heads(self) -> int:
        """Heads of an ARWKV layer: H_q with the RADLADS init (head size d_h), else C / arwkv_head_size."""
        if self.arwkv_init == "radlads":
            return self.num_attention_heads
        return self.hidden_size // self.arwkv_head_size
