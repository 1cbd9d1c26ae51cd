"""MQAR generator and scorer against plain-Python recomputations (Zoology multiquery_ar semantics)."""

import numpy as np
import pytest
import torch

from wuneng.eval.tasks.mqar import (
    MQARConfig,
    generate_mqar,
    make_rng,
    mqar_accuracy,
    sample_distinct_rows,
)

SETTINGS = [
    pytest.param(MQARConfig(vocab_size=8192, seq_len=64, num_kv_pairs=4), id="V8192-T64-n4"),
    pytest.param(MQARConfig(vocab_size=1024, seq_len=128, num_kv_pairs=8), id="V1024-T128-n8"),
    pytest.param(MQARConfig(vocab_size=1024, seq_len=256, num_kv_pairs=64), id="V1024-T256-n64-topk-path"),
    pytest.param(
        MQARConfig(vocab_size=100, seq_len=64, num_kv_pairs=16, power_a=1.0, filler="zero"), id="V100-uniform-zero"
    ),
]


def slow_check_example(inputs, labels, cfg):
    """Recompute what one example must satisfy with Python lists and dicts only."""
    inputs, labels = [int(x) for x in inputs], [int(x) for x in labels]
    n, T, V = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
    keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
    assert len(set(keys)) == n and len(set(values)) == n
    assert all(1 <= k < V // 2 for k in keys)
    assert all(V // 2 <= v < V for v in values)
    kv = dict(zip(keys, values))
    assert all(lab == -100 for lab in labels[: 2 * n])
    queried = []
    for t in range(2 * n, T):
        if labels[t] != -100:
            assert (t - 2 * n) % 2 == 0, "queries sit at even offsets of the query region"
            assert inputs[t] in kv and labels[t] == kv[inputs[t]]
            queried.append(inputs[t])
        elif cfg.filler == "zero":
            assert inputs[t] == 0
    assert sorted(queried) == sorted(keys), "every key is queried exactly once"
    if cfg.filler == "zero":
        # with zero filler the labels are a function of the inputs alone: recompute them outright
        expected = [-100] * 2 * n + [kv[x] if x != 0 else -100 for x in inputs[2 * n :]]
        assert labels == expected
    return queried


@pytest.mark.parametrize("cfg", SETTINGS)
def test_labels_match_slow_recomputation(cfg):
    torch.manual_seed(0)
    data = generate_mqar(cfg, 64, seed=3)
    assert data.input_ids.shape == (64, cfg.seq_len) and data.labels.shape == (64, cfg.seq_len)
    assert data.input_ids.dtype == torch.int64 and data.labels.dtype == torch.int64
    for x, y in zip(data.input_ids, data.labels):
        slow_check_example(x, y, cfg)
    assert int(data.input_ids.max()) < cfg.vocab_size and int(data.input_ids.min()) >= 0


def test_random_filler_is_uniform_over_vocab():
    torch.manual_seed(0)
    cfg = MQARConfig(vocab_size=256, seq_len=128, num_kv_pairs=4)
    data = generate_mqar(cfg, 200, seed=0)
    region = data.input_ids[:, 8:][data.labels[:, 8:] == -100]
    # 200 * 116 filler draws over 256 tokens: both halves of the vocabulary appear, mean near 127.5
    assert int(region.min()) < 10 and int(region.max()) > 245
    assert abs(region.double().mean().item() - 127.5) < 3.0


def test_gap_law_matches_sequential_sampling_without_replacement():
    """First and second query slots follow p_i and sum_i p_i p_j / (1 - p_i) (numpy choice's law)."""
    torch.manual_seed(0)
    cfg = MQARConfig(vocab_size=64, seq_len=16, num_kv_pairs=2, power_a=0.5, filler="zero")
    p = cfg.gap_probabilities()
    S = p.size
    assert S == 6
    data = generate_mqar(cfg, 40_000, seed=11)
    x = data.input_ids.numpy()
    n = cfg.num_kv_pairs
    first_gap = np.array([(row[2 * n :].tolist().index(row[0])) // 2 for row in x])
    second_gap = np.array([(row[2 * n :].tolist().index(row[2])) // 2 for row in x])
    second_p = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(S) if i != j) for j in range(S)])
    for gaps, expect in ((first_gap, p), (second_gap, second_p)):
        freq = np.bincount(gaps, minlength=S) / gaps.size
        sigma = np.sqrt(expect * (1 - expect) / gaps.size)
        assert np.all(np.abs(freq - expect) < 5 * sigma + 1e-12), (freq, expect)


def test_seed_and_epoch_control_the_data():
    torch.manual_seed(0)
    cfg = MQARConfig(vocab_size=1024, seq_len=64, num_kv_pairs=4)
    a = generate_mqar(cfg, 32, seed=5)
    b = generate_mqar(cfg, 32, seed=5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, generate_mqar(cfg, 32, seed=6).input_ids)
    assert not torch.equal(a.input_ids, generate_mqar(cfg, 32, seed=5, epoch=1).input_ids)
    # (seed, epoch) are mixed, not added: (0, 1) and (1, 0) differ
    assert not torch.equal(
        generate_mqar(cfg, 8, seed=0, epoch=1).input_ids, generate_mqar(cfg, 8, seed=1, epoch=0).input_ids
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=64, seq_len=64, num_kv_pairs=4), "vocab_size > seq_len"),
        (dict(vocab_size=8192, seq_len=64, num_kv_pairs=17), "4 \\* num_kv_pairs <= seq_len"),
        (dict(num_kv_pairs=0), "positive int"),
        (dict(power_a=0.0), "power_a"),
        (dict(filler="noise"), "filler"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_examples"):
        generate_mqar(MQARConfig(), 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_rng(-1)


@pytest.mark.parametrize("pool, k", [(4095, 4), (511, 64), (10, 10)], ids=["rejection", "topk", "full-permutation"])
def test_sample_distinct_rows(pool, k):
    rng = np.random.default_rng(0)
    rows = sample_distinct_rows(rng, 500, 7, 7 + pool, k)
    assert rows.shape == (500, k)
    assert rows.min() >= 7 and rows.max() < 7 + pool
    assert all(len(set(r.tolist())) == k for r in rows)
    # position 0 is uniform over the pool (no ordering bias): its mean is near the pool's centre
    centre = 7 + (pool - 1) / 2
    assert abs(rows[:, 0].mean() - centre) < 5 * np.sqrt((pool**2 - 1) / 12 / 500)


def test_scorer_perfect_and_constant_predictors():
    torch.manual_seed(0)
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, filler="zero")
    data = generate_mqar(cfg, 50, seed=1)
    logits = torch.nn.functional.one_hot(data.labels.clamp_min(0), cfg.vocab_size).float()
    assert mqar_accuracy(logits, data.labels) == 1.0
    assert mqar_accuracy(data.labels.clamp_min(0), data.labels) == 1.0
    constant = 40  # a value token
    pred = torch.full_like(data.labels, constant)
    hits = total = 0
    for row in data.labels.tolist():
        for lab in row:
            if lab != -100:
                total += 1
                hits += lab == constant
    assert total == 50 * cfg.num_kv_pairs
    assert mqar_accuracy(pred, data.labels) == pytest.approx(hits / total, abs=0)
