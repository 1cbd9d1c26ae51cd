"""Arithmetic word problems: answers against eval() of the expression, recall against a parse of the
line, clean train/test separation, corpus answer masks, and the scorer."""

import re

import numpy as np
import pytest

from wuneng.eval.tasks.arithmetic import (
    TEMPLATES,
    ArithmeticConfig,
    build_corpus,
    generate_examples,
    generate_training_examples,
    heldout_categories,
    make_test_set,
    score_arithmetic,
    training_corpus,
)

ANSWER_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(-?\d+)\. #### (-?\d+)$")
VERBS = {
    "+": ("buys", "finds", "got", "picks"),
    "-": ("gives away", "loses", "sold", "uses"),
    "*": ("bags", "bag", "boxes", "box"),
}


def check_example(e, config):
    if e.category == "recall":
        m = re.fullmatch(r"((?:k\d+=v\d+ )+)k(\d+)\?", e.prompt)
        assert m is not None, e.prompt
        pairs = dict(re.findall(r"k(\d+)=v(\d+)", m.group(1)))
        assert len(pairs) == len(re.findall(r"k\d+=", m.group(1))), "keys are distinct"
        lo, hi = config.recall_pairs
        assert lo <= len(pairs) <= hi
        assert e.answer == "v" + pairs[m.group(2)]
        return
    m = ANSWER_RE.match(e.answer)
    assert m is not None, e.answer
    a, op, b, c, final = m.groups()
    assert eval(f"{a}{op}{b}") == int(c) == int(final)  # noqa: S307 -- digits and one operator only
    assert (int(a), op, int(b)) == e.fact
    assert op in config.ops
    assert e.prompt.startswith("Q: ") and e.prompt.endswith(" A:")
    numbers = re.findall(r"\d+", e.prompt)
    assert numbers == [a, b], "the question states a then b"
    assert any(v in e.prompt for v in VERBS[op])
    if op == "-":
        assert int(a) >= int(b)
    digits = "2d" if max(int(a), int(b)) >= 10 else "1d"
    assert e.category == op + digits


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(ArithmeticConfig(), id="default-1digit"),
        pytest.param(
            ArithmeticConfig(two_digit_fraction=0.5, ops=("+", "-", "*"), recall_pairs=(2, 6)), id="mixed-with-mul"
        ),
    ],
)
def test_examples_are_correct(config):
    ex = generate_examples(config, 400, seed=0)
    assert len(ex) == 400
    for e in ex:
        check_example(e, config)
        assert e.text == e.prompt + " " + e.answer
    n_recall = sum(e.category == "recall" for e in ex)
    assert 0.2 < n_recall / 400 < 0.4  # recall_fraction 0.3
    if config.two_digit_fraction == 0:
        assert all(e.fact is None or max(e.fact[0], e.fact[2]) <= 9 for e in ex)
    else:
        assert any(e.fact is not None and max(e.fact[0], e.fact[2]) >= 10 for e in ex)


def test_every_template_renders():
    ex = generate_examples(ArithmeticConfig(ops=("+", "-", "*"), recall_fraction=0.0), 600, seed=1)
    used = {op: set() for op in TEMPLATES}
    for e in ex:
        q = e.prompt[3:-3]
        for i, t in enumerate(TEMPLATES[e.fact[1]]):
            pattern = re.escape(t).replace(r"\{name\}", r"\w+").replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")
            pattern = re.sub(r"\\\{\w+\\\}", r"\\w+", pattern)
            if re.fullmatch(pattern, q):
                used[e.fact[1]].add(i)
    assert all(used[op] == set(range(len(TEMPLATES[op]))) for op in TEMPLATES)


def test_singular_items_for_a_count_of_one():
    from wuneng.eval.tasks.arithmetic import arithmetic_example

    assert (
        arithmetic_example(1, "+", 3, "Tom", "shells").prompt
        == "Q: Tom has 1 shell and buys 3 more. How many shells? A:"
    )
    assert (
        arithmetic_example(1, "*", 1, "Ann", "cups", template=1).prompt
        == "Q: Ann buys 1 box of 1 cup. How many cups? A:"
    )


def test_seed_reproduces_and_differs():
    cfg = ArithmeticConfig(two_digit_fraction=0.3)
    a = [e.text for e in generate_examples(cfg, 50, seed=3)]
    assert a == [e.text for e in generate_examples(cfg, 50, seed=3)]
    assert a != [e.text for e in generate_examples(cfg, 50, seed=4)]
    assert a != [e.text for e in generate_examples(cfg, 50, seed=3, epoch=1)]


def test_test_set_is_balanced_and_distinct():
    cfg = ArithmeticConfig(two_digit_fraction=0.3)
    test = make_test_set(cfg, per_category=30, seed=1)
    groups = test.by_category()
    assert list(groups) == heldout_categories(cfg) == ["+1d", "-1d", "+2d", "-2d", "recall"]
    assert all(len(v) == 30 for v in groups.values())
    assert len({e.prompt for e in test.examples}) == len(test.examples)
    for e in test.examples:
        check_example(e, cfg)
    assert all(min(e.fact[0], e.fact[2]) >= 10 for e in groups["+2d"] + groups["-2d"])
    assert test.held_out_facts == {e.fact for e in groups["+2d"] + groups["-2d"]}
    assert heldout_categories(ArithmeticConfig(recall_fraction=0.0)) == ["+1d", "-1d"]


def test_training_never_contains_held_out_problems():
    # a high 2-digit share and few names/items so that collisions with the test set really happen
    cfg = ArithmeticConfig(
        two_digit_fraction=0.5, names=("Tom",), items=("shells",), recall_pairs=(1, 2), recall_keys=4, recall_values=3
    )
    test = make_test_set(cfg, per_category=20, seed=1)
    unfiltered = generate_examples(cfg, 3000, seed=0)
    forbidden = [e for e in unfiltered if not test.allows(e)]
    assert forbidden, "the check below must be able to fail: the raw stream hits the test set"
    train = generate_training_examples(cfg, 3000, seed=0, test_set=test)
    assert len(train) == 3000
    test_prompts = {e.prompt for e in test.examples}
    two_digit_facts = {e.fact for e in test.examples if e.fact and max(e.fact[0], e.fact[2]) >= 10}
    assert not test_prompts & {e.prompt for e in train}
    assert not two_digit_facts & {e.fact for e in train}
    corpus = training_corpus(cfg, 3000, seed=0, test_set=test)
    lines = corpus.text.split("\n")
    assert lines[-1] == "" and len(lines) == 3001
    for line in lines[:-1]:
        prompt = line[: line.index(" A: ") + 3] if line.startswith("Q: ") else line[: line.index("?") + 1]
        assert prompt not in test_prompts
    # 1-digit facts are shared on purpose (only 81 exist per op); the exact prompt is still held out
    one_digit_test_facts = {e.fact for e in test.examples if e.fact and max(e.fact[0], e.fact[2]) <= 9}
    assert one_digit_test_facts & {e.fact for e in train}
    # the same seed with no test set keeps the examples the test set allows, in order
    kept = [e for e in unfiltered if test.allows(e)]
    assert [e.text for e in train[: len(kept)]] == [e.text for e in kept]


def test_corpus_answer_mask_covers_answers_and_separators():
    ex = generate_examples(ArithmeticConfig(), 30, seed=2)
    corpus = build_corpus(ex, separator="\n")
    assert corpus.num_examples == 30 and corpus.answer_mask.shape == (len(corpus.text),)
    masked = "".join(ch for ch, m in zip(corpus.text, corpus.answer_mask) if m)
    assert masked == "".join(e.answer + "\n" for e in ex)
    unmasked = "".join(ch if not m else "|" for ch, m in zip(corpus.text, corpus.answer_mask))
    assert [seg.rstrip(" ") for seg in unmasked.split("|") if seg] == [e.prompt for e in ex]
    with pytest.raises(ValueError):
        build_corpus(ex, separator="")


def test_bad_configs_raise():
    with pytest.raises(ValueError):
        ArithmeticConfig(ops=("/",))
    with pytest.raises(ValueError):
        ArithmeticConfig(two_digit_fraction=1.5)
    with pytest.raises(ValueError):
        ArithmeticConfig(recall_pairs=(4, 3))
    with pytest.raises(ValueError):
        make_test_set(ArithmeticConfig(), per_category=0)


def test_score_arithmetic_perfect_and_constant():
    cfg = ArithmeticConfig(two_digit_fraction=0.3)
    test = make_test_set(cfg, per_category=20, seed=5)
    ex = test.examples
    # generations as a model would produce them: leading space, then more text after a newline
    perfect = score_arithmetic([" " + e.answer + "\nQ: next" for e in ex], ex)
    assert perfect["exact"] == 1.0 and perfect["final"] == 1.0
    assert all(row["exact"] == 1.0 for row in perfect["per_category"].values())
    constant = score_arithmetic(["3+5=8. #### 8"] * len(ex), ex)
    arith = [e for e in ex if e.fact is not None]
    assert constant["final"] == pytest.approx(sum(e.answer.endswith("#### 8") for e in arith) / len(arith), abs=0)
    assert constant["exact"] == pytest.approx(sum(e.answer == "3+5=8. #### 8" for e in ex) / len(ex), abs=0)
    assert "final" not in constant["per_category"]["recall"]
    wrong_work_right_final = score_arithmetic(["1+1=8. #### " + e.answer.split("#### ")[1] for e in arith], arith)
    assert wrong_work_right_final["final"] == 1.0 and wrong_work_right_final["exact"] < 1.0
    assert np.isnan(score_arithmetic(["v1"], [e for e in ex if e.fact is None][:1])["final"])
