"""Passkey prompts: key placement, lengths (chars and tokens), reproducibility, and the scorer."""

import numpy as np
import pytest

from wuneng.eval.tasks.passkey import (
    CLASSIC_FILLER,
    PasskeyConfig,
    generate_passkey_examples,
    make_passkey_example,
    needle,
    passkey_match,
    sample_passkey_examples,
    score_passkey,
)


def words(text):
    """A toy tokenizer: whitespace-separated words."""
    return text.split()


def test_grid_shape_keys_and_format():
    cfg = PasskeyConfig()
    ex = generate_passkey_examples(cfg, [600, 1500], trials=3, seed=0)
    assert len(ex) == 2 * 10 * 3
    assert sorted({e.depth for e in ex}) == pytest.approx(list(np.linspace(0, 1, 10)))
    for e in ex:
        assert len(e.answer) == 5 and e.answer.isdigit() and e.answer[0] != "0"
        assert e.prompt.startswith(cfg.intro)
        assert e.prompt.endswith("What is the pass key? The pass key is")
        assert e.prompt.count(needle(e.answer)) == 1
        assert e.prompt.count(e.answer) == 2  # the key appears only inside the needle
        assert e.prompt_length == len(e.prompt) <= e.length


def test_length_is_maximal_in_characters():
    cfg = PasskeyConfig()
    for length in (400, 999, 4000):
        e = make_passkey_example(cfg, length, 0.5, "12345", np.random.default_rng(0))
        # the haystack uses whole filler sentences: one more would overflow the budget
        n_filler = sum(e.prompt.count(s) for s in CLASSIC_FILLER)
        longest_next = max(len(s) for s in CLASSIC_FILLER) + 1
        assert len(e.prompt) <= length < len(e.prompt) + longest_next
        assert n_filler >= 1


def test_depth_places_the_needle():
    cfg = PasskeyConfig()
    rng = np.random.default_rng(0)
    first = make_passkey_example(cfg, 2000, 0.0, "54321", rng).prompt
    last = make_passkey_example(cfg, 2000, 1.0, "54321", rng).prompt
    assert first.startswith(cfg.intro + " " + needle("54321"))
    assert last.endswith(needle("54321") + " " + cfg.question)
    positions = [make_passkey_example(cfg, 3000, float(d), "54321", rng).prompt.index("54321") for d in cfg.depths()]
    assert positions == sorted(positions) and positions[0] < positions[-1]


def test_token_lengths_with_a_tokenizer_function():
    ex = generate_passkey_examples(PasskeyConfig(filler="varied"), [300, 1200], trials=1, seed=3, tokenizer=words)
    for e in ex:
        n = len(words(e.prompt))
        assert e.prompt_length == n <= e.length
        assert n > e.length - 6  # a filler sentence has at most 5 words here
    # an HF-style tokenizer returning a dict of input_ids is accepted too
    e = make_passkey_example(
        PasskeyConfig(), 300, 0.3, "11111", np.random.default_rng(0), lambda s: {"input_ids": s.split()}
    )
    assert e.prompt_length == len(e.prompt.split()) <= 300


def test_reproducible_and_seed_dependent():
    a = generate_passkey_examples(PasskeyConfig(filler="varied"), [500], trials=2, seed=7)
    b = generate_passkey_examples(PasskeyConfig(filler="varied"), [500], trials=2, seed=7)
    c = generate_passkey_examples(PasskeyConfig(filler="varied"), [500], trials=2, seed=8)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.answer for e in a] != [e.answer for e in c]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="too short"):
        make_passkey_example(PasskeyConfig(), 50, 0.5, "12345", np.random.default_rng(0))
    with pytest.raises(ValueError, match="depth"):
        make_passkey_example(PasskeyConfig(), 500, 1.5, "12345", np.random.default_rng(0))
    with pytest.raises(ValueError):
        generate_passkey_examples(PasskeyConfig(), [], seed=0)
    with pytest.raises(ValueError):
        PasskeyConfig(filler="lorem")


@pytest.mark.parametrize(
    "generated, ok",
    [
        ("12345", True),
        (" 12345.", True),
        ("\n12345 and more", True),
        ("123456", False),
        ("1234", False),
        ("The key is 12345", False),
        ("", False),
    ],
)
def test_passkey_match(generated, ok):
    assert passkey_match(generated, "12345") is ok


def test_score_passkey_perfect_and_constant():
    ex = generate_passkey_examples(PasskeyConfig(), [400, 800], trials=2, seed=1)
    perfect = score_passkey([" " + e.answer + "." for e in ex], ex)
    assert perfect["accuracy"] == 1.0
    assert set(perfect["per_length"]) == {400, 800} and len(perfect["per_cell"]) == 20
    constant = ex[5].answer
    score = score_passkey([constant] * len(ex), ex)
    assert score["accuracy"] == sum(e.answer == constant for e in ex) / len(ex)
    with pytest.raises(ValueError):
        score_passkey(["1"], ex)


SHORT = dict(intro="", needle_template="The pass key is {key}.", question="What is the pass key?")


def test_a_short_needle_without_intro_builds_the_prompt_a_byte_model_can_hold():
    cfg = PasskeyConfig(**SHORT)
    assert needle("12345", cfg.needle_template) == "The pass key is 12345."
    bare = make_passkey_example(cfg, 44, 0.0, "12345", np.random.default_rng(0))
    assert bare.prompt == "The pass key is 12345. What is the pass key?"  # no leading space for the empty intro
    e = make_passkey_example(cfg, 128, 0.5, "12345", np.random.default_rng(0))
    assert e.prompt == (
        "The grass is green. The sky is blue. The pass key is 12345. The sun is yellow. Here we go. "
        "What is the pass key?"
    )
    assert e.prompt_length == len(e.prompt) <= 128
    with pytest.raises(ValueError, match="needle_template"):
        PasskeyConfig(needle_template="no key here")
    with pytest.raises(ValueError, match="question"):
        PasskeyConfig(question="")


def test_sampled_training_prompts_are_grid_prompts_of_random_length_depth_and_key():
    cfg = PasskeyConfig(**SHORT)
    ex = sample_passkey_examples(cfg, 200, max_length=121, seed=3)
    assert ex == sample_passkey_examples(cfg, 200, max_length=121, seed=3)
    assert [e.answer for e in ex] != [e.answer for e in sample_passkey_examples(cfg, 200, max_length=121, seed=4)]
    for i, e in enumerate(ex):
        assert 44 <= e.prompt_length <= e.length <= 121 and 0.0 <= e.depth <= 1.0 and e.trial == i
        assert len(e.answer) == 5 and e.answer[0] != "0"
        # the prompt is exactly the one the grid builds for that length, depth and key
        assert e.prompt == make_passkey_example(cfg, e.length, e.depth, e.answer, np.random.default_rng(0)).prompt
    assert min(e.length for e in ex) < 60 and max(e.length for e in ex) > 110  # lengths spread over the range
    assert min(e.depth for e in ex) < 0.1 and max(e.depth for e in ex) > 0.9
    assert len({e.answer for e in ex}) > 190
    with pytest.raises(ValueError, match="without filler takes 44"):
        sample_passkey_examples(cfg, 1, max_length=40)
