"""Peak resident memory of ``wuneng convert`` (issue 13 item 6), measured in fresh processes.

Child processes, one after the other, each reporting its own peak resident set (``VmHWM`` of
/proc/self/status, Linux):

    teacher   builds a Qwen2 teacher with random weights in the teacher dtype (default bfloat16) and saves it
              (safetensors) into a temporary folder, and a tiny teacher of the same architecture (64 wide, 2
              layers, 1,000-token vocabulary, < 1 MB); not measured
    idle      imports what a conversion imports (torch, transformers' Qwen2 model, wuneng.convert) and exits
    baseline  the same imports, then converts the tiny teacher with the same options (load, convert, save):
              the Python/torch baseline of the conversion code (the libraries' code pages that loading,
              converting and saving touch: ~40 MB of libtorch_cpu.so beyond the imports), independent of the
              model's size
    convert   the same imports, then ``wuneng.convert.convert_checkpoint(teacher_dir, out_dir, **options)``:
              loads the teacher, converts it and saves the student, nothing else

The bound (issue 13): peak(convert) <= peak(baseline) + (1 + slack) * (teacher bytes + new parameter bytes), with
slack 0.15; teacher bytes are the tensors of the teacher's checkpoint, new parameter bytes those of the student's
checkpoint that the teacher does not have (both read from the safetensors headers, in the saved dtype). The
resident set counts the teacher's safetensors file pages mapped by the loader (they are the teacher's bytes).
``--check`` exits 1 when the bound is exceeded. The printout also gives the excess over the imports-only idle
process.

    python benchmarks/convert_memory.py                        # Qwen2.5-0.5B shapes, bf16, default options
    python benchmarks/convert_memory.py --shape small --check  # ~160 MB teacher (the slow test's)
    python benchmarks/convert_memory.py --arwkv                # ARWKV replacement layers
    PYTHONPATH=/path/to/other/src python benchmarks/convert_memory.py   # another source tree (children inherit it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

#: teacher shapes: Qwen2.5-0.5B's (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936,
#: tied embeddings) and a small one of ~160 MB in bf16 for the test
SHAPES = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=640,
        intermediate_size=3456,
        num_hidden_layers=8,
        num_attention_heads=10,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}
TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
DTYPES = ("bfloat16", "float16", "float32")
SLACK = 0.15


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# -- the children ---------------------------------------------------------------------------------------------
def _child_teacher(out_dir: str, shape: str, dtype: str, seed: int) -> dict:
    """Save the teacher of ``shape`` into ``out_dir`` and the tiny one into ``out_dir``-tiny."""
    _save_teacher(out_dir + "-tiny", TINY, dtype, seed)
    return _save_teacher(out_dir, SHAPES[shape], dtype, seed)


def _save_teacher(out_dir: str, shapes: dict, dtype: str, seed: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shapes)
    with torch.device("meta"):
        teacher = Qwen2ForCausalLM(config)
    teacher = teacher.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():  # random weights of the scale of a trained model (norm weights around 1)
        for name, p in teacher.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.02 * torch.randn(p.shape))
    teacher.model.rotary_emb = type(teacher.model.rotary_emb)(config=config)
    teacher.tie_weights()
    teacher.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in teacher.parameters())}


def _child_idle() -> dict:
    import torch  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import wuneng.convert  # noqa: F401

    return {}


def _child_convert(teacher_dir: str, out_dir: str, options: dict) -> dict:
    import torch  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import wuneng.convert
    from wuneng.convert import convert_checkpoint

    start = time.perf_counter()
    model = convert_checkpoint(teacher_dir, out_dir, **_options(options))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "wuneng": os.path.dirname(wuneng.convert.__file__),
        "student_params": sum(p.numel() for p in model.parameters()),
    }


def _options(options: dict) -> dict:
    import torch

    if "dtype" in options:
        options = dict(options, dtype=getattr(torch, options["dtype"]))
    return options


def _run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint_bytes(path: str) -> dict:
    """{tensor name: bytes} of a safetensors checkpoint folder (headers only)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sizes = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                numel = 1
                for n in sl.get_shape():
                    numel *= n
                itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}[sl.get_dtype()]
                sizes[key] = numel * itemsize
    return sizes


def measure(
    shape: str = "qwen2.5-0.5b",
    dtype: str = "bfloat16",
    workdir: str | None = None,
    seed: int = 0,
    slack: float = SLACK,
    with_idle: bool = True,
    build_in_process: bool = False,
    **options,
) -> dict:
    """Build the teacher, then measure the idle, the baseline and the converting process; returns the numbers
    and the bound. ``build_in_process``: build the teachers in this process (a test that has imported torch
    already) instead of a child; ``with_idle=False`` skips the imports-only process."""
    tmp = tempfile.mkdtemp(prefix="convert-memory-", dir=workdir)
    teacher_dir, out_dir = os.path.join(tmp, "teacher"), os.path.join(tmp, "student")
    try:
        t0 = time.perf_counter()
        if build_in_process:
            made = _child_teacher(teacher_dir, shape, dtype, seed)
        else:
            made = _run_child("teacher", teacher_dir, shape, dtype, str(seed))
        build_s = time.perf_counter() - t0
        idle = _run_child("idle") if with_idle else {"peak_rss": float("nan")}
        base = _run_child("convert", teacher_dir + "-tiny", out_dir + "-tiny", json.dumps(options))
        conv = _run_child("convert", teacher_dir, out_dir, json.dumps(options))
        teacher_sizes, student_sizes = checkpoint_bytes(teacher_dir), checkpoint_bytes(out_dir)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    teacher_bytes = sum(teacher_sizes.values())
    new_bytes = sum(b for k, b in student_sizes.items() if k not in teacher_sizes)
    bound = base["peak_rss"] + (1 + slack) * (teacher_bytes + new_bytes)
    return {
        "shape": shape,
        "dtype": dtype,
        "options": options,
        "teacher_params": made["params"],
        "student_params": conv["student_params"],
        "teacher_bytes": teacher_bytes,
        "new_bytes": new_bytes,
        "idle_peak_rss": idle["peak_rss"],
        "baseline_peak_rss": base["peak_rss"],
        "convert_peak_rss": conv["peak_rss"],
        "convert_seconds": conv["seconds"],
        "teacher_build_seconds": build_s,
        "bound": bound,
        "slack": slack,
        "within_bound": conv["peak_rss"] <= bound,
        "wuneng": conv["wuneng"],
        # what the conversion added above the baseline (above the imports-only idle process), as a multiple of
        # teacher + new bytes
        "ratio": (conv["peak_rss"] - base["peak_rss"]) / (teacher_bytes + new_bytes),
        "ratio_over_idle": (conv["peak_rss"] - idle["peak_rss"]) / (teacher_bytes + new_bytes),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the teacher's dtype")
    parser.add_argument("--arwkv", action="store_true", help="convert with --arwkv (attention=False)")
    parser.add_argument("--fusion", default=None, help="fusion option of the conversion (default: the library's)")
    parser.add_argument("--to-dtype", default=None, choices=DTYPES, help="dtype option of the conversion")
    parser.add_argument("--workdir", default=None, help="where the temporary teacher/student folders go")
    parser.add_argument("--slack", type=float, default=SLACK)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when the peak exceeds the bound")
    args = parser.parse_args(argv)
    options = {}
    if args.arwkv:
        options["attention"] = False
    if args.fusion:
        options["fusion"] = args.fusion
    if args.to_dtype:
        options["dtype"] = args.to_dtype
    r = measure(args.shape, args.dtype, args.workdir, slack=args.slack, **options)
    print(f"wuneng from {r['wuneng']}")
    print(f"teacher {args.shape} ({r['teacher_params']:,} parameters, {args.dtype}), options {options or 'default'}")
    print(f"  teacher bytes           {_mib(r['teacher_bytes'])}")
    print(f"  new parameter bytes     {_mib(r['new_bytes'])}  (student {r['student_params']:,} parameters)")
    print(f"  idle process peak RSS   {_mib(r['idle_peak_rss'])}  (imports only)")
    print(f"  baseline peak RSS       {_mib(r['baseline_peak_rss'])}  (imports, then converting the tiny teacher)")
    print(f"  convert peak RSS        {_mib(r['convert_peak_rss'])}  ({r['convert_seconds']:.1f} s)")
    print(
        f"  bound baseline + {1 + r['slack']:.2f} x (teacher + new) = {_mib(r['bound'])}: "
        f"{'within' if r['within_bound'] else 'EXCEEDED'}"
    )
    print(
        f"  (peak - baseline) / (teacher + new) = {r['ratio']:.2f}; (peak - idle) / (teacher + new) = "
        f"{r['ratio_over_idle']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 1 if args.check and not r["within_bound"] else 0


def _child_main(argv) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "teacher":
        out = _child_teacher(rest[0], rest[1], rest[2], int(rest[3]))
    elif kind == "idle":
        out = _child_idle()
    elif kind == "convert":
        out = _child_convert(rest[0], rest[1], json.loads(rest[2]))
    else:
        raise SystemExit(f"unknown child {kind!r}")
    out["peak_rss"] = _peak_rss_bytes()
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        sys.exit(main())
