"""benchmarks/hybrid_real.py --quick: the three models are built from one teacher, every measure is produced for
each of them, and the ratios are the teacher's numbers over (prefill) or under (decode) the model's."""

from __future__ import annotations

import pytest

from _helpers import load_benchmark


@pytest.mark.slow
def test_quick_run_measures_every_model_and_reports_ratios_to_the_teacher(capsys):
    bench = load_benchmark("hybrid_real")
    out = bench.main(["--quick", "--threads", "1"])
    results, ratios = out["results"], out["ratios"]
    assert set(results) == {"prefill64", "decode64", "decode256"}
    for key, row in results.items():
        assert set(row) == {"teacher", "wuneng", "arwkv"}
        assert all(v > 0 for v in row.values())
        for name in ("wuneng", "arwkv"):
            want = row[name] / row["teacher"] if key.startswith("prefill") else row["teacher"] / row[name]
            assert ratios[(key, name)] == pytest.approx(want)
    # the teacher's cache holds keys and values of 256 + 6 tokens in 2 layers (2 kv heads x 32 x 4 bytes each);
    # ARWKV's holds no key/value cache, only its recurrent states: the same bytes after 64 and after 256 tokens
    cache = out["cache_bytes"]
    assert cache[256]["teacher"] >= 2 * 2 * (256 + 6) * 2 * 32 * 4 > cache[64]["teacher"]
    assert cache[256]["arwkv"] == cache[64]["arwkv"] < cache[64]["teacher"]
    assert cache[256]["wuneng"] > cache[64]["wuneng"]
    printed = capsys.readouterr().out
    assert "wuneng/T" in printed and "decode ms/token (B 1, after 256)" in printed
