"""Passkey retrieval (needle in a haystack), after the recipe used for RWKV-7 / RWKV-X
(``RWKV-X/evaluation/pass_key_rwkv.py``; originally Mohtashami & Jaggi, "Landmark Attention").

A prompt is::

    <intro> <filler ... filler> The pass key is 12345. Remember it. 12345 is the pass key. <filler ...>
    What is the pass key? The pass key is

and the answer is the 5 digits (``"12345"``). The needle sits at a relative *depth* in the filler
(0 = right after the intro, 1 = right before the question); the standard grid is 10 depths
``linspace(0, 1, 10)`` per length. Lengths are in characters, or in tokens when a tokenizer function
is given (the number of filler sentences is then found by bisection so the prompt is the longest one
that fits). Scoring is greedy exact match of the generated digits.

The filler is the classic block "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." repeated sentence by sentence (``filler="classic"``), or sentences drawn from
small templates with a seeded generator (``filler="varied"``) so that the haystack is not periodic.

The intro, the needle sentence (``needle_template``) and the question are fields of :class:`PasskeyConfig`, so that
a short format fits a byte-level model's short rows (``wuneng demo``: no intro, ``"The pass key is 12345."``,
``"What is the pass key?"``). :func:`sample_passkey_examples` draws training prompts in the same format at random
lengths, depths and keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np

from wuneng.eval.scoring import mean
from wuneng.eval.tasks.mqar import make_rng

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
CLASSIC_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
QUESTION = "What is the pass key? The pass key is"
#: the sentence that hides the key (``{key}``: the digits), RWKV-X's
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
_SUBJECTS = ("The grass", "The sky", "The sea", "The road", "The house", "The river", "The cat", "The hill")
_PREDICATES = ("is green", "is blue", "is quiet", "is long", "is old", "is wide", "is warm", "is far away")

TokenCounter = Callable[[str], Union[int, Sequence[int]]]


def needle(passkey: str, template: str = NEEDLE) -> str:
    """The sentence that hides the key: ``template`` with ``{key}`` replaced by ``passkey``."""
    return template.replace("{key}", passkey)


@dataclass(frozen=True)
class PasskeyConfig:
    """Passkey prompt construction.

    Attributes:
        num_depths: depths per length, ``linspace(0, 1, num_depths)`` (standard: 10).
        num_digits: digits of the key (standard: 5; the key never starts with 0).
        filler: ``"classic"`` (the repeated 5-sentence block) or ``"varied"`` (seeded templates).
        intro: the instruction at the start of the prompt ("" for none).
        question: the text after the haystack; the model continues it with the key.
        needle_template: the sentence that hides the key, ``{key}`` where the digits go (:func:`needle`); a
            short one (``"The pass key is {key}."``) lets a byte-level model's short contexts hold the prompt.
    """

    num_depths: int = 10
    num_digits: int = 5
    filler: Literal["classic", "varied"] = "classic"
    intro: str = INTRO
    question: str = QUESTION
    needle_template: str = NEEDLE

    def __post_init__(self) -> None:
        if not isinstance(self.num_depths, int) or self.num_depths < 1:
            raise ValueError(f"PasskeyConfig.num_depths must be a positive int, got {self.num_depths!r}")
        if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 18:
            raise ValueError(f"PasskeyConfig.num_digits must be an int in [1, 18], got {self.num_digits!r}")
        if self.filler not in ("classic", "varied"):
            raise ValueError(f"PasskeyConfig.filler must be 'classic' or 'varied', got {self.filler!r}")
        if "{key}" not in self.needle_template:
            raise ValueError(
                f"PasskeyConfig.needle_template must contain '{{key}}' where the key goes, got {self.needle_template!r}"
            )
        if not self.question:
            raise ValueError("PasskeyConfig.question must be non-empty: the model continues it with the key")

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess of the key: ``num_digits`` digits, the first non-zero,
        ``1 / (9 * 10**(num_digits - 1))``."""
        return 1.0 / (9 * 10 ** (self.num_digits - 1))

    def depths(self) -> np.ndarray:
        """Relative needle depths, float64 ``[num_depths]`` in [0, 1]."""
        return np.linspace(0.0, 1.0, self.num_depths) if self.num_depths > 1 else np.zeros(1)


@dataclass(frozen=True)
class PasskeyExample:
    """One prompt.

    Attributes:
        prompt: the full prompt, ending with the question (no trailing space).
        answer: the key's digits, e.g. ``"12345"``.
        length: the requested length (characters, or tokens if a tokenizer was given).
        depth: the requested relative depth in [0, 1].
        trial: trial index within the (length, depth) cell.
        prompt_length: the prompt's actual length in the same unit (<= length).
    """

    prompt: str
    answer: str
    length: int
    depth: float
    trial: int
    prompt_length: int


def _filler_sentences(config: PasskeyConfig, count: int, rng: np.random.Generator) -> list[str]:
    if config.filler == "classic":
        reps = -(-count // len(CLASSIC_FILLER))
        return list(CLASSIC_FILLER * reps)[:count]
    # one draw per sentence keeps the list prefix-consistent across counts
    pick = rng.integers(0, len(_SUBJECTS) * len(_PREDICATES), size=count)
    return [f"{_SUBJECTS[i // len(_PREDICATES)]} {_PREDICATES[i % len(_PREDICATES)]}." for i in pick]


def build_prompt(config: PasskeyConfig, filler: Sequence[str], depth: float, passkey: str) -> str:
    """Assemble intro, filler with the needle after ``round(depth * len(filler))`` sentences, question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    cut = int(round(depth * len(filler)))
    parts = [config.intro, *filler[:cut], needle(passkey, config.needle_template), *filler[cut:], config.question]
    return " ".join(p for p in parts if p)


def _length_fn(tokenizer: Optional[TokenCounter]) -> Callable[[str], int]:
    if tokenizer is None:
        return len

    def count(text: str) -> int:
        out = tokenizer(text)
        if isinstance(out, int):
            return out
        if isinstance(out, dict) or hasattr(out, "keys"):  # HF tokenizer __call__ -> BatchEncoding
            out = out["input_ids"]
        return len(out)

    return count


def make_passkey_example(
    config: PasskeyConfig,
    length: int,
    depth: float,
    passkey: str,
    rng: np.random.Generator,
    tokenizer: Optional[TokenCounter] = None,
    trial: int = 0,
) -> PasskeyExample:
    """The longest prompt of at most ``length`` units (chars, or tokens of ``tokenizer``) with the key at ``depth``.

    ``tokenizer`` is any function of a string returning a token count or a token list (an HF tokenizer's
    ``encode`` works). Raises ValueError if even a prompt with no filler is longer than ``length``.
    """
    measure = _length_fn(tokenizer)
    pool_seed = int(rng.integers(0, 2**63 - 1))  # one draw per example, whatever the length

    def pool(n: int) -> list[str]:  # prefix-consistent: pool(m)[:n] == pool(n) for m >= n
        return _filler_sentences(config, n, np.random.default_rng(pool_seed))

    def size(n: int) -> int:
        return measure(build_prompt(config, pool(n), depth, passkey))

    if size(0) > length:
        raise ValueError(f"length {length} is too short for the passkey prompt without filler ({size(0)} units)")
    # bracket, then bisect for the largest n with size(n) <= length (size grows with n)
    lo, hi = 0, 16
    while size(hi) <= length:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi = mid
    prompt = build_prompt(config, pool(lo), depth, passkey)
    return PasskeyExample(prompt, passkey, int(length), float(depth), int(trial), measure(prompt))


def generate_passkey_examples(
    config: PasskeyConfig,
    lengths: Sequence[int],
    trials: int = 1,
    seed: int = 0,
    tokenizer: Optional[TokenCounter] = None,
) -> list[PasskeyExample]:
    """A full grid: every length x every depth x ``trials`` keys, each with its own random key.

    Args:
        lengths: prompt lengths in characters (or tokens of ``tokenizer``).
        trials: keys per (length, depth) cell (RWKV-X uses 5).
        seed: reproducible keys (and filler for ``filler="varied"``).
        tokenizer: optional token counter (see :func:`make_passkey_example`).
    """
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if not lengths:
        raise ValueError("lengths must be a non-empty sequence of positive ints")
    rng = make_rng(seed)
    low = 10 ** (config.num_digits - 1)
    examples = []
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"lengths must be positive ints, got {length!r}")
        for depth in config.depths():
            for trial in range(trials):
                key = str(int(rng.integers(low, 10 * low)))
                examples.append(make_passkey_example(config, int(length), float(depth), key, rng, tokenizer, trial))
    return examples


def sample_passkey_examples(
    config: PasskeyConfig,
    num_examples: int,
    max_length: int,
    seed: int = 0,
    min_length: Optional[int] = None,
    tokenizer: Optional[TokenCounter] = None,
) -> list[PasskeyExample]:
    """Training prompts in the grid's format: each with its own random key, a length drawn uniformly from
    ``[min_length, max_length]`` (default minimum: the prompt without filler) and a depth drawn uniformly from
    [0, 1]; each prompt is :func:`make_passkey_example` of that length and depth (so the longest one that fits).
    ``trial`` is the example's index. Lengths in characters, or tokens of ``tokenizer``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    measure = _length_fn(tokenizer)
    shortest = measure(build_prompt(config, [], 0.0, "9" * config.num_digits))
    low_length = shortest if min_length is None else int(min_length)
    if not shortest <= low_length <= max_length:
        raise ValueError(
            f"passkey training lengths [{low_length}, {max_length}]: the prompt without filler takes {shortest} units, "
            "so both bounds must be at least that (and min <= max)"
        )
    rng = make_rng(seed)
    low = 10 ** (config.num_digits - 1)
    out = []
    for i in range(int(num_examples)):
        length = int(rng.integers(low_length, max_length + 1))
        depth = float(rng.random())
        key = str(int(rng.integers(low, 10 * low)))
        out.append(make_passkey_example(config, length, depth, key, rng, tokenizer, i))
    return out


_LEADING_DIGITS = re.compile(r"\s*(\d+)")


def passkey_match(generated: str, answer: str) -> bool:
    """Greedy exact match: the digits at the start of the generation (after spaces) equal the key.

    ``" 12345."`` and ``"12345\\n..."`` match ``"12345"``; ``"123456"`` and ``"1234"`` do not.
    """
    if not isinstance(generated, str):
        raise TypeError(f"generated must be a str, got {type(generated).__name__}")
    m = _LEADING_DIGITS.match(generated)
    return m is not None and m.group(1) == answer


def score_passkey(generations: Sequence[str], examples: Sequence[PasskeyExample]) -> dict:
    """Accuracy overall, per length, and per (length, depth) cell.

    Returns:
        ``{"accuracy": float, "per_length": {length: acc}, "per_cell": {(length, depth): acc}}``.
    """
    if len(generations) != len(examples):
        raise ValueError(f"got {len(generations)} generations for {len(examples)} examples")
    hits = [passkey_match(g, e.answer) for g, e in zip(generations, examples)]
    per_len: dict = defaultdict(list)
    per_cell: dict = defaultdict(list)
    for h, e in zip(hits, examples):
        per_len[e.length].append(h)
        per_cell[(e.length, round(e.depth, 6))].append(h)
    return {
        "accuracy": mean(hits),
        "per_length": {k: mean(v) for k, v in per_len.items()},
        "per_cell": {k: mean(v) for k, v in per_cell.items()},
    }
