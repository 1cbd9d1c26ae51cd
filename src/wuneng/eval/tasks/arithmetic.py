"""Small GSM8K-like arithmetic word problems with worked answers, plus key-value recall lines.

This is the task of feasibility Probe A, scaled to what a ~1 M-parameter model learns on a CPU in
minutes (1-digit operands by default, optionally a fraction of 2-digit ones)::

    Q: Tom has 5 shells and buys 3 more. How many shells? A: 5+3=8. #### 8
    k0=v5 k3=v9 k1=v6 k3? v9

Every example is a ``(prompt, answer)`` pair and its training text is ``prompt + " " + answer``
(the separating space belongs to neither, as lm-eval's ``target_delimiter``). Prompts end in
``"A:"`` (arithmetic) or ``"kX?"`` (recall); answers are ``"a+b=c. #### c"`` or ``"vY"``.

Train/test separation (:func:`make_test_set`, :func:`generate_training_examples`): training text
never contains a held-out prompt (arithmetic or recall), and by default never contains the
``(a, op, b)`` fact of a held-out problem with a 2-digit operand, in any phrasing. Facts with two
1-digit operands are shared (there are only 81 per operation; holding them out would make the
1-digit test unlearnable), as in Probe A.

Scorers: whole-answer exact match and ``#### N`` final-number match (see ``wuneng.eval.scoring``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from wuneng.eval.scoring import exact_match, final_number_match, mean
from wuneng.eval.tasks.mqar import make_rng

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Leo", "Zoe", "Max", "Ida")
ITEMS = ("shells", "apples", "coins", "books", "pens", "cards", "stones", "cups")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{name} has {a} {item_a} and buys {b} more. How many {item}?",
        "{name} has {a} {item_a} and finds {b} more. How many {item}?",
        "{name} had {a} {item_a} and got {b} more. How many {item} now?",
        "{name} picks {a} {item_a} and then {b} more. How many {item} in all?",
    ),
    "-": (
        "{name} has {a} {item_a} and gives away {b}. How many {item} left?",
        "{name} has {a} {item_a} and loses {b}. How many {item} left?",
        "{name} had {a} {item_a} and sold {b}. How many {item} now?",
        "{name} has {a} {item_a} and uses {b}. How many {item} remain?",
    ),
    "*": (
        "{name} has {a} {bags} with {b} {item_b} each. How many {item}?",
        "{name} buys {a} {boxes} of {b} {item_b}. How many {item}?",
    ),
}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticConfig:
    """The problem mix.

    Attributes:
        ops: operations, a subset of ``("+", "-", "*")``; for ``-`` the larger operand comes first.
        two_digit_fraction: probability that an operand is 2-digit (10..99) instead of 1-digit (1..9).
        recall_fraction: share of key-value recall lines in generated training examples.
        recall_pairs: (min, max) distinct keys per recall line.
        recall_keys: keys are ``k0 .. k{recall_keys-1}``.
        recall_values: values are ``v0 .. v{recall_values-1}`` (chance is 1/recall_values).
        names, items: the template vocabulary (items are plurals ending in "s").
    """

    ops: tuple[str, ...] = ("+", "-")
    two_digit_fraction: float = 0.0
    recall_fraction: float = 0.3
    recall_pairs: tuple[int, int] = (3, 4)
    recall_keys: int = 10
    recall_values: int = 10
    names: tuple[str, ...] = NAMES
    items: tuple[str, ...] = ITEMS

    def __post_init__(self) -> None:
        if not self.ops or any(op not in TEMPLATES for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ArithmeticConfig.ops must be distinct ops from {tuple(TEMPLATES)}, got {self.ops!r}")
        for name in ("two_digit_fraction", "recall_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ArithmeticConfig.{name} must lie in [0, 1], got {value}")
        lo, hi = self.recall_pairs
        if not 1 <= lo <= hi <= self.recall_keys:
            raise ValueError(
                f"ArithmeticConfig.recall_pairs must satisfy 1 <= min <= max <= recall_keys={self.recall_keys}, "
                f"got {self.recall_pairs}"
            )
        if self.recall_values < 1:
            raise ValueError(f"ArithmeticConfig.recall_values must be >= 1, got {self.recall_values}")
        if not self.names or not self.items:
            raise ValueError("ArithmeticConfig.names and items must be non-empty")

    def chance(self, category: str) -> float:
        """Exact-match accuracy of a guesser on one test category (:func:`heldout_categories`).

        ``"recall"``: one of the ``recall_values`` values, ``1 / recall_values``. An arithmetic category
        (``"+1d"``, ``"-2d"``, ...): the guesser copies the operands from the prompt and picks the result
        uniformly among the values the operation gives on the category's operands (both 1..9 for ``1d``, both
        10..99 for ``2d``, as :func:`make_test_set` draws them; for ``-`` the larger comes first), so
        ``1 / |{a op b}|`` (``+1d``: 1/17). The ``#### N`` final-number match has the same chance.
        """
        if category == "recall":
            return 1.0 / self.recall_values
        op, digits = category[:1], category[1:]
        if op not in _APPLY or digits not in ("1d", "2d"):
            raise ValueError(
                f"unknown arithmetic category {category!r}; expected 'recall' or an op of {tuple(_APPLY)} followed "
                "by '1d' or '2d'"
            )
        operands = range(1, 10) if digits == "1d" else range(10, 100)
        results = {
            _APPLY[op](max(a, b), min(a, b)) if op == "-" else _APPLY[op](a, b) for a in operands for b in operands
        }
        return 1.0 / len(results)


@dataclass(frozen=True)
class ArithmeticExample:
    """One problem.

    Attributes:
        prompt: ``"Q: ... A:"`` or ``"k0=v5 k3=v9 k3?"``.
        answer: ``"5+3=8. #### 8"`` or ``"v9"``.
        category: ``"+1d"``, ``"-2d"``, ``"*1d"``, ... (``2d`` = some operand has 2 digits) or ``"recall"``.
        fact: ``(a, op, b)`` for arithmetic, ``None`` for recall.
    """

    prompt: str
    answer: str
    category: str
    fact: Optional[tuple[int, str, int]] = None

    @property
    def text(self) -> str:
        """Training text: prompt, one space, answer."""
        return f"{self.prompt} {self.answer}"


def arithmetic_example(a: int, op: str, b: int, name: str, item: str, template: int = 0) -> ArithmeticExample:
    """Format one problem ``a op b`` with a template of ``op``."""
    if op not in TEMPLATES:
        raise ValueError(f"op must be one of {tuple(TEMPLATES)}, got {op!r}")
    c = _APPLY[op](a, b)
    # items are plain plurals ("shells"); a count of one takes the singular
    fields = dict(
        name=name,
        a=a,
        b=b,
        item=item,
        item_a=item[:-1] if a == 1 and item.endswith("s") else item,
        item_b=item[:-1] if b == 1 and item.endswith("s") else item,
        bags="bag" if a == 1 else "bags",
        boxes="box" if a == 1 else "boxes",
    )
    question = TEMPLATES[op][template % len(TEMPLATES[op])].format(**fields)
    digits = "2d" if max(a, b) >= 10 else "1d"
    return ArithmeticExample(f"Q: {question} A:", f"{a}{op}{b}={c}. #### {c}", f"{op}{digits}", (a, op, b))


def recall_example(keys: Sequence[int], values: Sequence[int], query: int) -> ArithmeticExample:
    """Format ``k.=v.`` pairs and a query of one of the keys."""
    if len(keys) != len(values) or query not in keys:
        raise ValueError("recall_example needs equal-length keys and values and a query among the keys")
    pairs = " ".join(f"k{k}=v{v}" for k, v in zip(keys, values))
    return ArithmeticExample(f"{pairs} k{query}?", f"v{values[list(keys).index(query)]}", "recall")


def _operands(rng: np.random.Generator, size: int, two_digit_fraction: float) -> np.ndarray:
    two = rng.random(size) < two_digit_fraction
    return np.where(two, rng.integers(10, 100, size), rng.integers(1, 10, size)).astype(np.int64)


def generate_arithmetic(
    config: ArithmeticConfig,
    num_examples: int,
    rng: np.random.Generator,
    op: Optional[str] = None,
    two_digit_fraction: Optional[float] = None,
) -> list[ArithmeticExample]:
    """``num_examples`` arithmetic problems (ops uniform over ``config.ops`` unless ``op`` is given)."""
    p2 = config.two_digit_fraction if two_digit_fraction is None else two_digit_fraction
    ops = np.array(config.ops if op is None else (op,))
    op_idx = rng.integers(0, len(ops), num_examples)
    a = _operands(rng, num_examples, p2)
    b = _operands(rng, num_examples, p2)
    names = rng.integers(0, len(config.names), num_examples)
    items = rng.integers(0, len(config.items), num_examples)
    templates = rng.integers(0, 1 << 30, num_examples)
    out = []
    for i in range(num_examples):
        o, x, y = str(ops[op_idx[i]]), int(a[i]), int(b[i])
        if o == "-" and x < y:
            x, y = y, x
        out.append(arithmetic_example(x, o, y, config.names[names[i]], config.items[items[i]], int(templates[i])))
    return out


def generate_recall(config: ArithmeticConfig, num_examples: int, rng: np.random.Generator) -> list[ArithmeticExample]:
    """``num_examples`` key-value recall lines (distinct keys, values with repetition, one query)."""
    lo, hi = config.recall_pairs
    counts = rng.integers(lo, hi + 1, num_examples)
    order = np.argsort(rng.random((num_examples, config.recall_keys)), axis=1)  # random key order per row
    values = rng.integers(0, config.recall_values, (num_examples, hi))
    queries = rng.integers(0, 1 << 30, num_examples)
    out = []
    for i in range(num_examples):
        n = int(counts[i])
        keys = [int(k) for k in order[i, :n]]
        out.append(recall_example(keys, [int(v) for v in values[i, :n]], keys[int(queries[i]) % n]))
    return out


def generate_examples(
    config: ArithmeticConfig, num_examples: int, seed: int, epoch: int = 0
) -> list[ArithmeticExample]:
    """A shuffled mix: ``recall_fraction`` recall lines, the rest arithmetic (no train/test filtering)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    rng = make_rng(seed, epoch)
    is_recall = rng.random(num_examples) < config.recall_fraction
    n_rec = int(is_recall.sum())
    arith = iter(generate_arithmetic(config, num_examples - n_rec, rng))
    recall = iter(generate_recall(config, n_rec, rng))
    return [next(recall) if r else next(arith) for r in is_recall]


# --------------------------------------------------------------------------------------------
# train / test split
# --------------------------------------------------------------------------------------------


@dataclass
class ArithmeticTestSet:
    """Held-out problems and what training must avoid.

    Attributes:
        examples: the test problems, grouped by category in order.
        held_out_prompts: every test prompt (training never repeats one).
        held_out_facts: ``(a, op, b)`` facts training never uses (test facts with a 2-digit operand,
            when ``holdout_facts``).
    """

    examples: list[ArithmeticExample]
    held_out_prompts: frozenset = field(default_factory=frozenset)
    held_out_facts: frozenset = field(default_factory=frozenset)

    def allows(self, example: ArithmeticExample) -> bool:
        """Whether ``example`` may appear in training text."""
        return example.prompt not in self.held_out_prompts and example.fact not in self.held_out_facts

    def by_category(self) -> dict[str, list[ArithmeticExample]]:
        groups: dict[str, list[ArithmeticExample]] = defaultdict(list)
        for e in self.examples:
            groups[e.category].append(e)
        return dict(groups)


def heldout_categories(config: ArithmeticConfig) -> list[str]:
    """Categories of the test set: each op at 1 digit, at 2 digits if ``two_digit_fraction > 0``, and recall."""
    cats = [f"{op}1d" for op in config.ops]
    if config.two_digit_fraction > 0:
        cats += [f"{op}2d" for op in config.ops]
    if config.recall_fraction > 0:
        cats.append("recall")
    return cats


def make_test_set(
    config: ArithmeticConfig,
    per_category: int = 50,
    seed: int = 1,
    holdout_facts: bool = True,
) -> ArithmeticTestSet:
    """A balanced held-out set: ``per_category`` distinct prompts per category of :func:`heldout_categories`.

    ``1d`` problems have two 1-digit operands, ``2d`` problems two 2-digit operands. Use a seed that
    differs from the training seed (the split stays clean either way: training is filtered).
    """
    if not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"per_category must be a positive int, got {per_category!r}")
    rng = make_rng(seed)
    examples: list[ArithmeticExample] = []
    for cat in heldout_categories(config):
        seen: dict[str, ArithmeticExample] = {}
        for _ in range(1000):
            need = per_category - len(seen)
            if need == 0:
                break
            if cat == "recall":
                batch = generate_recall(config, 2 * need, rng)
            else:
                batch = generate_arithmetic(config, 2 * need, rng, op=cat[0], two_digit_fraction=float(cat[1:] == "2d"))
            for e in batch:
                if len(seen) < per_category and e.prompt not in seen:
                    seen[e.prompt] = e
        if len(seen) < per_category:
            raise ValueError(f"could not draw {per_category} distinct {cat!r} problems")
        examples.extend(seen.values())
    facts = frozenset(
        e.fact for e in examples if holdout_facts and e.fact is not None and max(e.fact[0], e.fact[2]) >= 10
    )
    return ArithmeticTestSet(examples, frozenset(e.prompt for e in examples), facts)


def generate_training_examples(
    config: ArithmeticConfig,
    num_examples: int,
    seed: int,
    test_set: Optional[ArithmeticTestSet] = None,
    epoch: int = 0,
) -> list[ArithmeticExample]:
    """Like :func:`generate_examples` but with every example the test set forbids dropped and redrawn."""
    if test_set is None:
        return generate_examples(config, num_examples, seed, epoch)
    out: list[ArithmeticExample] = []
    round_ = 0
    while len(out) < num_examples:
        if round_ > 50:
            raise ValueError("the test set forbids almost every training problem; use a larger problem space")
        # round 0 uses (seed, epoch); later rounds top up from independent streams
        batch = generate_examples(
            config, max(num_examples - len(out), 16) if round_ else num_examples, seed, epoch + round_ * 1_000_003
        )
        out.extend(e for e in batch if test_set.allows(e))
        round_ += 1
    return out[:num_examples]


@dataclass
class TrainingCorpus:
    """Packed training text.

    Attributes:
        text: examples joined by ``separator`` (and ending with it).
        answer_mask: bool ``[len(text)]``; True on answer characters and on the separator that ends
            each example (so that an answer-only loss also teaches the model to stop).
        num_examples: examples in ``text``.
    """

    text: str
    answer_mask: np.ndarray
    num_examples: int


def build_corpus(examples: Iterable[ArithmeticExample], separator: str = "\n") -> TrainingCorpus:
    """Join examples as ``prompt + " " + answer + separator`` and mark the answer characters."""
    if not separator:
        raise ValueError("separator must be a non-empty string")
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    count = 0
    for e in examples:
        start = pos + len(e.prompt) + 1
        piece = e.text + separator
        pieces.append(piece)
        pos += len(piece)
        spans.append((start, pos))
        count += 1
    text = "".join(pieces)
    mask = np.zeros(len(text), dtype=bool)
    for s, t in spans:
        mask[s:t] = True
    return TrainingCorpus(text, mask, count)


def training_corpus(
    config: ArithmeticConfig,
    num_examples: int,
    seed: int,
    test_set: Optional[ArithmeticTestSet] = None,
    epoch: int = 0,
    separator: str = "\n",
) -> TrainingCorpus:
    """Training text of ``num_examples`` problems that never overlaps ``test_set`` (see module doc)."""
    return build_corpus(generate_training_examples(config, num_examples, seed, test_set, epoch), separator)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def score_arithmetic(generations: Sequence[str], examples: Sequence[ArithmeticExample], stop: str = "\n") -> dict:
    """Exact match (whole answer, up to the first ``stop``) and final-number match (``#### N``).

    Returns:
        ``{"exact": float over all examples, "final": float over arithmetic examples (NaN if none),
        "per_category": {category: {"exact": float, "final": float (arithmetic only), "count": int}}}``.
    """
    if len(generations) != len(examples):
        raise ValueError(f"got {len(generations)} generations for {len(examples)} examples")
    exact_all: list[bool] = []
    final_all: list[bool] = []
    cats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"exact": [], "final": []})
    for g, e in zip(generations, examples):
        ex = exact_match(g, e.answer, stop=stop)
        exact_all.append(ex)
        cats[e.category]["exact"].append(ex)
        if e.fact is not None:
            fin = final_number_match(g, e.answer)
            final_all.append(fin)
            cats[e.category]["final"].append(fin)
    per_cat = {}
    for c, d in cats.items():
        row = {"exact": mean(d["exact"]), "count": len(d["exact"])}
        if d["final"]:
            row["final"] = mean(d["final"])
        per_cat[c] = row
    return {
        "exact": mean(exact_all),
        "final": mean(final_all) if final_all else float("nan"),
        "per_category": per_cat,
    }
