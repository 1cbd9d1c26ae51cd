"""Training configuration: typed dataclasses, a strict YAML loader and command-line overrides.

A run is described by one YAML file whose keys mirror :class:`TrainConfig` (nested sections
``model``, ``data``, ``optim``, ``align``, ``distill``). Loading is strict: an unknown key, a value of
the wrong type or a stage that lacks what it needs raises :class:`ConfigError` with the key path and
what to change. ``key.sub=value`` overrides (``wuneng train -o optim.lr=3e-4``) are parsed as YAML
scalars and applied before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "AlignConfig",
    "DistillConfig",
    "PeftConfig",
    "DistributedConfig",
    "TeacherCacheConfig",
    "TrainConfig",
    "STAGES",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
]

STAGES = ("pretrain", "align", "distill", "sft")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to change."""


@dataclass
class ModelConfig:
    """Where the trained model comes from.

    Exactly one of ``path`` (a local ``save_pretrained`` folder, e.g. a ``wuneng convert`` result) or
    ``config`` (a dict with ``model_type`` plus config fields, or a path to a ``config.json``;
    builds a freshly initialised model: pretraining from scratch).
    """

    path: Optional[str] = None
    config: Optional[Union[dict, str]] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    """Training data.

    ``sources``: files or folders (``.txt``/``.md`` plain text, ``.jsonl`` with ``text`` or ``messages``
    or ``prompt``/``response`` per line), a Hugging Face ``datasets`` folder (``save_to_disk``),
    ``.parquet`` files or folders of them, or
    ``python:package.module:function`` (a callable returning an iterable of texts / records; called
    with ``generator_kwargs``).
    """

    sources: list[str] = field(default_factory=list)
    seq_len: int = 256
    # "greedy": whole documents per sequence (a document that does not fit starts the next one; the
    # rest is padding; longer ones are cut into seq_len pieces). "concat": one token stream cut every
    # seq_len tokens (no padding, documents may straddle sequences).
    packing: Literal["greedy", "concat"] = "greedy"
    # How a plain text file becomes documents: the whole file, blank-line separated paragraphs, or lines.
    text_unit: Literal["file", "paragraph", "line"] = "file"
    text_field: str = "text"
    messages_field: str = "messages"
    hf_split: str = "train"
    generator_kwargs: dict = field(default_factory=dict)
    max_documents: Optional[int] = None
    # Stream the sources (wuneng.train.streaming): read, tokenised by num_workers DataLoader workers (0: in the
    # training process) and packed on the fly, in source order (rows shuffled within windows of shuffle_window
    # rows; 0 = no shuffling); the stream position is saved in checkpoints. false: everything is read, tokenised
    # and packed before step 1 and rows are drawn in a seeded permutation per epoch.
    streaming: bool = False
    num_workers: int = 0
    shuffle_window: int = 0
    # Rows carry position_ids restarting at 0 at each packed document, and the training forward passes them (no
    # attention mask, no cache) so that attention, token shifts and recurrent states restart at every document
    # (docs/training.md, "Document-aware packing"). null: on for the sft stage, off otherwise; true: also for
    # pretrain; false: off. Eager and streamed data alike.
    document_boundaries: Optional[bool] = None


@dataclass
class OptimConfig:
    """AdamW and its schedule (defaults from ARWKV, SPEC section 5)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    schedule: Literal["exponential", "cosine", "constant"] = "exponential"
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # RWKV-7 decay biases ("*w0") learn at this multiple of lr (RWKV-LM uses 2x) and get no decay.
    w0_lr_scale: float = 2.0
    grad_clip: Optional[float] = 1.0


@dataclass
class AlignConfig:
    """Stage 1: per-layer alignment of converted mixers to the teacher's attention."""

    # Layers to align; None = all of ``student.converted_layer_indices()``.
    layers: Optional[list[int]] = None
    # Weight of the state-heads-alone term of hybrid (WuNeng) mixers (SPEC: 1).
    state_weight: float = 1.0
    # Stop once the step's alignment loss (output term + state_weight x state term) is at or below this
    # (ARWKV stops its pure replacement at 0.2).
    stop_loss: Optional[float] = None


@dataclass
class DistillConfig:
    """Stage 2: forward KL(p_teacher || p_student) at a temperature, plus optional CE."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    freeze_mlp: bool = False
    # The KL is computed over chunks of this many tokens, each recomputed in the backward (memory).
    chunk_tokens: int = 4096
    # Distil from cached teacher logits (top-k + log-sum-exp of the rest) instead of a live teacher; build the
    # cache first with `wuneng cache-teacher RECIPE`. See docs/training.md, "Cached teacher logits".
    teacher_cache: Optional["TeacherCacheConfig"] = None


@dataclass
class TeacherCacheConfig:
    """``distill.teacher_cache``: where the teacher's top-k logits live (``wuneng.train.teacher_cache``)."""

    path: str = ""
    top_k: int = 64
    # Rows per safetensors shard (a shard is the unit written atomically and held in memory while read).
    shard_rows: int = 256
    # Rows per teacher forward while building.
    batch_size: int = 8


@dataclass
class PeftConfig:
    """Parameter-efficient options of the stage (wuneng.train.peft_options; docs/training.md "PEFT").

    ``lora_r`` set: LoRA adapters of rank ``lora_r`` (the ``peft`` library, extra ``wuneng[peft]``) on
    ``target_modules`` ("teacher-linear": the linears copied from the teacher, or a list of module names or
    suffixes); their base weights freeze. ``freeze``: also freeze the MLPs and/or the embeddings.
    ``merge_at_end``: the final model is saved with the adapters merged (it loads with the usual classes); false:
    ``final/`` holds the base weights and ``final/adapter/`` the adapter (a PEFT adapter folder).
    """

    lora_r: Optional[int] = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[Literal["teacher-linear"], list[str]] = "teacher-linear"
    merge_at_end: bool = True
    freeze: list[Literal["mlp", "embeddings"]] = field(default_factory=list)


@dataclass
class DistributedConfig:
    """How several processes share the training (docs/training.md "From a laptop to a cluster").

    ``strategy``: ``ddp``: every process holds the whole model and optimizer (accelerate's DDP; one process: plain
    training). ``fsdp``: the student is sharded with FSDP2 ``fully_shard`` (each decoder layer and the root;
    wuneng.train.fsdp) on any backend, gloo on CPU included; checkpoints are sharded (torch.distributed.checkpoint).
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
#: The experiment trackers ``log_with`` takes (accelerate's names).
TRACKERS = ("tensorboard", "wandb", "mlflow")


def parse_mixed_precision(value: Any, where: str = "config.mixed_precision") -> str:
    """``mixed_precision`` in any spelling a YAML file or an override gives it: "auto", "bf16", "fp16", or full
    precision as ``no`` / ``false`` / ``off`` (which YAML reads as the boolean False), ``"no"`` or ``"false"``.
    Returns one of :data:`MIXED_PRECISIONS`; anything else raises :class:`ConfigError` naming the key."""
    if value is False:
        return "no"
    if isinstance(value, str) and value.strip().lower() in MIXED_PRECISIONS + ("false", "off"):
        v = value.strip().lower()
        return "no" if v in ("false", "off") else v
    raise ConfigError(
        f"{where}: {value!r} is not a precision; use one of bf16, fp16, auto, or no (also written false) for full precision"
    )


@dataclass
class TrainConfig:
    """One training run. ``stage`` selects the objective; see docs/training.md."""

    stage: Literal["pretrain", "align", "distill", "sft"] = "pretrain"
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    # Teacher for align/distill: a local folder of the transformers causal LM the student was converted from.
    teacher: Optional[str] = None
    # "byte" (the project's ByteLevelTokenizer), a local tokenizer folder, or None = the teacher's
    # tokenizer when there is a teacher folder, else the model folder's, else "byte".
    tokenizer: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    micro_batch_size: int = 2
    grad_accum_steps: int = 1
    # Length of the run: the lr schedule spans max_steps optimiser steps.
    max_steps: int = 100
    # End the run early at this step (the schedule still spans max_steps); for sliced runs.
    stop_at_step: Optional[int] = None
    # Wall-clock budget in seconds: the run ends after the first optimiser step that finishes at or past it, as if
    # that step were the last (checkpoint, final model; the lr schedule still spans max_steps). null: none.
    max_seconds: Optional[float] = None
    seed: int = 0
    # "auto": bf16 autocast where the device supports it (CUDA with bf16), else full precision. "no" (YAML's
    # no/false too): full precision. "fp16" needs a GPU (train() refuses it on CPU). See docs/training.md.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"parse": parse_mixed_precision}
    )
    gradient_checkpointing: bool = False
    # On CPU: keep freed memory in the process instead of returning it to the kernel after every step
    # (glibc mallopt; wuneng.runtime.tune_cpu_allocator). Process-wide; off = the C library's defaults.
    tune_cpu_allocator: bool = True
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 3
    save_final: bool = True
    # false: no training checkpoints at all, not even at the end (save_every and keep_last unused; nothing to
    # --resume). For runs whose product is the model in memory (train() returns it trained) or final/.
    save_checkpoints: bool = True
    # "auto": the device accelerate picks (CUDA when present); "cpu": the CPU even on a GPU machine.
    device: Literal["auto", "cpu"] = "auto"
    # Progress on the main process: a rich bar when stderr is a terminal, else a plain log line every
    # progress_interval seconds (null: $WUNENG_PROGRESS_INTERVAL, else 10; 0: every step).
    progress: bool = True
    progress_interval: Optional[float] = None
    # Experiment trackers (accelerate's, docs/training.md "Trackers"): any of tensorboard, wandb, mlflow. They get the
    # numbers of every logged step (metrics.jsonl and the log lines stay as they are). A named tracker whose package
    # is missing stops the run before it starts, naming the extra to install.
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    # Where the trackers write: TensorBoard's events, wandb's run folder, MLflow's artifacts. null: OUTPUT_DIR/trackers.
    project_dir: Optional[str] = None
    # The trackers' project: TensorBoard's subfolder of project_dir, the wandb project, the MLflow experiment.
    tracker_project: str = "wuneng"
    # Keyword arguments per tracker for its start (accelerate's init_trackers init_kwargs), e.g.
    # {wandb: {mode: online, entity: me, name: s1}}; wandb runs offline unless this or $WANDB_MODE says otherwise.
    tracker_kwargs: dict = field(default_factory=dict)
    # Also TensorBoard, as if named in log_with, when its package is installed (quietly none when it is not).
    tensorboard: bool = True
    # DDP: set when some trainable parameters do not take part in every forward pass.
    find_unused_parameters: bool = False


# ------------------------------------------------------------------------------ strict loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return config_from_dict(value, tp, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; use one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: a value is required (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in the dataclasses, not in the YAML


def config_from_dict(data: Any, cls: type = None, where: str = "config"):
    """Build dataclass ``cls`` (default :class:`TrainConfig`) from a mapping, strictly."""
    cls = cls or TrainConfig
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    # a field may bring its own parser (metadata "parse"): mixed_precision accepts YAML's boolean `no`
    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(cls) if "parse" in f.metadata}
    kwargs = {
        k: parsers[k](v, f"{where}.{k}") if k in parsers else _coerce(hints[k], v, f"{where}.{k}")
        for k, v in data.items()
    }
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    """Plain-data copy (tuples become lists) for YAML/JSON."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``"a.b=value"`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def validate(
    config: TrainConfig, *, has_model: bool = False, has_teacher: bool = False, has_data: bool = False
) -> None:
    """Cross-field checks. ``has_*``: the Python caller passes that object directly."""
    positive = {
        "micro_batch_size": config.micro_batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "max_steps": config.max_steps,
        "log_every": config.log_every,
        "save_every": config.save_every,
        "keep_last": config.keep_last,
        "data.seq_len": config.data.seq_len,
    }
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"config.{name}: must be >= 1, got {v}")
    if config.data.seq_len < 2:
        raise ConfigError("config.data.seq_len: must be >= 2 (one input and one target token)")
    if config.stop_at_step is not None and config.stop_at_step < 1:
        raise ConfigError(f"config.stop_at_step: must be >= 1, got {config.stop_at_step}")
    if config.max_seconds is not None and not config.max_seconds > 0:
        raise ConfigError(f"config.max_seconds: must be > 0 seconds (or null for no budget), got {config.max_seconds}")
    o = config.optim
    if o.lr <= 0 or o.min_lr < 0:
        raise ConfigError(f"config.optim: lr must be > 0 and min_lr >= 0 (got lr={o.lr}, min_lr={o.min_lr})")
    if o.schedule == "exponential" and o.min_lr <= 0:
        raise ConfigError("config.optim.min_lr: the exponential schedule needs min_lr > 0 (or use schedule: cosine)")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.eps <= 0:
        raise ConfigError("config.optim: warmup_steps and weight_decay must be >= 0 and eps > 0")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError("config.optim.grad_clip: must be > 0, or null to disable clipping")
    if config.progress_interval is not None and not config.progress_interval >= 0:
        raise ConfigError(f"config.progress_interval: must be >= 0 seconds (or null), got {config.progress_interval}")
    if config.distill.chunk_tokens < 1:
        raise ConfigError(f"config.distill.chunk_tokens: must be >= 1, got {config.distill.chunk_tokens}")
    if config.distill.temperature <= 0:
        raise ConfigError(f"config.distill.temperature: must be > 0, got {config.distill.temperature}")
    cache = config.distill.teacher_cache
    if cache is not None and (not cache.path or cache.top_k < 1 or cache.shard_rows < 1 or cache.batch_size < 1):
        raise ConfigError(
            "config.distill.teacher_cache: needs `path` (a folder) and top_k, shard_rows, batch_size >= 1, got "
            f"{cache!r}"
        )
    d = config.data
    if d.num_workers < 0 or d.shuffle_window < 0:
        raise ConfigError(
            f"config.data: num_workers and shuffle_window must be >= 0, got {d.num_workers} and {d.shuffle_window}"
        )
    if not d.streaming and (d.num_workers or d.shuffle_window):
        raise ConfigError(
            "config.data: num_workers and shuffle_window apply to streamed data; set data.streaming: true (or remove them)"
        )
    if d.streaming and config.stage == "distill" and cache is not None:
        raise ConfigError(
            "config.data.streaming: the cached teacher logits are looked up by row index of the eager dataset; "
            "set data.streaming: false to distil from distill.teacher_cache"
        )
    if d.document_boundaries and config.stage in ("align", "distill"):
        raise ConfigError(
            f"config.data.document_boundaries: applies to the pretrain and sft stages, not {config.stage}; remove it"
        )
    for name, kwargs in config.tracker_kwargs.items():
        if name not in TRACKERS or not isinstance(kwargs, dict):
            raise ConfigError(
                f"config.tracker_kwargs.{name}: expected a tracker name ({', '.join(TRACKERS)}) mapped to its keyword "
                f"arguments, e.g. tracker_kwargs: {{wandb: {{mode: online}}}}; got {name!r}: {kwargs!r}"
            )
    if config.distributed.strategy == "fsdp" and config.stage == "align":
        raise ConfigError(
            "config.distributed.strategy: fsdp does not run the align stage (it calls the mixers inside the sharded "
            "decoder layers directly); align with strategy ddp (it trains only the new parameters)"
        )
    if config.distributed.strategy == "fsdp" and config.peft.lora_r is not None:
        raise ConfigError(
            "config.distributed.strategy: fsdp with peft.lora_r is not supported (the adapters are saved from the "
            "unsharded model); use strategy ddp with LoRA"
        )
    if config.peft.lora_r is not None and config.peft.lora_r < 1:
        raise ConfigError(f"config.peft.lora_r: must be >= 1 (or null for no LoRA), got {config.peft.lora_r}")
    if not has_model:
        m = config.model
        if (m.path is None) == (m.config is None):
            raise ConfigError(
                "config.model: give exactly one of `path` (a local model folder, e.g. from `wuneng convert`) "
                "or `config` (model_type + fields, to build a model from scratch)"
            )
    cached = config.stage == "distill" and cache is not None
    if config.stage in ("align", "distill") and config.teacher is None and not has_teacher and not cached:
        raise ConfigError(
            f"stage {config.stage!r} needs a teacher: set `teacher: /path/to/qwen2-or-llama` in the YAML "
            "or pass `-o teacher=/path/to/model`"
        )
    if config.stage in ("align", "distill") and config.model.config is not None and not has_model:
        raise ConfigError(
            f"stage {config.stage!r} trains a converted student: set `model.path` to a `wuneng convert` output "
            "instead of `model.config`"
        )
    if not config.data.sources and not has_data:
        raise ConfigError(
            "config.data.sources: give at least one data file, folder, datasets folder or python:module:function"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any) -> TrainConfig:
    """Read a YAML run description, apply overrides, and build a :class:`TrainConfig`.

    ``fixed``: top-level values set after the YAML and before the overrides (e.g. ``stage=``).
    Cross-field validation happens in the training entry point (it knows which objects the caller
    passes directly).
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for k, v in fixed.items():
        if v is not None:
            data[k] = v
    apply_overrides(data, list(overrides or []))
    where = f"{path}: config" if path is not None else "config"
    return config_from_dict(data, TrainConfig, where)
