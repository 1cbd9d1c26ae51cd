"""``wuneng bench-arch``: train architectures from scratch on MQAR and group state tracking, at equal budgets.

Variants (:data:`VARIANTS`), all 2 layers of width ``d_model`` with head size ``head_size``:

- ``transformer``: transformers' ``Qwen2ForCausalLM`` (RoPE, GQA off, SwiGLU MLP);
- ``rwkv7``: :class:`~wuneng.models.rwkv7.RWKV7ForCausalLM`;
- ``wuneng-gate`` / ``-add`` / ``-concat`` / ``-hymba``: a Qwen2 of the transformer's shape converted with
  :meth:`~wuneng.models.wuneng.WuNengForCausalLM.from_teacher` (that fusion, middle heads, state-query on),
  then *every* parameter trained from that random start (there is no teacher to preserve here);
- ``wuneng-none``: the hybrid layers with fusion "none";
- ``wuneng-gate-lambda0``: ``wuneng-gate`` without the state-query modulation (lambda = 0, ``state_query=False``);
- ``metastate``: :class:`~wuneng.models.metastate.MetaStateForCausalLM`;
- ``arwkv`` / ``arwkv-attn``: the same random Qwen2 converted ARWKV-style (every attention replaced by an RWKV-7
  time-mix), ``arwkv-attn`` keeping the last layer's softmax attention; every parameter trained.

Tasks (:class:`TaskSetting`): MQAR (Zoology's generator; accuracy on the queried values) and group word
problems (accuracy on every prefix product; also the longest prefix length solved above 95%). Training data is
drawn fresh every epoch; the test set has its own seed. The loss is cross-entropy at labelled positions only
(the label at position t is predicted by the logits at t).

Every run trains through the library's own :func:`wuneng.train.loop.train` (a ``pretrain`` stage): the task rows
enter in its next-token convention (:func:`next_token_rows`), with its options for generated tasks
(``dataset_for_epoch``, ``should_stop``, ``max_seconds``, ``save_checkpoints: false``).

Every cell is the mean over seeds (default 3) with a two-sided 95% Student-t interval over seeds
(:func:`t_interval`); the plot draws it as error bars. Positive controls (:class:`Control`, in the default sweep: a
2-layer Transformer solves MQAR; RWKV-7 solves parity where the same-size Transformer stays near chance) are
checked from the same rows, and ``results.md`` says at its top whether each reproduced; if one did not, the
comparisons are marked as not interpretable.

State-head contribution (WuNeng variants): after training, each ``wuneng-*`` run is evaluated once more on the same
test set with its state heads zeroed (Y = 0, :func:`wuneng.eval.ablation.state_heads_zeroed`); the row records
``accuracy_state_zeroed`` and the learned magnitudes per layer (``state_head_magnitudes``,
:func:`wuneng.eval.ablation.state_head_magnitudes`), and ``results.md`` gets a "State-head contribution" table
(:func:`state_contribution`). Rows written before this existed load as before and are left out of that table.

Every run (setting x variant x learning rate x seed) has the same optimiser-step and batch budget (so the same
token budget; a setting may set its own steps and learning rates) and optionally a wall-clock cap. Finished runs are appended to ``OUTPUT_DIR/results.jsonl``; a run
whose key is already there is skipped, so an interrupted sweep resumes and several invocations accumulate in
one table (``results.md`` and ``accuracy.png`` are rewritten from the whole file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wuneng.labels import IGNORE_INDEX
from wuneng.train.data import PackedDataset

logger = logging.getLogger(__name__)

__all__ = [
    "VARIANTS",
    "TaskSetting",
    "BenchConfig",
    "build_model",
    "train_run",
    "run_bench",
    "read_results",
    "best_rows",
    "results_table",
    "state_contribution",
    "Claim",
    "CLAIMS",
    "claim_verdicts",
    "claims_markdown",
    "difference_interval",
]

VARIANTS = (
    "transformer",
    "rwkv7",
    "wuneng-gate",
    "wuneng-add",
    "wuneng-concat",
    "wuneng-hymba",
    "wuneng-none",
    "wuneng-gate-lambda0",
    "metastate",
    "arwkv",
    "arwkv-attn",
)

# 97.5% quantiles of Student's t for 1..29 degrees of freedom (two-sided 95% interval); 30 and more use df = 30's.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and half-width of the two-sided 95% Student-t interval over seeds: ``t_{0.975, n-1} * s / sqrt(n)``
    with the sample standard deviation ``s`` (ddof 1). One value has no interval (half-width None)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, None
    t = T_975[min(x.size - 1, len(T_975)) - 1]
    return mean, float(t * x.std(ddof=1) / math.sqrt(x.size))


@dataclass(frozen=True)
class TaskSetting:
    """One task configuration.

    Attributes:
        task: "mqar" or "state".
        seq_len: T (MQAR) or k (state tracking: elements per training sequence).
        num_kv_pairs: MQAR key-value pairs n.
        vocab_size: MQAR vocabulary V (state tracking: the group order, set by ``group``).
        group: state-tracking group ("A5", "S5", "Z60", "Z2" for parity, ...).
        variants: the variants run on this setting (None: all of the sweep's).
        test_seq_len: state tracking only: test sequences of this length (> ``seq_len``), scored on the positions
            beyond the training length only (length generalisation); None: test at ``seq_len``, every position.
        lrs: learning rates of this setting (None: the sweep's ``lrs``).
        steps: optimiser steps of this setting (None: the sweep's ``steps``).
        filler: MQAR filler tokens of the query region: "random" (Zoology's default) or "zero" (Zoology's figure 2;
            a random filler can repeat a key and so make a query ambiguous to an induction head).
    """

    task: str
    seq_len: int
    num_kv_pairs: int = 4
    vocab_size: int = 1024
    group: str = "A5"
    variants: Optional[tuple[str, ...]] = None
    test_seq_len: Optional[int] = None
    lrs: Optional[tuple[float, ...]] = None
    steps: Optional[int] = None
    filler: str = "random"

    def __post_init__(self) -> None:
        if self.task not in ("mqar", "state"):
            raise ValueError(f"TaskSetting.task must be 'mqar' or 'state', got {self.task!r}")
        self.task_config()  # validates the sizes
        for v in self.variants or ():
            if v not in VARIANTS:
                raise ValueError(f"TaskSetting.variants: unknown variant {v!r}; expected some of {VARIANTS}")
        if self.test_seq_len is not None and (self.task != "state" or not self.test_seq_len > self.seq_len):
            raise ValueError(
                f"TaskSetting.test_seq_len is for state tracking and must exceed seq_len ({self.seq_len}), "
                f"got {self.test_seq_len!r} for task {self.task!r}"
            )
        if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
            raise ValueError(f"TaskSetting.lrs must be positive learning rates, got {self.lrs}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"TaskSetting.steps must be a positive int, got {self.steps!r}")

    @property
    def name(self) -> str:
        if self.task == "mqar":
            zero = " zero-filler" if self.filler == "zero" else ""
            return f"mqar T={self.seq_len} n={self.num_kv_pairs} V={self.vocab_size}{zero}"
        if self.test_seq_len is not None:
            return f"state {self.group} k={self.seq_len} test k={self.test_seq_len}"
        return f"state {self.group} k={self.seq_len}"

    def task_config(self, seq_len: Optional[int] = None):
        if self.task == "mqar":
            from wuneng.eval.tasks.mqar import MQARConfig

            return MQARConfig(
                vocab_size=self.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs, filler=self.filler
            )
        from wuneng.eval.tasks.state_tracking import StateTrackingConfig

        return StateTrackingConfig(group=self.group, seq_len=seq_len or self.seq_len)

    @property
    def model_vocab(self) -> int:
        return self.task_config().vocab_size

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess over the labels (the task config's): 1 / (V - V//2) values (MQAR), 1 / group
        order (state)."""
        return self.task_config().chance

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model sees (the test length when it is longer)."""
        return self.test_seq_len or self.seq_len

    def generate(
        self, num_examples: int, seed: int, epoch: int = 0, seq_len: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, int64 ``[num_examples, T]``; labels -100 where nothing is scored.
        ``seq_len``: state tracking only, another sequence length (the test length)."""
        if self.task == "mqar":
            from wuneng.eval.tasks.mqar import generate_mqar

            d = generate_mqar(self.task_config(), num_examples, seed, epoch)
        else:
            from wuneng.eval.tasks.state_tracking import generate_word_problems

            d = generate_word_problems(self.task_config(seq_len), num_examples, seed, epoch)
        return d.input_ids, d.labels

    def generate_test(self, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The test set: at ``test_seq_len`` when set (all positions labelled; :func:`evaluate` scores the ones
        beyond ``seq_len``), else like the training data."""
        return self.generate(num_examples, seed=seed, seq_len=self.test_seq_len)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: a count N (seeds 0..N-1, N >= 2: a single seed has no interval) or a comma-separated list of
    two or more seeds, e.g. ``"3"`` -> (0, 1, 2), ``"0,4"`` -> (0, 4)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--seeds: expected a count N >= 2 or a comma-separated list of seeds >= 0, got {text!r}")
    if len(values) == 1:
        if values[0] < 2:
            raise ValueError(
                f"--seeds: a count must be >= 2 (an interval needs two seeds), got {text!r}; to pick seeds give a "
                f"comma-separated list of two or more, e.g. '0,1'"
            )
        return tuple(range(values[0]))
    return tuple(values)


@dataclass(frozen=True)
class Control:
    """A known result that must reproduce in the same sweep for its comparisons to count.

    The control holds when the mean test accuracy over seeds of ``variant`` on the setting named ``setting``
    (at its best learning rate) is ``>= at_least`` and ``<= at_most`` (either may be None).
    """

    label: str
    setting: str
    variant: str
    at_least: Optional[float] = None
    at_most: Optional[float] = None


def check_controls(rows: Sequence[dict], controls: Sequence[Control]) -> list[dict]:
    """Each control's verdict from the result rows: ``{"control", "status"`` ("reproduced", "failed" or "not run"),
    ``"accuracy"`` (mean over seeds), ``"half_width"`` (95% t-interval), ``"seeds"}``."""
    best = best_rows(rows)
    out = []
    for c in controls:
        b = best.get((c.setting, c.variant))
        if b is None:
            out.append({"control": c, "status": "not run", "accuracy": None, "half_width": None, "seeds": []})
            continue
        acc = b["accuracy"]
        ok = (c.at_least is None or acc >= c.at_least) and (c.at_most is None or acc <= c.at_most)
        out.append(
            {
                "control": c,
                "status": "reproduced" if ok else "failed",
                "accuracy": acc,
                "half_width": b["half_width"],
                "seeds": b["seeds"],
            }
        )
    return out


@dataclass
class BenchConfig:
    """The sweep: settings x variants x learning rates x seeds, each run with the same budget.

    ``controls``: known results that must reproduce in the same sweep (:class:`Control`); when one fails or was not
    run, ``results.md`` says so at its top and marks the comparisons as not interpretable.
    """

    output_dir: str = "runs/bench-arch"
    settings: tuple[TaskSetting, ...] = ()
    variants: tuple[str, ...] = VARIANTS
    lrs: tuple[float, ...] = (2e-3, 6e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    controls: tuple[Control, ...] = ()
    d_model: int = 64
    num_layers: int = 2
    head_size: int = 32
    steps: int = 1000
    batch_size: int = 64
    max_seconds: Optional[float] = None  # wall-clock cap per run (the budget actually used is recorded)
    examples_per_epoch: int = 20_000  # fresh data every epoch
    test_examples: int = 1000
    eval_every: Optional[int] = None  # with stop_accuracy: evaluate during training and stop once reached
    stop_accuracy: Optional[float] = None
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    device: str = "cpu"
    threads: Optional[int] = None
    jobs: int = 1  # runs trained at once in separate processes (CPU only; each with threads or 1 torch thread)
    mode: str = "default"

    def __post_init__(self) -> None:
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
        if not self.settings:
            raise ValueError("BenchConfig.settings is empty: give at least one TaskSetting")
        for name in (
            "d_model",
            "num_layers",
            "head_size",
            "steps",
            "batch_size",
            "examples_per_epoch",
            "test_examples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"BenchConfig.jobs must be a positive int, got {self.jobs!r}")
        if self.jobs > 1 and self.device != "cpu":
            raise ValueError(
                f"BenchConfig.jobs > 1 runs several CPU processes; device must be 'cpu', got {self.device!r}"
            )
        if self.d_model % self.head_size or self.head_size % 16:
            raise ValueError(
                f"BenchConfig: head_size ({self.head_size}) must be a multiple of 16 dividing d_model ({self.d_model})"
            )
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"BenchConfig.lrs must be positive learning rates, got {self.lrs}")

    def only(self, patterns: Sequence[str]) -> "BenchConfig":
        """This sweep restricted to the settings whose name contains one of ``patterns`` (e.g. ``"state A5 k=16"``).
        Run keys do not change, so the rows count toward (and are skipped by) the whole sweep later."""
        chosen = tuple(s for s in self.settings if any(p in s.name for p in patterns))
        if not chosen:
            raise ValueError(f"no setting matches {list(patterns)}; settings are: {[s.name for s in self.settings]}")
        return replace(self, settings=chosen)

    @property
    def num_heads(self) -> int:
        return self.d_model // self.head_size

    def steps_of(self, setting: TaskSetting) -> int:
        """The optimiser-step budget of a setting (its own, else the sweep's)."""
        return setting.steps or self.steps

    def runs(self) -> list[tuple[TaskSetting, str, float, int]]:
        """Every (setting, variant, lr, seed) of the sweep, in order."""
        out = []
        for s in self.settings:
            chosen = [v for v in self.variants if s.variants is None or v in s.variants]
            for v in chosen:
                for lr in s.lrs or self.lrs:
                    for seed in self.seeds:
                        out.append((s, v, lr, seed))
        return out

    def run_key(self, setting: TaskSetting, variant: str, lr: float, seed: int) -> str:
        """Identity of a run: what it trains and with which budget (a changed budget is a new run)."""
        cap = "" if self.max_seconds is None else f" cap={self.max_seconds:g}s"
        return (
            f"{setting.name} | {variant} | lr={lr:g} | seed={seed} | d={self.d_model} L={self.num_layers} "
            f"hs={self.head_size} | steps={self.steps_of(setting)} bs={self.batch_size}{cap}"
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def default(cls, **kw) -> "BenchConfig":
        """The two positive controls, each for every variant, 3 seeds (see ``docs/results/history.md`` for the tuning runs).

        - recall: MQAR T = 32, n = 2, V = 512, 800 steps x 64 at lr 1.5e-3; the control is a 2-layer Transformer
          at >= 95% test accuracy;
        - state tracking: parity (the group Z2, the parity of every prefix), k = 16, 600 steps x 64 at lr 6e-3; the
          control is RWKV-7 at >= 95% while the same-size Transformer stays at <= 65% (chance 50%; position 1,
          the input bit itself, is free).
        """
        recall = TaskSetting("mqar", 32, 2, 512, lrs=(1.5e-3,), steps=800)
        state = TaskSetting("state", 16, group="Z2", lrs=(6e-3,), steps=600)
        controls = (
            Control("recall: a 2-layer Transformer solves MQAR", recall.name, "transformer", at_least=0.95),
            Control("state tracking: RWKV-7 tracks parity", state.name, "rwkv7", at_least=0.95),
            Control(
                "state tracking: the same-size Transformer stays near chance there",
                state.name,
                "transformer",
                at_most=0.65,
            ),
        )
        return cls(**{**dict(settings=(recall, state), controls=controls, batch_size=64, mode="default"), **kw})

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """A few minutes: every variant on a small MQAR and A5 at k = 16, one learning rate, short runs."""
        settings = (TaskSetting("mqar", 64, 4, 256), TaskSetting("state", 16, group="A5"))
        return cls(
            **{
                **dict(
                    settings=settings,
                    lrs=(4e-3,),
                    seeds=(0,),  # a smoke run: one seed, so no intervals
                    steps=150,
                    batch_size=32,
                    test_examples=256,
                    examples_per_epoch=4800,
                    mode="quick",
                ),
                **kw,
            }
        )

    @classmethod
    def full(cls, **kw) -> "BenchConfig":
        """Zoology scale for a GPU: V = 8192, (64, 4), (128, 8), (256, 16), d = 128, trained to 99% or 20 k steps."""
        settings = (
            TaskSetting("mqar", 64, 4, 8192),
            TaskSetting("mqar", 128, 8, 8192),
            TaskSetting("mqar", 256, 16, 8192),
            TaskSetting("state", 16, group="A5"),
            TaskSetting("state", 32, group="A5"),
            TaskSetting("state", 32, group="S5"),
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            **{
                **dict(
                    settings=settings,
                    lrs=(1e-3, 3e-3, 1e-2),
                    d_model=128,
                    steps=20_000,
                    batch_size=256,
                    examples_per_epoch=100_000,
                    eval_every=500,
                    stop_accuracy=0.99,
                    device=device,
                    mode="full",
                ),
                **kw,
            }
        )


# ------------------------------------------------------------------------------------------------ models
def _qwen2(cfg: BenchConfig, vocab: int, seq_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.d_model,
        intermediate_size=16 * math.ceil(8 * cfg.d_model / 3 / 16),  # SwiGLU with ~ the parameters of a 4C MLP
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(512, 2 * seq_len),
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def build_model(variant: str, cfg: BenchConfig, vocab: int, seq_len: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model of ``variant`` (seeded) for a task of ``vocab`` tokens."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    if variant == "transformer":
        return _qwen2(cfg, vocab, seq_len)
    if variant == "rwkv7":
        from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

        return RWKV7ForCausalLM(
            RWKV7Config(
                vocab_size=vocab,
                hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers,
                head_size=cfg.head_size,
                bos_token_id=None,
                eos_token_id=None,
            )
        )
    if variant == "metastate":
        from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM

        return MetaStateForCausalLM(
            MetaStateConfig(
                vocab_size=vocab,
                hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers,
                head_size=cfg.head_size,
                bos_token_id=None,
                eos_token_id=None,
            )
        )
    from wuneng.models.wuneng import WuNengForCausalLM

    base = _qwen2(cfg, vocab, seq_len)  # the same random Qwen2 as "transformer", then converted
    if variant.startswith("arwkv"):
        from wuneng.convert import convert_teacher

        # ARWKV: every attention replaced by an RWKV-7 time-mix; "arwkv-attn" keeps the last layer's attention
        kinds = ["arwkv"] * cfg.num_layers
        if variant == "arwkv-attn":
            kinds[-1] = "attention"
        model = convert_teacher(base, layer_kinds=kinds)
        model.requires_grad_(True)
        return model
    fusion = variant.split("-")[1]
    model = WuNengForCausalLM.from_teacher(
        base, fusion=fusion, middle_heads=min(4, cfg.num_heads), state_query=not variant.endswith("lambda0")
    )
    model.requires_grad_(True)  # every parameter trains (from scratch, no teacher to preserve)
    return model


# ---------------------------------------------------------------------------------------------- training
def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at labelled positions: logits ``[B, T, V]`` at position t predict ``labels[:, t]``."""
    mask = labels != IGNORE_INDEX
    return F.cross_entropy(logits[mask].float(), labels[mask])


@torch.no_grad()
def evaluate(
    model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    batch_size: int = 256,
    train_len: Optional[int] = None,
) -> dict:
    """Accuracy at labelled positions (and, for state tracking, per length and the longest solved prefix).

    State tracking with test rows longer than ``train_len``: ``accuracy`` counts only the positions beyond
    ``train_len`` (length generalisation); ``accuracy_within_train_len`` the others."""
    from wuneng.eval.scoring import labelled_accuracy
    from wuneng.eval.tasks.state_tracking import state_tracking_report

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(inputs), batch_size):
        preds.append(model(input_ids=inputs[i : i + batch_size].to(device)).logits.argmax(-1).cpu())
    model.train(was_training)
    pred = torch.cat(preds)
    if task == "state":
        rep = state_tracking_report(pred, labels)
        if train_len is not None and labels.shape[1] > train_len:
            beyond, within = labels.clone(), labels.clone()
            beyond[:, :train_len] = IGNORE_INDEX
            within[:, train_len:] = IGNORE_INDEX
            return {
                "accuracy": labelled_accuracy(pred, beyond),
                "accuracy_within_train_len": labelled_accuracy(pred, within),
                "solved_up_to": rep["solved_up_to"],
            }
        return {"accuracy": rep["accuracy"], "solved_up_to": rep["solved_up_to"]}
    return {"accuracy": labelled_accuracy(pred, labels)}


class TaskVocabulary:
    """What :func:`~wuneng.train.loop.train` needs of a tokenizer for rows that are already token ids: their number."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def next_token_rows(input_ids: torch.Tensor, labels: torch.Tensor) -> PackedDataset:
    """A task's rows in the next-token convention of :func:`~wuneng.train.loop.train` (and transformers).

    The generators label position t with what the logits at t must predict (``labels[:, t]``); ``train`` scores the
    logits at t against ``labels[:, t + 1]``. So the labels move one place right, and one input token (id 0) is
    appended so that the last label keeps a position: the logits of that extra token are never scored, and a causal
    model's earlier logits do not see it. ``input_ids``, ``labels``: int64 ``[N, T]``; returns rows ``[N, T + 1]``.
    """
    n = input_ids.shape[0]
    ids = torch.cat([input_ids, input_ids.new_zeros(n, 1)], dim=1)
    shifted = torch.cat([labels.new_full((n, 1), IGNORE_INDEX), labels], dim=1)
    return PackedDataset(ids, shifted, torch.ones_like(ids), n, 0)


def _losses_of(run_dir: Path) -> list[float]:
    """The loss of every step of a run (its ``metrics.jsonl``, written with ``log_every: 1``)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["loss"] for r in records if "event" not in r and "loss" in r]


def train_run(
    setting: TaskSetting,
    variant: str,
    lr: float,
    seed: int,
    cfg: BenchConfig,
    progress: bool = True,
) -> dict:
    """Train one model from scratch through :func:`wuneng.train.loop.train` and evaluate it; returns the result row
    (without the key).

    The run is a ``pretrain`` stage on :func:`next_token_rows` of fresh task data every epoch (``dataset_for_epoch``),
    with the sweep's step budget (``max_steps``), wall-clock cap (``max_seconds``), early stop at ``stop_accuracy``
    (``should_stop``), in full precision, writing no checkpoint and no model (its run folder is temporary).
    """
    import tempfile

    from wuneng.train.config import OptimConfig, TrainConfig
    from wuneng.train.loop import NonFiniteLossError, train

    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # train() runs on the current CUDA device
    steps_budget = cfg.steps_of(setting)
    model = build_model(variant, cfg, setting.model_vocab, setting.max_seq_len, seed)
    test_x, test_y = setting.generate_test(cfg.test_examples, seed=10_000 + seed)
    per_epoch = max(cfg.batch_size, cfg.examples_per_epoch - cfg.examples_per_epoch % cfg.batch_size)

    def epoch_rows(epoch: int) -> PackedDataset:  # fresh data every epoch (a fixed set gets memorised: Probe B)
        return next_token_rows(*setting.generate(per_epoch, seed=seed, epoch=epoch))

    stopped_at: list[int] = []

    def reached_accuracy(step: int, trained: torch.nn.Module) -> bool:
        if not cfg.eval_every or cfg.stop_accuracy is None or step % cfg.eval_every:
            return False
        if evaluate(trained, test_x, test_y, setting.task, train_len=setting.seq_len)["accuracy"] >= cfg.stop_accuracy:
            stopped_at.append(step)
            return True
        return False

    diverged = False
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wuneng-bench-arch-") as run_dir:
        config = TrainConfig(
            stage="pretrain",
            output_dir=run_dir,
            optim=OptimConfig(
                lr=lr,
                min_lr=lr / 10,
                schedule="cosine",
                warmup_steps=max(1, int(cfg.warmup_fraction * steps_budget)),
                weight_decay=cfg.weight_decay,
                w0_lr_scale=1.0,
            ),
            micro_batch_size=cfg.batch_size,
            max_steps=steps_budget,
            max_seconds=cfg.max_seconds,
            seed=seed,
            mixed_precision="no",
            device="cpu" if device.type == "cpu" else "auto",
            log_every=1,  # every step's loss: the curve below
            save_checkpoints=False,
            save_final=False,
            progress=progress,
            tensorboard=False,
        )
        try:
            train(
                config,
                model=model,
                tokenizer=TaskVocabulary(setting.model_vocab),
                dataset_for_epoch=epoch_rows,
                should_stop=reached_accuracy,
            )
        except NonFiniteLossError as e:  # the weights of the last finite step stay; the row says it diverged
            logger.info("%s %s lr=%g seed=%d diverged: %s", setting.name, variant, lr, seed, e)
            diverged = True
        losses = _losses_of(Path(run_dir))
    seconds = time.perf_counter() - start
    log_every = max(1, steps_budget // 40)
    curve: list[tuple[int, float]] = []
    ema = None
    for step, value in enumerate(losses, start=1):
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % log_every == 0 or step == steps_budget:
            curve.append((step, round(ema, 4)))
    steps = len(losses)
    result = evaluate(model, test_x, test_y, setting.task, train_len=setting.seq_len)
    if variant.startswith("wuneng-"):
        result.update(state_head_ablation(model, test_x, test_y, setting))
    return {
        "setting": setting.name,
        "task": setting.task,
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "tokens": steps * cfg.batch_size * setting.seq_len,
        "chance": setting.chance,
        "seconds": round(seconds, 2),
        "final_loss": ema,
        "diverged": bool(diverged),
        "stopped_at_accuracy": bool(stopped_at),
        **result,
        "loss_curve": curve,
    }


def state_head_ablation(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, setting: TaskSetting):
    """A trained WuNeng model's accuracy on the test set with its state heads zeroed and its learned magnitudes:
    ``{"accuracy_state_zeroed": float, "state_head_magnitudes": [per layer dict]}`` (see
    :mod:`wuneng.eval.ablation`)."""
    from wuneng.eval.ablation import state_head_magnitudes, state_heads_zeroed

    with state_heads_zeroed(model):
        zeroed = evaluate(model, test_x, test_y, setting.task, train_len=setting.seq_len)["accuracy"]
    return {"accuracy_state_zeroed": zeroed, "state_head_magnitudes": state_head_magnitudes(model)}


# ------------------------------------------------------------------------------------------------ results
def read_results(path: Path) -> list[dict]:
    """Rows of a ``results.jsonl`` (a torn last line from an interrupted write is ignored)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def best_rows(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Per (setting, variant): the learning rate with the best mean accuracy over seeds.

    Returns ``{(setting, variant): {"lr", "accuracy" (mean over seeds), "half_width" (of the 95% Student-t
    interval over seeds, :func:`t_interval`; None for one seed), "seeds", "accuracies" (per seed, in seed order),
    "seconds" (mean per run), "solved_up_to" (mean, state tracking), "by_lr": {lr: mean accuracy}}}``.
    """
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["variant"]), {}).setdefault(r["lr"], []).append(r)
    best = {}
    for key, by_lr in groups.items():
        means = {lr: float(np.mean([r["accuracy"] for r in rs])) for lr, rs in by_lr.items()}
        lr = max(means, key=lambda k: (means[k], -k))
        rs = sorted(by_lr[lr], key=lambda r: r["seed"])
        solved = [r["solved_up_to"] for r in rs if r.get("solved_up_to") is not None]
        _, half_width = t_interval([r["accuracy"] for r in rs])
        best[key] = {
            "lr": lr,
            "accuracy": means[lr],
            "half_width": half_width,
            "accuracies": [r["accuracy"] for r in rs],
            "seconds": float(np.mean([r["seconds"] for r in rs])) if all("seconds" in r for r in rs) else None,
            "seeds": [r["seed"] for r in rs],
            "solved_up_to": float(np.mean(solved)) if solved else None,
            "by_lr": means,
        }
    return best


MAGNITUDE_KEYS = (
    "lambda_mean_abs",
    "lambda_max_abs",
    "rho_mean_abs",
    "beta_mean_abs",
    "o_state_mean_abs",
    "o_middle_mean_abs",
)


def state_contribution(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Per (setting, variant) with state-head ablation rows, at the best learning rate of :func:`best_rows`: the
    seeds that have the ablation (rows written before it existed are left out) and, each as (mean, half-width of
    the 95% t-interval over those seeds) by :func:`t_interval`: ``accuracy``, ``zeroed`` (accuracy with Y = 0) and
    ``drop`` (accuracy - zeroed, per seed). ``layers``: the per-layer magnitudes, each value the mean over those
    seeds (None where a seed has none, e.g. lambda without the state-query modulation)."""
    out = {}
    for key, best in best_rows(rows).items():
        rs = sorted(
            (
                r
                for r in rows
                if (r["setting"], r["variant"]) == key and r["lr"] == best["lr"] and "accuracy_state_zeroed" in r
            ),
            key=lambda r: r["seed"],
        )
        if not rs:
            continue
        layers = []
        for i, first in enumerate(rs[0].get("state_head_magnitudes") or []):
            layer = dict(first)
            for name in MAGNITUDE_KEYS:
                if name in first:
                    values = [(r["state_head_magnitudes"][i].get(name)) for r in rs]
                    layer[name] = None if any(v is None for v in values) else float(np.mean(values))
            layers.append(layer)
        out[key] = {
            "lr": best["lr"],
            "seeds": [r["seed"] for r in rs],
            "accuracy": t_interval([r["accuracy"] for r in rs]),
            "zeroed": t_interval([r["accuracy_state_zeroed"] for r in rs]),
            "drop": t_interval([r["accuracy"] - r["accuracy_state_zeroed"] for r in rs]),
            "layers": layers,
        }
    return out


@dataclass(frozen=True)
class Claim:
    """A claim that variant ``better`` reaches a higher test accuracy than ``worse`` (at each one's best lr)."""

    label: str
    better: str
    worse: str


# The papers' claims the default sweep can test (WuNeng: gated fusion, the state-query modulation, the state heads'
# fusion; ARWKV: keeping attention layers), each checked on every setting both variants ran.
CLAIMS = (
    Claim("gated fusion beats concatenation", "wuneng-gate", "wuneng-concat"),
    Claim("gated fusion beats addition", "wuneng-gate", "wuneng-add"),
    Claim("gated fusion beats Hymba's mean fusion", "wuneng-gate", "wuneng-hymba"),
    Claim(
        "fusing the state heads beats none (state heads only in the middle heads and the query)",
        "wuneng-gate",
        "wuneng-none",
    ),
    Claim("the state-query modulation helps (lambda learned vs lambda = 0)", "wuneng-gate", "wuneng-gate-lambda0"),
    Claim("WuNeng (gate) beats the Transformer", "wuneng-gate", "transformer"),
    Claim("WuNeng (gate) beats RWKV-7", "wuneng-gate", "rwkv7"),
    Claim("ARWKV keeping an attention layer beats pure ARWKV", "arwkv-attn", "arwkv"),
)

CEILING = 0.95  # both variants at or above this accuracy: the setting cannot separate them


def difference_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, Optional[float], Optional[float]]:
    """``mean(a) - mean(b)`` with the half-width of Welch's two-sided 95% interval and its degrees of freedom.

    Half-width ``t_{0.975, floor(df)} * sqrt(s_a^2/n_a + s_b^2/n_b)`` with the Welch-Satterthwaite ``df`` (rounded
    down: a wider interval); (diff, None, None) when a side has fewer than two values, (diff, 0.0, inf) when both
    sides are constant. The seeds are not paired: the same seed gives the two variants the same data but different
    initial weights.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return diff, None, None
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if va + vb == 0:
        return diff, 0.0, math.inf
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    t = T_975[min(max(int(math.floor(df)), 1), len(T_975)) - 1]
    return diff, float(t * math.sqrt(va + vb)), float(df)


def claim_verdicts(rows: Sequence[dict], claims: Sequence[Claim] = CLAIMS) -> list[dict]:
    """Each claim on each setting where either variant ran: ``{"claim", "setting", "verdict", "note", "better",
    "worse" (best_rows entries or None), "diff", "half_width"}``.

    Verdict: "held" when the 95% Welch interval of ``better - worse`` lies above 0, "not held" when it lies below
    0, "inconclusive" when it contains 0 (the note says when both are at or above 95%: the setting does not
    separate them) or a side has one seed, "not run" when a variant is missing.
    """
    best = best_rows(rows)
    settings, _ = _ordered(rows)
    out = []
    for c in claims:
        for s in settings:
            b, w = best.get((s, c.better)), best.get((s, c.worse))
            if b is None and w is None:
                continue
            entry = {"claim": c, "setting": s, "better": b, "worse": w, "diff": None, "half_width": None, "note": ""}
            if b is None or w is None:
                entry.update(verdict="not run", note=f"{c.better if b is None else c.worse} not in these results")
                out.append(entry)
                continue
            diff, hw, _ = difference_interval(b["accuracies"], w["accuracies"])
            entry.update(diff=diff, half_width=hw)
            if hw is None:
                entry.update(verdict="inconclusive", note="one seed: no interval")
            elif diff - hw > 0:
                entry["verdict"] = "held"
            elif diff + hw < 0:
                entry["verdict"] = "not held"
            else:
                entry["verdict"] = "inconclusive"
                if min(b["accuracy"], w["accuracy"]) >= CEILING:
                    entry["note"] = f"both >= {100 * CEILING:g}%: this setting does not separate them"
            out.append(entry)
    return out


def claims_markdown(rows: Sequence[dict], claims: Sequence[Claim] = CLAIMS, controls_ok: bool = True) -> str:
    """The "Claims" section: per claim and setting, both accuracies, the difference with its 95% Welch interval
    (:func:`difference_interval`) and the verdict (:func:`claim_verdicts`); headed NOT INTERPRETABLE when a
    positive control did not reproduce."""
    verdicts = claim_verdicts(rows, claims)
    if not verdicts:
        return ""
    title = "## Claims: difference of mean accuracy with its 95% Welch interval over seeds"
    lines = [
        title + ("" if controls_ok else " (NOT INTERPRETABLE: see the controls above)"),
        "",
        "held: the interval of (first - second) lies above 0; not held: below 0; inconclusive: it contains 0.",
        "",
        "| claim | setting | first | second | difference (points) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        c = v["claim"]
        first = "-" if v["better"] is None else _cell(v["better"])
        second = "-" if v["worse"] is None else _cell(v["worse"])
        if v["diff"] is None:
            diff = "-"
        else:
            diff = f"{100 * v['diff']:+.1f}" + ("" if v["half_width"] is None else f" ± {100 * v['half_width']:.1f}")
        verdict = f"**{v['verdict']}**" + (f" ({v['note']})" if v["note"] else "")
        lines.append(
            f"| {c.label} ({c.better} vs {c.worse}) | {v['setting']} | {first} | {second} | {diff} | {verdict} |"
        )
    return "\n".join(lines)


def _pm(mean_hw: tuple[float, Optional[float]], unit: str = "%") -> str:
    """``mean ± half-width`` in percent (points) of a (mean, half-width or None) pair."""
    mean, hw = mean_hw
    return f"{100 * mean:.1f}{unit}" + ("" if hw is None else f" ± {100 * hw:.1f}")


def state_contribution_markdown(rows: Sequence[dict]) -> str:
    """The "State-head contribution" section (empty when no row has the ablation): accuracy, accuracy with Y = 0
    and the drop per WuNeng variant and setting, and the learned magnitudes per layer."""
    contribution = state_contribution(rows)
    if not contribution:
        return ""
    order = {v: i for i, v in enumerate(VARIANTS)}
    keys = sorted(contribution, key=lambda k: (order.get(k[1], len(order)), k[0]))
    lines = [
        "## State-head contribution: accuracy with the state heads zeroed (Y = 0) at evaluation",
        "",
        "Mean ± 95% t-interval half-width over the seeds that have the ablation, at the best learning rate; drop in "
        "percentage points (accuracy - accuracy with Y = 0, per seed).",
        "",
        "Claim: the trained model uses its state heads. held: the drop's interval lies above 0; not held: below 0; "
        "inconclusive: it contains 0 (or one seed).",
        "",
        "| variant | task | accuracy | accuracy with Y = 0 | drop (points) | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, variant in keys:
        c = contribution[(setting, variant)]
        drop, hw = c["drop"]
        verdict = "inconclusive" if hw is None or abs(drop) <= hw else ("held" if drop > 0 else "not held")
        lines.append(
            f"| {variant} | {setting} | {_pm(c['accuracy'])} | {_pm(c['zeroed'])} | {_pm(c['drop'], '')} "
            f"| {len(c['seeds'])} | **{verdict}** |"
        )
    lines += [
        "",
        "Learned magnitudes per layer (mean over those seeds): mean and max |lambda| (state-query scale), mean |rho| "
        "(gate), mean |beta| (add), mean |W^O_s| (concat), mean |W^O_m| (middle heads, which mix (1 - s) Y into the "
        "output); '-' where the layer has no such parameter.",
        "",
        "| variant | task | layer | fusion | mean abs lambda | max abs lambda | mean abs rho | mean abs beta "
        "| mean abs W^O_s | mean abs W^O_m |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, variant in keys:
        for layer in contribution[(setting, variant)]["layers"]:
            fusion = layer["fusion"] if layer.get("kind") == "hybrid" else layer.get("kind")
            values = ["-" if layer.get(n) is None else f"{layer[n]:.3g}" for n in MAGNITUDE_KEYS]
            lines.append(f"| {variant} | {setting} | {layer['layer']} | {fusion} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _ordered(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    return settings, variants


def _cell(b: dict) -> str:
    """``mean ± half-width % (n seeds, lr)`` of one best_rows entry."""
    hw = "" if b.get("half_width") is None else f" ± {100 * b['half_width']:.1f}"
    extra = f", solved k<={b['solved_up_to']:.1f}" if b.get("solved_up_to") is not None else ""
    return f"{100 * b['accuracy']:.1f}%{hw} (n={len(b['seeds'])}, lr {b['lr']:g}{extra})"


def controls_markdown(rows: Sequence[dict], controls: Sequence[Control]) -> tuple[str, bool]:
    """The controls' verdicts as Markdown lines, and whether every control reproduced (True when there are none)."""
    if not controls:
        return "", True
    verdicts = check_controls(rows, controls)
    lines = ["## Positive controls", ""]
    for v in verdicts:
        c = v["control"]
        bound = " and ".join(
            part
            for part in (
                None if c.at_least is None else f">= {100 * c.at_least:g}%",
                None if c.at_most is None else f"<= {100 * c.at_most:g}%",
            )
            if part
        )
        if v["status"] == "not run":
            measured = "not run in this sweep"
        else:
            hw = "" if v["half_width"] is None else f" ± {100 * v['half_width']:.1f}"
            measured = f"{100 * v['accuracy']:.1f}%{hw} over seeds {v['seeds']}"
        lines.append(
            f"- **{v['status'].upper()}**: {c.label}: {c.variant} on {c.setting} must be {bound}; measured {measured}"
        )
    ok = all(v["status"] == "reproduced" for v in verdicts)
    lines.append("")
    if not ok:
        lines.append(
            "**The comparisons below are NOT INTERPRETABLE: a positive control did not reproduce (or was not run) "
            "in this sweep.**"
        )
    else:
        lines.append("Both controls reproduced: the comparisons below are interpretable.")
    return "\n".join(lines), ok


def results_markdown(rows: Sequence[dict], controls: Sequence[Control] = ()) -> str:
    """The controls' verdicts (at the top), the best-lr accuracy table (mean ± 95% t-interval over seeds, one column
    per setting), the state-head contribution of the WuNeng variants (:func:`state_contribution_markdown`, when
    rows have it) and the full per-run table, as Markdown."""
    best = best_rows(rows)
    settings, variants = _ordered(rows)
    head, ok = controls_markdown(rows, controls)
    lines = [head, ""] if head else []
    title = "## Accuracy at the best learning rate: mean ± 95% t-interval half-width over seeds"
    lines += [title + ("" if ok else " (NOT INTERPRETABLE: see the controls above)"), ""]
    chance = {r["setting"]: r["chance"] for r in rows if r.get("chance") is not None}
    header = (
        "| variant | "
        + " | ".join(f"{s}" + (f" (chance {100 * chance[s]:.1f}%)" if s in chance else "") for s in settings)
        + " |"
    )
    lines += [header, "|" + "---|" * (len(settings) + 1)]
    for v in variants:
        cells = ["-" if (s, v) not in best else _cell(best[(s, v)]) for s in settings]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    claims = claims_markdown(rows, controls_ok=ok)
    if claims:
        lines += ["", claims]
    contribution = state_contribution_markdown(rows)
    if contribution:
        lines += ["", contribution]
    lines += [
        "",
        "| setting | variant | params | lr | seed | accuracy | steps | tokens | seconds | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = " (diverged)" if r.get("diverged") else ""
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['params'] / 1e3:.0f} k | {r['lr']:g} | {r['seed']} | {100 * r['accuracy']:.1f}%{flag} | {r['steps']} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} | {r['final_loss'] if r['final_loss'] is None else round(r['final_loss'], 3)} |"
        )
    return "\n".join(lines)


def results_table(rows: Sequence[dict], title: str = "bench-arch: accuracy at the best learning rate"):
    from rich.table import Table

    best = best_rows(rows)
    settings, variants = _ordered(rows)
    table = Table(title=title)
    table.add_column("variant")
    for s in settings:
        table.add_column(s, justify="right")
    for v in variants:
        cells = []
        for s in settings:
            b = best.get((s, v))
            hw = "" if b is None or b["half_width"] is None else f" ± {100 * b['half_width']:.1f}"
            cells.append("-" if b is None else f"{100 * b['accuracy']:.1f}%{hw} @ {b['lr']:g} (n={len(b['seeds'])})")
        table.add_row(v, *cells)
    return table


def plot_results(rows: Sequence[dict], path: Path) -> Path:
    from wuneng.train.plotting import pyplot

    plt = pyplot()

    best = best_rows(rows)
    settings, variants = _ordered(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(settings) * max(1, len(variants)) / 3), 4.5))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        xs = np.arange(len(settings)) + (j - (len(variants) - 1) / 2) * width
        vals = [100 * best[(s, v)]["accuracy"] if (s, v) in best else np.nan for s in settings]
        errs = [
            100 * (best[(s, v)]["half_width"] or 0.0) if (s, v) in best else 0.0 for s in settings
        ]  # 95% t-interval half-widths over seeds
        color = plt.get_cmap("tab20")(VARIANTS.index(v) % 20 if v in VARIANTS else j % 20)  # 11 variants: tab10 repeats
        bars = ax.bar(xs, vals, width, yerr=errs, capsize=2, error_kw={"elinewidth": 0.8}, label=v, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(np.arange(len(settings)), settings, fontsize=8)
    ax.set_ylabel("test accuracy (%): mean, 95% t-interval", fontsize=9)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)  # below the bars
    ax.set_title("bench-arch: accuracy per variant and setting at the best lr, over seeds (equal budgets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _train_in_worker(run: tuple, cfg: BenchConfig) -> dict:
    """One run in a worker process of ``run_bench`` (``jobs > 1``): ``cfg.threads`` (default 1) torch threads."""
    torch.set_num_threads(cfg.threads or 1)
    return train_run(*run, cfg, progress=False)


def run_bench(cfg: BenchConfig, console=None) -> list[dict]:
    """Run every missing run of the sweep, then write ``results.md`` and ``accuracy.png`` from all rows.

    Progress (the sweep, each run's step, loss, tokens/s and ETA every few seconds, each result) goes through
    ``logging``; the results table is printed only to ``console`` when one is given (the CLI passes its own).
    """

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {r.get("key") for r in read_results(path)}
    runs = cfg.runs()
    todo = [r for r in runs if cfg.run_key(*r) not in done]
    logger.info(
        f"bench-arch ({cfg.mode}): {len(runs)} runs, {len(runs) - len(todo)} already in {path}, {len(todo)} to train; "
        f"batch {cfg.batch_size}, seeds {list(cfg.seeds)}, d={cfg.d_model}, {cfg.num_layers} layers, device {cfg.device}; "
        + "; ".join(
            f"{s.name}: {cfg.steps_of(s)} steps, lrs {', '.join(f'{lr:g}' for lr in s.lrs or cfg.lrs)}"
            for s in cfg.settings
        )
    )

    def finished(i: int, run: tuple, row: dict) -> None:
        setting, variant, lr, seed = run
        row = {"key": cfg.run_key(*run), "mode": cfg.mode, **row}
        _append_row(path, row)  # in the parent only: one writer
        extra = f", solved k<={row['solved_up_to']}" if "solved_up_to" in row else ""
        if "accuracy_state_zeroed" in row:
            extra += f", with Y = 0 {100 * row['accuracy_state_zeroed']:.1f}%"
        logger.info(
            f"[{i + 1}/{len(todo)}] {setting.name} {variant} lr={lr:g} seed={seed}: acc {100 * row['accuracy']:.1f}%{extra} "
            f"loss {row['final_loss'] if row['final_loss'] is None else round(row['final_loss'], 3)} ({row['seconds']:.0f} s)"
        )

    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        logger.info(f"bench-arch: {cfg.jobs} runs at a time in separate processes")
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_in_worker, run, cfg): run for run in todo}
            for i, future in enumerate(as_completed(futures)):
                finished(i, futures[future], future.result())
    else:
        for i, run in enumerate(todo):
            setting, variant, lr, seed = run
            logger.info(f"[{i + 1}/{len(todo)}] {setting.name} {variant} lr={lr:g} seed={seed}: training")
            finished(i, run, train_run(setting, variant, lr, seed, cfg))
    rows = read_results(path)
    (out / "results.md").write_text(results_markdown(rows, cfg.controls) + "\n", encoding="utf-8")
    if rows:
        plot_results(rows, out / "accuracy.png")
        if console is not None:
            console.print(results_table(rows))
    logger.info(f"wrote {out / 'results.md'} and {out / 'accuracy.png'}")
    return rows
