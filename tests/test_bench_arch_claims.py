"""The claims table of bench-arch: differences between two variants with a Welch 95% interval over seeds, and a
verdict (held / not held / inconclusive) that follows the interval."""

from __future__ import annotations

import math

import pytest

from wuneng.apps.bench_arch import CLAIMS, Claim, claim_verdicts, claims_markdown, difference_interval


def _rows(setting: str, variant: str, accs) -> list[dict]:
    return [
        {"setting": setting, "variant": variant, "lr": 1e-3, "seed": s, "accuracy": a, "seconds": 1.0}
        for s, a in enumerate(accs)
    ]


def test_difference_interval_is_welchs_with_a_hand_computed_value():
    # a = (0.9, 0.8, 0.7): mean 0.8, var 0.01; b = (0.5, 0.5, 0.2): mean 0.4, var 0.03
    # se = sqrt(0.01/3 + 0.03/3) = sqrt(0.04/3); Welch df = (0.04/3)^2 / ((0.01/3)^2/2 + (0.03/3)^2/2) = 3.2 -> 3
    diff, hw, df = difference_interval([0.9, 0.8, 0.7], [0.5, 0.5, 0.2])
    assert diff == pytest.approx(0.4, abs=1e-12)
    assert df == pytest.approx(3.2, abs=1e-9)
    assert hw == pytest.approx(3.182 * math.sqrt(0.04 / 3), abs=1e-9)  # t_{0.975, 3}: df rounded down (wider)


def test_difference_interval_of_constant_samples_is_exact():
    diff, hw, _ = difference_interval([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert diff == pytest.approx(0.5) and hw == 0.0


def test_difference_interval_needs_two_seeds_on_each_side():
    diff, hw, df = difference_interval([0.9], [0.5, 0.6])
    assert diff == pytest.approx(0.35) and hw is None and df is None


def test_verdicts_follow_the_interval():
    s = "state Z2 k=16"
    rows = (
        _rows(s, "wuneng-gate", [0.99, 0.98, 1.00])
        + _rows(s, "wuneng-concat", [0.60, 0.62, 0.58])  # gate clearly better: held
        + _rows(s, "wuneng-add", [0.99, 1.00, 0.98])  # both solve it: inconclusive, at the ceiling
        + _rows(s, "wuneng-hymba", [0.70, 0.95, 0.99])  # wide: inconclusive
    )
    claims = (
        Claim("gate > concat", "wuneng-gate", "wuneng-concat"),
        Claim("gate > add", "wuneng-gate", "wuneng-add"),
        Claim("gate > hymba", "wuneng-gate", "wuneng-hymba"),
        Claim("concat > gate", "wuneng-concat", "wuneng-gate"),  # clearly the other way: not held
        Claim("gate > metastate", "wuneng-gate", "metastate"),  # metastate not run
    )
    v = {(x["claim"].label, x["setting"]): x for x in claim_verdicts(rows, claims)}
    assert v[("gate > concat", s)]["verdict"] == "held"
    assert v[("gate > add", s)]["verdict"] == "inconclusive"
    assert "both >= 95%" in v[("gate > add", s)]["note"]
    assert v[("gate > hymba", s)]["verdict"] == "inconclusive"
    assert v[("concat > gate", s)]["verdict"] == "not held"
    assert v[("gate > metastate", s)]["verdict"] == "not run"


def test_claims_markdown_is_marked_not_interpretable_when_a_control_failed():
    s = "state Z2 k=16"
    rows = _rows(s, "wuneng-gate", [0.99, 0.98, 1.00]) + _rows(s, "wuneng-concat", [0.60, 0.62, 0.58])
    ok = claims_markdown(rows, controls_ok=True)
    assert "| gate > concat | state Z2 k=16 |" not in ok  # the default claims carry their own labels
    assert "held" in ok and "NOT INTERPRETABLE" not in ok
    bad = claims_markdown(rows, controls_ok=False)
    assert "NOT INTERPRETABLE" in bad.splitlines()[0]


def test_the_default_claims_name_only_variants_of_the_sweep():
    from wuneng.apps.bench_arch import VARIANTS

    assert CLAIMS and all(c.better in VARIANTS and c.worse in VARIANTS for c in CLAIMS)
