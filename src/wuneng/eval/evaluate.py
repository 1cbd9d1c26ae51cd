"""``wuneng eval``: run the registry's tasks (and optionally lm-eval tasks) on a saved checkpoint.

Each task runs at one preset of :data:`wuneng.eval.registry.TASKS` (default: its first preset):

* ``arithmetic`` and ``passkey`` are text tasks: prompts go through the checkpoint's tokenizer and the
  model continues them greedily (``model.generate`` with its recurrent cache when the model has it,
  else :func:`~wuneng.eval.generation.greedy_generate`), cut at the first newline;
* ``mqar`` and ``state_tracking`` are token tasks: the generator's ids are fed to the model directly and
  the argmax at every labelled position is scored. MQAR's vocabulary is shrunk to the model's when the
  preset's (Zoology's 8192) does not fit; a group larger than the vocabulary is skipped;
* ``perplexity`` scores held-out text: ``--text FILE``, or by default the arithmetic preset's held-out
  test problems (seed 1, never in training corpora built with ``training_corpus(..., test_set=...)``).

Results are :class:`EvalRow` lists (task, setting, metric, value, count), printed as a rich table and
optionally written as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from wuneng.eval._model import evaluating, model_device
from wuneng.eval.generation import greedy_generate
from wuneng.eval.lm_eval_tasks import _atomic_write
from wuneng.eval.perplexity import _encode, perplexity
from wuneng.eval.registry import get_task, list_tasks

__all__ = [
    "DEFAULT_TASKS",
    "EvalRow",
    "load_model_folder",
    "generate_continuations",
    "evaluate_model",
    "rows_table",
    "write_rows_json",
]

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("arithmetic", "mqar", "state_tracking", "passkey", "perplexity")
DEFAULT_PASSKEY_LENGTHS = (256, 512, 1024)
DEFAULT_EXAMPLES = 256  # mqar / state_tracking sequences when no limit is given


@dataclass
class EvalRow:
    """One line of the results table.

    Attributes:
        task: registry name, or ``"lm-eval:<task>"``.
        setting: the preset and anything adapted to the model (e.g. ``"T64_n4 V=259"``).
        metric: ``accuracy``, ``exact``, ``final``, ``ppl``, ``nll``, ``solved_up_to``, ...
        value: the number (NaN when the task was skipped, see ``note``).
        count: examples (or scored tokens for perplexity).
        note: why a task was skipped or adapted ("" otherwise).
    """

    task: str
    setting: str
    metric: str
    value: float
    count: int
    note: str = ""


def load_model_folder(path: Union[str, os.PathLike], device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """A saved wuneng (or any local HF causal LM) folder -> ``(model in eval mode, tokenizer)``.

    The model loads through :func:`wuneng.saving.load_causal_lm` (the folder's checks, one line naming the file;
    wuneng's model classes registered; ``dtype`` None: the checkpoint's own), the tokenizer through
    :func:`wuneng.tokenization.load_tokenizer` when the folder has one, else the byte-level default. Nothing is
    downloaded.
    """
    from wuneng.saving import load_causal_lm
    from wuneng.tokenization import ByteLevelTokenizer, load_tokenizer

    folder = Path(path)
    model = load_causal_lm(folder, dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    has_tokenizer = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(folder) if has_tokenizer else ByteLevelTokenizer()
    return model, tokenizer


def _stop_ids(tokenizer: Any, stop: str) -> list[int]:
    ids = _encode(tokenizer, stop)
    out = [ids[0]] if len(ids) == 1 else []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        out.append(eos)
    return out


@torch.no_grad()
def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: str = "\n",
    batch_size: int = 16,
    use_generate: Optional[bool] = None,
    label: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut before the first ``stop``.

    Prompts of equal token length are batched (no padding). ``use_generate`` (default: when the model
    has ``generate``) decodes with the model's cache; otherwise the cache-free reference
    :func:`~wuneng.eval.generation.greedy_generate` re-runs the prefix every step (same tokens).
    Progress: a ``label: batch i/n, new tokens/s, ETA`` line every few seconds (:class:`~wuneng.progress.ProgressLog`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    encoded = [_encode(tokenizer, p) for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("every prompt must encode to at least one token")
    stops = _stop_ids(tokenizer, stop)
    use_generate = hasattr(model, "generate") if use_generate is None else use_generate
    if not use_generate:
        new_ids = greedy_generate(model, encoded, max_new_tokens, stops or None, batch_size)
    else:
        device = model_device(model)
        new_ids = [[] for _ in prompts]
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = stops[-1] if pad is None and stops else (0 if pad is None else pad)
        from wuneng.progress import ProgressLog

        batches = sum(math.ceil(len(rows) / batch_size) for rows in by_len.values())
        lines = ProgressLog(label, batches, unit="batch", rate_unit="new tokens/s", logger=logger)
        done = new_tokens = 0
        with evaluating(model):
            for length, rows in by_len.items():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start : start + batch_size]
                    x = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)  # [B, T]
                    out = model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=stops or None,
                        pad_token_id=pad,
                    )
                    for r, i in enumerate(chunk):
                        ids = out[r, length:].tolist()
                        for j, t in enumerate(ids):  # drop what follows the first stop (generate pads it)
                            if t in stops:
                                ids = ids[: j + 1]
                                break
                        new_ids[i] = ids
                    done, new_tokens = done + 1, new_tokens + sum(len(new_ids[i]) for i in chunk)
                    lines.update(done, amount=new_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    return [t.split(stop, 1)[0] if stop else t for t in texts]


@torch.no_grad()
def _argmax_ids(model: Any, input_ids: torch.Tensor, batch_size: int, label: str = "forward") -> torch.Tensor:
    """Greedy next-token predictions at every position: ``[N, T] -> [N, T]`` (batched forwards; a progress
    line every few seconds)."""
    from wuneng.progress import ProgressLog

    device = model_device(model)
    out = []
    lines = ProgressLog(label, math.ceil(input_ids.shape[0] / batch_size), unit="batch", logger=logger)
    with evaluating(model):
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            out.append(model(input_ids=batch).logits.argmax(dim=-1).cpu())
            lines.update(len(out), amount=(start + batch.shape[0]) * input_ids.shape[1])
    return torch.cat(out)


def _vocab_size(model: Any) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int):
        raise TypeError("the model needs config.vocab_size (an HF causal LM)")
    return size


def _skip(task: str, setting: str, metric: str, why: str) -> list[EvalRow]:
    return [EvalRow(task, setting, metric, float("nan"), 0, f"skipped: {why}")]


def _run_arithmetic(model, tokenizer, preset, limit, seed, batch_size) -> list[EvalRow]:
    from wuneng.eval.tasks.arithmetic import heldout_categories, make_test_set, score_arithmetic

    config = get_task("arithmetic").presets[preset]
    per_category = 50 if limit is None else max(1, math.ceil(limit / len(heldout_categories(config))))
    examples = make_test_set(config, per_category=per_category, seed=seed).examples
    if limit is not None:
        examples = _spread(examples, limit)
    max_new = max(len(_encode(tokenizer, " " + e.answer)) for e in examples) + 2
    gens = generate_continuations(
        model, tokenizer, [e.prompt for e in examples], max_new, "\n", batch_size, label="eval arithmetic"
    )
    scores = score_arithmetic(gens, examples)
    n_arith = sum(e.fact is not None for e in examples)
    return [
        EvalRow("arithmetic", preset, "exact", scores["exact"], len(examples)),
        EvalRow("arithmetic", preset, "final", scores["final"], n_arith),
    ]


def _run_passkey(model, tokenizer, preset, limit, seed, batch_size, lengths) -> list[EvalRow]:
    from wuneng.eval.tasks.passkey import generate_passkey_examples, score_passkey

    config = get_task("passkey").presets[preset]
    examples = generate_passkey_examples(
        config, list(lengths), trials=1, seed=seed, tokenizer=lambda s: _encode(tokenizer, s)
    )
    if limit is not None:
        examples = _spread(examples, limit)
    max_new = len(_encode(tokenizer, " " + examples[0].answer)) + 1
    gens = generate_continuations(
        model, tokenizer, [e.prompt for e in examples], max_new, "\n", batch_size, label="eval passkey"
    )
    scores = score_passkey(gens, examples)
    rows = [EvalRow("passkey", preset, "accuracy", scores["accuracy"], len(examples))]
    for length, acc in sorted(scores["per_length"].items()) if len(scores["per_length"]) > 1 else ():
        n = sum(e.length == length for e in examples)
        rows.append(EvalRow("passkey", f"{preset} len={length}", "accuracy", acc, n))
    return rows


def _run_mqar(model, preset, limit, seed, batch_size) -> list[EvalRow]:
    from wuneng.eval.tasks.mqar import generate_mqar, mqar_accuracy

    config = get_task("mqar").presets[preset]
    vocab, note = _vocab_size(model), ""
    if config.vocab_size > vocab:
        if vocab <= config.seq_len:
            return _skip("mqar", preset, "accuracy", f"model vocabulary {vocab} <= seq_len {config.seq_len}")
        note = f"vocab {config.vocab_size} -> model's {vocab}"
        config = replace(config, vocab_size=vocab)
    data = generate_mqar(config, limit or DEFAULT_EXAMPLES, seed)
    acc = mqar_accuracy(_argmax_ids(model, data.input_ids, batch_size, "eval mqar"), data.labels)
    return [EvalRow("mqar", f"{preset} V={config.vocab_size}", "accuracy", acc, len(data), note)]


def _run_state_tracking(model, preset, limit, seed, batch_size) -> list[EvalRow]:
    from wuneng.eval.tasks.state_tracking import generate_word_problems, state_tracking_report

    config = get_task("state_tracking").presets[preset]
    setting = f"{preset} k={config.seq_len}"
    if config.vocab_size > _vocab_size(model):
        return _skip(
            "state_tracking",
            setting,
            "accuracy",
            f"group order {config.vocab_size} > model vocabulary {_vocab_size(model)}",
        )
    data = generate_word_problems(config, limit or DEFAULT_EXAMPLES, seed)
    report = state_tracking_report(_argmax_ids(model, data.input_ids, batch_size, "eval state_tracking"), data.labels)
    return [
        EvalRow("state_tracking", setting, "accuracy", report["accuracy"], len(data)),
        EvalRow("state_tracking", setting, "solved_up_to", float(report["solved_up_to"]), len(data)),
    ]


def heldout_text(limit: Optional[int] = None, seed: int = 1) -> str:
    """The default perplexity text: the held-out arithmetic problems of the ``one_digit`` preset
    (``prompt answer`` lines, as in training corpora)."""
    from wuneng.eval.tasks.arithmetic import make_test_set

    examples = make_test_set(get_task("arithmetic").presets["one_digit"], per_category=50, seed=seed).examples
    if limit is not None:
        examples = _spread(examples, limit)
    return "".join(e.text + "\n" for e in examples)


def _run_perplexity(model, tokenizer, text, setting, context_length, batch_size) -> list[EvalRow]:
    result = perplexity(model, texts=[text], tokenizer=tokenizer, context_length=context_length, batch_size=batch_size)
    return [
        EvalRow("perplexity", setting, "ppl", result.ppl, result.num_tokens),
        EvalRow("perplexity", setting, "nll", result.nll, result.num_tokens),
    ]


def _spread(items: Sequence, limit: int) -> list:
    """``limit`` items evenly spaced over ``items`` (all of them when there are fewer), so that a limit keeps
    every category / length / depth represented."""
    if limit >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in idx]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: Optional[int] = None,
    presets: Optional[dict[str, str]] = None,
    seed: int = 1,
    text: Optional[str] = None,
    passkey_lengths: Sequence[int] = DEFAULT_PASSKEY_LENGTHS,
    context_length: int = 512,
    batch_size: int = 16,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_kwargs: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[EvalRow]:
    """Run registry ``tasks`` (and lm-eval ``lm_eval_tasks``) on a loaded model; see the module doc.

    Args:
        limit: examples per task (None = each task's default); for lm-eval, documents per task.
        presets: ``{task: preset name}`` (default: each task's first preset).
        seed: data seed (1 = the held-out seed the generators use for tests).
        text: held-out text for perplexity (default :func:`heldout_text`).
        passkey_lengths: passkey prompt lengths in tokens.
        context_length: perplexity window.
        lm_eval_kwargs: extra keyword arguments of :func:`wuneng.eval.lm_eval_glue.run_lm_eval`.
        progress: called with each task name before it runs. Each task also logs a start line, progress lines
            every few seconds (batch i/n, tokens/s, ETA) and a result line through ``logging``.
    """
    if isinstance(limit, bool) or (limit is not None and (not isinstance(limit, int) or limit < 1)):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    presets = dict(presets or {})
    for name in tasks:
        get_task(name)  # ValueError listing the registered names
    for name, preset in presets.items():
        if name not in tasks:
            raise ValueError(f"preset given for {name!r}, which is not among the tasks {list(tasks)}")
        if preset not in get_task(name).presets:
            raise ValueError(
                f"unknown preset {preset!r} for {name}; available: {', '.join(get_task(name).presets) or 'none'}"
            )
    vocab = _vocab_size(model)
    text_ok = len(tokenizer) <= vocab
    rows: list[EvalRow] = []
    t_start = time.monotonic()
    for index, name in enumerate(tasks):
        if progress is not None:
            progress(name)
        preset = presets.get(name) or next(iter(get_task(name).presets), "")
        logger.info("eval: task %d/%d %s (%s)", index + 1, len(tasks), name, preset or "-")
        t_task, first_row = time.monotonic(), len(rows)
        if name in ("arithmetic", "passkey", "perplexity") and not text_ok:
            rows += _skip(name, preset, "-", f"tokenizer has {len(tokenizer)} ids, the model's vocabulary {vocab}")
        elif name == "arithmetic":
            rows += _run_arithmetic(model, tokenizer, preset, limit, seed, batch_size)
        elif name == "passkey":
            rows += _run_passkey(model, tokenizer, preset, limit, seed, batch_size, passkey_lengths)
        elif name == "mqar":
            rows += _run_mqar(model, preset, limit, seed, batch_size)
        elif name == "state_tracking":
            rows += _run_state_tracking(model, preset, limit, seed, batch_size)
        elif name == "perplexity":
            setting = "text file" if text is not None else "held-out arithmetic"
            rows += _run_perplexity(
                model, tokenizer, heldout_text(limit) if text is None else text, setting, context_length, batch_size
            )
        else:  # pragma: no cover - a task added to the registry without a runner here
            rows += _skip(
                name, preset, "-", f"no runner for {name!r} in wuneng.eval.evaluate (registered: {list_tasks()})"
            )
        _log_task_done(
            name, rows[first_row:], time.monotonic() - t_task, index + 1, len(tasks), time.monotonic() - t_start
        )
    if lm_eval_tasks:
        from wuneng.eval.lm_eval_glue import run_lm_eval

        if progress is not None:
            progress("lm-eval: " + ",".join(lm_eval_tasks))
        result = run_lm_eval(model, list(lm_eval_tasks), tokenizer=tokenizer, limit=limit, **(lm_eval_kwargs or {}))
        for task, metrics in result.metrics.items():
            for metric, value in metrics.items():
                rows.append(EvalRow(f"lm-eval:{task}", "", metric, value, result.num_samples.get(task, 0)))
    return rows


def _log_task_done(name: str, rows: Sequence[EvalRow], seconds: float, done: int, total: int, elapsed: float) -> None:
    """One line per finished task: its first result, its time, and the ETA of the remaining tasks."""
    from wuneng.progress import format_duration

    first = next((r for r in rows if not math.isnan(r.value)), None)
    result = f"{first.metric} {first.value:.4f}" if first is not None else (rows[0].note if rows else "no result")
    eta = elapsed / done * (total - done)
    logger.info(
        "eval: task %d/%d %s done in %.1f s (%s), elapsed %s, ETA %s",
        done,
        total,
        name,
        seconds,
        result,
        format_duration(elapsed),
        format_duration(eta),
    )


def rows_table(rows: Sequence[EvalRow], title: str = "wuneng eval"):
    """A ``rich.table.Table`` of the rows."""
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (
        ("task", "left"),
        ("setting", "left"),
        ("metric", "left"),
        ("value", "right"),
        ("n", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=col in ("task", "metric", "value"))
    for r in rows:
        if math.isnan(r.value):
            value = "-"
        elif r.metric == "solved_up_to":
            value = str(int(r.value))
        else:
            value = f"{r.value:.4f}"
        table.add_row(r.task, r.setting, r.metric, value, str(r.count), r.note)
    return table


def write_rows_json(path: Union[str, os.PathLike], rows: Sequence[EvalRow], meta: Optional[dict] = None) -> Path:
    """Write ``{"meta": ..., "results": [row, ...]}`` atomically (NaN becomes null)."""
    path = Path(path)
    results = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
    _atomic_write(path, json.dumps({"meta": meta or {}, "results": results}, indent=2) + "\n")
    return path
