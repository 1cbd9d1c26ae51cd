"""Registry of evaluation tasks by name, for ``wuneng eval`` and benchmark scripts.

Each :class:`TaskSpec` bundles a config dataclass (its defaults are the task's standard setting),
a generator and a scorer. The generators share the keyword ``seed``; their other arguments differ by
task kind and are named in ``generate_signature``:

* ``"sequence"`` tasks (mqar, state_tracking) give token tensors ``input_ids``/``labels`` ``[N, T]``
  scored from logits ``[N, T, V]`` or predicted ids ``[N, T]``;
* ``"generation"`` tasks (arithmetic, passkey) give ``(prompt, answer)`` examples scored from
  generated strings (greedy decoding, e.g. :func:`wuneng.eval.generation.generate_text`);
* ``"likelihood"`` (perplexity) scores a model directly on held-out text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

from wuneng.eval.perplexity import perplexity
from wuneng.eval.tasks.arithmetic import ArithmeticConfig, make_test_set, score_arithmetic
from wuneng.eval.tasks.mqar import MQARConfig, generate_mqar, mqar_accuracy
from wuneng.eval.tasks.passkey import PasskeyConfig, generate_passkey_examples, score_passkey
from wuneng.eval.tasks.state_tracking import StateTrackingConfig, generate_word_problems, state_tracking_report


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    Attributes:
        name: registry key.
        kind: ``"sequence"``, ``"generation"`` or ``"likelihood"``.
        description: one line for listings.
        config_cls: the config dataclass (``None`` for perplexity).
        generate: data generator (``None`` for perplexity).
        generate_signature: how to call ``generate``.
        score: scorer.
        score_signature: how to call ``score`` and what it returns.
        presets: named standard settings, ``{preset name: config}``.
    """

    name: str
    kind: Literal["sequence", "generation", "likelihood"]
    description: str
    config_cls: Optional[type]
    generate: Optional[Callable[..., Any]]
    generate_signature: str
    score: Callable[..., Any]
    score_signature: str
    presets: dict


TASKS: dict[str, TaskSpec] = {
    "mqar": TaskSpec(
        name="mqar",
        kind="sequence",
        description="Multi-query associative recall (Zoology): recall the value of each queried key.",
        config_cls=MQARConfig,
        generate=generate_mqar,
        generate_signature="generate_mqar(config, num_examples, seed, epoch=0) -> MQARData(input_ids, labels)",
        score=mqar_accuracy,
        score_signature="mqar_accuracy(logits [N,T,V] or ids [N,T], labels [N,T]) -> float",
        presets={f"T{t}_n{n}": MQARConfig(seq_len=t, num_kv_pairs=n) for t, n in ((64, 4), (128, 8), (256, 16))},
    ),
    "state_tracking": TaskSpec(
        name="state_tracking",
        kind="sequence",
        description="Group word problems (S5, A5, Z60, A4xZ5): label every prefix product.",
        config_cls=StateTrackingConfig,
        generate=generate_word_problems,
        generate_signature="generate_word_problems(config, num_examples, seed, epoch=0) -> StateTrackingData",
        score=state_tracking_report,
        score_signature="state_tracking_report(logits or ids, labels) -> {accuracy, per_length, solved_up_to}; "
        "across depths use scoring.min_depth_reaching",
        presets={g: StateTrackingConfig(group=g, seq_len=16) for g in ("S5", "A5", "Z60", "A4xZ5")},
    ),
    "passkey": TaskSpec(
        name="passkey",
        kind="generation",
        description="Passkey retrieval: a 5-digit key hidden at 10 depths in filler text.",
        config_cls=PasskeyConfig,
        generate=generate_passkey_examples,
        generate_signature="generate_passkey_examples(config, lengths, trials=1, seed=0, tokenizer=None) -> [PasskeyExample]",
        score=score_passkey,
        score_signature="score_passkey(generations [str], examples) -> {accuracy, per_length, per_cell}",
        presets={"classic": PasskeyConfig(), "varied": PasskeyConfig(filler="varied")},
    ),
    "arithmetic": TaskSpec(
        name="arithmetic",
        kind="generation",
        description="Small arithmetic word problems with worked answers (#### N) and key-value recall lines.",
        config_cls=ArithmeticConfig,
        generate=make_test_set,
        generate_signature="make_test_set(config, per_category=50, seed=1, holdout_facts=True) -> ArithmeticTestSet "
        "(training text: tasks.arithmetic.training_corpus(config, n, seed, test_set))",
        score=score_arithmetic,
        score_signature="score_arithmetic(generations [str], examples) -> {exact, final, per_category}",
        presets={
            "one_digit": ArithmeticConfig(),
            "mixed_digits": ArithmeticConfig(two_digit_fraction=0.3),
            "with_multiplication": ArithmeticConfig(ops=("+", "-", "*")),
        },
    ),
    "perplexity": TaskSpec(
        name="perplexity",
        kind="likelihood",
        description="Sliding-window perplexity on held-out text.",
        config_cls=None,
        generate=None,
        generate_signature="(none: bring held-out token ids or texts + tokenizer)",
        score=perplexity,
        score_signature="perplexity(model, token_ids | texts=..., tokenizer=..., context_length, stride, batch_size) "
        "-> PerplexityResult(nll, ppl, num_tokens)",
        presets={},
    ),
}


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered under ``name`` (ValueError listing the names otherwise)."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown evaluation task {name!r}; available: {', '.join(list_tasks())}") from None
