"""Where an RWKV-7 prefill's time goes, against the machine's matmul rate measured in the same run.

For each size (random weights, vocabulary 65536, head size 64, float32) one prompt of ``--tokens`` tokens is
prefilled with ``logits_to_keep=1`` (as ``benchmarks/peers.py`` times it), best of ``--repeats``; then one more
prefill runs under ``torch.profiler`` and its CPU time is split into

    projections  the dense matmuls (``aten::mm`` / ``aten::addmm``): r, k, v, o and the channel-mix's key and value,
                 the head's one row
    low-rank     the LoRA maps (``aten::bmm`` / ``aten::baddbmm`` of the batched low-rank bank)
    wkv          the WKV-7 recurrence (the C kernel's autograd function, or the chunked operator)
    read-out     the GroupNorm + bonus pass
    rest         every other op: token shift and mixes, activations, LayerNorms, residual adds, copies

The projections' share gives the rate they ran at (their FLOPs, 2 x weights x tokens, over their time), which is
printed next to the matmul limit ``benchmarks/peers.py`` uses (float32 GFLOP/s of a [1024, C] x [C, 4C] product,
best of 5, measured in this run). The prefill's fraction of its limit is then the product of two factors: the
projections' rate over the limit, and the projections' share of the time. The profiler's own overhead is left
out by reading shares from the profile and the total from the unprofiled runs.

    python benchmarks/prefill_breakdown.py                       # 0.1b and 0.4b, 1024 tokens, 2 threads
    python benchmarks/prefill_breakdown.py --sizes 0.1b --tokens 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import SIZES, VOCAB, best_of, matmul_gflops  # noqa: E402

from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM  # noqa: E402

CATEGORIES = {
    "projections": ("aten::mm", "aten::addmm"),
    "low-rank": ("aten::bmm", "aten::baddbmm"),
    "wkv": ("_CpuWKV7", "_ChunkedWKV7"),
    "read-out": ("_ReadOutCPU",),
}


def category(name: str) -> str:
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "rest"


def dense_weights(model: RWKV7ForCausalLM) -> int:
    """Weights of the block's dense projections (nn.Linear in the layers; the head excluded: one row is kept)."""
    return sum(m.weight.numel() for m in model.model.blocks.modules() if isinstance(m, torch.nn.Linear))


def measure(size: str, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=VOCAB, head_size=64, **SIZES[size])).eval()
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:, :16], logits_to_keep=1)  # warm-up: kernel build, allocator
        seconds = best_of(lambda: model(ids, logits_to_keep=1, use_cache=False), repeats)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, logits_to_keep=1, use_cache=False)
    shares = dict.fromkeys(list(CATEGORIES) + ["rest"], 0.0)
    for evt in prof.key_averages():
        shares[category(evt.key)] += evt.self_cpu_time_total
    total = sum(shares.values())
    shares = {k: v / total for k, v in shares.items()}
    flops = 2 * dense_weights(model) * tokens
    proj_seconds = shares["projections"] * seconds
    gflops = matmul_gflops(model.config.hidden_size)
    non_embed = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.emb.", "head.")))
    limit_tok_s = gflops * 1e9 / (2 * non_embed)
    return {
        "size": size,
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "limit_tok_s": limit_tok_s,
        "shares": shares,
        "proj_gflops": flops / proj_seconds / 1e9,
        "limit_gflops": gflops,
    }


def report(rows: list) -> str:
    cats = list(CATEGORIES) + ["rest"]
    head = ["size", "tokens", "tok/s", "of limit"] + [f"{c} %" for c in cats] + ["proj GFLOP/s", "limit GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        cells = [r["size"], str(r["tokens"]), f"{r['tok_s']:.0f}", f"{r['tok_s'] / r['limit_tok_s']:.0%}"]
        cells += [f"{100 * r['shares'][c]:.1f}" for c in cats]
        cells += [f"{r['proj_gflops']:.0f} ({r['proj_gflops'] / r['limit_gflops']:.0%})", f"{r['limit_gflops']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.1b,0.4b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [measure(s, args.tokens, args.repeats) for s in args.sizes.split(",")]
    print(report(rows))
    load = open("/proc/loadavg").read().split()[:3]
    print(f"threads {args.threads}, load average {' '.join(load)}, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
