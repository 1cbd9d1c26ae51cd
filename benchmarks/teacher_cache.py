"""Stage 2 with a live teacher vs from cached top-k teacher logits, on CPU, at the 20M benchmark model.

The models of benchmarks/hybrid.py: the Qwen2 teacher (20.06 M parameters, vocabulary 8192) and the WuNeng student
converted from it. Random token rows (seeded) of --seq tokens. Three processes (run by this script, so that each
peak resident memory is its own):

    build    the teacher writes the top-k cache of every row (wuneng.train.teacher_cache.build_teacher_cache) and
             the student is saved; reports the build time and the cache size on disk
    live     student + teacher in memory: DistillObjective forward + backward + AdamW step (best of --repeats)
    cached   student only, the objective reading the cache: the same step

Reported: seconds per step and tokens/s of live and cached, and each process's peak resident memory (ru_maxrss).

    python benchmarks/teacher_cache.py                     # batch 4 x 512, top-k 64, 1 thread
    python benchmarks/teacher_cache.py --batch 2 --seq 256 --repeats 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rows(args):
    from wuneng.train.data import PackedDataset

    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.repeats + 1)
    ids = torch.randint(0, 8192, (n, args.seq), generator=g)
    return PackedDataset(ids, ids.clone(), torch.ones_like(ids))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_mode(args) -> dict:
    torch.set_num_threads(args.threads)
    from wuneng.train.stages import DistillObjective

    work = Path(args.work)
    rows = _rows(args)
    if args.mode == "build":
        sys.path.insert(0, str(Path(__file__).parent))
        from hybrid import build_models

        from wuneng.train.teacher_cache import build_teacher_cache, teacher_fingerprint

        models = build_models(0)
        teacher, student = models["teacher"], models["wuneng"]
        teacher.save_pretrained(work / "teacher")
        student.save_pretrained(work / "student")
        start = time.perf_counter()
        build_teacher_cache(
            teacher,
            rows.input_ids,
            rows.attention_mask,
            work / "cache",
            top_k=args.top_k,
            teacher_id=teacher_fingerprint(teacher),
            batch_size=args.batch,
        )
        size = sum(f.stat().st_size for f in (work / "cache").iterdir())
        return {"build_s": time.perf_counter() - start, "cache_mib": size / 2**20, "peak_mib": _peak_mib()}

    from transformers import AutoModelForCausalLM

    import wuneng.models  # noqa: F401

    student = AutoModelForCausalLM.from_pretrained(str(work / "student"), local_files_only=True)
    student.train()
    if args.mode == "live":
        teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), local_files_only=True).eval()
        teacher.requires_grad_(False)
        objective = DistillObjective(student, teacher, chunk_tokens=4096)
    else:
        from wuneng.train.teacher_cache import TeacherLogitCache

        objective = DistillObjective(student, None, teacher_cache=TeacherLogitCache(work / "cache"), chunk_tokens=4096)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for r in range(args.repeats + 1):  # the first step warms up
        idx = list(range(r * args.batch, (r + 1) * args.batch))
        batch = {**rows.batch(idx), "row_index": torch.tensor(idx)}
        start = time.perf_counter()
        objective(batch)["loss_sum"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = min(times[1:])
    return {"step_s": step, "tokens_per_s": args.batch * args.seq / step, "peak_mib": _peak_mib()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["build", "live", "cached"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for mode in ("build", "live", "cached"):
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode, "--work", work]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            print(mode, results[mode], flush=True)
        live, cached = results["live"], results["cached"]
        print(
            f"batch {args.batch} x {args.seq}, top-k {args.top_k}, {args.threads} thread(s): "
            f"step {live['step_s']:.2f} s live / {cached['step_s']:.2f} s cached "
            f"({live['step_s'] / cached['step_s']:.2f}x); peak RSS {live['peak_mib']:.0f} / {cached['peak_mib']:.0f} MiB; "
            f"cache build {results['build']['build_s']:.1f} s, {results['build']['cache_mib']:.1f} MiB on disk"
        )


if __name__ == "__main__":
    main()
