"""``wuneng bench-convert``: does conversion add a capability the teacher lacks? (issue 18 item 4)

The small-scale form of the WuNeng paper's central claim, on the demo's models (:mod:`wuneng.apps.demo`):

1. A byte-level Qwen2 teacher (:func:`wuneng.apps.demo.build_teacher`, the demo's shape) is pretrained on the demo's
   arithmetic word problems and key-value recall lines (:mod:`wuneng.eval.tasks.arithmetic`), **without** the
   subtask: the parity of a bit string in text form, ``"P:0110100111010010= 1"`` (parity = the group Z2 of
   :mod:`wuneng.eval.tasks.state_tracking`; the length, 16 bits by default, is where bench-arch's 2-layer
   Transformer stays near chance). The teacher is trained once and cached in the run folder, keyed by its
   settings (:func:`teacher_key`).
2. Four arms start from it: ``wuneng`` (the hybrid, gate fusion, the demo's options), ``arwkv`` (every attention
   replaced by an RWKV-7 time-mix, ``attention=False``), ``arwkv-keep`` (ARWKV keeping the attention layers that
   :func:`wuneng.select_layers.select_layers` chooses for this teacher, ``keep`` of them) and ``teacher`` (the
   teacher itself, trained on).
3. Each arm trains on a mix that contains the subtask (:func:`mix_examples`: ``parity_share`` of the examples are
   parity lines, the rest the teacher's own mix) with the **same SFT steps, rows and data** (the same
   :class:`~wuneng.train.data.PackedDataset` per seed, whose fingerprint each row records). The converted arms first
   run stage 1 (``align``: only their new parameters, teacher-forced per layer to reproduce the teacher's attention
   outputs; its targets come from the teacher, so it carries no subtask label; the teacher arm has nothing to
   align). Stage 2 (distillation) is left out for every arm: its target is a teacher that cannot do the subtask.
   Stage 3 (``sft``, answer-only cross-entropy) is the arms' common training.
4. Each arm is evaluated (greedy, held-out) on parity, arithmetic (``+1d``, ``-1d`` exact match) and recall; the
   teacher before training is the reference for retention: ``(after - chance) / (teacher - chance)``
   (:func:`wuneng.eval.retention.relative_score`).

Parity labels (``parity_prefix_labels``, default on): besides the answer bytes, the training rows label each bit of
a parity line with the parity of the bits so far (the byte after a bit is labelled with the running parity, as
bench-arch's parity control labels every prefix). The parities are targets only, never input, so attention cannot
read them back (no chain of thought); evaluation is the greedy answer after ``"="``.

Every (arm, seed) row is appended to ``OUTPUT_DIR/results.jsonl`` as it finishes; a rerun skips the rows whose key
is there (:meth:`ConvertBenchConfig.run_key`), and ``results.md`` / ``accuracy.png`` are rewritten from all rows:
mean over seeds with the two-sided 95% Student-t interval (:func:`wuneng.apps.bench_arch.t_interval`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ARMS",
    "ConvertBenchConfig",
    "parity_example",
    "mix_examples",
    "mix_dataset",
    "teacher_key",
    "prepare_teacher",
    "train_arm",
    "summarise",
    "results_markdown",
    "plot_results",
    "run_convert_bench",
]

#: the four arms, in the order of the tables
ARMS = ("wuneng", "arwkv", "arwkv-keep", "teacher")
ARM_LABELS = {
    "wuneng": "WuNeng (hybrid, gate)",
    "arwkv": "ARWKV (no attention)",
    "arwkv-keep": "ARWKV + kept attention",
    "teacher": "teacher, trained on",
}
#: the metrics of a row (accuracies in [0, 1]) and their chance levels' keys
METRICS = ("parity", "arithmetic", "recall")
PARITY = "parity"
#: teacher-forced prefix parities (:func:`prefix_parity`): accuracy over every prefix length, longest solved length
EXTRA_METRICS = ("prefix_accuracy", "solved_up_to")


@dataclass
class ConvertBenchConfig:
    """The experiment: shapes (the demo's teacher), budgets, the subtask, seeds.

    Every arm gets ``align_steps`` (converted arms only, new parameters only) and then ``sft_steps`` optimiser
    steps of ``batch`` rows of ``context`` bytes, the same rows for every arm of a seed.
    """

    output_dir: str = "runs/bench-convert"
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    # teacher (the demo's shape and pretraining; seed 0, trained once)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    teacher_steps: int = 600
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    recall_fraction: float = 0.3
    context: int = 128
    # arms
    align_steps: int = 40
    sft_steps: int = 160
    batch: int = 16
    align_lr: float = 3e-3
    sft_lr: float = 1e-3
    # the subtask
    parity_bits: int = 16
    parity_share: float = 0.5
    parity_prefix_labels: bool = True
    # evaluation: held-out problems per arithmetic/recall category, held-out parity strings
    eval_per_category: int = 50
    parity_test: int = 200
    # select-layers for arwkv-keep: layers kept, optimiser steps of each of its runs (align once, then L + 1 runs)
    keep: int = 1
    select_steps: int = 20
    select_lr: float = 1e-3
    threads: Optional[int] = None  # torch threads per process (None: 1 with jobs > 1, else torch's default)
    jobs: int = 1  # (arm, seed) runs at once in separate processes
    progress: bool = True
    mode: str = "default"

    def __post_init__(self) -> None:
        for a in self.arms:
            if a not in ARMS:
                raise ValueError(f"unknown arm {a!r}; expected some of {', '.join(ARMS)}")
        if not self.arms:
            raise ValueError("ConvertBenchConfig.arms is empty; give at least one of " + ", ".join(ARMS))
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"ConvertBenchConfig.seeds must be non-negative ints, got {self.seeds!r}")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "teacher_steps",
            "teacher_batch",
            "context",
            "sft_steps",
            "batch",
            "parity_bits",
            "eval_per_category",
            "parity_test",
            "keep",
            "select_steps",
            "jobs",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvertBenchConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.align_steps, bool) or not isinstance(self.align_steps, int) or self.align_steps < 0:
            raise ValueError(f"ConvertBenchConfig.align_steps must be an int >= 0, got {self.align_steps!r}")
        if not 0.0 < self.parity_share < 1.0:
            raise ValueError(f"ConvertBenchConfig.parity_share must lie in (0, 1), got {self.parity_share}")
        if self.keep >= self.num_layers:
            raise ValueError(
                f"ConvertBenchConfig.keep ({self.keep}) must be below num_layers ({self.num_layers}): "
                "arwkv-keep converts at least one layer"
            )
        if 2**self.parity_bits < 4 * self.parity_test:
            raise ValueError(
                f"ConvertBenchConfig: {self.parity_bits} bits give {2**self.parity_bits} strings, too few to hold out "
                f"{self.parity_test}; use more bits or a smaller parity_test"
            )
        for name in ("teacher_lr", "align_lr", "sft_lr", "select_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ConvertBenchConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"ConvertBenchConfig.threads must be a positive int or None, got {self.threads!r}")
        self.demo_config()  # the demo's own checks of the shape

    @classmethod
    def quick(cls, **kw) -> "ConvertBenchConfig":
        """A smoke run of every arm (a few minutes on a CPU): the numbers mean little."""
        small = dict(
            teacher_steps=60,
            teacher_batch=16,
            align_steps=5,
            sft_steps=10,
            batch=8,
            eval_per_category=10,
            parity_test=40,
            select_steps=4,
            seeds=(0, 1),
            mode="quick",
        )
        return cls(**{**small, **kw})

    # ------------------------------------------------------------------ derived settings
    def demo_config(self, seed: int = 0):
        """The :class:`~wuneng.apps.demo.DemoConfig` of this shape and these budgets (for the demo's helpers)."""
        from wuneng.apps.demo import DemoBudget, DemoConfig

        budget = DemoBudget(
            teacher_steps=self.teacher_steps,
            teacher_batch=self.teacher_batch,
            align_steps=max(1, self.align_steps),
            distill_steps=1,  # not run here
            sft_steps=self.sft_steps,
            student_batch=self.batch,
            context=self.context,
            eval_per_category=self.eval_per_category,
        )
        return DemoConfig(
            budget=budget,
            output_dir=self.output_dir,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            teacher_lr=self.teacher_lr,
            align_lr=self.align_lr,
            sft_lr=self.sft_lr,
            recall_fraction=self.recall_fraction,
            seed=seed,
            progress=self.progress,
            retention=False,
            overwrite=False,
        )

    def task(self):
        """The teacher's problem mix (:class:`~wuneng.eval.tasks.arithmetic.ArithmeticConfig`)."""
        from wuneng.eval.tasks.arithmetic import ArithmeticConfig

        return ArithmeticConfig(recall_fraction=self.recall_fraction)

    def teacher_settings(self) -> dict:
        """What the cached teacher (and its evaluation before training) depends on."""
        keys = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "teacher_steps",
            "teacher_batch",
            "teacher_lr",
            "recall_fraction",
            "context",
            "parity_bits",
            "eval_per_category",
            "parity_test",
        )
        return {k: getattr(self, k) for k in keys}

    def run_key(self, arm: str, seed: int) -> str:
        """Identity of an (arm, seed) run: the teacher, the budgets and the subtask (a change is a new run)."""
        keep = f" keep={self.keep} select={self.select_steps}@{self.select_lr:g}" if arm == "arwkv-keep" else ""
        if arm == "wuneng":  # the demo's student options (a change there is a new run here)
            dc = self.demo_config()
            keep = f" fusion={dc.fusion} hm={dc.middle_heads} sq={int(dc.state_query)}"
        return (
            f"{arm} | seed={seed} | teacher={teacher_key(self)} | align={self.align_steps}@{self.align_lr:g} "
            f"sft={self.sft_steps}@{self.sft_lr:g} bs={self.batch} ctx={self.context} | parity bits={self.parity_bits} "
            f"share={self.parity_share:g} prefix={int(self.parity_prefix_labels)}{keep}"
        )

    def runs(self) -> list[tuple[str, int]]:
        """Every (arm, seed), seed-major (the arms of one seed run side by side)."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]


def teacher_key(cfg: ConvertBenchConfig) -> str:
    """12 hex digits naming the teacher's settings (its cache folder is ``teacher-<key>``)."""
    text = json.dumps(cfg.teacher_settings(), sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- data
def parity_example(bits: Sequence[int]):
    """One parity line as an :class:`~wuneng.eval.tasks.arithmetic.ArithmeticExample` of category ``"parity"``:
    prompt ``"P:<bits>="``, answer ``"0"`` or ``"1"`` (the parity of the bits)."""
    from wuneng.eval.tasks.arithmetic import ArithmeticExample

    text = "".join("1" if b else "0" for b in bits)
    if not text:
        raise ValueError("parity_example needs at least one bit")
    return ArithmeticExample(f"P:{text}=", str(sum(1 for b in bits if b) % 2), PARITY)


def parity_test_set(cfg: ConvertBenchConfig) -> list:
    """``cfg.parity_test`` distinct held-out parity lines of ``cfg.parity_bits`` bits (fixed seed, the same for every
    run); training never contains one."""
    from wuneng.eval.tasks.mqar import make_rng

    rng = make_rng(1, 7)
    seen: dict[str, object] = {}
    while len(seen) < cfg.parity_test:
        e = parity_example(rng.integers(0, 2, cfg.parity_bits))
        seen.setdefault(e.prompt, e)
    return list(seen.values())


def mix_examples(cfg: ConvertBenchConfig, num_examples: int, seed: int, epoch: int, test) -> list:
    """``num_examples`` training examples: exactly ``round(parity_share * num_examples)`` parity lines of
    ``parity_bits`` bits (none of the held-out strings), the rest the teacher's arithmetic/recall mix
    (:func:`~wuneng.eval.tasks.arithmetic.generate_training_examples`, none of ``test``'s prompts), shuffled."""
    from wuneng.eval.tasks.arithmetic import generate_training_examples
    from wuneng.eval.tasks.mqar import make_rng

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    n_parity = int(round(cfg.parity_share * num_examples))
    held_out = {e.prompt for e in parity_test_set(cfg)}
    rng = make_rng(seed, 50_000 + epoch)
    parity: list = []
    while len(parity) < n_parity:
        bits = rng.integers(0, 2, (n_parity - len(parity), cfg.parity_bits))
        parity += [e for e in (parity_example(row) for row in bits) if e.prompt not in held_out]
    old = (
        generate_training_examples(cfg.task(), num_examples - n_parity, seed, test, epoch)
        if n_parity < num_examples
        else []
    )
    merged = old + parity[:n_parity]
    return [merged[i] for i in rng.permutation(len(merged))]


def mix_dataset(cfg: ConvertBenchConfig, rows: int, seed: int, epoch: int, test):
    """``rows`` answer-masked rows of ``cfg.context`` bytes of :func:`mix_examples` (the demo's packing,
    :func:`wuneng.apps.demo.answer_only_dataset`); with ``parity_prefix_labels`` the byte after each bit of a parity
    line is labelled with the parity of the bits up to it (see the module doc)."""
    from wuneng.apps.demo import answer_only_dataset

    need = rows * cfg.context
    n = max(64, need // 30)  # lines average ~35-45 bytes; topped up below if short
    examples = mix_examples(cfg, n, seed, epoch, test)
    while sum(len(e.text) + 1 for e in examples) < need:
        n = n + max(64, n // 4)
        examples = mix_examples(cfg, n, seed, epoch, test)
    data = answer_only_dataset(examples, cfg.context, rows)
    if cfg.parity_prefix_labels:
        labels = data.labels.view(-1)
        pos = 0
        zero, one = ord("0"), ord("1")
        for e in examples:  # the layout of build_corpus: prompt, space, answer, newline
            if pos >= need:
                break
            if e.category == PARITY:
                running = 0
                for j, bit in enumerate(e.prompt[2:-1]):  # "P:" bits "="
                    running ^= bit == "1"
                    target = pos + 2 + j + 1  # the byte after bit j ("=" after the last one)
                    if target < need:
                        labels[target] = one if running else zero
            pos += len(e.text) + 1
    return data


def dataset_fingerprint(data) -> str:
    """sha1 of a dataset's inputs and labels (identical rows have identical fingerprints)."""
    h = hashlib.sha1()
    h.update(data.input_ids.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------- models
def _test_examples(cfg: ConvertBenchConfig):
    """(arithmetic test set, all held-out examples): the demo's held-out problems (seed 1) + the parity lines."""
    from wuneng.eval.tasks.arithmetic import make_test_set

    test = make_test_set(cfg.task(), per_category=cfg.eval_per_category, seed=1)
    return test, list(test.examples) + parity_test_set(cfg)


def scores(result: dict, cfg: ConvertBenchConfig) -> dict:
    """The metrics of an evaluation (:func:`wuneng.apps.demo.evaluate_student`): parity, arithmetic (mean exact match
    of the arithmetic categories), recall, with their chance levels."""
    task = cfg.task()
    per = result["per_category"]
    arith = [c for c in per if c not in ("recall", PARITY)]
    return {
        "parity": per[PARITY]["exact"],
        "arithmetic": float(np.mean([per[c]["exact"] for c in arith])),
        "recall": per["recall"]["exact"],
        "chance": {
            "parity": 0.5,
            "arithmetic": float(np.mean([task.chance(c) for c in arith])),
            "recall": task.chance("recall"),
        },
        "per_category": {c: per[c]["exact"] for c in per},
        "ppl": result["ppl"],
    }


@torch.no_grad()
def prefix_parity(model, examples: Sequence, batch_size: int = 256) -> dict:
    """Teacher-forced prefix parities on held-out parity lines: the logits at bit j of ``"P:<bits>="`` predict the
    parity of bits 0..j (what ``parity_prefix_labels`` trains). Returns
    :func:`~wuneng.eval.tasks.state_tracking.state_tracking_report`'s ``{"accuracy" (all positions), "per_length"
    ({k: accuracy of the parity of the first k bits}), "solved_up_to" (longest k with every length <= k above 95%)}``.
    """
    from wuneng.eval.tasks.state_tracking import state_tracking_report

    lines = [e for e in examples if e.category == PARITY]
    if not lines:
        raise ValueError("prefix_parity needs parity lines (category 'parity')")
    ids = torch.tensor([list(e.prompt.encode("ascii")) for e in lines], dtype=torch.long)  # [N, 2 + bits + 1]
    bits = ids[:, 2:-1] - ord("0")
    labels = torch.cumsum(bits, dim=1) % 2  # [N, bits]: parity of bits 0..j
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(lines), batch_size):
        logits = model(input_ids=ids[i : i + batch_size]).logits[:, 2:-1]  # at each bit
        preds.append(logits.argmax(-1) - ord("0"))
    model.train(was_training)
    report = state_tracking_report(torch.cat(preds), labels)
    return {
        "accuracy": report["accuracy"],
        "per_length": {int(k): float(v) for k, v in report["per_length"].items()},
        "solved_up_to": int(report["solved_up_to"] or 0),
    }


def _train(cfg: ConvertBenchConfig, stage: str, steps: int, batch: int, lr: float, seed: int, **kw):
    """One stage through the library's loop with the demo's stage settings, in a temporary folder, no checkpoint."""
    from wuneng.apps.demo import stage_train_config
    from wuneng.train.loop import train

    with tempfile.TemporaryDirectory(prefix="wuneng-bench-convert-") as run_dir:
        tc = stage_train_config(stage, Path(run_dir) / stage, steps, batch, lr, cfg.demo_config(seed), seed)
        tc = replace(tc, save_checkpoints=False, mixed_precision="no", device="cpu")
        return train(tc, **kw)


def teacher_dir(cfg: ConvertBenchConfig) -> Path:
    return Path(cfg.output_dir) / f"teacher-{teacher_key(cfg)}"


def prepare_teacher(cfg: ConvertBenchConfig) -> dict:
    """Pretrain the teacher (seed 0) and evaluate it, or read both from ``teacher-<key>/`` when an earlier run of the
    same settings wrote them. Returns ``{"dir", "scores", "seconds", "params"}``."""
    from wuneng.apps.demo import build_teacher, evaluate_student, stage_dataset
    from wuneng.tokenization import ByteLevelTokenizer

    folder = teacher_dir(cfg)
    info_path = folder / "teacher.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        logger.info(f"bench-convert: teacher from {folder} (cached)")
        return info
    if folder.exists():
        shutil.rmtree(folder)  # a torn earlier attempt (no teacher.json): this tool made it
    tokenizer = ByteLevelTokenizer()
    dc = cfg.demo_config(0)
    test, examples = _test_examples(cfg)
    teacher = build_teacher(dc, tokenizer)
    logger.info(
        f"bench-convert: pretraining the teacher ({cfg.teacher_steps} steps x {cfg.teacher_batch} x {cfg.context} "
        "bytes, arithmetic and recall, no parity)"
    )
    data = stage_dataset(cfg.task(), test, cfg.teacher_steps * cfg.teacher_batch, cfg.context, 0, epoch=0)
    t0 = time.perf_counter()
    _train(
        cfg,
        "pretrain",
        cfg.teacher_steps,
        cfg.teacher_batch,
        cfg.teacher_lr,
        0,
        model=teacher,
        tokenizer=tokenizer,
        dataset=data,
    )
    seconds = time.perf_counter() - t0
    teacher.eval()
    before = scores(evaluate_student(teacher, tokenizer, examples), cfg)
    before["prefix"] = prefix_parity(teacher, examples)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    teacher.save_pretrained(str(tmp))
    info = {
        "dir": str(folder),
        "key": teacher_key(cfg),
        "settings": cfg.teacher_settings(),
        "scores": before,
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in teacher.parameters()),
    }
    (tmp / "teacher.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, folder)
    logger.info(
        f"bench-convert: teacher parity {100 * before['parity']:.1f}%, arithmetic {100 * before['arithmetic']:.1f}%, "
        f"recall {100 * before['recall']:.1f}% ({seconds:.0f} s)"
    )
    return info


def load_teacher(cfg: ConvertBenchConfig):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(str(teacher_dir(cfg))).eval()


def kept_layers(cfg: ConvertBenchConfig) -> list[int]:
    """The attention layers ``arwkv-keep`` keeps: :func:`wuneng.select_layers.select_layers` on the cached teacher
    with the subtask mix (written once as ``select_data.txt``; its work folder makes a rerun free)."""
    from wuneng.eval.tasks.arithmetic import build_corpus
    from wuneng.select_layers import SelectionConfig, select_layers

    folder = teacher_dir(cfg)
    data_file = folder / "select_data.txt"
    if not data_file.is_file():
        test, _ = _test_examples(cfg)
        need = (cfg.num_layers + 2) * cfg.select_steps * cfg.batch * cfg.context + 16 * cfg.context
        text = build_corpus(mix_examples(cfg, max(64, need // 30), 0, 99, test)).text
        tmp = data_file.with_suffix(".txt.tmp")
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, data_file)
    tokens = cfg.select_steps * cfg.batch * cfg.context
    result = select_layers(
        SelectionConfig(
            teacher=str(folder),
            data=[str(data_file)],
            budget_tokens=tokens,
            align_tokens=tokens,
            keep=cfg.keep,
            work_dir=str(folder / f"select-k{cfg.keep}-s{cfg.select_steps}-lr{cfg.select_lr:g}"),
            seq_len=cfg.context,
            micro_batch_size=cfg.batch,
            lr=cfg.select_lr,
            eval_rows=8,
            seed=0,
            tokenizer="byte",
        )
    )
    return list(result.chosen)


def build_arm(arm: str, teacher, cfg: ConvertBenchConfig, seed: int, keep: Sequence[int] = ()):
    """The model an arm trains: a conversion of ``teacher`` (seeded by ``seed``), or a copy of the teacher."""
    import copy

    from wuneng.apps.demo import convert_teacher
    from wuneng.models.wuneng import WuNengForCausalLM

    if arm in ("wuneng", "arwkv"):
        return convert_teacher(teacher, arm, cfg.demo_config(seed))
    if arm == "arwkv-keep":
        torch.manual_seed(seed + 2)  # as the demo seeds its arwkv conversion
        return WuNengForCausalLM.from_teacher(teacher, attention=False, keep_attention=list(keep))
    if arm == "teacher":
        return copy.deepcopy(teacher)
    raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")


def arm_datasets(cfg: ConvertBenchConfig, seed: int, test) -> dict:
    """The rows of a seed, the same for every arm: ``{"align": ..., "sft": ...}`` (align only with align_steps)."""
    out = {"sft": mix_dataset(cfg, cfg.sft_steps * cfg.batch, seed, epoch=2, test=test)}
    if cfg.align_steps:
        out["align"] = mix_dataset(cfg, cfg.align_steps * cfg.batch, seed, epoch=1, test=test)
    return out


def train_arm(
    arm: str, seed: int, cfg: ConvertBenchConfig, keep: Sequence[int] = (), threads: Optional[int] = None
) -> dict:
    """Build, train and evaluate one arm for one seed; returns its result row (without the key)."""
    from wuneng.apps.demo import evaluate_student
    from wuneng.tokenization import ByteLevelTokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    tokenizer = ByteLevelTokenizer()
    teacher = load_teacher(cfg)
    test, examples = _test_examples(cfg)
    data = arm_datasets(cfg, seed, test)
    model = build_arm(arm, teacher, cfg, seed, keep)
    stages = {}
    plan = ([("align", cfg.align_steps, cfg.align_lr)] if arm != "teacher" and cfg.align_steps else []) + [
        ("sft", cfg.sft_steps, cfg.sft_lr)
    ]
    for stage, steps, lr in plan:
        t0 = time.perf_counter()
        extra = {"teacher": teacher} if stage == "align" else {}
        res = _train(
            cfg, stage, steps, cfg.batch, lr, seed, model=model, tokenizer=tokenizer, dataset=data[stage], **extra
        )
        stages[stage] = {
            "steps": int(res.step),
            "rows": int(len(data[stage])),
            "batch": cfg.batch,
            "lr": lr,
            "data": dataset_fingerprint(data[stage]),
            "final_loss": float(res.loss) if res.loss is not None else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    model.eval()
    t0 = time.perf_counter()
    result = scores(evaluate_student(model, tokenizer, examples), cfg)
    prefix = prefix_parity(model, examples)
    return {
        "arm": arm,
        "seed": seed,
        **{m: result[m] for m in METRICS},
        "prefix_accuracy": prefix["accuracy"],
        "solved_up_to": prefix["solved_up_to"],
        "prefix_per_length": prefix["per_length"],
        "chance": result["chance"],
        "per_category": result["per_category"],
        "ppl": result["ppl"],
        "kept_layers": list(keep) if arm == "arwkv-keep" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "stages": stages,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
    }


def _train_in_worker(arm: str, seed: int, cfg: ConvertBenchConfig, keep: Sequence[int]) -> dict:
    return train_arm(arm, seed, replace(cfg, progress=False), keep, threads=cfg.threads or 1)


# ------------------------------------------------------------------------------------------------- results
def read_rows(path: Path) -> list[dict]:
    """The rows of a ``results.jsonl`` (a torn last line is ignored): :func:`wuneng.apps.bench_arch.read_results`."""
    from wuneng.apps.bench_arch import read_results

    return read_results(path)


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarise(rows: Sequence[dict], teacher_scores: dict) -> dict:
    """Per arm: for each metric the per-seed values, mean and 95% t half-width
    (:func:`wuneng.apps.bench_arch.t_interval`), and the same for the relative score against the teacher before
    training, ``(after - chance) / (teacher - chance)`` (None where the teacher is not above chance).

    Returns ``{arm: {"seeds": [...], metric: {"values", "mean", "half_width"}, "relative": {metric: {...} or None},
    "seconds": mean}}``."""
    from wuneng.apps.bench_arch import t_interval
    from wuneng.eval.retention import relative_score

    out: dict = {}
    for arm in ARMS:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        entry: dict = {"seeds": [r["seed"] for r in rs], "relative": {}}
        for m in METRICS:
            values = [float(r[m]) for r in rs]
            mean, hw = t_interval(values)
            entry[m] = {"values": values, "mean": mean, "half_width": hw}
            chance = rs[0]["chance"][m]
            rel = [relative_score(v, teacher_scores[m], chance) for v in values]
            if any(x is None for x in rel):
                entry["relative"][m] = None
            else:
                rmean, rhw = t_interval(rel)
                entry["relative"][m] = {"values": rel, "mean": rmean, "half_width": rhw}
        for extra in EXTRA_METRICS:  # no chance level to be relative to
            values = [float(r[extra]) for r in rs if extra in r]
            if values:
                mean, hw = t_interval(values)
                entry[extra] = {"values": values, "mean": mean, "half_width": hw}
        entry["seconds"] = float(np.mean([r["seconds"] for r in rs]))
        entry["params"] = rs[0]["params"]
        entry["kept_layers"] = rs[0].get("kept_layers")
        out[arm] = entry
    return out


def verdict(summary: dict, margin: float = 0.1) -> tuple[str, str]:
    """The claim "conversion to WuNeng adds the subtask": WuNeng's parity interval against the trained-on teacher's.

    ``("held", why)`` when WuNeng's 95% interval lies wholly above the teacher arm's; ``("not held", why)`` when it
    lies wholly below, or when WuNeng did not learn the subtask (its interval ends below chance + ``margin``) and is
    not above the teacher's; else ``("inconclusive", why)``."""
    w, t = summary.get("wuneng"), summary.get("teacher")
    if w is None or t is None or w["parity"]["half_width"] is None or t["parity"]["half_width"] is None:
        return "inconclusive", "needs the wuneng and teacher arms with at least 2 seeds each"
    wm, wh = w["parity"]["mean"], w["parity"]["half_width"]
    tm, th = t["parity"]["mean"], t["parity"]["half_width"]
    text = f"WuNeng {100 * wm:.1f}% ± {100 * wh:.1f} vs the trained-on teacher {100 * tm:.1f}% ± {100 * th:.1f}"
    if wm - wh > tm + th:
        return "held", text + ": the intervals do not overlap, WuNeng above"
    if wm + wh < tm - th:
        return "not held", text + ": the intervals do not overlap, WuNeng below"
    if wm + wh < 0.5 + margin:
        return (
            "not held",
            text + f": WuNeng did not learn it (its interval ends below chance + {100 * margin:.0f} points)",
        )
    return "inconclusive", text + ": the intervals overlap"


def _pm(entry: Optional[dict], pct: bool = True, digits: int = 2) -> str:
    """``mean ± half-width`` of a summary entry: accuracies in percent with one decimal, other numbers with
    ``digits`` decimals; "undefined" for None."""
    if entry is None:
        return "undefined"
    scale, unit, digits = (100.0, "%", 1) if pct else (1.0, "", digits)
    mean = f"{scale * entry['mean']:.{digits}f}{unit}"
    if entry["half_width"] is None:
        return mean
    return f"{mean} ± {scale * entry['half_width']:.{digits}f}"


def results_markdown(rows: Sequence[dict], teacher: dict) -> str:
    """``results.md``: the table (mean ± 95% t half-width over seeds), the relative scores, the verdict."""
    summary = summarise(rows, teacher["scores"])
    ts = teacher["scores"]
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# bench-convert: does conversion add a capability?",
        "",
        f"Teacher `{teacher.get('key', '?')}` ({teacher.get('params', 0) / 1e6:.2f} M parameters) before training: "
        f"parity {100 * ts['parity']:.1f}% (chance 50%), arithmetic {100 * ts['arithmetic']:.1f}% "
        f"(chance {100 * ts['chance']['arithmetic']:.1f}%), recall {100 * ts['recall']:.1f}% "
        f"(chance {100 * ts['chance']['recall']:.0f}%). Seeds: {', '.join(map(str, seeds))}; "
        "cells are mean ± half-width of the two-sided 95% Student-t interval over seeds.",
        "",
        "| arm | params | parity (answer) | prefix parities | solved k <= | arithmetic | recall | arithmetic rel. "
        "to teacher | recall rel. to teacher | s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in summary.items():
        label = ARM_LABELS[arm] + (f" (kept {e['kept_layers']})" if e.get("kept_layers") else "")
        lines.append(
            f"| {label} | {e['params'] / 1e6:.2f} M | {_pm(e['parity'])} | {_pm(e.get('prefix_accuracy'))} "
            f"| {_pm(e.get('solved_up_to'), pct=False, digits=1)} | {_pm(e['arithmetic'])} | {_pm(e['recall'])} "
            f"| {_pm(e['relative']['arithmetic'], pct=False)} | {_pm(e['relative']['recall'], pct=False)} "
            f"| {e['seconds']:.0f} |"
        )
    status, why = verdict(summary)
    lines += [
        "",
        "parity (answer): greedy answer after `=` on held-out lines (chance 50%); prefix parities: teacher-forced "
        "parity of every prefix at its last bit, all lengths (what the prefix labels train); solved k <=: the longest "
        f"prefix length k with every length up to k above 95% (teacher before: {ts.get('prefix', {}).get('solved_up_to', '-')}, "
        f"prefix parities {100 * ts.get('prefix', {}).get('accuracy', float('nan')):.1f}%).",
        "",
        "relative: `(after - chance) / (teacher before - chance)` per seed (1 = the teacher's gain over chance kept).",
        "",
        f"Verdict (WuNeng's parity against the trained-on teacher's): **{status}**: {why}.",
        "",
        "Per seed:",
        "",
        "| arm | seed | parity | prefix parities | solved k <= | arithmetic | recall | align loss end | sft loss end "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (ARMS.index(r["arm"]), r["seed"])):
        st = r["stages"]

        def loss(stage: str, st: dict = st) -> str:
            value = st.get(stage, {}).get("final_loss")
            return "-" if value is None else f"{value:.3f}"

        lines.append(
            f"| {r['arm']} | {r['seed']} | {100 * r['parity']:.1f}% | {100 * r.get('prefix_accuracy', float('nan')):.1f}% "
            f"| {r.get('solved_up_to', '-')} | {100 * r['arithmetic']:.1f}% | "
            f"{100 * r['recall']:.1f}% | {loss('align')} | {loss('sft')} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[dict], teacher: dict, path: Path) -> Path:
    """Bars per metric and arm (mean over seeds) with 95% t-interval error bars; the teacher before training dashed,
    chance dotted."""
    from wuneng.train.plotting import pyplot

    plt = pyplot()
    summary = summarise(rows, teacher["scores"])
    arms = list(summary)
    panels = [m for m in ("parity", "prefix_accuracy", "arithmetic", "recall") if all(m in summary[a] for a in arms)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8))
    for ax, m in zip(axes, panels):
        means = [100 * summary[a][m]["mean"] for a in arms]
        errs = [100 * (summary[a][m]["half_width"] or 0.0) for a in arms]
        ax.bar(range(len(arms)), means, yerr=errs, capsize=4, color=["C0", "C1", "C2", "C3"][: len(arms)])
        before = teacher["scores"].get("prefix", {}).get("accuracy") if m == "prefix_accuracy" else teacher["scores"][m]
        if before is not None:
            ax.axhline(100 * before, color="k", linestyle="--", linewidth=1, label="teacher before")
        chance = 0.5 if m == "prefix_accuracy" else teacher["scores"]["chance"][m]
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=20)
        ax.set_ylim(0, 105)
        ax.set_title({"prefix_accuracy": "prefix parities (teacher-forced)", "parity": "parity (answer)"}.get(m, m))
        ax.set_ylabel("held-out exact match (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("bench-convert: mean over seeds, 95% t-interval")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_convert_bench(cfg: ConvertBenchConfig) -> list[dict]:
    """Prepare the teacher (cached), choose the kept layers (cached), train every missing (arm, seed) run, then write
    ``results.md`` and ``accuracy.png`` from all rows of ``results.jsonl``. Returns the rows."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {r.get("key") for r in read_rows(path)}
    todo = [run for run in cfg.runs() if cfg.run_key(*run) not in done]
    parent_threads = cfg.threads if cfg.jobs == 1 else (cfg.threads or 1) * cfg.jobs
    if parent_threads is not None:
        torch.set_num_threads(min(parent_threads, os.cpu_count() or 1))
    logger.info(
        f"bench-convert ({cfg.mode}): {len(cfg.runs())} runs, {len(cfg.runs()) - len(todo)} already in {path}, "
        f"{len(todo)} to train; align {cfg.align_steps} + sft {cfg.sft_steps} steps x {cfg.batch} x {cfg.context} "
        f"bytes; parity {cfg.parity_bits} bits at {cfg.parity_share:g} of the examples; seeds {list(cfg.seeds)}"
    )
    t0 = time.perf_counter()
    teacher = prepare_teacher(cfg)
    keep: list[int] = []
    if any(arm == "arwkv-keep" for arm, _ in todo):
        keep = kept_layers(cfg)
        logger.info(f"bench-convert: select-layers keeps attention in layers {keep}")

    def finished(i: int, run: tuple, row: dict) -> None:
        row = {"key": cfg.run_key(*run), "mode": cfg.mode, "teacher": teacher["key"], **row}
        _append_row(path, row)
        logger.info(
            f"[{i + 1}/{len(todo)}] {run[0]} seed {run[1]}: parity {100 * row['parity']:.1f}%, arithmetic "
            f"{100 * row['arithmetic']:.1f}%, recall {100 * row['recall']:.1f}% ({row['seconds']:.0f} s)"
        )

    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_in_worker, arm, seed, cfg, keep): (arm, seed) for arm, seed in todo}
            for i, future in enumerate(as_completed(futures)):
                finished(i, futures[future], future.result())
    else:
        for i, (arm, seed) in enumerate(todo):
            logger.info(f"[{i + 1}/{len(todo)}] {arm} seed {seed}: training")
            finished(i, (arm, seed), train_arm(arm, seed, cfg, keep))
    keys = {cfg.run_key(*run) for run in cfg.runs()}
    rows = [r for r in read_rows(path) if r.get("key") in keys]  # this experiment's rows (others stay in the file)
    (out / "results.md").write_text(results_markdown(rows, teacher), encoding="utf-8")
    if rows:
        plot_results(rows, teacher, out / "accuracy.png")
    logger.info(
        f"bench-convert: wrote {out / 'results.md'} and {out / 'accuracy.png'} ({time.perf_counter() - t0:.0f} s)"
    )
    return rows
