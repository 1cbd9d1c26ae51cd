"""Group word problems: tables against plain-tuple group arithmetic, labels against a slow fold."""

import itertools
import math

import numpy as np
import pytest
import torch

from wuneng.eval.scoring import accuracy_per_length, min_depth_reaching
from wuneng.eval.tasks.state_tracking import (
    StateTrackingConfig,
    generate_word_problems,
    make_group,
    prefix_products,
    state_tracking_report,
)


def then(a, b):
    """'a then b' on permutation tuples: i -> b[a[i]]."""
    return tuple(b[a[i]] for i in range(len(a)))


def parity_by_cycles(p):
    """Permutation parity from its cycle decomposition (independent of the inversion count)."""
    seen, transpositions = set(), 0
    for start in range(len(p)):
        if start in seen:
            continue
        length, i = 0, start
        while i not in seen:
            seen.add(i)
            i = p[i]
            length += 1
        transpositions += length - 1
    return transpositions % 2


def slow_product(name, a, b):
    """Product of two readable elements of the named group, with plain Python."""
    if name.startswith("Z"):
        return (a + b) % int(name[1:])
    if name == "A4xZ5":
        return (then(a[0], b[0]), (a[1] + b[1]) % 5)
    return then(a, b)


@pytest.mark.parametrize("name, order", [("S5", 120), ("A5", 60), ("Z60", 60), ("A4xZ5", 60), ("S3", 6), ("Z2", 2)])
def test_group_tables_match_plain_arithmetic(name, order):
    g = make_group(name)
    assert g.order == order and g.table.shape == (order, order)
    index = {e: i for i, e in enumerate(g.elements)}
    assert len(index) == order
    for a, b in itertools.product(range(order), repeat=2):
        assert g.table[a, b] == index[slow_product(name, g.elements[a], g.elements[b])]
    # identity and Latin-square rows/columns (each element has an inverse)
    assert np.array_equal(g.table[g.identity], np.arange(order))
    assert all(sorted(row) == list(range(order)) for row in g.table.tolist())
    assert all(sorted(col) == list(range(order)) for col in g.table.T.tolist())


def test_group_facts():
    a5, s5 = make_group("A5"), make_group("S5")
    assert all(parity_by_cycles(p) == 0 for p in a5.elements)
    assert sum(parity_by_cycles(p) == 0 for p in s5.elements) == 60
    assert list(s5.elements) == sorted(itertools.permutations(range(5)))  # lexicographic numbering
    z60, a4z5 = make_group("Z60"), make_group("A4xZ5")
    assert np.array_equal(z60.table, z60.table.T)  # abelian
    assert not np.array_equal(a4z5.table, a4z5.table.T)  # not abelian
    assert not np.array_equal(a5.table, a5.table.T)

    # Z60 is cyclic: element 1 generates it; A4xZ5 has no element of order 60
    def orders(g):
        out = []
        for e in range(g.order):
            k, x = 1, e
            while x != g.identity:
                x, k = g.table[x, e], k + 1
            out.append(k)
        return out

    assert max(orders(z60)) == 60 and max(orders(a4z5)) < 60


@pytest.mark.parametrize("name", ["S5", "A5", "Z60", "A4xZ5"])
def test_prefix_product_labels_match_a_slow_fold(name):
    torch.manual_seed(0)
    cfg = StateTrackingConfig(group=name, seq_len=12)
    data = generate_word_problems(cfg, 40, seed=2)
    g = make_group(name)
    assert data.input_ids.shape == (40, 12) and data.labels.shape == (40, 12)
    assert cfg.vocab_size == g.order
    for xs, ys in zip(data.input_ids.tolist(), data.labels.tolist()):
        state = None
        for x, y in zip(xs, ys):
            elem = g.elements[x]
            state = elem if state is None else slow_product(name, state, elem)
            assert g.elements[y] == state


def test_permutation_convention_is_apply_the_newest_element_to_the_state():
    """y_t[i] = x_t[y_{t-1}[i]]: the documented composition order, checked on a 2-step S3 example."""
    g = make_group("S3")
    swap01, cycle = (1, 0, 2), (1, 2, 0)
    x = np.array([[g.elements.index(swap01), g.elements.index(cycle)]])
    y = prefix_products(g, x)
    assert g.elements[y[0, 1]] == tuple(cycle[swap01[i]] for i in range(3)) == (2, 1, 0)


def test_last_only_labels_and_reproducibility():
    torch.manual_seed(0)
    cfg = StateTrackingConfig(group="A5", seq_len=8, label_all_prefixes=False)
    a = generate_word_problems(cfg, 16, seed=4)
    assert bool((a.labels[:, :-1] == -100).all()) and bool((a.labels[:, -1] >= 0).all())
    full = generate_word_problems(StateTrackingConfig(group="A5", seq_len=8), 16, seed=4)
    assert torch.equal(a.input_ids, full.input_ids) and torch.equal(a.labels[:, -1], full.labels[:, -1])
    assert torch.equal(a.input_ids, generate_word_problems(cfg, 16, seed=4).input_ids)
    assert not torch.equal(a.input_ids, generate_word_problems(cfg, 16, seed=5).input_ids)
    assert not torch.equal(a.input_ids, generate_word_problems(cfg, 16, seed=4, epoch=1).input_ids)


@pytest.mark.parametrize("bad", ["S9", "Q8", "", "A5xB2", "Z0"])
def test_bad_group_names_raise(bad):
    with pytest.raises(ValueError):
        make_group(bad)


def test_bad_config_and_elements_raise():
    with pytest.raises(ValueError, match="seq_len"):
        StateTrackingConfig(seq_len=0)
    with pytest.raises(ValueError, match="element ids"):
        prefix_products(make_group("Z2"), np.array([[0, 2]]))


def test_accuracy_per_length_perfect_and_constant():
    torch.manual_seed(0)
    data = generate_word_problems(StateTrackingConfig(group="Z60", seq_len=6), 300, seed=0)
    perfect = accuracy_per_length(data.labels, data.labels)
    assert perfect == {k: 1.0 for k in range(1, 7)}
    constant = torch.full_like(data.labels, 7)
    per_len = accuracy_per_length(constant, data.labels)
    for t in range(6):
        expected = sum(1 for row in data.labels.tolist() if row[t] == 7) / 300
        assert per_len[t + 1] == pytest.approx(expected, abs=0)
    logits = torch.nn.functional.one_hot(data.labels, 60).double()
    report = state_tracking_report(logits, data.labels)
    assert report["accuracy"] == 1.0 and report["solved_up_to"] == 6


def test_min_depth_reaching():
    assert min_depth_reaching({1: 0.5, 2: 0.96, 3: 0.99, 4: 0.95}) == 2
    assert min_depth_reaching({1: 0.5, 2: 0.95}) is None  # strictly above the threshold
    nested = {1: {2: 0.99, 4: 0.6}, 2: {2: 1.0, 4: 0.97, 8: 0.5}, 4: {2: 1.0, 4: 1.0, 8: 0.96}}
    assert min_depth_reaching(nested) == {2: 1, 4: 2, 8: 4}
    assert min_depth_reaching(nested, threshold=0.98) == {2: 1, 4: 4, 8: None}
    with pytest.raises(ValueError):
        min_depth_reaching({})
    with pytest.raises(TypeError):
        min_depth_reaching({1: 0.5, 2: {2: 0.9}})
    with pytest.raises(TypeError):
        min_depth_reaching({"one": 0.5})
    assert math.isclose(min_depth_reaching({3: 0.951}), 3)
