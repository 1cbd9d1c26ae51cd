"""The training loop shared by every stage, on ``accelerate`` (one process, DDP, FSDP or ZeRO).

One optimiser step = ``grad_accum_steps`` micro-batches of ``micro_batch_size`` rows on each of
``world_size`` processes. Row order is a seeded permutation per epoch, indexed by the global sample
position, so the data a step sees depends only on (seed, step) — not on the number of processes —
and resuming needs no data-loader state. With ``data.streaming`` the rows of a step are instead the next
``rows_per_step`` rows of a :class:`~wuneng.train.streaming.TokenStream` (read by every process, which keeps its
share), whose position every checkpoint saves. Losses are sums over tokens divided by the token count of
the whole global step, so 1 process x batch 4 and 2 processes x batch 2 compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from ..saving import load_causal_lm, save_pretrained_atomic
from .checkpoint import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints, load_training_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, config_to_dict, validate
from .data import PackedDataset, SourceLike, build_dataset
from .optim import build_optimizer, build_scheduler
from .stages import build_objective

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "GlobalSampler",
    "EpochData",
    "load_model",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    loss: float
    output_dir: Path
    final_dir: Optional[Path]
    last_checkpoint: Optional[Path]
    history: list[dict] = field(default_factory=list)
    is_main_process: bool = True


class GlobalSampler:
    """Global sample position -> row index: a fresh seeded permutation of the rows every epoch."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.num_rows, generator=g)
        return self._cache[epoch]

    def rows(self, start: int, count: int) -> list[int]:
        return [row for _, row in self.positions(start, count)]

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(epoch, row)`` of the global sample positions ``start .. start + count - 1``."""
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_rows)
            out.append((epoch, int(self._perm(epoch)[offset])))
        return out


class EpochData:
    """Fresh rows every epoch (``train(dataset_for_epoch=...)``): ``make(epoch)`` returns the
    :class:`~wuneng.train.data.PackedDataset` of epoch 0, 1, ..., each of the same number of rows and row length
    (generated tasks, where a fixed set would be memorised). The rows of an epoch are visited in the seeded order of
    :class:`GlobalSampler`; the two newest epochs are kept in memory."""

    def __init__(self, make: Callable[[int], PackedDataset]):
        self.make = make
        self._cache: dict[int, PackedDataset] = {}
        self.first = self.get(0)

    def get(self, epoch: int) -> PackedDataset:
        if epoch not in self._cache:
            data = self.make(epoch)
            if epoch > 0 and (
                len(data) != len(self.first) or data.input_ids.shape[1:] != self.first.input_ids.shape[1:]
            ):
                raise ValueError(
                    f"dataset_for_epoch({epoch}) returned {len(data)} rows of {tuple(data.input_ids.shape[1:])} tokens, "
                    f"epoch 0 {len(self.first)} rows of {tuple(self.first.input_ids.shape[1:])}; every epoch needs "
                    "the same number of rows and row length"
                )
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = data
        return self._cache[epoch]

    def batch(self, positions: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The rows at ``(epoch, row)`` positions, in order, as one batch."""
        parts, run = [], []
        for i, (epoch, row) in enumerate(positions):
            run.append(row)
            if i + 1 == len(positions) or positions[i + 1][0] != epoch:
                parts.append(self.get(epoch).batch(run))
                run = []
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------ model loading
def _register_project_models(model_type: Optional[str] = None) -> None:
    """Import ``wuneng.models`` (its classes register with the Auto* factories) unless ``model_type`` is
    one transformers knows already (saves the import for plain Llama/Qwen2 runs)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type is not None and model_type in CONFIG_MAPPING:
        return
    import wuneng.models  # noqa: F401


def _model_type_of(path: Path) -> Optional[str]:
    """``model_type`` of a config.json (or of the one inside a folder), None if unreadable."""
    path = Path(path)
    try:
        with open(path / "config.json" if path.is_dir() else path, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def load_model(model_cfg) -> torch.nn.Module:
    """Load (``path``) or build from a config (``config``) the causal LM to train."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.path is not None:  # one line naming a missing folder, a corrupt weights file or a config mismatch
        return load_causal_lm(model_cfg.path, dtype, "model.path")
    spec = model_cfg.config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..saving import library_model_types

    if isinstance(spec, str):
        config_file = Path(spec).expanduser()
        config_file = config_file / "config.json" if config_file.is_dir() else config_file
        if not config_file.is_file():
            raise FileNotFoundError(f"model.config {spec}: no such config.json")
        model_type = _model_type_of(config_file)
        _refuse_fla_rwkv7(model_type, f"model.config {config_file}")
        _register_project_models(model_type)
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.config {config_file}: unknown model_type {model_type!r}; expected one of wuneng's own "
                f"({', '.join(library_model_types())}) or a transformers model type (e.g. llama, qwen2)"
            )
        hf_config = AutoConfig.from_pretrained(spec, local_files_only=True)
    else:
        spec = dict(spec)
        if "model_type" not in spec:
            raise ConfigError(
                f"model.config needs a `model_type`: one of wuneng's own ({', '.join(library_model_types())}) or a "
                "transformers model type (e.g. llama, qwen2)"
            )
        model_type = spec.pop("model_type")
        _refuse_fla_rwkv7(model_type, "model.config.model_type")
        _register_project_models(model_type)
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.config.model_type: unknown {model_type!r}; expected one of wuneng's own "
                f"({', '.join(library_model_types())}) or a transformers model type (e.g. llama, qwen2)"
            )
        try:
            hf_config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.config ({model_type}): {' '.join(str(e).split())}") from None
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _refuse_fla_rwkv7(model_type: Optional[str], where: str) -> None:
    """``rwkv7`` is flash-linear-attention's model type: known to transformers only in a process that imported
    fla, so accepting it would make the same recipe build fla's model in one process and fail in another."""
    if model_type == "rwkv7":
        raise ConfigError(
            f"{where}: model_type 'rwkv7' is flash-linear-attention's RWKV-7, not wuneng's; use 'wuneng_rwkv7' "
            "(an fla-hub folder converts with `wuneng import-fla SRC OUT`)"
        )


def _pick_tokenizer(config: TrainConfig):
    from ..tokenization import load_tokenizer

    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer)
    for candidate in (config.teacher, config.model.path):
        if candidate is not None and (Path(candidate) / "tokenizer_config.json").is_file():
            return load_tokenizer(candidate)
    return load_tokenizer("byte")


# ---------------------------------------------------------------------------------- logging
#: The package each tracker of ``log_with`` imports; the wuneng extra that installs it has the tracker's name.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _package_available(name: str) -> bool:
    """Whether ``import name`` would find the package (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or stubbed-out module
        return False


def resolve_trackers(config: TrainConfig) -> list[str]:
    """The run's experiment trackers: ``config.log_with`` (a missing package raises :class:`ConfigError` naming
    the extra to install), plus TensorBoard when ``config.tensorboard`` is set and its package is installed."""
    names = list(dict.fromkeys(config.log_with))
    for name in names:
        package = TRACKER_PACKAGES[name]
        if not _package_available(package):
            raise ConfigError(
                f"config.log_with: {name!r} needs the {package} package, which is not installed; install it with "
                f"pip install 'wuneng[{name}]' (or remove {name} from log_with)"
            )
    if config.tensorboard and "tensorboard" not in names and _package_available(TRACKER_PACKAGES["tensorboard"]):
        names.append("tensorboard")
    return names


def tracker_dir_of(config: TrainConfig) -> Path:
    """Where the trackers write: ``config.project_dir``, else ``OUTPUT_DIR/trackers``."""
    if config.project_dir:
        return Path(config.project_dir).expanduser()
    return Path(config.output_dir) / "trackers"


def tracker_init_kwargs(config: TrainConfig, trackers: Sequence[str]) -> dict[str, dict]:
    """accelerate's ``init_trackers(init_kwargs=...)``: ``config.tracker_kwargs`` per tracker; wandb also gets its
    folder (``dir``: the trackers' folder) and offline mode unless the kwargs or ``$WANDB_MODE`` choose one."""
    import os

    kwargs = {name: dict(config.tracker_kwargs.get(name, {})) for name in trackers}
    if "wandb" in kwargs:
        kwargs["wandb"].setdefault("dir", str(tracker_dir_of(config)))
        if "WANDB_MODE" not in os.environ:
            kwargs["wandb"].setdefault("mode", "offline")
    return kwargs


def flat_hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The run's configuration as one level of dotted keys (``optim.lr``) with scalar values (lists and mappings as
    JSON text): what trackers store as hyperparameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = json.dumps(value)

    walk("", config_to_dict(config))
    return out


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl``; the numbers of each step's record (one with a
    ``step`` and no ``event``) also go to the run's experiment trackers through ``accelerator.log``."""

    def __init__(self, run_dir: Path, enabled: bool, accelerator: Any = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        has_trackers = accelerator is not None and bool(getattr(accelerator, "trackers", None))
        self.accelerator = accelerator if enabled and has_trackers else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and "step" in record and "event" not in record:
            values = {
                k: v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self.accelerator.log(values, step=int(record["step"]))

    def close(self) -> None:
        """Finish the trackers (their files complete); not accelerate's ``end_training``, which would also end
        the process group."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self.accelerator = None


class _RunProgress:
    """The run's progress on the main process: a ``rich`` bar when stderr is a terminal, else a plain line
    through ``logging`` every ``interval`` seconds (:class:`~wuneng.progress.ProgressLog`: step, loss,
    tokens/s, elapsed, ETA) that reads the same in a log file. A context manager (the bar's lifetime)."""

    def __init__(
        self,
        enabled: bool,
        total: int,
        completed: int,
        stage: str,
        tokens_seen: int = 0,
        interval: Optional[float] = None,
        terminal: Optional[bool] = None,
    ):
        from ..progress import ProgressLog, stderr_is_terminal

        self.bar = self.task = self.lines = None
        if not enabled:
            return
        if not (stderr_is_terminal() if terminal is None else terminal):
            self.lines = ProgressLog(
                stage, total, start=completed, amount_start=tokens_seen, interval=interval, logger=logger
            )
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(f"[bold]{stage}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(stage, total=total, completed=completed, loss="-", tps="-")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def update(self, step: int, loss: float, tokens_seen: int, tokens_per_s: Optional[float] = None) -> None:
        """After each optimiser step; ``tokens_per_s`` on logged steps (the bar shows it)."""
        if self.bar is not None:
            fields = {} if tokens_per_s is None else {"loss": f"{loss:.4f}", "tps": f"{tokens_per_s:,.0f}"}
            self.bar.update(self.task, completed=step, **fields)
        if self.lines is not None:
            self.lines.update(step, f"loss {loss:.4f}", amount=tokens_seen)


def _progress(
    enabled: bool, total: int, completed: int, stage: str, tokens_seen: int = 0, interval: Optional[float] = None
) -> _RunProgress:
    """The :class:`_RunProgress` of a run (disabled: a no-op)."""
    return _RunProgress(enabled, total, completed, stage, tokens_seen, interval)


def _mixed_precision(choice: Any) -> str:
    """accelerate's ``mixed_precision`` for the config's value (any spelling :func:`parse_mixed_precision` takes):
    "auto" -> "bf16" on a CUDA device with bf16, else "no". "fp16" without CUDA is refused: accelerate runs fp16
    autocast and loss scaling only on GPUs/accelerators and would silently train in float32 on the CPU."""
    import logging

    from .config import ConfigError, parse_mixed_precision

    choice = parse_mixed_precision(choice)
    cuda = torch.cuda.is_available()
    if choice == "fp16" and not cuda:
        raise ConfigError(
            "config.mixed_precision: 'fp16' cannot act on the CPU (accelerate applies fp16 autocast and loss scaling "
            "only on a GPU, and would train in float32); use bf16 (CPU autocast) or no"
        )
    if choice != "auto":
        return choice
    resolved = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    logging.getLogger(__name__).info("mixed_precision auto -> %s", resolved)
    return resolved


# ------------------------------------------------------------------------------------ run folder
#: Entries a training run writes into its output folder. A fresh run refuses a folder holding any of them (an
#: earlier run: its config, metrics, checkpoints, final model or tracker logs are never overwritten nor
#: mixed with the new run's; ``tensorboard`` is where earlier versions wrote TensorBoard's); other files there are
#: left alone.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR, "final", "trackers", "tensorboard")


def check_run_dir(run_dir: Path, resume: bool, stage: str) -> None:
    """Refuse an output folder before anything is written: a fresh run (``resume`` False) needs a folder that
    holds none of :data:`RUN_ENTRIES` (FileExistsError naming them); a resumed one needs a complete checkpoint
    (FileNotFoundError) of the same stage (ConfigError)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"output_dir {run_dir} exists and is not a directory; choose another output_dir")
    if not resume:
        found = [name for name in RUN_ENTRIES if (run_dir / name).exists()]
        if found:
            checkpoints = list_checkpoints(run_dir)
            what = (
                f"checkpoints (newest {checkpoints[-1][1].name}) of an earlier run" if checkpoints else "an earlier run"
            )
            raise FileExistsError(
                f"output_dir {run_dir} already holds {what} ({', '.join(found)}); nothing was written: pass --resume "
                "to continue it, or choose another output_dir"
            )
        return
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(
            f"--resume: output_dir {run_dir} holds no complete checkpoint (nothing to resume); run without --resume "
            "to start there, or point output_dir at the run to continue"
        )
    try:
        with open(latest / "trainer_state.json", encoding="utf-8") as f:
            saved_stage = json.load(f).get("stage")
    except (OSError, ValueError):  # list_checkpoints parsed it a moment ago
        saved_stage = None
    if saved_stage is not None and saved_stage != stage:
        raise ConfigError(
            f"--resume: {latest}/trainer_state.json is a {saved_stage!r} run but this run's stage is {stage!r}; resume "
            f"with stage {saved_stage!r}, or start the {stage!r} stage in another output_dir"
        )


def _check_resume_strategy(checkpoint: Path, fsdp: bool) -> bool:
    """Whether ``checkpoint`` is an FSDP one (``distributed_state/``); an FSDP run refuses a checkpoint of a DDP run
    (its optimizer state is per unsharded parameter)."""
    from .fsdp import has_distributed_state

    distributed = has_distributed_state(checkpoint)
    if fsdp and not distributed:
        raise ConfigError(
            f"--resume: {checkpoint} was written with distributed.strategy ddp; resume it with strategy ddp (an FSDP "
            "run reads only the sharded checkpoints of FSDP runs)"
        )
    return distributed


def _write_run_config(run_dir: Path, config: TrainConfig, resumed_from: Optional[Path]) -> None:
    """``config.yaml`` of a fresh run; a resumed run keeps the first one and, if its config differs, writes
    ``config.resume-step_XXXXXXXX.yaml`` beside it. Written to a temporary name and renamed."""
    import os

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    target = run_dir / "config.yaml"
    if resumed_from is not None and target.exists():
        if target.read_text(encoding="utf-8") == text:
            return
        target = run_dir / f"config.resume-{resumed_from.name}.yaml"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------ train
def train(
    config: TrainConfig,
    *,
    model: Optional[torch.nn.Module] = None,
    teacher: Optional[torch.nn.Module] = None,
    tokenizer: Any = None,
    data_sources: Sequence[SourceLike] = (),
    dataset: Optional[PackedDataset] = None,
    resume: bool = False,
    dataset_for_epoch: Optional[Callable[[int], PackedDataset]] = None,
    should_stop: Optional[Callable[[int, torch.nn.Module], bool]] = None,
) -> TrainResult:
    """Run one training stage as described by ``config``.

    Objects given here replace what the config would load: ``model`` (the model to train),
    ``teacher`` (align/distill), ``tokenizer``, extra ``data_sources`` (iterables or callables of
    texts/records, e.g. the eval task generators) or a ready ``dataset``. ``dataset_for_epoch`` instead gives fresh
    rows every epoch: called with 0, 1, ... as the run reaches each epoch (:class:`EpochData`; not with streaming or
    a teacher cache). ``should_stop(step, model)`` is called after every optimiser step with the trained model (one
    process, or every process of DDP; e.g. an evaluation); True ends the run at that step as if it were the last
    (checkpoint, final model), and under several processes one True is enough. With ``resume`` the newest
    complete checkpoint of ``config.output_dir`` is continued (model, optimizer, scheduler, data
    position, RNG); without one it is an error. A fresh run refuses an output folder that holds an
    earlier run (:data:`RUN_ENTRIES`), before anything is written (:func:`check_run_dir`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from transformers.utils import logging as hf_logging

    validate(
        config,
        has_model=model is not None,
        has_teacher=teacher is not None,
        has_data=bool(data_sources) or dataset is not None or dataset_for_epoch is not None,
    )
    if dataset_for_epoch is not None and (dataset is not None or data_sources or config.data.streaming):
        raise ConfigError(
            "train(dataset_for_epoch=...) is the run's data: pass no dataset or data_sources and set data.streaming: "
            "false"
        )
    if dataset_for_epoch is not None and config.stage == "distill" and config.distill.teacher_cache is not None:
        raise ConfigError(
            "train(dataset_for_epoch=...): distill.teacher_cache looks teacher logits up by row of one fixed dataset; "
            "distil with the teacher itself (teacher_cache: null) or from one dataset"
        )
    check_run_dir(Path(config.output_dir), resume, config.stage)  # every process, before anything is written
    hf_logging.disable_progress_bar()  # transformers' loading/saving bars would interleave with the run's own
    stage = config.stage
    # accelerate keeps one process-wide state; a second train() in the same process (tests, notebooks)
    # may ask for another precision. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    if config.tune_cpu_allocator and not torch.cuda.is_available():
        from ..runtime import tune_cpu_allocator

        tune_cpu_allocator()  # a CPU step otherwise re-faults its activations' pages every step
    trackers = resolve_trackers(config)  # a missing tracker package stops the run here, before anything is written
    accelerator = Accelerator(
        # cpu=True on CPU-only machines: accelerate then runs torchrun's processes as MULTI_CPU (gloo).
        cpu=config.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(config.mixed_precision),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
        log_with=trackers or None,
        project_dir=str(tracker_dir_of(config)) if trackers else None,
    )
    dropped = [name for name in trackers if name not in {str(t) for t in accelerator.log_with}]
    if dropped:  # accelerate skips (with a debug line) a tracker whose package it does not see
        raise ConfigError(f"config.log_with: accelerate cannot start {', '.join(dropped)}; is the package installed?")
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    run_dir = Path(config.output_dir)
    accelerator.wait_for_everyone()  # every process has checked the run folder before process 0 writes there
    set_seed(config.seed)

    # ---- model, teacher, tokenizer, data
    if tokenizer is None:
        tokenizer = _pick_tokenizer(config)
    student = model if model is not None else load_model(config.model)
    cache_cfg = config.distill.teacher_cache if stage == "distill" else None
    if teacher is None and config.teacher is not None and stage in ("align", "distill") and cache_cfg is None:
        teacher = load_causal_lm(config.teacher, next(student.parameters()).dtype, "teacher")
    if stage in ("align", "distill") and teacher is None and cache_cfg is None:
        raise ValueError(f"stage {stage!r} needs a teacher")
    vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} ids but the model's vocabulary is {vocab}: "
            "use a model with vocab_size >= the tokenizer size (or the matching tokenizer)"
        )
    stream = None  # data.streaming: rows come from a TokenStream (wuneng.train.streaming), in stream order
    epochs = None  # dataset_for_epoch: fresh rows every epoch
    if dataset is None and config.data.streaming:
        from .streaming import open_stream

        stream = open_stream(config.data, tokenizer, stage, data_sources, seed=config.seed)
    elif dataset_for_epoch is not None:
        epochs = EpochData(dataset_for_epoch)
        dataset = epochs.first  # epoch 0: the row count and length
    elif dataset is None:
        dataset = build_dataset(config.data, tokenizer, stage, data_sources)
    teacher_cache = None
    if cache_cfg is not None:  # distil from cached logits: the teacher is not loaded (one given here only names it)
        from .teacher_cache import open_teacher_cache

        teacher_cache = open_teacher_cache(config, dataset, teacher)
        teacher = None
    if config.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(student).__name__} does not support gradient checkpointing; set gradient_checkpointing: false"
            )
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(student, "config"):
            student.config.use_cache = False

    student.to(accelerator.device)
    student.train()
    if teacher is not None:
        teacher.to(accelerator.device)
        teacher.eval()
        teacher.requires_grad_(False)
    objective = build_objective(
        stage, student, teacher, config, tokenizer_size=len(tokenizer), teacher_cache=teacher_cache
    )

    # ---- resume, part 1: the weights, before DDP/FSDP wrap the model
    step, tokens_seen = 0, 0
    # Data position: global sample index of step `base_step`'s first row. Counting consumed samples
    # (not steps) lets a resumed run change its global batch and still continue where it stopped.
    base_step, base_sample = 0, 0
    resumed_from = latest_checkpoint(run_dir) if resume else None  # check_run_dir: one exists when resuming
    fsdp = config.distributed.strategy == "fsdp"  # FSDP2 by the loop itself (wuneng.train.fsdp), not accelerate's
    if resumed_from is not None:
        fsdp_checkpoint = _check_resume_strategy(resumed_from, fsdp)  # its model loads with the optimizer (part 2)
        state = load_training_checkpoint(resumed_from, model=None if fsdp_checkpoint else student, restore_rng=False)
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        base_step, base_sample = step, int(state.get("samples_consumed", 0))

    fsdp_sharded = fsdp and world > 1  # one process: nothing to shard (its checkpoints are sharded ones all the same)
    if fsdp and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            f"config.distributed.strategy: fsdp shards the model itself, but accelerate is set up for "
            f"{accelerator.distributed_type.value} (accelerate config / launch --config_file); use one of the two: "
            "strategy ddp with that accelerate config, or strategy fsdp with a plain multi-process launch"
        )
    if fsdp_sharded:
        from .fsdp import shard_model

        shard_model(student)  # before the optimizer: it holds the sharded parameters
    optimizer = build_optimizer(student, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.max_steps)
    if fsdp_sharded:  # accelerate for the rest (optimizer, reductions, trackers), no DDP around the sharded model
        model_p, optimizer_p = objective, accelerator.prepare(optimizer)
    else:
        model_p, optimizer_p = accelerator.prepare(objective, optimizer)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # FSDP/ZeRO clip through the wrapped model's (flat) parameters; otherwise the trainable ones.
    params = list(model_p.parameters()) if sharded else [p for p in student.parameters() if p.requires_grad]

    # ---- resume, part 2: optimizer, scheduler, this process's RNG
    if resumed_from is not None:
        load_training_checkpoint(
            resumed_from,
            **({"model": student, "optimizer": optimizer} if fsdp_checkpoint else {"optimizer": optimizer_p}),
            scheduler=scheduler,
            rank=rank,
            restore_rng=True,
        )
        if stream is not None:
            from .checkpoint import load_data_state

            data_state = load_data_state(resumed_from)
            if data_state is None:
                raise ConfigError(
                    f"--resume: {resumed_from} was written by a run without data.streaming, so its position in the "
                    "data stream is unknown; resume with data.streaming: false (or start a new run)"
                )
            stream.load_state_dict(data_state)
    stop_step = min(config.max_steps, config.stop_at_step or config.max_steps)
    sampler = GlobalSampler(len(dataset), config.seed) if stream is None else None
    rows_per_micro = config.micro_batch_size
    rows_per_step = rows_per_micro * world * config.grad_accum_steps
    if is_main:  # everything loaded: only now the run folder gets the run's files (a failed start leaves none)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_config(run_dir, config, resumed_from)
        if trackers:
            tracker_dir_of(config).mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(
                config.tracker_project,
                config=flat_hyperparameters(config),
                init_kwargs=tracker_init_kwargs(config, trackers),
            )
    writer = MetricsWriter(run_dir, is_main, accelerator)
    if is_main:
        writer.write(
            {
                "event": "resume" if resumed_from else "start",
                "stage": stage,
                "step": step,
                "checkpoint": str(resumed_from) if resumed_from else None,
                "rows": len(dataset) if stream is None else None,
                "world_size": world,
                "rows_per_step": rows_per_step,
            }
        )
        if resumed_from is not None:
            logger.info(
                "%s: resuming from checkpoint %s at step %d (runs to step %d)", stage, resumed_from, step, stop_step
            )
        else:
            logger.info("%s: starting at step 0 (runs to step %d) in %s", stage, stop_step, run_dir)
        logger.info(
            "%s: %s rows of %d tokens, %d process(es) x %d rows x %d accumulation = %d rows per step",
            stage,
            len(dataset) if stream is None else "streamed",
            dataset.input_ids.shape[1] if stream is None else stream.seq_len,
            world,
            rows_per_micro,
            config.grad_accum_steps,
            rows_per_step,
        )

    history: list[dict] = []
    last_ckpt: Optional[Path] = resumed_from or latest_checkpoint(run_dir)
    last_loss = float("nan")
    unwrapped = accelerator.unwrap_model(model_p)
    progress = _progress(config.progress and is_main, stop_step, step, stage, tokens_seen, config.progress_interval)
    window_tokens, window_start = 0, time.perf_counter()
    loop_start = window_start  # config.max_seconds counts from here (loading and set-up excluded)

    def checkpoint(at_step: int, last_metrics: dict) -> Path:
        full_sd = None
        if sharded:
            sd = accelerator.get_state_dict(model_p)
            full_sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")} if sd else None
        return save_checkpoint(
            run_dir,
            at_step,
            model=student,
            optimizer=optimizer_p,
            scheduler=scheduler,
            trainer_state={
                "samples_consumed": base_sample + (at_step - base_step) * rows_per_step,
                "tokens_seen": tokens_seen,
                "stage": stage,
                "metrics": last_metrics,
            },
            keep_last=config.keep_last,
            rank=rank,
            world_size=world,
            barrier=accelerator.wait_for_everyone,
            model_state_dict=full_sd,
            sharded_optimizer=sharded,
            data_state=stream.state_dict() if stream is not None else None,
            distributed_state=(student, optimizer) if fsdp else None,
        )

    with progress:
        while step < stop_step:
            # -- the micro-batches of this step on this process
            batches = []
            step_rows = stream.next_rows(rows_per_step) if stream is not None else None  # every process: all rows
            for a in range(config.grad_accum_steps):
                first = base_sample + (step - base_step) * rows_per_step
                start = first + a * world * rows_per_micro + rank * rows_per_micro
                if step_rows is not None:
                    offset = start - first
                    b = step_rows.batch(range(offset, offset + rows_per_micro))
                    batches.append({k: v.to(accelerator.device) for k, v in b.items()})
                    continue
                if epochs is not None:
                    b = epochs.batch(sampler.positions(start, rows_per_micro))
                    batches.append({k: v.to(accelerator.device) for k, v in b.items()})
                    continue
                row_indices = sampler.rows(start, rows_per_micro)
                b = dataset.batch(row_indices)
                if teacher_cache is not None:  # the cached teacher logits are looked up by row index
                    b["row_index"] = torch.as_tensor(row_indices, dtype=torch.long)
                batches.append({k: v.to(accelerator.device) for k, v in b.items()})
            # Terms with their own normaliser (the distillation CE over labels): global counts, then scales.
            term_counts = [unwrapped.term_counts(b) for b in batches]
            term_names = sorted(term_counts[0])
            counts = torch.stack(
                [
                    sum(unwrapped.count_tokens(b) for b in batches).to(torch.float64),
                    sum(b["attention_mask"].sum() for b in batches).to(torch.float64),
                    *[sum(c[name] for c in term_counts).to(torch.float64) for name in term_names],
                ]
            ).to(accelerator.device)
            counts = accelerator.reduce(counts, reduction="sum")
            n_global, input_tokens = max(float(counts[0]), 1.0), int(counts[1])
            forward_kwargs = {}
            if term_names:
                forward_kwargs["term_scales"] = {
                    n: n_global / max(float(c), 1.0) for n, c in zip(term_names, counts[2:])
                }

            sums: dict[str, torch.Tensor] = {}
            for a, b in enumerate(batches):
                sync = contextlib.nullcontext() if a == len(batches) - 1 else accelerator.no_sync(model_p)
                if fsdp_sharded:  # not prepared by accelerate: its autocast and no_sync are applied here
                    from .fsdp import no_gradient_sync

                    sync = contextlib.nullcontext() if a == len(batches) - 1 else no_gradient_sync(student)
                with sync, accelerator.autocast() if fsdp_sharded else contextlib.nullcontext():
                    out = model_p(b, **forward_kwargs)
                    # DDP averages gradients over processes: scale by world so the result is sum / n_global.
                    accelerator.backward(out["loss_sum"] * (world / n_global))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().to(torch.float64)
            keys = sorted(sums)
            totals = accelerator.reduce(torch.stack([sums[k] for k in keys]).to(accelerator.device), reduction="sum")
            metrics = {("loss" if k == "loss_sum" else k): float(v) / n_global for k, v in zip(keys, totals)}
            loss = metrics["loss"]
            if fsdp_sharded:  # DTensor gradients: the norm of the full gradients, on every process
                from .fsdp import clip_grad_norm

                grad_norm = clip_grad_norm(params, config.optim.grad_clip)
            elif config.optim.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(params, config.optim.grad_clip)
            else:
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
            grad_norm = float(grad_norm)
            # fp16: an inf gradient norm is the loss scaler's overflow signal (it skips the step), not a failure
            grad_ok = math.isfinite(grad_norm) or accelerator.mixed_precision == "fp16"
            if not (math.isfinite(loss) and grad_ok):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                bad = loss if not math.isfinite(loss) else grad_norm
                msg = (
                    f"{what} is {bad} at step {step + 1} (stage {stage}); the run stopped before updating the weights. "
                    f"Last good checkpoint: {last_ckpt if last_ckpt else 'none (no checkpoint written yet)'}. "
                    "Lower optim.lr or check the data, then continue with --resume."
                )
                writer.write(
                    {
                        "event": "nonfinite",
                        "step": step + 1,
                        what.replace(" ", "_"): str(bad),
                        "checkpoint": str(last_ckpt) if last_ckpt else None,
                    }
                )
                writer.close()
                raise NonFiniteLossError(msg)
            lr = optimizer.param_groups[0]["lr"]
            optimizer_p.step()
            scheduler.step()
            optimizer_p.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += input_tokens
            window_tokens += input_tokens
            last_loss = loss

            stop_now = step >= stop_step
            if config.align.stop_loss is not None and stage == "align" and loss <= config.align.stop_loss:
                stop_now = True
            stop_reason = None  # the run's own ends (max_steps, stop_at_step, align.stop_loss) are the same everywhere
            if stop_now:
                pass
            elif config.max_seconds is not None and time.perf_counter() - loop_start >= config.max_seconds:
                stop_reason = f"wall-clock budget of {config.max_seconds:g} s reached"
            elif should_stop is not None and should_stop(step, student):
                stop_reason = "should_stop returned True"
            if not stop_now and world > 1 and (config.max_seconds is not None or should_stop is not None):
                flag = accelerator.reduce(torch.tensor([float(stop_reason is not None)], device=accelerator.device))
                if float(flag.sum()) > 0 and stop_reason is None:
                    stop_reason = "another process stopped"
            if stop_reason is not None:  # every process stops at this step
                stop_now = True
                if is_main:
                    logger.info("%s: stopping at step %d (of %d): %s", stage, step, stop_step, stop_reason)
            if step % config.log_every == 0 or stop_now:
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed if elapsed > 0 else 0.0
                record = {
                    "step": step,
                    **metrics,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": round(tps, 1),
                }
                history.append(record)
                writer.write(record)
                window_tokens, window_start = 0, time.perf_counter()
                progress.update(step, loss, tokens_seen, tps)
            else:
                progress.update(step, loss, tokens_seen)
            if config.save_checkpoints and (step % config.save_every == 0 or stop_now):
                last_ckpt = checkpoint(step, {k: v for k, v in metrics.items()})
                if is_main:
                    logger.info("%s: checkpoint %s written", stage, last_ckpt)
            if stop_now:
                break

    if stream is not None:
        stream.close()
    final_dir = None
    if config.save_final:
        final_dir = run_dir / "final"
        accelerator.wait_for_everyone()
        state_dict = (
            accelerator.get_state_dict(model_p)
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            else None
        )
        if fsdp_sharded:  # gathered on process 0, keys without the objective's "student." (added for the line below)
            from .fsdp import full_model_state_dict

            state_dict = {f"student.{k}": v for k, v in full_model_state_dict(student).items()}
        if is_main:
            if state_dict is not None:
                state_dict = {k[len("student.") :]: v for k, v in state_dict.items() if k.startswith("student.")}
            adapter = None
            if config.peft.lora_r is not None and state_dict is None:
                from .peft_options import ADAPTER_DIR, merge_lora, take_adapter, write_adapter

                if config.peft.merge_at_end:
                    logger.info("%s: merged %d LoRA adapters into the final model", stage, merge_lora(student))
                else:  # the base weights as the model's own, the adapter beside them in final/adapter/
                    adapter = take_adapter(student)

            def write_final(folder: str) -> None:
                student.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
                if hasattr(tokenizer, "save_pretrained"):
                    tokenizer.save_pretrained(folder)
                if adapter is not None:
                    write_adapter(Path(folder) / ADAPTER_DIR, *adapter)

            # assembled beside and renamed in; a resumed run's earlier final/ is replaced only once the new one is whole
            save_pretrained_atomic(student, final_dir, write=write_final, check=False)
    if is_main:
        writer.write({"event": "end", "step": step, "loss": last_loss})
        logger.info(
            "%s: finished at step %d, loss %.4f%s",
            stage,
            step,
            last_loss,
            f", model in {final_dir}" if final_dir else "",
        )
    writer.close()
    accelerator.wait_for_everyone()
    return TrainResult(step, last_loss, run_dir, final_dir, last_ckpt, history, is_main)
