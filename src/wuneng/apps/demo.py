"""``wuneng demo``: the README's main job on the embedded default data (nothing is downloaded).

1. Pretrain a small byte-level Qwen2 teacher (transformers' own ``Qwen2ForCausalLM``) on generated
   arithmetic word problems and key-value recall lines (:mod:`wuneng.eval.tasks.arithmetic`), and with
   ``passkey_fraction`` of its rows starting with a passkey prompt (:func:`demo_passkey_config`, the format the
   retention grid asks in, at lengths up to the row), with the loss on answer bytes only (``shared/reference/feasibility.md``: the loss on every byte wastes ~80% of
   the gradient on random question text).
2. Convert it into two students: WuNeng (hybrid state heads beside attention, the default options) and
   ARWKV (every attention replaced by an RWKV-7 time-mix, ``attention=False``).
3. Run stage 1 (alignment), stage 2 (distillation) and stage 3 (SFT, answer-only cross-entropy) for both
   students with the same steps, batch and data, i.e. the same token budget per stage.
4. Evaluate the teacher and every student after every stage on held-out problems (greedy exact match,
   ``#### N`` final-number match, per category, recall) and on held-out text (perplexity), then write
   ``report.md``, ``results.json`` and PNG plots (loss curves per stage, accuracy bars) and print the table.
5. Retention report of each student against the teacher (:mod:`wuneng.eval.retention`, small settings): relative
   scores, a passkey grid at 0.5, 1, 2 and 4x the training context (retrieval beyond the rows the models were
   trained on: where WuNeng, which keeps attention, and ARWKV, pure recurrent, are expected to differ), cache
   bytes and tokens/s; written to ``retention/<student>/`` and included in ``report.md``.

Every stage runs through :func:`wuneng.train.loop.train` (the same machinery as ``wuneng train``) with the
models, tokenizer and an answer-masked :class:`~wuneng.train.data.PackedDataset` passed in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from wuneng.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

__all__ = [
    "DemoBudget",
    "DemoConfig",
    "answer_only_dataset",
    "build_teacher",
    "demo_passkey_config",
    "evaluate_student",
    "passkey_mixed_dataset",
    "run_demo",
]

STUDENTS = ("wuneng", "arwkv")
STUDENT_STAGES = ("align", "distill", "sft")


@dataclass
class DemoBudget:
    """Optimiser steps and batch sizes of every stage (rows of ``context`` bytes).

    Both students get the same steps, rows and data per stage, so their token budgets are equal. The
    defaults aim at about 15 minutes on 2 uncontended CPU cores: the teacher (~13 k tokens/s, feasibility
    Probe A) takes about half of it; the students' stages, evaluations and process start the rest.
    """

    teacher_steps: int = 600
    teacher_batch: int = 32
    align_steps: int = 100
    distill_steps: int = 150
    sft_steps: int = 150
    student_batch: int = 16
    context: int = 128
    eval_per_category: int = 50

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoBudget.{name} must be a positive int, got {value!r}")
        if self.context < 16:
            raise ValueError(f"DemoBudget.context must be >= 16 bytes (one problem line), got {self.context}")

    def stage_steps(self, stage: str) -> int:
        return {"align": self.align_steps, "distill": self.distill_steps, "sft": self.sft_steps}[stage]

    def tokens(self, stage: str) -> int:
        """Input tokens one run of ``stage`` ("teacher" or a student stage) consumes."""
        if stage == "teacher":
            return self.teacher_steps * self.teacher_batch * self.context
        return self.stage_steps(stage) * self.student_batch * self.context

    @classmethod
    def fast(cls) -> "DemoBudget":
        """The CI smoke test (``--fast``): every stage runs, the numbers mean little (under 3 minutes)."""
        return cls(
            teacher_steps=40,
            teacher_batch=8,
            align_steps=5,
            distill_steps=5,
            sft_steps=5,
            student_batch=4,
            eval_per_category=4,
        )


@dataclass
class DemoConfig:
    """Shapes, learning rates and output folder of the demo.

    Teacher: Qwen2, ``hidden_size`` 128, 4 layers, 4 query / 2 kv heads (head size 32), MLP 512, tied
    embeddings, byte vocabulary (259): about 1.0 M parameters (feasibility Probe A's model).
    """

    budget: DemoBudget = field(default_factory=DemoBudget)
    output_dir: str = "runs/demo"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    teacher_lr: float = 3e-3
    align_lr: float = 3e-3
    # Stages 2 and 3 train every parameter; a converted WuNeng starts at the teacher's optimum, where Adam's
    # normalised steps are pure noise, so these stay below the teacher's peak lr.
    distill_lr: float = 5e-4
    sft_lr: float = 5e-4
    # WuNeng student options (SPEC section 3 defaults); the ARWKV student is attention=False.
    fusion: str = "gate"
    middle_heads: int = 4
    state_query: bool = True
    recall_fraction: float = 0.3
    # share of the training rows (teacher and every student stage) that start with a passkey prompt of
    # demo_passkey_config() (lengths up to the row, the rest of the row arithmetic / recall text): the retrieval
    # the retention grid measures at and beyond the training length; 0: the demo before passkey rows
    passkey_fraction: float = 0.25
    seed: int = 0
    # torch intra-op threads (None: torch's default, one per core). On a machine whose cores other jobs share,
    # 1 thread is several times faster than oversubscribed OpenMP threads.
    threads: Optional[int] = None
    progress: bool = True
    # the retention report of each student against the teacher (wuneng.eval.retention), with small settings:
    # examples per registry task, keys per passkey cell; grid lengths 0.5, 1, 2 and 4 x budget.context
    retention: bool = True
    retention_limit: int = 16
    retention_trials: int = 4
    # an earlier demo run in output_dir is replaced (only the entries the demo writes, DEMO_OUTPUTS: its output is
    # regenerated from the same command); False: refuse it, so that nothing is replaced by accident
    overwrite: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 16:
            raise ValueError(
                f"DemoConfig: hidden_size / num_heads must be a multiple of 16 (RWKV-7 state heads), got "
                f"{self.hidden_size} / {self.num_heads}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"DemoConfig.threads must be a positive int or None, got {self.threads!r}")
        for name in ("retention_limit", "retention_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        for name in ("teacher_lr", "align_lr", "distill_lr", "sft_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DemoConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.passkey_fraction < 1.0:
            raise ValueError(f"DemoConfig.passkey_fraction must lie in [0, 1), got {self.passkey_fraction}")


# ------------------------------------------------------------------------------------------------ data
def answer_only_dataset(examples, context: int, num_rows: Optional[int] = None):
    """Pack arithmetic examples into rows of ``context`` bytes with labels only on answer bytes.

    ``examples``: :class:`~wuneng.eval.tasks.arithmetic.ArithmeticExample` list, joined as
    ``prompt + " " + answer + "\\n"`` (:func:`~wuneng.eval.tasks.arithmetic.build_corpus`). The byte
    stream is cut every ``context`` bytes (rows may straddle examples, as in the feasibility probes).
    Labels are aligned with the inputs (the loss shifts them): the byte itself on the space that separates
    prompt and answer, the answer bytes and the closing newline, -100 elsewhere. (The space is a target
    because greedy generation from the prompt must produce it first.) Returns a :class:`~wuneng.train.data.PackedDataset` of
    ``[N, context]`` rows (``N = num_rows`` or as many full rows as the text gives).
    """
    from wuneng.eval.tasks.arithmetic import build_corpus
    from wuneng.train.data import PackedDataset

    corpus = build_corpus(examples)
    try:
        ids = np.frombuffer(corpus.text.encode("ascii"), dtype=np.uint8).astype(np.int64)
    except UnicodeEncodeError:
        raise ValueError("the demo corpus must be ASCII so that the answer mask aligns with the bytes") from None
    rows = len(ids) // context if num_rows is None else num_rows
    if rows < 1 or rows * context > len(ids):
        raise ValueError(f"{len(ids)} bytes of text cannot fill {rows} rows of {context} bytes; generate more examples")
    answer = corpus.answer_mask
    mask = answer.copy()
    mask[:-1] |= answer[1:] & ~answer[:-1]  # the byte before each answer: the separating space
    ids = ids[: rows * context].reshape(rows, context)
    mask = mask[: rows * context].reshape(rows, context)
    labels = np.where(mask, ids, IGNORE_INDEX)
    input_ids = torch.from_numpy(ids.copy())
    return PackedDataset(input_ids, torch.from_numpy(labels), torch.ones_like(input_ids), corpus.num_examples, 0)


def demo_passkey_config():
    """The passkey prompt of the demo's training rows and of its retention grid: no intro, the short needle
    ``"The pass key is 12345."``, the question ``"What is the pass key?"`` and the classic filler; 44 bytes without
    filler, so that a 64-byte cell (half the 128-byte rows) holds it, and the answer is ``" 12345"``."""
    from wuneng.eval.tasks.passkey import PasskeyConfig

    return PasskeyConfig(intro="", needle_template="The pass key is {key}.", question="What is the pass key?")


def _answer_only_stream(examples) -> tuple:
    """``(ids int64 [n], mask bool [n])`` of ``prompt + " " + answer + "\n"`` per example: mask True on the
    separating space, the answer and the newline (see :func:`answer_only_dataset`)."""
    from wuneng.eval.tasks.arithmetic import build_corpus

    corpus = build_corpus(examples)
    try:
        ids = np.frombuffer(corpus.text.encode("ascii"), dtype=np.uint8).astype(np.int64)
    except UnicodeEncodeError:
        raise ValueError("the demo corpus must be ASCII so that the answer mask aligns with the bytes") from None
    answer = corpus.answer_mask
    mask = answer.copy()
    mask[:-1] |= answer[1:] & ~answer[:-1]  # the byte before each answer: the separating space
    return ids, mask


def passkey_mixed_dataset(examples, passkey_examples, passkey_rows, context: int, num_rows: int):
    """Rows of ``context`` bytes, answer-masked as :func:`answer_only_dataset`, where row ``passkey_rows[i]`` starts
    with passkey prompt ``passkey_examples[i]`` (``prompt + " " + key + "\n"``, at most ``context`` bytes, from
    position 0 as the grid asks it) and every other byte continues the packed stream of ``examples`` (rows may
    straddle those). ``passkey_examples``: :class:`~wuneng.eval.tasks.passkey.PasskeyExample` list. Returns a
    :class:`~wuneng.train.data.PackedDataset` of ``[num_rows, context]`` rows."""
    from wuneng.eval.tasks.arithmetic import ArithmeticExample
    from wuneng.train.data import PackedDataset

    passkey_rows = [int(r) for r in passkey_rows]
    if len(passkey_rows) != len(passkey_examples) or len(set(passkey_rows)) != len(passkey_rows):
        raise ValueError(f"{len(passkey_examples)} passkey examples need as many distinct rows, got {passkey_rows}")
    if any(not 0 <= r < num_rows for r in passkey_rows):
        raise ValueError(f"passkey rows must lie in [0, {num_rows}), got {passkey_rows}")
    stream_ids, stream_mask = _answer_only_stream(examples)
    first = dict(zip(passkey_rows, passkey_examples))
    ids = np.empty((num_rows, context), dtype=np.int64)
    mask = np.empty((num_rows, context), dtype=bool)
    pos = 0
    for r in range(num_rows):
        head_ids, head_mask = np.zeros(0, np.int64), np.zeros(0, bool)
        if r in first:
            e = first[r]
            head_ids, head_mask = _answer_only_stream([ArithmeticExample(e.prompt, e.answer, "passkey")])
            if len(head_ids) > context:
                raise ValueError(f"passkey example of {len(head_ids)} bytes does not fit a row of {context} bytes")
        take = context - len(head_ids)
        if pos + take > len(stream_ids):
            raise ValueError(
                f"{len(stream_ids)} bytes of text cannot fill {num_rows} rows of {context} bytes; generate more examples"
            )
        ids[r] = np.concatenate([head_ids, stream_ids[pos : pos + take]])
        mask[r] = np.concatenate([head_mask, stream_mask[pos : pos + take]])
        pos += take
    labels = np.where(mask, ids, IGNORE_INDEX)
    input_ids = torch.from_numpy(ids)
    return PackedDataset(
        input_ids, torch.from_numpy(labels), torch.ones_like(input_ids), len(examples) + len(passkey_examples), 0
    )


def _passkey_byte_range(context: int) -> tuple:
    """(shortest, longest) prompt bytes of the demo's passkey rows: without filler, and the row less the answer."""
    from wuneng.eval.tasks.passkey import build_prompt

    config = demo_passkey_config()
    return len(build_prompt(config, [], 0.0, "9" * config.num_digits)), context - (config.num_digits + 2)


def stage_dataset(
    task,
    test_set,
    rows: int,
    context: int,
    seed: int,
    epoch: int,
    passkey=None,
    passkey_fraction: float = 0.0,
    passkey_min_length: Optional[int] = None,
):
    """``rows`` answer-masked rows of freshly generated problems (none of them held out); with ``passkey`` (a
    :class:`~wuneng.eval.tasks.passkey.PasskeyConfig`), ``round(passkey_fraction * rows)`` rows drawn at random
    start with a passkey prompt of that format (:func:`passkey_mixed_dataset`), its length uniform between the
    prompt without filler (or ``passkey_min_length``) and ``context`` minus the answer, its depth uniform in
    [0, 1]."""
    from wuneng.eval.tasks.arithmetic import generate_training_examples
    from wuneng.eval.tasks.mqar import make_rng

    n_passkey = int(round(passkey_fraction * rows)) if passkey is not None else 0
    passkey_examples: list = []
    if n_passkey:
        from wuneng.eval.tasks.passkey import sample_passkey_examples

        # the seed stream of this stage's passkey rows: independent of the problems' (seed, epoch) stream
        # the longest prompt leaves room for " " + key + "\n" in the row
        passkey_examples = sample_passkey_examples(
            passkey,
            n_passkey,
            context - (passkey.num_digits + 2),
            seed=seed * 1_000_003 + 7 * epoch + 5,
            min_length=passkey_min_length,
        )
    need = rows * context - sum(len(e.prompt) + passkey.num_digits + 2 for e in passkey_examples)
    n = max(64, need // 40)  # examples are ~45-60 bytes; top up below if short
    examples = generate_training_examples(task, n, seed, test_set, epoch)
    extra = 1
    while sum(len(e.text) + 1 for e in examples) < need:
        examples += generate_training_examples(task, max(64, n // 4), seed, test_set, epoch + 7919 * extra)
        extra += 1
    if not n_passkey:
        return answer_only_dataset(examples, context, rows)
    order = make_rng(seed, 1_000_003 + epoch).permutation(rows)
    return passkey_mixed_dataset(examples, passkey_examples, sorted(order[:n_passkey].tolist()), context, rows)


# ---------------------------------------------------------------------------------------------- models
def build_teacher(cfg: DemoConfig, tokenizer):
    """A freshly initialised byte-level ``Qwen2ForCausalLM`` of the demo's shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(512, 4 * cfg.budget.context),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def convert_teacher(teacher, kind: str, cfg: DemoConfig):
    """The demo's student of ``kind`` ("wuneng": attention kept, state heads added with ``cfg``'s fusion, middle
    heads and state query; otherwise ARWKV: attention replaced) converted from ``teacher``, with the random init of
    its new parameters seeded from ``cfg.seed`` (also used by ``wuneng bench-convert``)."""
    from wuneng.models.wuneng import WuNengForCausalLM

    torch.manual_seed(cfg.seed + (1 if kind == "wuneng" else 2))
    if kind == "wuneng":
        return WuNengForCausalLM.from_teacher(
            teacher, fusion=cfg.fusion, middle_heads=cfg.middle_heads, state_query=cfg.state_query
        )
    return WuNengForCausalLM.from_teacher(teacher, attention=False)


def stage_train_config(stage: str, run_dir: Path, steps: int, batch: int, lr: float, cfg: DemoConfig, seed: int):
    """The :class:`~wuneng.train.config.TrainConfig` of one demo stage: cosine schedule from ``lr`` to ``lr / 10``
    with a short warm-up, only the end-of-run checkpoint kept in ``run_dir`` (also used by ``wuneng bench-convert``)."""
    from wuneng.train.config import OptimConfig, TrainConfig

    return TrainConfig(
        stage=stage,
        output_dir=str(run_dir),
        optim=OptimConfig(lr=lr, min_lr=lr / 10, schedule="cosine", warmup_steps=min(100, max(1, steps // 10))),
        micro_batch_size=batch,
        max_steps=steps,
        seed=seed,
        log_every=max(1, steps // 60),
        save_every=10 * steps,  # only the end-of-run checkpoint
        keep_last=1,
        save_final=False,
        progress=cfg.progress,
        tensorboard=False,
    )


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def answer_perplexity(model, examples, batch_size: int = 64):
    """Per-byte perplexity of the held-out answers given their prompts: the bytes ``" " + answer + "\n"`` of
    ``prompt + " " + answer + "\n"`` are scored (what answer-only training teaches; the prompt bytes, never a
    target, are not). Sequences of equal length are batched (no padding). Returns a
    :class:`~wuneng.eval.perplexity.PerplexityResult`."""
    from wuneng.eval._model import evaluating, model_device
    from wuneng.eval.perplexity import PerplexityResult
    from wuneng.train.stages import shifted_cross_entropy_sum

    device = model_device(model)
    by_len: dict[int, list[tuple[list[int], int]]] = {}
    for e in examples:
        ids = list((e.text + "\n").encode("utf-8"))
        by_len.setdefault(len(ids), []).append((ids, len(e.prompt.encode("utf-8"))))
    total, count = 0.0, 0
    with evaluating(model):
        for items in by_len.values():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                x = torch.tensor([ids for ids, _ in chunk], dtype=torch.long, device=device)
                labels = x.clone()
                for r, (_, prompt_len) in enumerate(chunk):
                    labels[r, :prompt_len] = IGNORE_INDEX
                loss, n = shifted_cross_entropy_sum(model(input_ids=x).logits, labels)
                total += float(loss)
                count += int(n)
    nll = total / max(count, 1)
    return PerplexityResult(nll, math.exp(nll), count)


def evaluate_student(model, tokenizer, examples) -> dict:
    """Greedy accuracy on held-out problems and the per-byte perplexity of their answers.

    Returns ``{"exact", "final", "recall", "per_category": {cat: {"exact", ["final"], "count"}},
    "ppl", "nll", "samples": [(prompt, generation, answer), ...]}``; accuracies in [0, 1].
    """
    from wuneng.eval.evaluate import generate_continuations
    from wuneng.eval.scoring import exact_match
    from wuneng.eval.tasks.arithmetic import score_arithmetic

    max_new = max(len(e.answer) for e in examples) + 3
    gens = generate_continuations(
        model, tokenizer, [e.prompt for e in examples], max_new, "\n", batch_size=64, label="demo eval"
    )
    scores = score_arithmetic(gens, examples)
    ppl = answer_perplexity(model, examples)
    arith = [e for e in examples if e.fact is not None]
    exact_match_flags = [exact_match(g, e.answer) for g, e in zip(gens, examples)]
    recall = scores["per_category"].get("recall", {}).get("exact", float("nan"))
    step = max(1, len(examples) // 6)
    return {
        "exact": scores["exact"],
        "exact_arithmetic": float(np.mean([exact_match_flags[i] for i, e in enumerate(examples) if e.fact is not None]))
        if arith
        else float("nan"),
        "final": scores["final"],
        "recall": recall,
        "per_category": scores["per_category"],
        "ppl": ppl.ppl,
        "nll": ppl.nll,
        "samples": [(e.prompt, g.strip(), e.answer) for e, g in list(zip(examples, gens))[::step][:6]],
    }


# ---------------------------------------------------------------------------------------------- report
def _fmt_pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _last_mean(history: list[dict], key: str, n: int = 3) -> float:
    vals = [r[key] for r in history if key in r]
    return float(np.mean(vals[-n:])) if vals else float("nan")


def _first(history: list[dict], key: str) -> float:
    vals = [r[key] for r in history if key in r]
    return float(vals[0]) if vals else float("nan")


def _plot_losses(histories: dict[str, list[dict]], path: Path) -> Path:
    from wuneng.train.plotting import pyplot

    plt = pyplot()

    panels = [
        ("teacher pretrain (answer CE)", [("teacher", "teacher", "loss")]),
        (
            "stage 1: alignment ||y_T - y_S|| / sqrt(C)",
            [
                ("wuneng/align", "WuNeng hybrid output", "align_output"),
                ("wuneng/align", "WuNeng state heads alone", "align_state"),
                ("arwkv/align", "ARWKV replacement", "align_output"),
            ],
        ),
        (
            "stage 2: distillation KL(p_T || p_S)",
            [("wuneng/distill", "WuNeng", "kl"), ("arwkv/distill", "ARWKV", "kl")],
        ),
        ("stage 3: SFT (answer CE)", [("wuneng/sft", "WuNeng", "loss"), ("arwkv/sft", "ARWKV", "loss")]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (title, curves) in zip(axes, panels):
        for run, label, key in curves:
            recs = [r for r in histories.get(run, []) if key in r]
            if recs:
                ax.plot(
                    [r["step"] for r in recs],
                    [max(r[key], 1e-6) for r in recs],
                    label=label,
                    marker="." if len(recs) < 20 else None,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_accuracy(
    final: dict[str, dict], stages: dict[str, dict[str, dict]], categories: list[str], path: Path
) -> Path:
    from wuneng.train.plotting import pyplot

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    models = list(final)
    groups = categories + ["all (exact)"]
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        vals = [final[m]["per_category"].get(c, {}).get("exact", 0.0) for c in categories] + [final[m]["exact"]]
        xs = np.arange(len(groups)) + (j - (len(models) - 1) / 2) * width
        bars = ax1.bar(xs, [100 * v for v in vals], width, label=m)
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
    ax1.set_xticks(np.arange(len(groups)), groups)
    ax1.set_ylabel("exact match (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title("held-out accuracy after SFT (teacher: after pretraining)", fontsize=10)
    ax1.legend(fontsize=8)
    order = ["converted", *STUDENT_STAGES]
    for s, per_stage in stages.items():
        ax2.plot(order, [100 * per_stage[k]["exact"] for k in order if k in per_stage], marker="o", label=s)
    teacher = final.get("teacher")
    if teacher is not None:
        ax2.axhline(100 * teacher["exact"], color="gray", linestyle="--", label="teacher")
    ax2.set_ylabel("exact match (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("students' accuracy after each stage", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _main_rows(results: dict) -> list[list[str]]:
    rows = []
    cats = results["categories"]
    for name, r in results["final"].items():
        rows.append(
            [name, f"{results['params'][name] / 1e6:.2f} M", _fmt_pct(r["exact"]), _fmt_pct(r["final"])]
            + [_fmt_pct(r["per_category"].get(c, {}).get("exact")) for c in cats]
            + [f"{r['ppl']:.3f}"]
        )
    return rows


def _main_header(results: dict) -> list[str]:
    return ["model", "params", "exact", "final (####)", *[f"{c} exact" for c in results["categories"]], "answer ppl"]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _stage_rows(results: dict) -> list[list[str]]:
    rows = []
    for s in STUDENTS:
        for stage in ("converted", *STUDENT_STAGES):
            r = results["stages"][s].get(stage)
            if r is None:
                continue
            secs = results["seconds"].get(f"{s}/{stage}")
            rows.append(
                [
                    s,
                    stage,
                    _fmt_pct(r["exact"]),
                    _fmt_pct(r["final"]),
                    _fmt_pct(r["recall"]),
                    f"{r['ppl']:.3f}",
                    "-" if secs is None else f"{secs:.0f}",
                ]
            )
    return rows


def _fmt_loss(x: float) -> str:
    return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.4f}"


def _align_rows(results: dict) -> list[list[str]]:
    a = results["align"]
    return [
        [
            "WuNeng hybrid output (y_S = mixer)",
            _fmt_loss(a["wuneng_output_first"]),
            _fmt_loss(a["wuneng_output_final"]),
        ],
        ["WuNeng state heads alone (Y W^O)", _fmt_loss(a["wuneng_state_first"]), _fmt_loss(a["wuneng_state_final"])],
        ["ARWKV replacement (RWKV-7 time-mix)", _fmt_loss(a["arwkv_output_first"]), _fmt_loss(a["arwkv_output_final"])],
    ]


def _passkey_data_lines(results: dict) -> list:
    share = results["config"].get("passkey_fraction", 0.0)
    if not share:
        return []
    return [
        f"Passkey rows: {100 * share:g}% of the rows of every training stage (teacher and students) start with a "
        "passkey prompt in the format of the retention grid below (`demo_passkey_config`: classic filler sentences "
        'with the needle `"The pass key is 12345."` among them, then `"What is the pass key?"`; the answer is the '
        f"key), {results['passkey_bytes'][0]}-{results['passkey_bytes'][1]} bytes, needle depth uniform in [0, 1], "
        "a fresh key per row; the rest of such a row continues the arithmetic and recall text. The held-out set "
        "and its categories are those of the demo without passkey rows; the arithmetic and recall lines get that "
        "much less of the rows.",
        "",
    ]


def _passkey_summary_lines(results: dict) -> list:
    grids = results.get("passkey")
    if not grids:
        return []
    context = results["budget"]["context"]
    lengths = sorted({int(n) for g in grids.values() for n in g["per_length"]})
    header = ["model", *[f"{n}{' *' if n > context else ''}" for n in lengths], f"<= {context}", f"> {context}"]
    rows = [
        [name, *[_fmt_pct(g["per_length"].get(str(n), g["per_length"].get(n))) for n in lengths]]
        + [_fmt_pct(g["within"]), _fmt_pct(g["beyond"])]
        for name, g in grids.items()
    ]
    return [
        "## Passkey retrieval per context length (bytes; * beyond the training rows)",
        "",
        _md_table(header, rows),
        "",
        f"Greedy exact match of the 5-digit key (chance 1/90000), {results['passkey_keys']} keys per length "
        "(depths 0, 0.25, 0.5, 0.75, 1); the students after SFT. Per cell in the retention reports below.",
        "",
    ]


def write_report(results: dict, out_dir: Path, sections: Sequence[str] = ()) -> Path:
    """``report.md`` with the tables, the plots, ``sections`` (Markdown, e.g. the retention reports) and a few
    samples."""
    b = results["budget"]
    lines = [
        "# wuneng demo report",
        "",
        f"Command: `{results['command']}`  ",
        f"Wall time: {results['seconds']['total']:.0f} s on {results['threads']} CPU thread(s) "
        f"(torch {results['torch']}, seed {results['config']['seed']}).",
        "",
        "Data: generated arithmetic word problems (1-digit `+`/`-`) and key-value recall lines, bytes as tokens; "
        "pretraining and SFT put the loss on answer bytes only (with the space before and the newline after); held-out problems never occur in training.",
        "",
        *_passkey_data_lines(results),
        "## Held-out results",
        "",
        _md_table(_main_header(results), _main_rows(results)),
        "",
        "exact: the whole answer line matches (greedy); final: the `#### N` number matches (arithmetic only); "
        'ppl: per-byte perplexity of the held-out answers (`" " + answer + newline`) given their prompts. '
        f"{b['eval_per_category']} problems per category.",
        "",
        "## Students after each stage",
        "",
        _md_table(["student", "after", "exact", "final", "recall", "ppl", "stage seconds"], _stage_rows(results)),
        "",
        "## Stage 1: alignment loss (mean over layers of ||y_T - y_S||_2 / sqrt(C), per token)",
        "",
        _md_table(["mixer", "first logged step", "end of stage 1"], _align_rows(results)),
        "",
        "## Budgets (both students: same steps, rows and data per stage)",
        "",
        _md_table(
            ["stage", "steps", "rows x bytes", "tokens", "lr (peak, cosine to 1/10)", "seconds (wuneng / arwkv)"],
            [
                [
                    "teacher pretrain",
                    str(b["teacher_steps"]),
                    f"{b['teacher_batch']} x {b['context']}",
                    f"{results['tokens']['teacher']:,}",
                    f"{results['config']['teacher_lr']:g}",
                    f"{results['seconds'].get('teacher', 0):.0f}",
                ],
            ]
            + [
                [
                    stage,
                    str(b[f"{stage}_steps"]),
                    f"{b['student_batch']} x {b['context']}",
                    f"{results['tokens'][stage]:,}",
                    f"{results['config'][f'{stage}_lr']:g}",
                    f"{results['seconds'].get(f'wuneng/{stage}', 0):.0f} / {results['seconds'].get(f'arwkv/{stage}', 0):.0f}",
                ]
                for stage in STUDENT_STAGES
            ],
        ),
        "",
        "Stage 1 trains only the new parameters (teacher-forced per layer); stages 2 and 3 train all parameters. "
        "Stage 2 distils forward KL on every byte; stage 3 is cross-entropy on answer bytes.",
        "",
        "## Plots",
        "",
        "![loss curves](losses.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
        *_passkey_summary_lines(results),
        *sections,
        "## Samples (after SFT; teacher after pretraining)",
        "",
    ]
    for name, r in results["final"].items():
        lines.append(f"**{name}**")
        lines.append("")
        lines.append("```")
        lines += [f"{p} {g!r}   (expected {a})" for p, g, a in r["samples"]]
        lines.append("```")
        lines.append("")
    path = out_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def log_evaluation(who: str, r: dict, seconds: Optional[float] = None) -> str:
    """Log (INFO) and return the one-line summary of an evaluation ``r`` (``exact``, ``recall``, ``ppl``)."""
    line = f"{who}: exact {_fmt_pct(r['exact'])}, recall {_fmt_pct(r['recall'])}, ppl {r['ppl']:.3f}"
    if seconds is not None:
        line += f" ({seconds:.0f} s)"
    logger.info("%s", line)
    return line


def print_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title="wuneng demo: held-out results")
    for i, h in enumerate(_main_header(results)):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in _main_rows(results):
        table.add_row(*row)
    console.print(table)
    align = Table(title="stage 1 alignment loss")
    for h in ("mixer", "first", "end"):
        align.add_column(h, justify="left" if h == "mixer" else "right")
    for row in _align_rows(results):
        align.add_row(*row)
    console.print(align)


# ------------------------------------------------------------------------------------------- retention
def retention_settings(cfg: DemoConfig):
    """The demo's small retention settings: every registry task at ``retention_limit`` examples, a passkey grid of
    0.5, 1, 2 and 4 x ``budget.context`` bytes x 5 depths with ``retention_trials`` keys per cell in the format of
    the training rows (:func:`demo_passkey_config`), 16 timed decode steps."""
    from wuneng.eval.retention import RetentionSettings

    return RetentionSettings(
        train_length=cfg.budget.context,
        trials=cfg.retention_trials,
        limit=cfg.retention_limit,
        batch_size=64,
        decode_tokens=16,
        passkey=demo_passkey_config(),
    )


def write_retention_reports(measured: dict, cfg: DemoConfig, out: Path, seconds: dict) -> dict:
    """Each student's retention report against the teacher into ``out/retention/<student>/``; ``measured``:
    ``{"teacher" or student: ModelMeasurements}``. Returns ``{student: (RetentionReport, Markdown section for
    report.md)}`` (empty when nothing was measured)."""
    if "teacher" not in measured:
        return {}
    from wuneng.eval.retention import build_report, report_markdown, write_retention_report

    t0 = time.perf_counter()
    out_sections: dict = {}
    for kind in STUDENTS:
        if kind not in measured:
            continue
        report = build_report(measured[kind], measured["teacher"], cfg.budget.context)
        folder = out / "retention" / kind
        write_retention_report(report, folder, meta={"demo": True})
        figures = {
            f"{kind}: passkey accuracy per cell": f"retention/{kind}/passkey_grid.png",
            f"{kind}: cache bytes and tokens/s per length": f"retention/{kind}/memory_speed.png",
        }
        out_sections[kind] = (report, report_markdown(report, figures, level=3))
    seconds["retention"] = seconds.get("retention", 0.0) + time.perf_counter() - t0
    head = (
        "## Retention against the teacher\n\n"
        f"`wuneng.eval.retention` with small settings (registry tasks at {cfg.retention_limit} examples, "
        f"{cfg.retention_trials} key(s) per passkey cell, bytes as tokens; training length {cfg.budget.context}): "
        f"{seconds['retention']:.0f} s in all. Full reports in `retention/<student>/`; the same from saved folders: "
        "`wuneng eval STUDENT --teacher TEACHER --out DIR`.\n"
    )
    first = next(iter(out_sections))
    report, section = out_sections[first]
    out_sections[first] = (report, head + "\n" + section)
    return out_sections


# ------------------------------------------------------------------------------------------------- run
#: what a demo run writes into its output folder (stage runs, then the report and its companions)
DEMO_OUTPUTS = (
    "teacher",
    "wuneng",
    "arwkv",
    "report.md",
    "results.json",
    "results.json.tmp",
    "losses.png",
    "accuracy.png",
    "retention",
)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; an earlier demo run there is refused (FileExistsError naming what is there) unless
    ``overwrite``, which removes only the entries of :data:`DEMO_OUTPUTS` (nothing else in the folder)."""
    existing = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} holds an earlier demo run ({', '.join(existing)}): drop --no-overwrite to replace it, or pass "
            "--out another folder"
        )
    for name in existing:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg: Optional[DemoConfig] = None, console=None, command: str = "wuneng demo") -> dict:
    """Run the whole demo; returns the results dict (also written to ``OUTPUT_DIR/results.json``).

    Progress goes through ``logging`` (each stage's steps, loss, tokens/s and ETA from the training loop, each
    evaluation); the results tables are printed only to ``console`` when one is given (the CLI passes its own).
    """
    from wuneng.eval.tasks.arithmetic import ArithmeticConfig, heldout_categories, make_test_set
    from wuneng.tokenization import ByteLevelTokenizer
    from wuneng.train.loop import train

    cfg = cfg or DemoConfig()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    b = cfg.budget
    out = Path(cfg.output_dir)
    replaced = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    prepare_output_dir(out, cfg.overwrite)
    if replaced:
        logger.info(f"replacing the earlier demo run in {out} ({', '.join(replaced)})")
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    tokenizer = ByteLevelTokenizer()
    task = ArithmeticConfig(recall_fraction=cfg.recall_fraction)
    test = make_test_set(task, per_category=b.eval_per_category, seed=cfg.seed + 1)
    categories = heldout_categories(task)

    def evaluate(model) -> dict:
        t0 = time.perf_counter()
        r = evaluate_student(model, tokenizer, test.examples)
        seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - t0
        return r

    # -- teacher
    teacher = build_teacher(cfg, tokenizer)
    logger.info(
        f"wuneng demo: teacher Qwen2 {cfg.num_layers}L x {cfg.hidden_size} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M "
        f"parameters), {b.teacher_steps} steps x {b.teacher_batch} x {b.context} bytes; output {out}"
    )
    passkey = demo_passkey_config()
    data = stage_dataset(
        task, test, b.teacher_steps * b.teacher_batch, b.context, cfg.seed, 0, passkey, cfg.passkey_fraction
    )
    t0 = time.perf_counter()
    res = train(
        stage_train_config(
            "pretrain", out / "teacher", b.teacher_steps, b.teacher_batch, cfg.teacher_lr, cfg, cfg.seed
        ),
        model=teacher,
        tokenizer=tokenizer,
        dataset=data,
    )
    seconds["teacher"] = time.perf_counter() - t0
    histories = {"teacher": res.history}
    teacher.eval()
    final = {"teacher": evaluate(teacher)}
    log_evaluation("teacher", final["teacher"], seconds["teacher"])
    measured: dict[str, Any] = {}

    def measure_retention(name: str, model) -> None:
        if not cfg.retention:
            return
        from wuneng.eval.retention import measure_model

        t0 = time.perf_counter()
        measured[name] = measure_model(model, tokenizer, retention_settings(cfg), name=name)
        seconds["retention"] = seconds.get("retention", 0.0) + time.perf_counter() - t0

    measure_retention("teacher", teacher)

    # -- students: same data per stage for both
    stage_data = {
        stage: stage_dataset(
            task,
            test,
            b.stage_steps(stage) * b.student_batch,
            b.context,
            cfg.seed,
            1 + k,
            passkey,
            cfg.passkey_fraction,
        )
        for k, stage in enumerate(STUDENT_STAGES)
    }
    stage_lr = {"align": cfg.align_lr, "distill": cfg.distill_lr, "sft": cfg.sft_lr}
    params = {"teacher": sum(p.numel() for p in teacher.parameters())}
    per_stage: dict[str, dict[str, dict]] = {}
    for kind in STUDENTS:
        student = convert_teacher(teacher, kind, cfg)
        params[kind] = sum(p.numel() for p in student.parameters())
        per_stage[kind] = {"converted": evaluate(student)}
        for stage in STUDENT_STAGES:
            logger.info(f"{kind}: stage {stage} ({b.stage_steps(stage)} steps)")
            t0 = time.perf_counter()
            res = train(
                stage_train_config(
                    stage, out / kind / stage, b.stage_steps(stage), b.student_batch, stage_lr[stage], cfg, cfg.seed
                ),
                model=student,
                teacher=teacher,
                tokenizer=tokenizer,
                dataset=stage_data[stage],
            )
            seconds[f"{kind}/{stage}"] = time.perf_counter() - t0
            histories[f"{kind}/{stage}"] = res.history
            per_stage[kind][stage] = evaluate(student)
            log_evaluation(f"{kind} after {stage}", per_stage[kind][stage], seconds[f"{kind}/{stage}"])
        final[kind] = per_stage[kind]["sft"]
        measure_retention(kind, student)
        del student
    retention_sections = write_retention_reports(measured, cfg, out, seconds)
    from wuneng.eval.retention import report_json, report_tables

    seconds["total"] = time.perf_counter() - t_start
    wa, aa = histories["wuneng/align"], histories["arwkv/align"]
    results: dict[str, Any] = {
        "command": command,
        "config": {k: v for k, v in asdict(cfg).items() if k != "budget"},
        "budget": asdict(b),
        "tokens": {"teacher": b.tokens("teacher"), **{s: b.tokens(s) for s in STUDENT_STAGES}},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "categories": categories,
        "params": params,
        "final": final,
        "stages": per_stage,
        "align": {
            "wuneng_output_first": _first(wa, "align_output"),
            "wuneng_output_final": _last_mean(wa, "align_output"),
            "wuneng_state_first": _first(wa, "align_state"),
            "wuneng_state_final": _last_mean(wa, "align_state"),
            "arwkv_output_first": _first(aa, "align_output"),
            "arwkv_output_final": _last_mean(aa, "align_output"),
        },
        "seconds": seconds,
        "histories": histories,
        "retention": {kind: report_json(report) for kind, (report, _) in retention_sections.items()},
        "passkey": {
            name: {
                "per_length": {n: m.grid.accuracy(n, n) for n in m.grid.lengths},
                "within": m.grid.accuracy(max_length=b.context),
                "beyond": m.grid.accuracy(min_length=b.context + 1),
            }
            for name, m in measured.items()
        },
        "passkey_keys": cfg.retention_trials * len(retention_settings(cfg).depths),
        "passkey_bytes": _passkey_byte_range(b.context),
    }
    _plot_losses(histories, out / "losses.png")
    _plot_accuracy(final, per_stage, categories, out / "accuracy.png")
    results["seconds"]["total"] = time.perf_counter() - t_start
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, out / "results.json")
    report = write_report(results, out, [section for _, section in retention_sections.values()])
    if console is not None:
        print_results(results, console)
        for retention_report, _ in retention_sections.values():
            for table in report_tables(retention_report):
                console.print(table)
    logger.info(f"wrote {report}, {out / 'losses.png'}, {out / 'accuracy.png'} ({results['seconds']['total']:.0f} s)")
    return results
