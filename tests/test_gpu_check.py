"""scripts/gpu_check.sh, the GPU check of issue 19, run end to end on the CPU (``--cpu``: tiny sizes, no wheels, the
CUDA tests collected and skipped), so that the script cannot rot between the sessions that are lent a GPU machine.
The JSON it writes must hold every section with a status, and numbers where the CPU can give them; a failing and a
hanging section are recorded while the others still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
SECTIONS = ["environment", "fla_accuracy", "cuda_tests", "train_stages", "throughput_train", "throughput_decode",
            "two_process"]  # fmt: skip
STATUSES = {"ok", "failed", "partial", "skipped", "timeout"}


def run_check(out: Path, *args: str, inject: str = "", fresh: bool = False, timeout: float = 600):
    """Run the script with --cpu; (the finished process, the JSON report). ``fresh``: each section in a fresh
    interpreter, as on a GPU machine, instead of a process forked from the preloaded server."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1", GPU_CHECK_INJECT=inject,
               GPU_CHECK_FRESH_PROCESS="1" if fresh else "0")  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").stat().st_size > 0
    return proc, report


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_cpu_dry_run_fills_every_section(tmp_path):
    """About 50-100 s on two shared cores (each section is a child process; the imports are paid once)."""
    _, report = run_check(tmp_path / "out", "--budget", "400")
    sections = report["sections"]
    assert report["mode"] == "cpu" and list(sections) == SECTIONS
    assert all(s["status"] in STATUSES and isinstance(s["seconds"], float) for s in sections.values())

    env = sections["environment"]
    assert env["status"] == "ok" and env["cuda_available"] is False and env["wuneng_file"].startswith(str(REPO / "src"))
    assert env["wheels"] == "skipped: --cpu"
    assert sections["fla_accuracy"]["status"] == "skipped"

    tests = sections["cuda_tests"]  # collected (their imports ran) and all skipped without CUDA
    assert tests["status"] == "skipped" and tests["total"] >= 40
    assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": tests["total"]}
    names = {t["name"] for t in tests["tests"]}
    assert any("test_cuda_wkv7" in n for n in names) and any("test_cuda_models" in n for n in names)
    assert any("test_cuda_fla_matches_reference" in n for n in names)

    stages = sections["train_stages"]
    assert stages["status"] == "ok" and list(stages["stages"]) == ["align", "distill", "sft"]
    for stage in stages["stages"].values():
        assert stage["status"] == "ok" and len(stage["losses"]) == 2 and all(map(math.isfinite, stage["losses"]))
        assert stage["changed_tensors"] > 0

    train = sections["throughput_train"]
    assert train["status"] == "ok" and train["config"]["autocast"] == "bf16"
    for name in ("teacher", "wuneng", "arwkv", "rwkv7"):
        entry = train["models"][name]
        assert entry["status"] == "ok" and positive(entry["tokens_per_s"]) and positive(entry["parameters"])
        assert entry["peak_memory_bytes"] is None  # CUDA only
    assert train["models"]["fla_rwkv7"]["status"] == "skipped" and positive(train["models"]["fla_rwkv7"]["parameters"])
    assert positive(train["ratios"]["wuneng/teacher"]) and positive(train["ratios"]["arwkv/teacher"])
    assert train["ratios"]["rwkv7/fla_rwkv7"] is None
    assert set(train["targets"]) == {"wuneng/teacher", "rwkv7/fla_rwkv7"}
    assert train["targets"]["wuneng/teacher"]["met"] in (True, False)

    decode = sections["throughput_decode"]
    assert decode["status"] == "ok"
    settings = {(r["model"], r["batch"], r["context"]) for r in decode["runs"]}
    assert settings == {(m, b, c) for m in ("teacher", "wuneng", "arwkv", "rwkv7") for b in (1, 4) for c in (32, 96)}
    assert all(r["status"] == "ok" and positive(r["tokens_per_s"]) for r in decode["runs"])

    ddp = sections["two_process"]
    assert ddp["status"] == "ok" and ddp["world_size"] == 2 and len(ddp["losses"]) == 3
    fsdp = ddp["fsdp"]  # distributed.strategy fsdp (distill), 2 processes on gloo
    assert fsdp["status"] == "ok" and fsdp["world_size"] == 2 and len(fsdp["losses"]) == 3
    assert report["summary"] == {"ok": 5, "skipped": 2}


@pytest.mark.slow
def test_a_failing_and_a_hanging_section_are_recorded(tmp_path):
    """environment raises, fla_accuracy hangs and is killed at its limit (20 s in --cpu mode): the script still ends
    with exit 0 and a JSON naming each outcome (about 35 s). Each section in a fresh interpreter (the GPU mode's
    way), so that path runs too."""
    proc, report = run_check(tmp_path / "out", "--only", "environment,fla_accuracy",
                             inject="environment:fail,fla_accuracy:hang", fresh=True, timeout=180)  # fmt: skip
    sections = report["sections"]
    assert list(sections) == SECTIONS
    assert sections["environment"]["status"] == "failed" and "injected" in sections["environment"]["error"]
    assert (
        sections["fla_accuracy"]["status"] == "timeout" and "killed at its limit" in sections["fla_accuracy"]["error"]
    )
    assert 15 <= sections["fla_accuracy"]["seconds"] <= 30
    assert all(sections[n] == {"status": "skipped", "reason": "not in --only"} for n in SECTIONS[2:])
    assert report["summary"] == {"failed": 1, "timeout": 1, "skipped": 5}
    assert "environment: failed" in proc.stdout and "fla_accuracy: timeout" in proc.stdout
