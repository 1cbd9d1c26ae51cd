"""``wuneng select-layers``: which layers of an ARWKV student should keep softmax attention, chosen by the
KL-guided method of fla-org/hybrid-distillation (arXiv 2512.20569).

The method, as run here:

1. Convert the teacher into the all-replaced ARWKV student (every layer an RWKV-7 time-mix) and, with
   ``align_tokens > 0``, align its new layers to the teacher's attention once (stage 1, ``align``); the result is
   the *base* student, shared by every candidate (its new parameters are saved in ``base.safetensors``).
2. The *baseline*: a short distillation run (stage 2, ``distill``, ``budget_tokens`` tokens) of the base student.
3. For each candidate layer i: the base student with layer i given back the teacher's attention (everything else
   as in the base), the same distillation run.
4. After each run, the KL(teacher || student) per token is measured on held-out rows (the same rows for every
   run, never trained on). A layer's score is how much its KL falls below the baseline's; the ``keep`` layers
   with the largest fall are chosen.

Every run is the project's own training loop (:func:`wuneng.train.loop.train`) with the same data, seed and
schedule. The cost is ``(L + 1) x budget_tokens`` distillation tokens (plus ``align_tokens`` once), each at
about the cost of a teacher forward and a student forward and backward.

Resumable: the result of each run is written to ``results.json`` in the work folder as soon as it finishes; a
rerun with the same settings skips the finished runs (a changed setting that the results depend on is refused,
``keep`` may change freely). A run interrupted before its end starts again (its one checkpoint is written at
its end; a leftover folder with a complete checkpoint is continued from it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .train.config import ConfigError

__all__ = ["SelectionConfig", "SelectionResult", "rank_layers", "select_layers", "BASELINE", "RESULTS_FILE"]

logger = logging.getLogger(__name__)

#: the key of the no-kept-layer run in results.json
BASELINE = "baseline"
RESULTS_FILE = "results.json"
BASE_FILE = "base.safetensors"
#: the key every select-layers output file carries beside fla's ``attn`` (so a rerun may replace it)
SELECTION_KEY = "wuneng_selection"


@dataclass
class SelectionConfig:
    """Settings of a layer selection (the CLI's options)."""

    teacher: str
    data: list
    budget_tokens: int
    keep: int
    work_dir: str = "runs/select-layers"
    out: Optional[str] = None  # default: WORK_DIR/keep_attention.json
    candidates: Optional[list] = None  # layers to try (default: all)
    align_tokens: Optional[int] = None  # stage-1 tokens once for the base student (None: budget_tokens; 0: none)
    seq_len: int = 256
    micro_batch_size: int = 4
    lr: float = 1e-4
    eval_rows: int = 8
    seed: int = 0
    arwkv_init: str = "rwkv7"
    dtype: str = "float32"
    tokenizer: Optional[str] = None  # default: the teacher folder's, else "byte"

    def check(self) -> None:
        """ValueError naming the setting for a value that cannot be used."""
        for name in ("budget_tokens", "keep", "seq_len", "micro_batch_size", "eval_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"select-layers: {name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError("select-layers: seq_len must be >= 2 (one input and one target token)")
        if self.align_tokens is not None and self.align_tokens < 0:
            raise ValueError(f"select-layers: align_tokens must be >= 0, got {self.align_tokens}")
        if not self.lr > 0:
            raise ValueError(f"select-layers: lr must be > 0, got {self.lr}")
        if not self.data:
            raise ValueError(
                "select-layers: give at least one data source (--data FILE, folder or python:module:function)"
            )
        if self.arwkv_init not in ("rwkv7", "radlads"):
            raise ValueError(f"select-layers: arwkv_init must be rwkv7 or radlads, got {self.arwkv_init!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"select-layers: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def steps(self, tokens: int) -> int:
        """Optimiser steps that see at least ``tokens`` tokens (one process, no accumulation)."""
        return max(1, math.ceil(tokens / (self.micro_batch_size * self.seq_len)))

    def settings(self) -> dict:
        """What the results depend on (stored in results.json; a rerun must match them)."""
        keys = (
            "budget_tokens",
            "align_tokens",
            "seq_len",
            "micro_batch_size",
            "lr",
            "eval_rows",
            "seed",
            "arwkv_init",
            "dtype",
        )
        out = {k: getattr(self, k) for k in keys}
        out["align_tokens"] = self.budget_tokens if self.align_tokens is None else self.align_tokens
        out["teacher"] = os.path.abspath(self.teacher)
        out["data"] = [os.path.abspath(d) if os.path.exists(str(d)) else str(d) for d in self.data]
        out["tokenizer"] = self.tokenizer
        return out


@dataclass
class SelectionResult:
    """``ranking``: ``[{"layer", "kl", "fall"}]`` best first (fall = baseline KL - KL); ``chosen``: the top
    ``keep`` layers, ascending; ``baseline_kl``; ``out``: the written file; ``runs``: runs done by this call."""

    ranking: list
    chosen: list
    baseline_kl: float
    out: str
    runs: int = 0
    results: dict = field(default_factory=dict)


def rank_layers(kl_by_layer: dict, baseline_kl: float, keep: int) -> tuple[list, list]:
    """Rank candidate layers by how much their KL falls below the baseline's.

    ``kl_by_layer``: ``{layer: KL of the student with that one layer kept}``. Returns ``(ranking, chosen)``:
    ``ranking`` = ``[{"layer", "kl", "fall"}]`` sorted by ``fall = baseline_kl - kl`` descending (ties: the lower
    layer first); ``chosen`` = the first ``keep`` layers of it in ascending order."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if keep > len(kl_by_layer):
        raise ValueError(f"keep={keep} layers asked but only {len(kl_by_layer)} candidate layers were measured")
    ranking = [
        {"layer": int(i), "kl": float(kl), "fall": float(baseline_kl) - float(kl)} for i, kl in kl_by_layer.items()
    ]
    ranking.sort(key=lambda r: (-r["fall"], r["layer"]))
    return ranking, sorted(r["layer"] for r in ranking[:keep])


# ---------------------------------------------------------------------------------------------- files
def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _load_results(path: Path, settings: dict) -> dict:
    """``{run key: record}`` of an earlier selection in the work folder (empty for a new one); ValueError when it
    was made with other settings."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs, saved = data["runs"], data["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a select-layers results file ({err}); choose another --work-dir") from None
    changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(
            f"{path} holds results made with other settings ({'; '.join(changed)}); rerun with the same settings to "
            "continue it, or choose another --work-dir"
        )
    return dict(runs)


def _check_out_file(path: Path) -> None:
    """Refuse to replace a file that an earlier select-layers run did not write."""
    if not path.exists():
        return
    try:
        ours = SELECTION_KEY in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if path.is_dir() or not ours:
        raise FileExistsError(f"--out {path} exists and was not written by select-layers; choose another --out")


# --------------------------------------------------------------------------------------------- models
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _student(teacher, kept: Optional[int], num_layers: int, arwkv_init: str, base: Optional[dict]):
    """The ARWKV student with layer ``kept`` (None: none) left as the teacher's attention, its new parameters
    taken from ``base`` (the base student's, when given)."""
    from .convert import convert_teacher

    kinds = ["attention" if i == kept else "arwkv" for i in range(num_layers)]
    student = convert_teacher(teacher, layer_kinds=kinds, arwkv_init=arwkv_init)
    if base is not None:
        new = student.new_parameter_names()
        missing = sorted(new - set(base))
        if missing:  # base.safetensors does not fit the student: not ours, or another teacher
            raise ValueError(
                f"{BASE_FILE}: lacks {', '.join(missing[:5])}; delete the work folder's {BASE_FILE} to rebuild it"
            )
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name in new:
                if params[name].shape != base[name].shape:
                    raise ValueError(
                        f"{BASE_FILE}: {name} has shape {tuple(base[name].shape)}, the student "
                        f"{tuple(params[name].shape)}; delete it to rebuild"
                    )
                params[name].copy_(base[name])
    return student


@torch.no_grad()
def held_out_kl(student, teacher, rows, batch_size: int) -> float:
    """Mean KL(p_teacher || p_student) per real token over ``rows`` (a dict of ``input_ids``, ``attention_mask``
    [N, T]), in float32; the distillation objective's own measure (:func:`wuneng.train.stages.kl_divergence_sum`)."""
    from .train.stages import _output_vocab, chunked_kl_divergence_sum

    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    vocab = min(_output_vocab(student), _output_vocab(teacher))
    total, count = 0.0, 0
    for start in range(0, rows["input_ids"].shape[0], batch_size):
        ids = rows["input_ids"][start : start + batch_size].to(device)
        mask = rows["attention_mask"][start : start + batch_size].to(device)
        t = teacher(input_ids=ids, attention_mask=mask).logits[..., :vocab]
        s = student(input_ids=ids, attention_mask=mask).logits[..., :vocab]
        total += float(chunked_kl_divergence_sum(t, s, mask))
        count += int(mask.sum())
    student.train(was_training)
    return total / max(count, 1)


def _train_config(cfg: SelectionConfig, stage: str, output_dir: Path, tokens: int):
    from .train.config import DataConfig, OptimConfig, TrainConfig

    steps = cfg.steps(tokens)
    return TrainConfig(
        stage=stage,
        output_dir=str(output_dir),
        data=DataConfig(seq_len=cfg.seq_len),
        optim=OptimConfig(lr=cfg.lr, min_lr=cfg.lr, schedule="constant", warmup_steps=min(10, steps // 10)),
        micro_batch_size=cfg.micro_batch_size,
        max_steps=steps,
        save_every=steps,  # one checkpoint, at the end (the loop writes it anyway)
        keep_last=1,
        save_final=False,
        seed=cfg.seed,
        tensorboard=False,
        log_every=max(1, steps // 20),
    )


def _run_stage(cfg: SelectionConfig, stage: str, run_dir: Path, tokens: int, student, teacher, tokenizer, dataset):
    """One training run with the project's loop; continues from the run folder's checkpoint if an interrupted
    run left one, else starts afresh there (a leftover without a checkpoint is removed: this tool made it).
    Returns the loop's :class:`~wuneng.train.loop.TrainResult`."""
    from .train import loop
    from .train.checkpoint import latest_checkpoint

    resume = run_dir.is_dir() and latest_checkpoint(run_dir) is not None
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    return loop.train(
        _train_config(cfg, stage, run_dir, tokens),
        model=student,
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=dataset,
        resume=resume,
    )


def _split(dataset, eval_rows: int):
    """(training rows, held-out rows): the last ``eval_rows`` rows are held out."""
    from .train.data import PackedDataset

    n = len(dataset)
    if n <= eval_rows:
        raise ConfigError(
            f"select-layers: the data packs into {n} rows of seq_len tokens, but {eval_rows} are held out for the KL "
            "and at least one more is needed to train on; give more data, or lower --eval-rows / --seq-len"
        )
    train_rows = PackedDataset(
        dataset.input_ids[: n - eval_rows], dataset.labels[: n - eval_rows], dataset.attention_mask[: n - eval_rows]
    )
    held_out = {
        "input_ids": dataset.input_ids[n - eval_rows :],
        "attention_mask": dataset.attention_mask[n - eval_rows :],
    }
    return train_rows, held_out


# ---------------------------------------------------------------------------------------------- main
def select_layers(cfg: SelectionConfig) -> SelectionResult:
    """Run (or continue) a KL-guided layer selection; see the module docstring. Writes ``results.json`` in
    ``cfg.work_dir`` after every run and the chosen layers to ``cfg.out`` in flash-linear-attention's format
    (``{"attn": {"layers": [...], ...}}``, read by ``wuneng convert --keep-attention FILE``)."""
    from .convert import load_teacher, write_layer_file
    from .tokenization import load_tokenizer
    from .train.config import DataConfig
    from .train.data import build_dataset

    cfg.check()
    work = Path(cfg.work_dir)
    if work.exists() and not work.is_dir():
        raise FileExistsError(f"--work-dir {work} exists and is not a folder; choose another --work-dir")
    out = Path(cfg.out) if cfg.out is not None else work / "keep_attention.json"
    _check_out_file(out)
    settings = cfg.settings()
    results_path = work / RESULTS_FILE
    runs = _load_results(results_path, settings)

    teacher = load_teacher(cfg.teacher, dtype=_dtype(cfg.dtype)).eval()
    num_layers = teacher.config.num_hidden_layers
    candidates = list(range(num_layers)) if cfg.candidates is None else sorted(set(cfg.candidates))
    bad = [i for i in candidates if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"select-layers: candidate layers {bad} out of range for a teacher of {num_layers} layers")
    if cfg.keep > len(candidates):
        raise ConfigError(f"select-layers: --keep {cfg.keep} is more than the {len(candidates)} candidate layers")
    keys = [BASELINE] + [str(i) for i in candidates]
    todo = [k for k in keys if k not in runs]
    logger.info(
        "select-layers: %d layers, %d candidate runs + baseline of %d tokens (%d steps) each; %d done, %d to run",
        num_layers,
        len(candidates),
        cfg.budget_tokens,
        cfg.steps(cfg.budget_tokens),
        len(keys) - len(todo),
        len(todo),
    )

    done_now = 0
    if todo:
        tokenizer_source = cfg.tokenizer or (
            cfg.teacher if (Path(cfg.teacher) / "tokenizer_config.json").is_file() else "byte"
        )
        tokenizer = load_tokenizer(tokenizer_source)
        dataset = build_dataset(DataConfig(sources=list(cfg.data), seq_len=cfg.seq_len), tokenizer, "distill")
        train_rows, held_out = _split(dataset, cfg.eval_rows)
        work.mkdir(parents=True, exist_ok=True)
        base = _base_parameters(cfg, work, teacher, tokenizer, train_rows, settings["align_tokens"])
        started = time.perf_counter()
        for n, key in enumerate(todo):
            kept = None if key == BASELINE else int(key)
            what = "baseline (no layer kept)" if kept is None else f"layer {kept} kept as attention"
            logger.info("select-layers: run %d/%d: %s", n + 1, len(todo), what)
            torch.manual_seed(cfg.seed)
            student = _student(teacher, kept, num_layers, cfg.arwkv_init, base)
            t0 = time.perf_counter()
            result = _run_stage(
                cfg,
                "distill",
                work / "runs" / (key if kept is None else f"layer_{kept:03d}"),
                cfg.budget_tokens,
                student,
                teacher,
                tokenizer,
                train_rows,
            )
            kl = held_out_kl(student, teacher, held_out, cfg.micro_batch_size)
            train_kl = [h["kl"] for h in result.history if "kl" in h]
            runs[key] = {
                "layer": kept,
                "kl": kl,
                "train_kl_last": train_kl[-1] if train_kl else None,
                "steps": result.step,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            _write_json_atomic(results_path, {"settings": settings, "runs": runs})
            shutil.rmtree(result.output_dir / "checkpoints", ignore_errors=True)  # only needed to resume this run
            done_now += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / done_now * (len(todo) - done_now)
            logger.info(
                "select-layers: %s: held-out KL %.5f (%d/%d runs, %.0fs, ETA %.0fs)",
                what,
                kl,
                n + 1,
                len(todo),
                elapsed,
                eta,
            )
            del student

    baseline_kl = runs[BASELINE]["kl"]
    ranking, chosen = rank_layers({i: runs[str(i)]["kl"] for i in candidates}, baseline_kl, cfg.keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_layer_file(
        out,
        teacher.config,
        chosen,
        extra={
            SELECTION_KEY: {
                "method": "KL-guided (arXiv 2512.20569): one layer kept as attention per short distillation run",
                "keep": cfg.keep,
                "baseline_kl": baseline_kl,
                "ranking": ranking,
                "settings": settings,
            }
        },
    )
    logger.info("select-layers: chosen layers %s written to %s", chosen, out)
    return SelectionResult(ranking, chosen, baseline_kl, str(out), done_now, runs)


def _base_parameters(cfg: SelectionConfig, work: Path, teacher, tokenizer, train_rows, align_tokens: int) -> dict:
    """The new parameters of the base (all-ARWKV) student: read from ``base.safetensors`` when an earlier call
    wrote it, else converted (seeded), aligned for ``align_tokens`` tokens when > 0, and written there."""
    from safetensors.torch import load_file, save_file

    path = work / BASE_FILE
    if path.exists():
        return load_file(str(path))
    num_layers = teacher.config.num_hidden_layers
    torch.manual_seed(cfg.seed)
    student = _student(teacher, None, num_layers, cfg.arwkv_init, None)
    if align_tokens > 0:
        logger.info(
            "select-layers: aligning the all-ARWKV base student (%d tokens, %d steps)",
            align_tokens,
            cfg.steps(align_tokens),
        )
        _run_stage(cfg, "align", work / "runs" / "align", align_tokens, student, teacher, tokenizer, train_rows)
    params = dict(student.named_parameters())
    base = {name: params[name].detach().to("cpu").contiguous() for name in sorted(student.new_parameter_names())}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(base, str(tmp))
    os.replace(tmp, path)
    shutil.rmtree(work / "runs" / "align" / "checkpoints", ignore_errors=True)
    return base
