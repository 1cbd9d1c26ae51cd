"""Retention report: how much of a teacher's ability a converted student keeps, and at what memory and speed.

``wuneng eval STUDENT --teacher TEACHER --out DIR`` measures both models the same way and writes
``retention.md``, ``retention.json``, ``passkey_grid.png`` and ``memory_speed.png`` into ``DIR``:

* **relative scores** per task, ``(student - chance) / (teacher - chance)`` (the metric RADLADS reports), with the
  three numbers beside it. The tasks are the registry's (:mod:`wuneng.eval.registry`: arithmetic, mqar,
  state_tracking, run by :func:`wuneng.eval.evaluate.evaluate_model`) and passkey (from the grid below); each
  chance level comes from the task's definition (``ArithmeticConfig.chance``, ``MQARConfig.chance``, ...). The
  ratio is undefined (``None``, shown as "undefined") when the teacher is not above chance: at chance it would
  divide by zero, below it its sign would flip;
* a **passkey grid**: needle depth x context length, accuracy per cell (greedy exact match of the key,
  :mod:`wuneng.eval.tasks.passkey`), for both models. The lengths default to 0.5, 1, 2 and 4 times the
  student's training length: retrieval beyond the training length is where pure-recurrent students are
  known to fail;
* per context length, after a prefill of that length (batch 1): the bytes the cache holds, split into
  recurrent **state bytes** and attention **KV bytes** (the storages behind the tensors, each counted once:
  :func:`wuneng.cache.storage_nbytes`; a growing KV buffer counts its spare room), and **prefill / decode
  tokens/s** (greedy decoding with the cache).

Everything is library code; the CLI only wires the options (:func:`wuneng.cli.eval_command`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from wuneng.cache import storage_nbytes
from wuneng.eval._model import evaluating, model_device
from wuneng.eval.perplexity import _encode
from wuneng.eval.tasks.passkey import PasskeyConfig
from wuneng.saving import apply_umask

__all__ = [
    "DEFAULT_DEPTHS",
    "LENGTH_FACTORS",
    "REPORT_FILES",
    "REPORT_TASKS",
    "LengthMeasurement",
    "ModelMeasurements",
    "PasskeyGrid",
    "RelativeRow",
    "RetentionReport",
    "RetentionSettings",
    "TaskScore",
    "build_report",
    "cache_bytes",
    "check_report_dir",
    "find_train_length",
    "measure_lengths",
    "measure_model",
    "passkey_grid",
    "relative_score",
    "report_markdown",
    "report_tables",
    "write_retention_report",
]

logger = logging.getLogger(__name__)

#: grid lengths as multiples of the training length (the default: up to 4x)
LENGTH_FACTORS = (0.5, 1.0, 2.0, 4.0)
#: relative needle depths of the grid (0: right after the intro, 1: right before the question)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: the tasks a report can score against chance (perplexity has no chance level)
REPORT_TASKS = ("arithmetic", "mqar", "state_tracking", "passkey")
#: what :func:`write_retention_report` writes into its folder (an existing one is never replaced)
REPORT_FILES = ("retention.md", "retention.json", "passkey_grid.png", "memory_speed.png")


def relative_score(student: float, teacher: float, chance: float) -> Optional[float]:
    """``(student - chance) / (teacher - chance)``; ``None`` (undefined) when the teacher is not above chance or a
    number is NaN (a skipped task). 1 = the student keeps all the teacher's gain over chance, 0 = none of it."""
    if any(isinstance(x, float) and math.isnan(x) for x in (student, teacher, chance)):
        return None
    if not teacher > chance:
        return None
    return (student - chance) / (teacher - chance)


# ------------------------------------------------------------------------------------------- data classes
@dataclass
class TaskScore:
    """One scored metric of one model.

    Attributes:
        task, setting, metric: as in :class:`wuneng.eval.evaluate.EvalRow`.
        value: the score (NaN when the task was skipped).
        count: examples scored.
        chance: the score of a guesser, from the task's definition.
        note: why a task was skipped or adapted.
    """

    task: str
    setting: str
    metric: str
    value: float
    count: int
    chance: float
    note: str = ""


@dataclass
class PasskeyGrid:
    """Passkey accuracy per (length, depth) cell of one model.

    Attributes:
        lengths: context lengths in tokens (the grid's columns).
        depths: relative needle depths (its rows).
        cells: ``{(length, round(depth, 6)): accuracy}``; ``None`` where the prompt does not fit the length.
        counts: ``{(length, depth): keys scored}``.
        notes: why cells are empty.
        intro: whether the prompts carry the passkey intro sentence (dropped for the whole grid when a usable
            length cannot hold it).
        chance: the accuracy of guessing the key (:attr:`PasskeyConfig.chance`).
    """

    lengths: list
    depths: list
    cells: dict
    counts: dict
    notes: list
    intro: bool
    chance: float = PasskeyConfig().chance

    def accuracy(self, min_length: Optional[int] = None, max_length: Optional[int] = None) -> float:
        """Accuracy over the scored keys of the cells with ``min_length <= length <= max_length`` (NaN if none)."""
        hits = total = 0.0
        for (length, depth), acc in self.cells.items():
            if acc is None or (min_length is not None and length < min_length):
                continue
            if max_length is not None and length > max_length:
                continue
            n = self.counts.get((length, depth), 1)
            hits, total = hits + acc * n, total + n
        return hits / total if total else float("nan")


@dataclass
class LengthMeasurement:
    """Cache size and speed at one context length (batch 1).

    Attributes:
        length: prefill tokens.
        state_bytes: bytes of the recurrent state tensors the cache holds after the prefill.
        kv_bytes: bytes of the attention keys and values it holds (a growing buffer's spare room included).
        prefill_tokens_per_s: ``length`` / time of the prefill forward.
        decode_tokens_per_s: decoded tokens / time of the greedy one-token steps after the prefill.
    """

    length: int
    state_bytes: int
    kv_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@dataclass
class ModelMeasurements:
    """Everything the report needs of one model (:func:`measure_model`)."""

    name: str
    scores: list
    grid: PasskeyGrid
    lengths: list
    settings: dict = field(default_factory=dict)


@dataclass
class RelativeRow:
    """One line of the relative-score table; ``relative`` None means undefined (see ``note``)."""

    task: str
    setting: str
    metric: str
    student: float
    teacher: float
    chance: float
    relative: Optional[float]
    note: str = ""


@dataclass
class RetentionReport:
    """A student measured against its teacher (:func:`build_report`)."""

    student: ModelMeasurements
    teacher: ModelMeasurements
    train_length: int
    rows: list


@dataclass(frozen=True)
class RetentionSettings:
    """What :func:`measure_model` measures.

    Attributes:
        train_length: the student's training context in tokens (the grid's reference length).
        lengths: grid and memory lengths in tokens (empty: :data:`LENGTH_FACTORS` x ``train_length``).
        depths: needle depths in [0, 1].
        trials: keys per passkey cell.
        tasks: registry tasks scored against chance (passkey always comes from the grid).
        limit: examples per task (None: each task's standard size, see ``evaluate_model``).
        seed: data seed.
        batch_size: sequences per forward / generate call.
        decode_tokens: greedy steps timed after each prefill.
        passkey: the prompt construction (its intro is dropped when a grid length cannot hold it).
    """

    train_length: int
    lengths: tuple = ()
    depths: tuple = DEFAULT_DEPTHS
    trials: int = 2
    tasks: tuple = REPORT_TASKS
    limit: Optional[int] = None
    seed: int = 1
    batch_size: int = 16
    decode_tokens: int = 32
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)

    def __post_init__(self) -> None:
        for name in ("train_length", "trials", "batch_size", "decode_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RetentionSettings.{name} must be a positive int, got {value!r}")
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in self.lengths):
            raise ValueError(f"RetentionSettings.lengths must be positive ints (tokens), got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise ValueError(f"RetentionSettings.depths must be numbers in [0, 1], got {list(self.depths)}")
        unknown = [t for t in self.tasks if t not in REPORT_TASKS]
        if unknown:
            raise ValueError(
                f"the retention report scores {', '.join(REPORT_TASKS)} against chance; {', '.join(unknown)} has no "
                "chance level (leave it out of the tasks)"
            )
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"RetentionSettings.limit must be a positive int or None, got {self.limit!r}")

    def grid_lengths(self) -> list:
        """The grid's lengths: ``lengths`` sorted, or :data:`LENGTH_FACTORS` x ``train_length``."""
        if self.lengths:
            return sorted({int(n) for n in self.lengths})
        return sorted({max(1, int(round(f * self.train_length))) for f in LENGTH_FACTORS})


# ------------------------------------------------------------------------------------------- training length
def find_train_length(folder: Union[str, os.PathLike]) -> Optional[int]:
    """The training context (``data.seq_len`` of a ``wuneng train`` run's ``config.yaml``) recorded for a model
    folder: its own ``config.yaml``, else its run folder's (the folder is ``RUN/final`` or
    ``RUN/checkpoints/step_N``). None when nothing readable is recorded."""
    import yaml

    folder = Path(folder)
    candidates = [folder / "config.yaml"]
    if folder.name == "final":
        candidates.append(folder.parent / "config.yaml")
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / "config.yaml")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
            logger.warning("%s: not readable as YAML (%s); its training length is not used", path, type(err).__name__)
            continue
        seq_len = (config or {}).get("data", {}).get("seq_len") if isinstance(config, dict) else None
        if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
            return seq_len
    return None


# ------------------------------------------------------------------------------------------- cache bytes
def cache_bytes(cache: Any) -> tuple:
    """``(state_bytes, kv_bytes)`` of a model's ``past_key_values``: the storages behind its recurrent states
    (``RecurrentStateCache.states``) and behind its attention keys and values (``cache.layers[i].keys/values``, or
    a legacy tuple of ``(keys, values)`` pairs), each storage counted once (a view counts the whole buffer it lives
    in: what keeping the cache alive costs)."""
    states = [t for layer in getattr(cache, "states", None) or [] for t in layer.values()]
    kv: list = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            kv += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif isinstance(cache, (tuple, list)):
        for pair in cache:
            kv += list(pair)
    elif cache is not None:
        raise TypeError(f"cache_bytes: unknown cache type {type(cache).__name__} (expected a transformers Cache)")
    return storage_nbytes(states), storage_nbytes(kv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_lengths(model: Any, lengths: Sequence[int], decode_tokens: int = 32, seed: int = 0) -> list:
    """Cache bytes and speed after a prefill of each length (batch 1, random ids of the model's vocabulary).

    For each length ``L``: one forward of ``[1, L]`` ids with ``use_cache=True`` (timed: prefill tokens/s), the
    cache's bytes right after it (:func:`cache_bytes`), then ``decode_tokens`` greedy steps of ``[1, 1]`` with the
    cache (timed: decode tokens/s). One short untimed forward first, so that one-time set-up does not count.
    Returns a :class:`LengthMeasurement` per length.
    """
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode_tokens must be a positive int, got {decode_tokens!r}")
    vocab = int(model.config.vocab_size)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    out = []
    with evaluating(model):
        model(input_ids=torch.randint(0, vocab, (1, 4), generator=generator).to(device), use_cache=True)
        for length in lengths:
            ids = torch.randint(0, vocab, (1, int(length)), generator=generator).to(device)
            _sync(device)
            t0 = time.perf_counter()
            try:  # the logits of the last position only (a [1, L, V] float32 tensor is not what is measured)
                result = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                result = model(input_ids=ids, use_cache=True)
            _sync(device)
            prefill = time.perf_counter() - t0
            cache = result.past_key_values
            state, kv = cache_bytes(cache)
            token = result.logits[:, -1:].argmax(dim=-1)  # [1, 1]
            del result
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                step = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = step.past_key_values, step.logits[:, -1:].argmax(dim=-1)
            _sync(device)
            decode = time.perf_counter() - t0
            del cache, step
            row = LengthMeasurement(int(length), state, kv, int(length) / prefill, decode_tokens / decode)
            logger.info(
                "retention: length %d: state %d B, KV %d B, prefill %.0f tokens/s, decode %.1f tokens/s",
                row.length,
                row.state_bytes,
                row.kv_bytes,
                row.prefill_tokens_per_s,
                row.decode_tokens_per_s,
            )
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------- passkey grid
def passkey_grid(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 2,
    seed: int = 1,
    config: Optional[PasskeyConfig] = None,
    batch_size: int = 16,
) -> PasskeyGrid:
    """Passkey accuracy per (length, depth): ``trials`` keys per cell, each the longest prompt of at most
    ``length`` tokens with the key at ``depth`` (:func:`~wuneng.eval.tasks.passkey.make_passkey_example`), greedy
    continuations (:func:`~wuneng.eval.evaluate.generate_continuations`), scored by
    :func:`~wuneng.eval.tasks.passkey.score_passkey`.

    A length that cannot hold the prompt without filler gets empty cells (``None``) and a note. When a usable
    length cannot hold the prompt's intro sentence, the intro is dropped from every prompt of the grid (so that
    all cells ask the same question); :attr:`PasskeyGrid.intro` says which.
    """
    from wuneng.eval.evaluate import generate_continuations
    from wuneng.eval.tasks.mqar import make_rng
    from wuneng.eval.tasks.passkey import build_prompt, make_passkey_example, score_passkey

    config = config or PasskeyConfig()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    lengths = sorted({int(n) for n in lengths})
    depths = [round(float(d), 6) for d in depths]

    def count(text: str) -> int:
        return len(_encode(tokenizer, text))

    key = "9" * config.num_digits

    def bare(cfg: PasskeyConfig) -> int:  # tokens of the prompt without filler
        return count(build_prompt(cfg, [], 0.0, key))

    notes: list = []
    no_intro = replace(config, intro="")
    usable = [n for n in lengths if n >= bare(no_intro)]
    if config.intro and any(n < bare(config) for n in usable):
        notes.append(
            f"prompts without the intro sentence: the shortest usable length {usable[0]} cannot hold it "
            f"({bare(config)} tokens without filler)"
        )
        config = no_intro
    for n in lengths:
        if n not in usable:
            notes.append(f"length {n}: too short for the passkey prompt ({bare(no_intro)} tokens without filler)")
    rng = make_rng(seed)
    low = 10 ** (config.num_digits - 1)
    examples = []
    for n in usable:
        for d in depths:
            for trial in range(trials):
                passkey = str(int(rng.integers(low, 10 * low)))
                examples.append(make_passkey_example(config, n, d, passkey, rng, count, trial))
    cells: dict = {(n, d): None for n in lengths for d in depths}
    counts: dict = {(n, d): 0 for n in lengths for d in depths}
    if examples:
        max_new = max(count(" " + e.answer) for e in examples) + 1
        gens = generate_continuations(
            model, tokenizer, [e.prompt for e in examples], max_new, "\n", batch_size, label="retention passkey"
        )
        cells.update(score_passkey(gens, examples)["per_cell"])
        for e in examples:
            counts[(e.length, round(e.depth, 6))] += 1
    return PasskeyGrid(lengths, depths, cells, counts, notes, bool(config.intro), config.chance)


# ------------------------------------------------------------------------------------------- task scores
def _task_chances(model: Any, tasks: Sequence[str], limit: Optional[int], seed: int) -> dict:
    """``{(task, metric): chance}`` of the settings :func:`~wuneng.eval.evaluate.evaluate_model` runs (each task's
    first preset; MQAR's vocabulary shrunk to the model's as it does; arithmetic over the examples it scores)."""
    from wuneng.eval.evaluate import _spread
    from wuneng.eval.registry import get_task
    from wuneng.eval.tasks.arithmetic import heldout_categories, make_test_set

    out: dict = {}
    for name in tasks:
        spec = get_task(name)
        config = next(iter(spec.presets.values()))
        if name == "arithmetic":
            per_category = 50 if limit is None else max(1, math.ceil(limit / len(heldout_categories(config))))
            examples = make_test_set(config, per_category=per_category, seed=seed).examples
            if limit is not None:
                examples = _spread(examples, limit)
            out[(name, "exact")] = float(np.mean([config.chance(e.category) for e in examples]))
            arith = [config.chance(e.category) for e in examples if e.fact is not None]
            out[(name, "final")] = float(np.mean(arith)) if arith else float("nan")
        elif name == "mqar":
            vocab = int(model.config.vocab_size)
            if config.vocab_size > vocab > config.seq_len:
                config = replace(config, vocab_size=vocab)
            out[(name, "accuracy")] = config.chance
        elif name == "state_tracking":
            out[(name, "accuracy")] = config.chance
    return out


def measure_model(model: Any, tokenizer: Any, settings: RetentionSettings, name: str = "model") -> ModelMeasurements:
    """Scores (with their chance levels), the passkey grid, and cache bytes and speed per length of one model."""
    from wuneng.eval.evaluate import evaluate_model

    t0 = time.perf_counter()
    tasks = [t for t in settings.tasks if t != "passkey"]
    scores = []
    if tasks:
        logger.info("retention: %s: tasks %s", name, ", ".join(tasks))
        rows = evaluate_model(
            model, tokenizer, tasks, limit=settings.limit, seed=settings.seed, batch_size=settings.batch_size
        )
        chances = _task_chances(model, tasks, settings.limit, settings.seed)
        for r in rows:
            if (r.task, r.metric) in chances:
                scores.append(
                    TaskScore(r.task, r.setting, r.metric, r.value, r.count, chances[(r.task, r.metric)], r.note)
                )
    lengths = settings.grid_lengths()
    logger.info("retention: %s: passkey grid, lengths %s x depths %s", name, lengths, list(settings.depths))
    grid = passkey_grid(
        model,
        tokenizer,
        lengths,
        settings.depths,
        settings.trials,
        settings.seed,
        settings.passkey,
        settings.batch_size,
    )
    memory = measure_lengths(model, lengths, settings.decode_tokens)
    logger.info("retention: %s measured in %.1f s", name, time.perf_counter() - t0)
    return ModelMeasurements(name, scores, grid, memory, {"model_class": type(model).__name__})


def build_report(student: ModelMeasurements, teacher: ModelMeasurements, train_length: int) -> RetentionReport:
    """Pair the two models' scores by (task, metric) and add the passkey rows from their grids (all lengths, then
    within and beyond ``train_length``); each row's relative score is :func:`relative_score`."""
    rows = []
    by_key = {(s.task, s.metric): s for s in teacher.scores}
    for s in student.scores:
        t = by_key.get((s.task, s.metric))
        if t is None:
            continue
        notes = list(dict.fromkeys(n for n in (s.note, t.note) if n))
        if s.setting != t.setting:
            notes.append(f"settings differ: teacher {t.setting}")
        rows.append(_row(s.task, s.setting, s.metric, s.value, t.value, t.chance, notes))
    chance = teacher.grid.chance
    for setting, bounds in (
        ("all lengths", (None, None)),
        (f"<= {train_length}", (None, train_length)),
        (f"> {train_length}", (train_length + 1, None)),
    ):
        notes = [] if student.grid.intro == teacher.grid.intro else ["the prompts differ (intro)"]
        rows.append(
            _row(
                "passkey",
                setting,
                "accuracy",
                student.grid.accuracy(*bounds),
                teacher.grid.accuracy(*bounds),
                chance,
                notes,
            )
        )
    return RetentionReport(student, teacher, int(train_length), rows)


def _row(task, setting, metric, student, teacher, chance, notes) -> RelativeRow:
    rel = relative_score(student, teacher, chance)
    notes = list(notes)
    if math.isnan(student) or math.isnan(teacher):
        notes.append("no score (no usable cell or a skipped task)")
    elif rel is None:
        notes.append("undefined: teacher at chance" if teacher == chance else "undefined: teacher below chance")
    return RelativeRow(task, setting, metric, float(student), float(teacher), float(chance), rel, "; ".join(notes))


# ------------------------------------------------------------------------------------------- formatting
def _score(x: Optional[float]) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _chance(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def _relative(row: RelativeRow) -> str:
    return "undefined" if row.relative is None else f"{row.relative:.3f}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _relative_table(report: RetentionReport) -> tuple:
    header = ["task", "setting", "metric", "student", "teacher", "chance", "relative", "note"]
    rows = [
        [r.task, r.setting, r.metric, _score(r.student), _score(r.teacher), _chance(r.chance), _relative(r), r.note]
        for r in report.rows
    ]
    return header, rows


def _grid_table(report: RetentionReport) -> tuple:
    s, t = report.student.grid, report.teacher.grid
    header = ["depth"] + [f"{n}{' *' if n > report.train_length else ''}" for n in s.lengths]
    rows = []
    for d in s.depths:
        rows.append([f"{d:g}"] + [f"{_score(s.cells.get((n, d)))} / {_score(t.cells.get((n, d)))}" for n in s.lengths])
    return header, rows


def _memory_table(report: RetentionReport) -> tuple:
    header = [
        "length",
        "student state B",
        "student KV B",
        "teacher state B",
        "teacher KV B",
        "student prefill tok/s",
        "student decode tok/s",
        "teacher prefill tok/s",
        "teacher decode tok/s",
    ]
    teacher = {m.length: m for m in report.teacher.lengths}
    rows = []
    for s in report.student.lengths:
        t = teacher.get(s.length)
        rows.append(
            [
                f"{s.length}{' *' if s.length > report.train_length else ''}",
                f"{s.state_bytes:,}",
                f"{s.kv_bytes:,}",
                "-" if t is None else f"{t.state_bytes:,}",
                "-" if t is None else f"{t.kv_bytes:,}",
                _rate(s.prefill_tokens_per_s),
                _rate(s.decode_tokens_per_s),
                "-" if t is None else _rate(t.prefill_tokens_per_s),
                "-" if t is None else _rate(t.decode_tokens_per_s),
            ]
        )
    return header, rows


def _md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report_markdown(report: RetentionReport, figures: Optional[dict] = None, level: int = 1) -> str:
    """The report as Markdown: relative scores, the passkey grid (student / teacher per cell), cache bytes and
    speed per length, and ``figures`` (``{caption: path}``, linked as images) if given. ``level``: the heading
    level of its title (the demo embeds it at 3)."""
    h = "#" * level
    s, t = report.student, report.teacher
    lengths = s.grid.lengths
    lines = [
        f"{h} Retention report: student {s.name} vs teacher {t.name}",
        "",
        f"Training length {report.train_length} tokens; lengths marked * lie beyond it. Passkey grid: lengths "
        f"{', '.join(map(str, lengths))} x depths {', '.join(f'{d:g}' for d in s.grid.depths)}, "
        f"{max(s.grid.counts.values(), default=0)} key(s) per cell, prompts "
        f"{'with' if s.grid.intro else 'without'} the intro sentence.",
        "",
        f"{h}# Relative scores: (student - chance) / (teacher - chance)",
        "",
        _md_table(*_relative_table(report)),
        "",
        "Chance comes from each task's definition; the ratio is undefined when the teacher is not above chance.",
        "",
        f"{h}# Passkey accuracy per cell (student / teacher)",
        "",
        _md_table(*_grid_table(report)),
        "",
    ]
    for note in dict.fromkeys(s.grid.notes + t.grid.notes):
        lines.append(f"- {note}")
    if s.grid.notes or t.grid.notes:
        lines.append("")
    lines += [
        f"{h}# Cache after a prefill of each length (batch 1) and speed",
        "",
        _md_table(*_memory_table(report)),
        "",
        "State B: recurrent state tensors; KV B: attention keys and values (a growing buffer's spare room "
        "included); each storage counted once. Decode: greedy one-token steps after the prefill.",
        "",
    ]
    for caption, path in (figures or {}).items():
        lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)


def report_tables(report: RetentionReport) -> list:
    """The report's three tables as ``rich.table.Table`` objects (relative scores, passkey grid, memory/speed)."""
    from rich.table import Table

    out = []
    for title, (header, rows) in (
        (
            f"retention: {report.student.name} vs {report.teacher.name} (relative = (s - c) / (t - c))",
            _relative_table(report),
        ),
        (f"passkey accuracy, student / teacher (* beyond training length {report.train_length})", _grid_table(report)),
        ("cache after prefill (bytes) and tokens/s, batch 1", _memory_table(report)),
    ):
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 or col in ("task", "setting", "metric", "note") else "right")
        for row in rows:
            table.add_row(*row)
        out.append(table)
    return out


# ------------------------------------------------------------------------------------------- figures and files
def plot_passkey_grid(report: RetentionReport, path: Union[str, os.PathLike]) -> Path:
    """Heatmaps of the two grids (depth x length), empty cells grey, a line at the training length."""
    from wuneng.train.plotting import pyplot

    plt = pyplot()
    grids = (
        ("student " + report.student.name, report.student.grid),
        ("teacher " + report.teacher.name, report.teacher.grid),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(report.student.grid.depths) + 2.6), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    for ax, (title, grid) in zip(axes[0], grids):
        values = np.array(
            [
                [np.nan if grid.cells.get((n, d)) is None else grid.cells[(n, d)] for n in grid.lengths]
                for d in grid.depths
            ]
        )
        ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8, color="white" if values[i, j] < 0.5 else "black"
                )
        ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
        ax.set_yticks(range(len(grid.depths)), [f"{d:g}" for d in grid.depths])
        beyond = [j for j, n in enumerate(grid.lengths) if n > report.train_length]
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="red", linewidth=1.5)
        ax.set_xlabel(f"context length (tokens; red line: training length {report.train_length})")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey accuracy: {title}", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, plt, Path(path))


def plot_memory_speed(report: RetentionReport, path: Union[str, os.PathLike]) -> Path:
    """Cache KiB (state and KV, linear axis) and prefill / decode tokens/s (log axis) against the context length
    (log axis), both models; a red line at the training length."""
    from wuneng.train.plotting import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, m, style in (("student", report.student, "-"), ("teacher", report.teacher, "--")):
        xs = [r.length for r in m.lengths]
        ax1.plot(xs, [r.state_bytes / 1024 for r in m.lengths], style, marker="o", label=f"{label}: state")
        ax1.plot(xs, [r.kv_bytes / 1024 for r in m.lengths], style, marker="x", label=f"{label}: KV")
        ax2.plot(xs, [r.decode_tokens_per_s for r in m.lengths], style, marker="o", label=f"{label}: decode")
        ax2.plot(xs, [r.prefill_tokens_per_s for r in m.lengths], style, marker="s", label=f"{label}: prefill")
    lengths = [r.length for r in report.student.lengths]
    for ax in (ax1, ax2):
        ax.axvline(report.train_length, color="red", linewidth=1, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel(f"context length (tokens; red line: training length {report.train_length})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax1.set_ylabel("KiB held by the cache after prefill (batch 1)")
    ax2.set_ylabel("tokens/s (batch 1)")
    fig.tight_layout()
    return _save_figure(fig, plt, Path(path))


def _save_figure(fig, plt, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        apply_umask(tmp)  # mkstemp made it 0o600
        _publish(Path(tmp), path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished file ``tmp`` its name ``path`` without ever replacing a file of that name (a hard link
    fails when ``path`` exists; where links are not supported, an existence check and a rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while the report was written; it was left as it is") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} appeared while the report was written; it was left as it is") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)  # mkstemp made it 0o600
        _publish(Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_report_dir(out_dir: Union[str, os.PathLike]) -> Path:
    """``out_dir`` as a Path when it can take a report: not a file, and none of :data:`REPORT_FILES` in it
    (FileExistsError naming them otherwise: nothing is ever replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; choose a folder for the report")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; nothing was written: choose another --out folder or move "
            "those files away"
        )
    return out


def report_json(report: RetentionReport, meta: Optional[dict] = None) -> dict:
    """The report as JSON-ready data (NaN as null): ``meta``, ``relative`` rows, ``passkey`` cells and ``memory``
    rows per model."""

    def clean(x):
        return None if isinstance(x, float) and math.isnan(x) else x

    def cells(grid: PasskeyGrid) -> list:
        return [
            {"length": n, "depth": d, "accuracy": grid.cells.get((n, d)), "count": grid.counts.get((n, d), 0)}
            for n in grid.lengths
            for d in grid.depths
        ]

    return {
        "meta": {
            "student": report.student.name,
            "teacher": report.teacher.name,
            "train_length": report.train_length,
            "lengths": report.student.grid.lengths,
            "depths": report.student.grid.depths,
            "passkey_intro": report.student.grid.intro,
            "passkey_notes": report.student.grid.notes,
            **(meta or {}),
        },
        "relative": [{k: clean(v) for k, v in asdict(r).items()} for r in report.rows],
        "passkey": {"student": cells(report.student.grid), "teacher": cells(report.teacher.grid)},
        "memory": {
            "student": [asdict(m) for m in report.student.lengths],
            "teacher": [asdict(m) for m in report.teacher.lengths],
        },
    }


def write_retention_report(
    report: RetentionReport, out_dir: Union[str, os.PathLike], meta: Optional[dict] = None
) -> list:
    """Write :data:`REPORT_FILES` into ``out_dir`` (created if needed), each to a temporary name first; refuses a
    folder that holds any of them (:func:`check_report_dir`). Returns the paths written."""
    out = check_report_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid_png = plot_passkey_grid(report, out / "passkey_grid.png")
    memory_png = plot_memory_speed(report, out / "memory_speed.png")
    figures = {"passkey accuracy per cell": grid_png.name, "cache bytes and tokens/s per length": memory_png.name}
    _write_text(out / "retention.md", report_markdown(report, figures))
    _write_text(out / "retention.json", json.dumps(report_json(report, meta), indent=1) + "\n")
    logger.info("retention: wrote %s", ", ".join(str(out / n) for n in REPORT_FILES))
    return [out / name for name in REPORT_FILES]


def retention_report(
    student_dir: Union[str, os.PathLike],
    teacher_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    settings: Optional[dict] = None,
    train_length: Optional[int] = None,
    device: Optional[str] = None,
) -> RetentionReport:
    """Load two saved model folders, measure both (:func:`measure_model`) and write the report into ``out_dir``.

    Checked before any model is loaded: ``out_dir`` holds none of :data:`REPORT_FILES` (FileExistsError), both
    folders exist (FileNotFoundError), and a training length is known: ``train_length``, else
    :func:`find_train_length` of the student (ValueError otherwise). ``settings``: the other fields of
    :class:`RetentionSettings`.
    """
    from wuneng.eval.evaluate import load_model_folder

    check_report_dir(out_dir)
    for what, folder in (("student", student_dir), ("teacher", teacher_dir)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{what} {folder}: no such model folder (expected a save_pretrained folder)")
    length = train_length if train_length is not None else find_train_length(student_dir)
    if length is None:
        raise ValueError(
            f"{student_dir}: no training length recorded (data.seq_len of a config.yaml in the folder or its run "
            "folder); pass --train-length N"
        )
    config = RetentionSettings(train_length=length, **(settings or {}))
    measured = []
    for folder in (student_dir, teacher_dir):
        model, tokenizer = load_model_folder(folder, device=device)
        measured.append(measure_model(model, tokenizer, config, name=str(folder)))
        del model
    report = build_report(measured[0], measured[1], config.train_length)
    meta = {
        "student_class": measured[0].settings.get("model_class"),
        "teacher_class": measured[1].settings.get("model_class"),
        "tasks": list(config.tasks),
        "limit": config.limit,
        "seed": config.seed,
        "trials": config.trials,
        "decode_tokens": config.decode_tokens,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    write_retention_report(report, out_dir, meta)
    return report
