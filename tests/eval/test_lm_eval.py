"""lm-evaluation-harness on saved wuneng checkpoints.

* The real ``lm_eval`` CLI runs the shipped ``wuneng_arith`` task on a saved tiny RWKV-7.
* :func:`wuneng.eval.lm_eval_glue.run_lm_eval` does the same in-process.

(How the CLI finds the wuneng classes, the ``auto_map`` shim, is tested in tests/models/test_auto_map.py.)

The checkpoints are tiny RWKV-7 models rigged to emit one fixed token whatever the input (``ln_out``
scale 0 and bias 1, one non-zero head row), so the exact-match score is known in advance: with
``max_gen_toks=1`` the model answers "8", which matches exactly the problems whose final answer is 8.
"""

import json
import os
import subprocess
import sys

import pytest
from eval_helpers import ANSWER, constant_answer_model, save_checkpoint

from wuneng.eval.lm_eval_glue import local_task_names, summarize_results
from wuneng.eval.lm_eval_tasks import WUNENG_ARITH_JSONL, prepare_include_path

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")

OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def expected_exact_match(limit: int) -> float:
    """lm-eval takes the first ``limit`` documents; the constant model is right where the final answer is 8."""
    rows = [json.loads(line) for line in WUNENG_ARITH_JSONL.read_text(encoding="utf-8").splitlines()[:limit]]
    return sum(r["final"] == ANSWER for r in rows) / limit


# ------------------------------------------------------------------------------------------ lm_eval


@pytest.mark.slow
def test_lm_eval_cli_runs_the_shipped_task_on_a_saved_checkpoint(tmp_path):
    """The real CLI: lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks wuneng_arith."""
    limit = 4
    folder = save_checkpoint(constant_answer_model(), tmp_path / "ckpt")
    tasks = prepare_include_path(tmp_path / "tasks")
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={folder},trust_remote_code=True",
        "--tasks", "wuneng_arith",
        "--include_path", str(tasks),
        "--limit", str(limit),
        "--batch_size", str(limit),
        "--gen_kwargs", "max_gen_toks=1",
        "--device", "cpu",
        "--output_path", str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = list(out_dir.rglob("results_*.json"))
    assert len(files) == 1, files
    raw = json.loads(files[0].read_text())
    value = raw["results"]["wuneng_arith"]["exact_match,none"]
    assert 0.0 <= value <= 1.0
    assert value == expected_exact_match(limit) == 0.25
    assert raw["n-samples"]["wuneng_arith"] == {"original": 48, "effective": limit}
    assert summarize_results(raw).metrics == {"wuneng_arith": {"exact_match": value}}


def test_run_lm_eval_in_process_on_a_model_and_a_folder(tmp_path):
    from wuneng.eval.lm_eval_glue import run_lm_eval

    limit = 8
    model = constant_answer_model()
    result = run_lm_eval(model, ["wuneng_arith"], limit=limit, batch_size=limit, gen_kwargs="max_gen_toks=1")
    assert result.metrics == {"wuneng_arith": {"exact_match": expected_exact_match(limit)}}
    assert result.num_samples == {"wuneng_arith": limit}
    folder = save_checkpoint(model, tmp_path / "ckpt")
    from_folder = run_lm_eval(
        folder, "wuneng_arith", limit=limit, batch_size=limit, device="cpu", gen_kwargs={"max_gen_toks": 1}
    )
    assert from_folder.metrics == result.metrics


def test_run_lm_eval_rejects_bad_input(tmp_path):
    from wuneng.eval.lm_eval_glue import run_lm_eval

    model = constant_answer_model()
    with pytest.raises(ValueError, match="limit"):
        run_lm_eval(model, ["wuneng_arith"], limit=0)
    with pytest.raises(ValueError, match="non-empty"):
        run_lm_eval(model, [])
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        run_lm_eval(tmp_path, ["wuneng_arith"])
    with pytest.raises(TypeError, match="model folder or a loaded"):
        run_lm_eval(42, ["wuneng_arith"])


def test_run_lm_eval_names_an_unknown_task(tmp_path):
    from wuneng.eval.lm_eval_glue import run_lm_eval

    with pytest.raises(ValueError, match="unknown lm-eval task.*wuneng_no_such_task"):
        run_lm_eval(constant_answer_model(), ["wuneng_no_such_task"], include_defaults=False)


def test_summarize_results_names_filters_and_stderrs():
    raw = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.5,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.75,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "wuneng_arith": {"alias": "wuneng_arith", "exact_match,none": 0.25, "exact_match_stderr,none": 0.2},
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 4}, "wuneng_arith": {"original": 48, "effective": 4}},
    }
    r = summarize_results(raw)
    assert r.metrics == {
        "gsm8k": {"exact_match/strict-match": 0.5, "exact_match/flexible-extract": 0.75},
        "wuneng_arith": {"exact_match": 0.25},
    }
    assert r.stderr == {"gsm8k": {"exact_match/strict-match": 0.1}, "wuneng_arith": {"exact_match": 0.2}}
    assert r.num_samples == {"gsm8k": 4, "wuneng_arith": 4}
    with pytest.raises(ValueError, match="results"):
        summarize_results({"nope": 1})
    assert local_task_names() == ["wuneng_arith"]
