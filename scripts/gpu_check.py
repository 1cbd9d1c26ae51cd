"""The GPU check of issue 19, run by scripts/gpu_check.sh (see benchmarks/README.md, "GPU check").

The orchestrator runs each section in a child process of its own (``--section NAME``) with a time limit taken
from one global budget, so that a crash, a CUDA error or a hang in one section is recorded and the others still
run. Every section writes its results as it goes into a JSON file that the orchestrator merges into
``$OUT/gpu_check.json``:

    {"mode": "cuda" | "cpu", "budget_s", "elapsed_s", "sections": {NAME: {"status": ..., "seconds": ..., ...}}}

status: "ok", "failed" (error says why), "partial" (some measurements failed or did not fit the budget),
"skipped" (reason says why) or "timeout" (killed at its limit; what it had written is kept).

Sections, in the order they run:

    environment        versions, the GPU, whether fla / the C kernels are importable, the wheels installed
    fla_accuracy       fla's chunk_rwkv7 through wkv7(impl="auto") against the float64 oracle: relative errors
                       of outputs, final states and gradients (numbers only; the CUDA tests assert thresholds)
    cuda_tests         pytest over tests/cuda and the CUDA tests of tests/ops and tests/models (each outcome)
    train_stages       `wuneng train` align -> distill -> sft with mixed_precision bf16 on a tiny WuNeng model
    throughput_train   training tokens/s (bf16 autocast, AdamW) and peak memory: the Qwen2 teacher at
                       Qwen2.5-0.5B shapes, WuNeng and ARWKV converted from it, RWKV-7 and fla's RWKV-7
    throughput_decode  decode tokens/s (bf16 parameters) at batch 1 and 32 after 2048 and 16384 tokens, peak memory
    two_process        DDP, then FSDP (distributed.strategy fsdp), with 2 processes: on 2 GPUs when there are 2,
                       on the CPU (gloo) in --cpu mode, else skipped with the reason

--cpu runs the same code on the CPU with tiny sizes (the dry run of tests/test_gpu_check.py). GPU_CHECK_INJECT
(e.g. "environment:fail,fla_accuracy:hang") makes sections fail or hang, for the test of the guards.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "fla_accuracy", "cuda_tests", "train_stages", "throughput_train", "throughput_decode",
            "two_process")  # fmt: skip
# Longest time each section may take (seconds), before the global budget's own limit.
CAPS = {
    # cuda: 470 s in all against the 450 s budget, so only a run where every section takes its whole limit loses
    # the last section's end
    "cuda": {"environment": 45, "fla_accuracy": 45, "cuda_tests": 130, "train_stages": 60, "throughput_train": 100,
             "throughput_decode": 90, "two_process": 45},
    "cpu": {"environment": 90, "fla_accuracy": 20, "cuda_tests": 90, "train_stages": 90, "throughput_train": 90,
            "throughput_decode": 90, "two_process": 90},  # generous: a loaded CI machine must not time out the dry run
}  # fmt: skip
DEFAULT_BUDGET = {"cuda": 450.0, "cpu": 400.0}

# Qwen2.5-0.5B shapes (random weights) on the GPU; a tiny model of the same structure on the CPU.
SIZES = {
    "cuda": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_size=64, train_batch=4, train_len=2048,
                 train_steps=3, decode_batches=(1, 32), decode_contexts=(2048, 16384), decode_steps=16,
                 prefill_chunk=2048),
    "cpu": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_size=16, train_batch=2, train_len=64, train_steps=2,
                decode_batches=(1, 4), decode_contexts=(32, 96), decode_steps=4, prefill_chunk=64),
}  # fmt: skip
TARGETS = {"wuneng/teacher": 0.8, "rwkv7/fla_rwkv7": 0.9}  # issue 19: training tokens/s ratios
CUDA_TEST_PATHS = ["tests/cuda", "tests/ops/test_wkv7.py::test_cuda_fla_matches_reference",
                   "tests/models/test_rwkv7.py::test_cuda_matches_cpu"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ results file
class Result(dict):
    """A section's results, written to ``path`` (temp name, then rename) at every ``save()``."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def log(msg: str, log_file: Path | None = None) -> None:
    line = f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log_file is not None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# ------------------------------------------------------------------------------------------------ orchestrator
def orchestrate(args) -> int:
    mode = "cpu" if args.cpu else "cuda"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "gpu_check.log"
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET[mode]
    start = time.time()
    deadline = start + budget
    report = {"schema": 1, "mode": mode, "budget_s": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv), "sections": {}}  # fmt: skip
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        raise SystemExit(
            f"gpu_check: --only: unknown section(s) {sorted(only - set(SECTIONS))}; use {','.join(SECTIONS)}"
        )
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    # Each section runs in a child process of its own, so that a crash or a hang stays in its section. On the CPU
    # the children fork from a server that imported torch / transformers / wuneng once. With CUDA each child
    # becomes a fresh interpreter (exec): CUDA cannot be used in a child forked after the CUDA driver was
    # initialised, which any imported library may do (torch.cuda.is_available() alone does, without NVML).
    fresh = mode == "cuda" or os.environ.get("GPU_CHECK_FRESH_PROCESS") == "1"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([] if fresh else PRELOAD)
    for name in SECTIONS:
        if name not in only:
            report["sections"][name] = {"status": "skipped", "reason": "not in --only"}
            continue
        left = deadline - time.time()
        limit = min(CAPS[mode][name], left - 5)
        if limit < 5:
            report["sections"][name] = {"status": "skipped", "reason": f"global budget spent ({budget:.0f} s)"}
            log(f"{name}: skipped, budget spent", log_file)
            write_json(out / "gpu_check.json", report)
            continue
        log(f"{name}: start (limit {limit:.0f} s)", log_file)
        result_path = scratch / f"{name}.json"
        t0 = time.time()
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(f"\n===== {name} =====\n")
        sys.stdout.flush()
        proc = ctx.Process(target=section_child, args=(name, mode, str(result_path), time.time() + limit - 3, str(out),
                                                       str(log_file), fresh))  # fmt: skip
        proc.start()
        proc.join(timeout=limit)
        rc = proc.exitcode
        if proc.is_alive():
            try:  # the section and anything it started (pytest, torchrun): it leads a process group of its own
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join()
            rc = None
        section = json.loads(result_path.read_text()) if result_path.exists() else {}
        if rc is None:
            section["status"] = "timeout"
            section["error"] = f"killed at its limit of {limit:.0f} s"
        elif section.get("status") in (None, "running") or (rc != 0 and section.get("status") == "ok"):
            section["status"] = "failed"  # died (a signal, os._exit) or ended without a verdict
            section.setdefault("error", f"section process exited {rc} without a result (see the log)")
        section["seconds"] = round(time.time() - t0, 1)
        report["sections"][name] = section
        log(f"{name}: {section['status']} in {section['seconds']} s"
            + (f" ({section.get('error') or section.get('reason')})" if section["status"] != "ok" else ""), log_file)  # fmt: skip
        report["elapsed_s"] = round(time.time() - start, 1)
        write_json(out / "gpu_check.json", report)
    shutil.rmtree(scratch, ignore_errors=True)
    report["elapsed_s"] = round(time.time() - start, 1)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    counts: dict = {}
    for section in report["sections"].values():
        counts[section["status"]] = counts.get(section["status"], 0) + 1
    report["summary"] = counts
    write_json(out / "gpu_check.json", report)
    log(f"done in {report['elapsed_s']} s: {counts}", log_file)
    log(summary_text(report), log_file)
    return 0


def summary_text(report: dict) -> str:
    """A few lines for the console: the test outcomes and the throughput ratios."""
    lines = []
    tests = report["sections"].get("cuda_tests", {})
    if "counts" in tests:
        lines.append(f"cuda tests: {tests['counts']}")
        lines += [f"  FAILED {t['name']}: {t.get('message', '')[:200]}" for t in tests.get("tests", [])
                  if t["outcome"] in ("failed", "error")]  # fmt: skip
    train = report["sections"].get("throughput_train", {})
    for name, entry in train.get("models", {}).items():
        lines.append(f"train {name}: {entry.get('tokens_per_s')} tok/s, peak {entry.get('peak_memory_bytes')} B"
                     + (f" [{entry.get('status')}: {entry.get('error', '')[:120]}]" if entry.get("status") != "ok" else ""))  # fmt: skip
    for key, value in train.get("ratios", {}).items():
        lines.append(f"ratio {key}: {value}")
    for run in report["sections"].get("throughput_decode", {}).get("runs", []):
        lines.append(f"decode {run['model']} B{run['batch']} ctx{run['context']}: {run.get('tokens_per_s')} tok/s"
                     f" ({run.get('status')})")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ helpers
def device_of(mode: str):
    import torch

    if mode == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (use --cpu for the dry run)")
        return torch.device("cuda")
    return torch.device("cpu")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device):
    """torch.cuda.max_memory_allocated on CUDA; None on the CPU (no allocator statistics there)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds_left(deadline: float) -> float:
    return deadline - time.time()


# ------------------------------------------------------------------------------------------------ sections
def section_environment(res: Result, mode: str, deadline: float, out: Path) -> None:
    import torch
    import transformers

    import wuneng
    from wuneng.ops.wkv7.cpu import cpu_kernel_available, cpu_kernel_error
    from wuneng.ops.wkv7.dispatch import fla_available

    res.update(python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
               transformers=transformers.__version__, wuneng_file=wuneng.__file__,
               wheels=os.environ.get("GPU_CHECK_WHEELS", "not run through gpu_check.sh"),
               machine_versions=os.environ.get("GPU_CHECK_MACHINE_VERSIONS"), transformers_file=transformers.__file__,
               cuda_available=torch.cuda.is_available(), cpu_count=os.cpu_count(),
               cpu_kernel_available=cpu_kernel_available(), cpu_kernel_error=cpu_kernel_error())  # fmt: skip
    for name in ("triton", "fla", "accelerate", "huggingface_hub", "tokenizers", "pytest"):
        try:
            module = __import__(name)
            res[name] = getattr(module, "__version__", "importable")
        except Exception as exc:  # noqa: BLE001 - recorded
            res[name] = f"not importable: {error_text(exc)}"
    res["fla_available"] = fla_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        res.update(gpu_count=torch.cuda.device_count(), gpu=props.name, gpu_memory_bytes=props.total_memory,
                   bf16_supported=torch.cuda.is_bf16_supported(), torch_cuda=torch.version.cuda)  # fmt: skip
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            x @ x
        torch.cuda.synchronize()
        res["bf16_matmul_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - t0) / 1e12, 1)
    else:
        res["gpu_count"] = 0
    if mode == "cuda" and not res["fla_available"]:
        res["warning"] = "fla is not importable: wkv7(impl='auto') falls back to the chunked form on CUDA"
    res["status"] = "ok"


def _fla_inputs(B, T, H, N, seed, device, dtype):
    """RWKV-7-shaped WKV inputs (as tests/ops/test_wkv7.py builds them), float64 on the CPU and ``dtype`` on
    ``device``; the initial state [B, H, N, N] in the S[i, j] = (value i, key j) layout."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    seq = {"r": randn(B, T, H, N) * 0.5, "log_w": -0.6065306597126334 * torch.sigmoid(randn(B, T, H, N)),
           "k": randn(B, T, H, N) * 0.5, "v": randn(B, T, H, N), "a": -kk, "b": kk * alpha}  # fmt: skip
    s0 = randn(B, H, N, N) * 0.3
    low = {n: (t.float() if n == "log_w" else t.to(dtype)).to(device) for n, t in seq.items()}
    return seq, s0, low


def section_fla_accuracy(res: Result, mode: str, deadline: float, out: Path) -> None:
    """Relative errors (||x - ref|| / ||ref||) of fla through wkv7(impl="auto") against the float64 chunked form
    on the CPU (equal to the sequential oracle to 1e-12, tests/ops/test_wkv7.py), on the inputs as rounded."""
    import torch

    from wuneng.ops.wkv7 import wkv7, wkv7_chunked
    from wuneng.ops.wkv7.dispatch import fla_available

    if mode == "cpu":
        res.update(status="skipped", reason="--cpu: fla's kernels need CUDA")
        return
    if not fla_available():
        res.update(status="skipped", reason="fla is not importable")
        return
    names = ("r", "log_w", "k", "v", "a", "b")
    res["cases"] = []
    for dtype, T in ((torch.float32, 256), (torch.bfloat16, 256), (torch.float32, 4096), (torch.bfloat16, 4096)):
        if seconds_left(deadline) < 10:
            break
        case = {"dtype": str(dtype), "B": 2, "T": T, "H": 4, "N": 64}
        try:
            seq, s0, low = _fla_inputs(2, T, 4, 64, seed=T, device="cuda", dtype=dtype)
            rounded = {n: t.double().cpu() for n, t in low.items()}
            leaves64 = [rounded[n].clone().requires_grad_() for n in names] + [s0.clone().requires_grad_()]
            y_ref, s_ref = wkv7_chunked(*leaves64)
            g = torch.Generator().manual_seed(1)
            gy, gs = (
                torch.randn(y_ref.shape, generator=g, dtype=torch.float64),
                torch.randn(s_ref.shape, generator=g, dtype=torch.float64),
            )
            ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
            leaves = [low[n].clone().requires_grad_() for n in names] + [s0.float().cuda().requires_grad_()]
            y, s = wkv7(*leaves)  # impl="auto": fla on CUDA
            ((y.double() * gy.cuda()).sum() + (s.double() * gs.cuda()).sum()).backward()
            rel = lambda x, ref: float((x.detach().double().cpu() - ref.detach()).norm() / ref.detach().norm())  # noqa: E731
            case.update(y=rel(y, y_ref), state=rel(s, s_ref),
                        grads={n: rel(l.grad, r.grad) for n, l, r in zip((*names, "initial_state"), leaves, leaves64)})  # fmt: skip
            case["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded
            case.update(status="failed", error=error_text(exc))
        res["cases"].append(case)
        res.save()
    statuses = {c["status"] for c in res["cases"]}
    res["status"] = (
        "ok" if statuses == {"ok"} and len(res["cases"]) == 4 else ("failed" if statuses == {"failed"} else "partial")
    )


class TestRecorder:
    """A pytest plugin that records every test's outcome into the section's results as it ends (saved at once, so a
    section killed at its time limit keeps the outcomes so far)."""

    def __init__(self, res: Result):
        self.res = res

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":  # setup/teardown count only when they fail or skip
            outcome = {"passed": "passed", "skipped": "skipped"}.get(report.outcome, "failed")
            if report.when != "call" and report.outcome == "failed":
                outcome = "error"
            message = ""
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                message = str(report.longrepr[2])
            elif report.outcome != "passed":
                message = str(report.longrepr)[-1500:]
            self.res["tests"].append({"name": report.nodeid, "outcome": outcome, "when": report.when,
                                      "seconds": round(report.duration, 3), "message": message})  # fmt: skip
            self.res["counts"][outcome] += 1
            self.res["total"] = len(self.res["tests"])
            self.res.save()

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.res["tests"].append({"name": report.nodeid, "outcome": "error", "when": "collect", "seconds": 0.0,
                                      "message": str(report.longrepr)[-1500:]})  # fmt: skip
            self.res["counts"]["error"] += 1
            self.res["total"] = len(self.res["tests"])
            self.res.save()


def section_cuda_tests(res: Result, mode: str, deadline: float, out: Path) -> None:
    """pytest over the CUDA tests, in this process (torch and transformers are imported already; the section's time
    limit bounds it), each outcome recorded as it ends. In --cpu mode the same files are collected and every test is
    skipped (their imports and collection still run)."""
    import pytest

    argv = ["-q", "-p", "no:cacheprovider", "-rfEs", "--durations=15", *CUDA_TEST_PATHS]
    res.update(command="pytest " + " ".join(argv), tests=[], total=0,
               counts={"passed": 0, "failed": 0, "error": 0, "skipped": 0})  # fmt: skip
    res.save()
    res["exit_code"] = int(pytest.main(argv, plugins=[TestRecorder(res)]))
    sys.stdout.flush()
    counts = res["counts"]
    if not res["tests"]:
        res["status"] = "failed"
        res["error"] = f"no test ran (pytest exit {res['exit_code']})"
    elif counts["failed"] or counts["error"] or res["exit_code"] not in (0, 5):
        res["status"] = "failed"
        res["error"] = f"{counts['failed']} failed, {counts['error']} errors (pytest exit {res['exit_code']})"
    elif counts["passed"] == 0:
        res["status"] = "skipped"
        res["reason"] = "every CUDA test skipped" + (" (--cpu)" if mode == "cpu" else "")
    else:
        res["status"] = "ok"


def _tiny_training_folders(root: Path):
    """A tiny Qwen2 teacher and the WuNeng student converted from it (both with the byte tokenizer), text and chat
    data; returns (teacher folder, student folder, text file, chat file)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wuneng.convert import convert_teacher
    from wuneng.tokenization import ByteLevelTokenizer

    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                           tie_word_embeddings=True))  # fmt: skip
    student = convert_teacher(teacher, middle_heads=2)
    tok = ByteLevelTokenizer()
    for folder, model in ((root / "teacher", teacher), (root / "student", student)):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    texts = ["the cat sat on the mat. the cat sat on the mat.", "one two three four five six seven",
             "hello world, hello world, hello world"] * 8  # fmt: skip
    chats = [{"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(6) for b in range(4)]  # fmt: skip
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return root / "teacher", root / "student", root / "text.jsonl", root / "chat.jsonl"


def _stage_config(stage: str, model: Path, data: Path, teacher: Path | None, steps: int) -> dict:
    cfg = {"stage": stage, "model": {"path": str(model)}, "mixed_precision": "bf16", "progress": False,
           "tensorboard": False, "micro_batch_size": 2, "max_steps": steps, "save_every": 1000, "log_every": 1,
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
           "data": {"sources": [str(data)], "seq_len": 48 if stage == "sft" else 32}}  # fmt: skip
    if teacher is not None:
        cfg["teacher"] = str(teacher)
    return cfg


def section_train_stages(res: Result, mode: str, deadline: float, out: Path) -> None:
    """`wuneng train` (the CLI, in this process) align -> distill -> sft, each from the previous stage's final
    model, with mixed_precision bf16; each must log finite losses and save finite weights that moved."""
    import torch
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from wuneng.cli import app

    root = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    teacher, model, text, chat = _tiny_training_folders(root)
    res["stages"] = {}
    steps = 4 if mode == "cuda" else 2
    for stage in ("align", "distill", "sft"):
        entry = res["stages"][stage] = {"status": "running"}
        if seconds_left(deadline) < 5:
            entry.update(status="skipped", reason="section time spent")
            continue
        try:
            cfg = _stage_config(
                stage, model, chat if stage == "sft" else text, teacher if stage != "sft" else None, steps
            )
            path = root / f"{stage}.yaml"
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            run = root / f"run_{stage}"
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = CliRunner().invoke(app, ["train", str(path), "--output-dir", str(run)])
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["exit_code"] = result.exit_code
            if result.exit_code != 0:
                raise RuntimeError(f"exit {result.exit_code}: {result.output[-1500:]} {result.exception!r}")
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
            entry["losses"] = losses
            entry["cuda_peak_memory_bytes"] = (
                int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
            )
            before = load_file(str(model / "model.safetensors"))
            after = load_file(str(run / "final" / "model.safetensors"))
            moved = [k for k in before if k in after and not torch.equal(before[k], after[k])]
            problems = []
            if len(losses) != steps or not all(math.isfinite(x) for x in losses):
                problems.append(f"losses {losses} (expected {steps} finite)")
            if not all(torch.isfinite(t).all() for t in after.values()):
                problems.append("non-finite weights saved")
            if not moved:
                problems.append("no weight changed")
            entry["changed_tensors"] = len(moved)
            entry["status"] = "failed" if problems else "ok"
            if problems:
                entry["error"] = "; ".join(problems)
            model = run / "final"  # the next stage starts from this one
        except Exception as exc:  # noqa: BLE001 - recorded
            entry.update(status="failed", error=error_text(exc))
            traceback.print_exc()
        res.save()
    shutil.rmtree(root, ignore_errors=True)
    statuses = {e["status"] for e in res["stages"].values()}
    res["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    res["status"] = "ok" if statuses == {"ok"} else ("failed" if "ok" not in statuses else "partial")


def _torchrun_train(path: Path, run_dir: Path, overrides: list[str], deadline: float) -> dict:
    """`torchrun --nproc_per_node 2 -m wuneng.cli train PATH` with ``-o`` overrides; its exit code, world size, the
    logged losses, seconds, and status ok when 2 processes logged 3 finite losses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "wuneng.cli", "train", str(path), "--output-dir", str(run_dir),
           *[a for o in overrides for a in ("-o", o)]]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res: dict = {"command": " ".join(cmd[2:])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(5.0, seconds_left(deadline) - 2))  # fmt: skip
    except subprocess.TimeoutExpired:
        return dict(res, status="timeout", error="torchrun ran past the section's time")
    print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n", flush=True)
    res["exit_code"] = proc.returncode
    rows = (
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if proc.returncode == 0
        else []
    )
    start = next((r for r in rows if r.get("event") == "start"), {})
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    res.update(world_size=start.get("world_size"), losses=losses, seconds=round(time.perf_counter() - t0, 2))
    ok = proc.returncode == 0 and start.get("world_size") == 2 and len(losses) == 3 and all(map(math.isfinite, losses))
    res["status"] = "ok" if ok else "failed"
    if not ok:
        res["error"] = (
            f"exit {proc.returncode}, world_size {start.get('world_size')}, losses {losses}: {proc.stderr[-1500:]}"
        )
    return res


def section_two_process(res: Result, mode: str, deadline: float, out: Path) -> None:
    """Two processes (torchrun) of `wuneng train`, bf16: DDP (align) and then FSDP (`distributed.strategy: fsdp`,
    distill, recorded under "fsdp"), on two GPUs when the machine has them; in --cpu mode on the CPU (gloo), so that
    the commands themselves are exercised; skipped on a one-GPU machine."""
    import torch
    import yaml

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    res["gpu_count"] = gpus
    if mode == "cuda" and gpus < 2:
        res.update(status="skipped", reason=f"{gpus} GPU(s): a 2-process CUDA run needs one GPU per process (NCCL "
                   "refuses two ranks on one device); the 2-process code paths (DDP, FSDP) are tested on the CPU in "
                   "CI (tests/train/test_distributed.py, tests/train/test_fsdp.py)")  # fmt: skip
        return
    root = Path(tempfile.mkdtemp(prefix="gpu_check_ddp_"))
    teacher, model, text, _ = _tiny_training_folders(root)
    res["device"] = "cuda" if mode == "cuda" else "cpu (gloo)"
    for stage in ("align", "distill"):
        (root / f"{stage}.yaml").write_text(
            yaml.safe_dump(_stage_config(stage, model, text, teacher, steps=3)), encoding="utf-8"
        )
    res.update(_torchrun_train(root / "align.yaml", root / "run", [], deadline))
    if res["status"] == "ok":  # FSDP2 over the decoder layers (wuneng.train.fsdp), a sharded checkpoint at the end
        fsdp = _torchrun_train(root / "distill.yaml", root / "fsdp", ["distributed.strategy=fsdp"], deadline)
        ckpt = root / "fsdp" / "checkpoints" / "step_00000003" / "distributed_state" / ".metadata"
        if fsdp["status"] == "ok" and not ckpt.is_file():
            fsdp.update(status="failed", error="no sharded checkpoint (distributed_state/) at step 3")
        res["fsdp"] = fsdp
        if fsdp["status"] != "ok":
            res["status"] = "partial"
    shutil.rmtree(root, ignore_errors=True)


# ---- throughput models
def teacher_config(sz: dict):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=sz["vocab_size"], hidden_size=sz["hidden_size"], intermediate_size=sz["intermediate_size"],
                       num_hidden_layers=sz["num_hidden_layers"], num_attention_heads=sz["num_attention_heads"],
                       num_key_value_heads=sz["num_key_value_heads"], max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0, attn_implementation="sdpa")  # fmt: skip


def build_model(name: str, sz: dict, device, seed: int = 0):
    """One model of the comparison on ``device`` (float32 parameters, random weights):

    teacher     transformers Qwen2ForCausalLM (Qwen2.5-0.5B shapes on the GPU)
    wuneng      WuNengForCausalLM.from_teacher(teacher) (defaults: gate fusion, middle heads, state query), its new
                parameters perturbed (0.01 N(0, 1)) so that no zero-initialised path is skipped
    arwkv       from_teacher(teacher, attention=False): RWKV-7 time-mix in every layer
    rwkv7       wuneng RWKV7ForCausalLM of the same width, depth and vocabulary (head size 64, channel-mix 4 C)
    fla_rwkv7   fla.models.RWKV7ForCausalLM with rwkv7's sizes and LoRA ranks
    """
    import torch

    torch.manual_seed(seed)
    if name in ("teacher", "wuneng", "arwkv"):
        from transformers import Qwen2ForCausalLM

        with torch.device(device):
            teacher = Qwen2ForCausalLM(teacher_config(sz))
        if name == "teacher":
            return teacher
        from wuneng.models.wuneng import WuNengForCausalLM

        model = WuNengForCausalLM.from_teacher(teacher, attention=name == "wuneng")
        del teacher
        with torch.no_grad():
            new = model.new_parameter_names()
            for pname, p in model.named_parameters():
                if pname in new:
                    p.add_(0.01 * torch.randn_like(p))
        return model.to(device)
    rwkv_cfg = rwkv7_config(sz)
    if name == "rwkv7":
        from wuneng import RWKV7ForCausalLM

        with torch.device(device):
            return RWKV7ForCausalLM(rwkv_cfg)
    if name == "fla_rwkv7":
        from fla.models.rwkv7 import RWKV7Config as FlaConfig
        from fla.models.rwkv7 import RWKV7ForCausalLM as FlaModel

        cfg = FlaConfig(vocab_size=sz["vocab_size"], hidden_size=sz["hidden_size"], num_hidden_layers=sz["num_hidden_layers"],
                        head_dim=sz["head_size"], intermediate_size=rwkv_cfg.intermediate_size,
                        decay_low_rank_dim=rwkv_cfg.decay_low_rank_dim, a_low_rank_dim=rwkv_cfg.a_low_rank_dim,
                        v_low_rank_dim=rwkv_cfg.v_low_rank_dim, gate_low_rank_dim=rwkv_cfg.gate_low_rank_dim,
                        tie_word_embeddings=False)  # fmt: skip
        with torch.device(device):
            return FlaModel(cfg)
    raise ValueError(f"unknown model {name!r}")


def rwkv7_config(sz: dict):
    from wuneng import RWKV7Config

    return RWKV7Config(vocab_size=sz["vocab_size"], hidden_size=sz["hidden_size"], num_hidden_layers=sz["num_hidden_layers"],
                       head_size=sz["head_size"])  # fmt: skip


TRAIN_MODELS = ("teacher", "wuneng", "rwkv7", "fla_rwkv7", "arwkv")  # the pairs with targets first


def section_throughput_train(res: Result, mode: str, deadline: float, out: Path) -> None:
    """Training tokens/s: forward + backward + AdamW under bf16 autocast (float32 parameters, as `mixed_precision:
    bf16` trains), batch train_batch x train_len, one warm-up step (compilation, autotuning) then the median of
    train_steps steps; peak memory over the timed steps."""
    import torch

    device = device_of(mode)
    sz = SIZES[mode]
    B, T = sz["train_batch"], sz["train_len"]
    res["config"] = {k: v for k, v in sz.items() if not k.startswith("decode")}
    res["config"].update(device=str(device), autocast="bf16", parameters="float32", optimizer="AdamW")
    res["models"] = {}
    for name in TRAIN_MODELS:
        entry = res["models"][name] = {"status": "running"}
        res.save()
        if seconds_left(deadline) < (30 if mode == "cuda" else 3):
            entry.update(status="skipped", reason="section time spent")
            continue
        if name == "fla_rwkv7" and mode == "cpu":
            try:  # the construction runs (the config mapping is exercised); fla's kernels need CUDA
                entry["parameters"] = sum(p.numel() for p in build_model(name, sz, device).parameters())
                entry.update(status="skipped", reason="--cpu: fla's model runs Triton kernels (CUDA only)")
            except Exception as exc:  # noqa: BLE001 - recorded
                entry.update(status="failed", error=error_text(exc))
            continue
        model = opt = None
        try:
            t0 = time.perf_counter()
            model = build_model(name, sz, device).train()
            entry["build_s"] = round(time.perf_counter() - t0, 2)
            entry["parameters"] = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            ids = torch.randint(0, sz["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1)).to(device)
            times = []
            for step in range(1 + sz["train_steps"]):
                if step == 1:
                    reset_peak(device)
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                dt = time.perf_counter() - t0
                if step == 0:
                    entry["first_step_s"] = round(dt, 3)
                else:
                    times.append(dt)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss {loss.item()} at step {step}")
                if seconds_left(deadline) < 2:
                    break
            if not times:
                raise TimeoutError("no timed step fitted the section's time")
            entry.update(step_s=[round(t, 4) for t in times], tokens_per_s=round(B * T / statistics.median(times), 1),
                         peak_memory_bytes=peak_bytes(device), loss=round(loss.item(), 4), status="ok")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - recorded
            entry.update(status="failed", error=error_text(exc))
            traceback.print_exc()
        del model, opt
        free(device)
        res.save()
    rate = {n: e.get("tokens_per_s") for n, e in res["models"].items()}
    ratios = {}
    for num, den in (("wuneng", "teacher"), ("arwkv", "teacher"), ("rwkv7", "fla_rwkv7")):
        ratios[f"{num}/{den}"] = round(rate[num] / rate[den], 3) if rate.get(num) and rate.get(den) else None
    res["ratios"] = ratios
    res["targets"] = {k: {"target": v, "ratio": ratios[k], "met": None if ratios[k] is None else ratios[k] >= v}
                      for k, v in TARGETS.items()}  # fmt: skip
    statuses = {e["status"] for n, e in res["models"].items() if not (mode == "cpu" and n == "fla_rwkv7")}
    res["status"] = "ok" if statuses == {"ok"} else ("failed" if "ok" not in statuses else "partial")


DECODE_MODELS = ("teacher", "wuneng", "rwkv7", "fla_rwkv7", "arwkv")


def section_throughput_decode(res: Result, mode: str, deadline: float, out: Path) -> None:
    """Decode tokens/s with bf16 parameters: prefill ``context`` random tokens in chunks of prefill_chunk (through
    the cache, only the last position's logits), then greedy steps of one token: 2 warm-up steps and the median of
    decode_steps (tokens/s = batch / median step). Peak memory: prefill and decode together. The models are built
    once; the settings run in order (batch, context) = (1, short), (B, short), (1, long), (B, long), every model
    per setting, until the section's time is spent."""
    import torch

    device = device_of(mode)
    sz = SIZES[mode]
    res["config"] = {"decode_batches": list(sz["decode_batches"]), "decode_contexts": list(sz["decode_contexts"]),
                     "decode_steps": sz["decode_steps"], "prefill_chunk": sz["prefill_chunk"], "parameters": "bfloat16",
                     "device": str(device)}  # fmt: skip
    res["models"], res["runs"] = {}, []
    models = {}
    for name in DECODE_MODELS:
        if mode == "cpu" and name == "fla_rwkv7":
            res["models"][name] = {"status": "skipped", "reason": "--cpu: fla's model runs Triton kernels (CUDA only)"}
            continue
        try:
            models[name] = build_model(name, sz, device).to(torch.bfloat16).eval()
            res["models"][name] = {"status": "ok"}
        except Exception as exc:  # noqa: BLE001 - recorded
            res["models"][name] = {"status": "failed", "error": error_text(exc)}
            traceback.print_exc()
        res.save()
    short, long = sz["decode_contexts"]
    one, many = sz["decode_batches"]
    for batch, context in ((one, short), (many, short), (one, long), (many, long)):
        for name, model in models.items():
            run = {"model": name, "batch": batch, "context": context, "status": "running"}
            res["runs"].append(run)
            if seconds_left(deadline) < (8 if mode == "cuda" else 1):
                run.update(status="skipped", reason="section time spent")
                continue
            cache = out_ = None
            try:
                reset_peak(device)
                g = torch.Generator().manual_seed(batch * 100003 + context)
                prompt = torch.randint(0, sz["vocab_size"], (batch, context), generator=g).to(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for i in range(0, context, sz["prefill_chunk"]):
                        out_ = model(input_ids=prompt[:, i : i + sz["prefill_chunk"]], past_key_values=cache,
                                     use_cache=True, logits_to_keep=1)  # fmt: skip
                        cache = out_.past_key_values
                    sync(device)
                    run["prefill_s"] = round(time.perf_counter() - t0, 3)
                    token = out_.logits[:, -1:].argmax(-1)
                    times = []
                    for step in range(2 + sz["decode_steps"]):
                        sync(device)
                        t0 = time.perf_counter()
                        out_ = model(input_ids=token, past_key_values=cache, use_cache=True)
                        cache = out_.past_key_values
                        token = out_.logits[:, -1:].argmax(-1)
                        sync(device)
                        if step >= 2:
                            times.append(time.perf_counter() - t0)
                run.update(tokens_per_s=round(batch / statistics.median(times), 2), step_ms=round(1e3 * statistics.median(times), 3),
                           peak_memory_bytes=peak_bytes(device), status="ok")  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - recorded
                run.update(status="failed", error=error_text(exc))
                traceback.print_exc()
            del cache, out_
            free(device)
            res.save()
    statuses = {r["status"] for r in res["runs"]} | {m["status"] for n, m in res["models"].items()
                                                      if not (mode == "cpu" and n == "fla_rwkv7")}  # fmt: skip
    res["status"] = "ok" if statuses == {"ok"} else ("failed" if "ok" not in statuses else "partial")


SECTION_FUNCTIONS = {
    "environment": section_environment,
    "fla_accuracy": section_fla_accuracy,
    "cuda_tests": section_cuda_tests,
    "train_stages": section_train_stages,
    "throughput_train": section_throughput_train,
    "throughput_decode": section_throughput_decode,
    "two_process": section_two_process,
}


PRELOAD = ["torch", "transformers", "pytest", "transformers.models.qwen2.modeling_qwen2", "safetensors.torch", "accelerate",
           "wuneng", "wuneng.cli", "wuneng.convert", "wuneng.train.loop"]  # fmt: skip


def section_child(name: str, mode: str, result: str, deadline: float, out: str, log_path: str, fresh: bool) -> None:
    """Entry of a section's child process: a process group of its own (killed whole at the time limit), output to
    the log, then :func:`run_section`, in this process or (``fresh``) in a fresh interpreter that replaces it."""
    os.setsid()
    os.chdir(REPO)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fresh:  # same process id and group, same output; nothing inherited but the environment
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), "--section", name, "--mode", mode,
                                  "--result", result, "--deadline", str(deadline), "--out", out])  # fmt: skip
    args = argparse.Namespace(section=name, mode=mode, result=result, deadline=deadline, out=out)
    run_section(args)
    sys.stdout.flush()
    sys.stderr.flush()


def run_section(args) -> int:
    res = Result(Path(args.result))
    res["status"] = "running"
    res.save()
    try:
        import torch

        torch.manual_seed(0)
        if args.mode == "cpu":  # tiny models: more threads only wait on each other (see tests/conftest.py)
            torch.set_num_threads(1)
        injected = dict(item.split(":", 1) for item in os.environ.get("GPU_CHECK_INJECT", "").split(",") if ":" in item)
        if injected.get(args.section) == "fail":  # tests/test_gpu_check.py: one failing section is recorded
            raise RuntimeError("failure injected by GPU_CHECK_INJECT")
        if injected.get(args.section) == "hang":  # ... and a hanging one is killed at its limit
            time.sleep(3600)
        SECTION_FUNCTIONS[args.section](res, args.mode, args.deadline, Path(args.out))
    except Exception as exc:  # noqa: BLE001 - recorded
        traceback.print_exc()
        res.update(status="failed", error=error_text(exc))
    res.save()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"))
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny sizes")
    parser.add_argument("--budget", type=float, default=None, help="global time budget in seconds")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
