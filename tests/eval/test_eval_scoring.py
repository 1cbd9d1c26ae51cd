"""Generic scorers: labelled/sequence/per-position accuracy and text answer parsing."""

import math

import numpy as np
import pytest
import torch

from wuneng.eval.scoring import (
    accuracy_per_position,
    exact_match,
    final_number_match,
    labelled_accuracy,
    parse_final_number,
    predictions_from,
    sequence_accuracy,
    truncate_at,
)


def slow_accuracies(preds, labels):
    hit = tot = seq_ok = seq_tot = 0
    for p_row, l_row in zip(preds, labels):
        scored = [(p, lab) for p, lab in zip(p_row, l_row) if lab != -100]
        if scored:
            seq_tot += 1
            seq_ok += all(p == lab for p, lab in scored)
        tot += len(scored)
        hit += sum(p == lab for p, lab in scored)
    return hit / tot, seq_ok / seq_tot


def test_accuracies_match_slow_loops():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (8, 12))
    labels[torch.rand(8, 12) < 0.5] = -100
    labels[3] = -100  # a row with no label is skipped by sequence accuracy
    preds = torch.where(torch.rand(8, 12) < 0.7, labels.clamp_min(0), torch.randint(0, 5, (8, 12)))
    acc, seq = slow_accuracies(preds.tolist(), labels.tolist())
    assert labelled_accuracy(preds, labels) == pytest.approx(acc, abs=0)
    assert sequence_accuracy(preds, labels) == pytest.approx(seq, abs=0)
    logits = torch.randn(8, 12, 5)
    logits.scatter_(2, preds[..., None], 10.0)  # argmax == preds
    assert labelled_accuracy(logits, labels) == pytest.approx(acc, abs=0)
    assert labelled_accuracy(preds.numpy(), labels.numpy()) == pytest.approx(acc, abs=0)
    per_pos = accuracy_per_position(preds, labels)
    for t in range(12):
        col = [(int(p), int(lab)) for p, lab in zip(preds[:, t], labels[:, t]) if lab != -100]
        if col:
            assert per_pos[t].item() == pytest.approx(sum(p == lab for p, lab in col) / len(col), abs=0)
        else:
            assert math.isnan(per_pos[t].item())


def test_shape_and_type_errors():
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must have shape"):
        labelled_accuracy(torch.zeros(2, 4, 5), labels)
    with pytest.raises(ValueError, match="labels' shape"):
        labelled_accuracy(torch.zeros(2, 4, dtype=torch.long), labels)
    with pytest.raises(TypeError):
        labelled_accuracy([[0, 0, 0]], labels)
    with pytest.raises(TypeError, match="integer"):
        predictions_from(torch.zeros(2, 3, 4), labels.float())
    with pytest.raises(ValueError, match="no labelled"):
        labelled_accuracy(labels, torch.full((2, 3), -100))


@pytest.mark.parametrize(
    "text, number",
    [
        ("5+3=8. #### 8", 8),
        (" 5+3=8. #### 8\nQ: next #### 9", 8),
        ("#### 1,234", 1234),
        ("####-3", -3),
        ("#### 8.", 8),
        ("#### 2.5 apples", 2.5),
        ("the answer is 7", None),
        ("####", None),
    ],
)
def test_parse_final_number(text, number):
    assert parse_final_number(text) == number


def test_parse_final_number_fallback_and_errors():
    assert parse_final_number("so 3 and then 12.", fallback_last_number=True) == 12
    assert parse_final_number("no digits", fallback_last_number=True) is None
    with pytest.raises(TypeError):
        parse_final_number(8)


def test_exact_and_final_match():
    assert exact_match(" 5+3=8. #### 8\nQ: Tom", "5+3=8. #### 8")
    assert not exact_match(" 5+3=8. #### 8 Q: Tom", "5+3=8. #### 8")
    assert exact_match("a  b", "a b", stop=None)
    assert truncate_at("abc<end>def", ["<end>", "d"]) == "abc"
    assert final_number_match("4+4=8. ####8", "5+3=8. #### 8")
    assert not final_number_match("5+3=8.", "5+3=8. #### 8")
    with pytest.raises(ValueError, match="reference"):
        final_number_match("#### 1", "no final")
    assert np.isclose(labelled_accuracy(torch.tensor([[1, 2]]), torch.tensor([[1, -100]])), 1.0)
