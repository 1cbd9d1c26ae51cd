"""One RWKV-7 decoding step (one token per row, a state cache), timed per piece against the machine's streaming rate.

For each size (random weights; head size 64):

    20m     L5-D384, vocabulary 8192 (the 20 M benchmark's shapes, benchmarks/hybrid.py)
    0.1b    L12-D768, vocabulary 65536
    0.4b    L24-D1024, vocabulary 65536

a ``RWKV7ForCausalLM`` decodes ``--steps`` steps after an 8-token prompt with ``logits_to_keep=1`` (as
``generate()`` does), and the median step is split into its pieces by timers wrapped around the modules:

    time-mix     the L ``TimeMix`` calls (LayerNorm excluded)
    channel-mix  the L ``ChannelMix`` calls
    head         the output projection (vocabulary x width)
    rest         everything else: embedding, LayerNorms, residual adds, the cache, Python

Each piece is also shown as the time its weights take to stream at the rate torch.mv reads a float32 matrix of the
head's size in the same run (``limit``: bytes / rate; ``of limit`` = limit / measured, 1.0 = at the streaming rate).
The whole step's limit counts every weight read once per step (the embedding: one row).

Decoding paths (``--paths``), taking turns inside every repeat so that load from other processes hits each alike:

    auto     the model as shipped: the fused time-mix kernel where ``one_token_kernel_preferred`` picks it, the
             channel-mix and head kernels up to ``CHANNEL_MIX_MAX_BATCH`` / ``HEAD_MAX_ROWS``
             (wuneng.fused.channel_mix)
    fused    every fused kernel forced at every batch (the batch limits lifted)
    mv       as auto, but the channel-mix and the head by torch.mv at one row (matrix products above): the row
             kernels off
    tensor   the tensor ops (``wkv_impl="chunked"``, the row kernels off: no kernel runs)

``--grid``: the table behind the kernels' batch limits (issue 17 item 3). At every size x threads x batch (defaults:
all three sizes, 1 and 2 threads, batch 1 2 4 8 16 32) the whole step of ``fused`` and ``tensor``, and of ``auto``
where it is neither (some pieces above their limit, others not), taking turns (3 turns, 1 unrecorded step each, 6
timed steps per turn up to batch 8, then 6 x 8 / batch, at least 2); printed: each path's median step, auto / tensor
and fused / tensor, each piece's fused / tensor ratio, what the limits pick; at the end, per piece, the largest batch
up to which its kernel won everywhere. The models' orthogonal init is replaced by Gaussian matrices of the same
scale (the QR of the heads took most of the run). The 1-thread half took 3 min 45 s on the 2-core development
machine under a load average of 3.5; the whole grid on the quiet machine is estimated at 3-5 minutes.

The machine may be shared: absolute times move with its load, ratios inside one run are what to compare.

    python benchmarks/decode_step.py --sizes 0.1b --threads 2
    python benchmarks/decode_step.py --sizes 0.1b 0.4b --dtype bf16 --paths auto
    python benchmarks/decode_step.py --grid
    python benchmarks/decode_step.py --grid --sizes 0.1b --threads 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import torch

from wuneng.fused import one_token

try:
    from wuneng.fused import channel_mix as fused_rows  # the channel-mix and head kernels
except ImportError:  # an older wuneng
    fused_rows = None
from wuneng.layers import rwkv7 as rwkv7_layers
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, modeling_rwkv7

SIZES = {
    "20m": dict(num_hidden_layers=5, hidden_size=384, vocab_size=8192),
    "0.1b": dict(num_hidden_layers=12, hidden_size=768, vocab_size=65536),
    "0.4b": dict(num_hidden_layers=24, hidden_size=1024, vocab_size=65536),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PIECES = ("time-mix", "channel-mix", "head")


def _gaussian_like_orthogonal(weight: torch.Tensor, gain: float) -> torch.Tensor:
    """``orthogonal_``'s scale without its QR: gain * sqrt(rows / cols) (rows > cols) times a Gaussian matrix of unit
    expected row or column norms. Timing needs the shapes and a sane scale, not orthogonality; the QR of the 65536-row
    heads took most of a model's build (0.4b: 100 s on one loaded core, against a few seconds this way)."""
    if weight.is_meta:
        return weight
    rows, cols = weight.shape
    g = gain * (math.sqrt(rows / cols) if rows > cols else 1.0)
    with torch.no_grad():
        return weight.copy_(torch.randn(rows, cols) * (g / math.sqrt(max(rows, cols))))


@contextlib.contextmanager
def fast_init():
    """Models built inside take :func:`_gaussian_like_orthogonal` for the library's orthogonal init."""
    modules = [m for m in (rwkv7_layers, modeling_rwkv7) if hasattr(m, "orthogonal_")]
    saved = [m.orthogonal_ for m in modules]
    try:
        for m in modules:
            m.orthogonal_ = _gaussian_like_orthogonal
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.orthogonal_ = fn


def build(size: str, dtype: torch.dtype, seed: int = 0, quick_init: bool = False) -> RWKV7ForCausalLM:
    """A random model of ``size`` (its own init, perturbed so that no weight is zero), in ``dtype``, eval mode;
    ``quick_init``: Gaussian matrices in place of the orthogonal ones (:func:`fast_init`)."""
    torch.manual_seed(seed)
    with fast_init() if quick_init else contextlib.nullcontext():
        model = RWKV7ForCausalLM(RWKV7Config(head_size=64, **SIZES[size]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.to(dtype).eval()


def weight_bytes(model: RWKV7ForCausalLM) -> dict:
    """Bytes read per decoding step and row-independent: per piece and in all (the embedding: one row)."""

    def size(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    blocks = model.model.blocks
    emb = model.model.emb.weight
    out = {
        "time-mix": sum(size(b.att) for b in blocks),
        "channel-mix": sum(size(b.ffn) for b in blocks),
        "head": size(model.head),
    }
    out["step"] = size(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    return out


def last_level_cache_bytes() -> int:
    """The size of the largest CPU cache (Linux sysfs; 0 where unknown)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG") or 0) * scale)
    return max(sizes, default=0)


class CacheFlush:
    """``flush()`` reads a buffer of twice the last-level cache, so that what follows reads its weights from memory,
    as a model does when another program (or model) ran in between; a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self.buffer = torch.ones(max(1, 2 * last_level_cache_bytes() // 4)) if enabled else None

    def flush(self) -> None:
        if self.buffer is not None:
            float(self.buffer.sum())


def stream_rate(rows: int, cols: int, flush: CacheFlush = None) -> float:
    """Bytes/s of torch.mv over a float32 [rows, cols] matrix (best of 5; each after ``flush``, if given)."""
    m, x = torch.randn(rows, cols), torch.randn(cols)
    torch.mv(m, x)
    best = float("inf")
    for _ in range(5):
        if flush is not None:
            flush.flush()
        t0 = time.perf_counter()
        torch.mv(m, x)
        best = min(best, time.perf_counter() - t0)
    return m.numel() * 4 / best


class PieceTimers:
    """Wall time of each piece per step: perf_counter around the forward of every TimeMix and ChannelMix and around
    the head's product (each wrapper costs well under a microsecond)."""

    def __init__(self, model: RWKV7ForCausalLM):
        self.model, self.acc, self.saved = model, dict.fromkeys(PIECES, 0.0), []

    def _wrap(self, module, piece: str) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.acc[piece] += time.perf_counter() - t0

        self.saved.append(module)
        module.forward = timed

    def __enter__(self):
        for block in self.model.model.blocks:
            self._wrap(block.att, "time-mix")
            self._wrap(block.ffn, "channel-mix")
        # the head runs through modeling_rwkv7.head_logits (the linear kernel or a matrix-vector product at batch 1,
        # bypassing the module's forward; older wuneng: linear_one_row): time that call (older still: the module)
        self.head_name = next((n for n in ("head_logits", "linear_one_row") if hasattr(modeling_rwkv7, n)), None)
        head_call = None if self.head_name is None else getattr(modeling_rwkv7, self.head_name)
        if head_call is None:
            self._wrap(self.model.head, "head")
            return self

        def timed_head(*args):
            t0 = time.perf_counter()
            try:
                return head_call(*args)
            finally:
                self.acc["head"] += time.perf_counter() - t0

        setattr(modeling_rwkv7, self.head_name, timed_head)
        self.head_call = head_call
        return self

    def __exit__(self, *exc):
        for module in self.saved:
            del module.forward  # the instance attribute goes, the class's forward is back
        self.saved.clear()
        if getattr(self, "head_call", None) is not None:
            setattr(modeling_rwkv7, self.head_name, self.head_call)

    def take(self) -> dict:
        out, self.acc = self.acc, dict.fromkeys(PIECES, 0.0)
        return out


ROW_LIMITS = ("CHANNEL_MIX_MAX_BATCH", "HEAD_MAX_ROWS", "BF16_MAX_ROWS")  # those the installed wuneng has


@contextlib.contextmanager
def decoding_path(model: RWKV7ForCausalLM, path: str):
    """``auto`` (as shipped), ``fused`` (every kernel's batch limit lifted), ``mv`` (as shipped but the channel-mix
    and the head by torch.mv / the BLAS: the row kernels off) or ``tensor`` (no kernel)."""
    max_batch = getattr(one_token, "TIME_MIX_MAX_BATCH", None)  # None: an older wuneng (auto and tensor only)
    limits = {n: getattr(fused_rows, n) for n in ROW_LIMITS if hasattr(fused_rows, n)}
    impls = [b.att.wkv_impl for b in model.model.blocks]
    try:
        if path == "fused":
            one_token.TIME_MIX_MAX_BATCH = 1 << 62
            for n in limits:
                setattr(fused_rows, n, 1 << 62)
        elif path in ("tensor", "mv"):
            for n in limits:
                setattr(fused_rows, n, 0)
        if path == "tensor":
            for b in model.model.blocks:
                b.att.wkv_impl = "chunked"
        yield
    finally:
        if max_batch is not None:
            one_token.TIME_MIX_MAX_BATCH = max_batch
        for n, value in limits.items():
            setattr(fused_rows, n, value)
        for b, impl in zip(model.model.blocks, impls):
            b.att.wkv_impl = impl


def start(model: RWKV7ForCausalLM, batch: int, seed: int = 1):
    """A cache after an 8-token prompt, and the next token [batch, 1]."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 8), generator=g)
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def time_steps(
    model, cache, token, steps: int, timers: PieceTimers = None, flush: CacheFlush = None, warmup: int = 2
) -> list:
    """``steps`` decoding steps (after ``warmup`` unrecorded ones; each after ``flush``, if given); each a dict of
    piece times and ``step``."""
    rows = []
    with torch.no_grad():
        for i in range(steps + warmup):
            if flush is not None:
                flush.flush()
            if timers is not None:
                timers.take()
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            total = time.perf_counter() - t0
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if i >= warmup:
                row = timers.take() if timers is not None else {}
                row["step"] = total
                rows.append(row)
    return rows


def profile(args) -> None:
    print(
        f"torch {torch.__version__}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
        f"dtype {args.dtype}; median of {args.steps} steps x {args.repeats} repeats; "
        f"cache flushed before each step: {args.flush}"
    )
    header = f"{'size':>5} {'thr':>3} {'B':>3} {'path':>6} {'piece':>12} {'ms':>8} {'limit ms':>9} {'of limit':>9}"
    flush = CacheFlush(args.flush) if args.flush else None
    for size in args.sizes:
        model = build(size, DTYPES[args.dtype])
        nbytes = weight_bytes(model)
        for threads in args.threads:
            torch.set_num_threads(threads)
            head = model.head.weight
            rate = stream_rate(head.numel() * head.element_size() // 4 // head.shape[1], head.shape[1], flush)
            print(
                f"\n{size}: {nbytes['step'] / 1e6:.0f} MB of weights per step; torch.mv streams {rate / 1e9:.1f} GB/s; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
            print(header)
            for batch in args.batch:
                samples = {p: [] for p in args.paths}
                cache = {}
                for path in args.paths:
                    with decoding_path(model, path):
                        cache[path] = start(model, batch)
                for _ in range(args.repeats):  # the paths take turns
                    for path in args.paths:
                        with decoding_path(model, path), PieceTimers(model) as timers:
                            samples[path] += time_steps(model, *cache[path], args.steps, timers, flush)
                for path in args.paths:
                    rows = samples[path]
                    med = {k: statistics.median(r[k] for r in rows) for k in (*PIECES, "step")}
                    med["rest"] = statistics.median(r["step"] - sum(r[p] for p in PIECES) for r in rows)
                    for piece in (*PIECES, "rest", "step"):
                        limit = nbytes.get(piece, 0) / rate
                        frac = f"{limit / med[piece]:>9.2f}" if limit else f"{'':>9}"
                        print(
                            f"{size:>5} {threads:>3} {batch:>3} {path:>6} {piece:>12} {med[piece] * 1e3:>8.2f} "
                            f"{limit * 1e3:>9.2f} {frac}"
                        )
                first = statistics.median(r["step"] for r in samples[args.paths[0]])
                for path in args.paths[1:]:
                    other = statistics.median(r["step"] for r in samples[path])
                    print(f"{'':>23} {args.paths[0]} / {path} step: {first / other:.2f}")
        del model


#: the limits that pick each piece's kernel (module, constant), in PIECES' order
RULES = {
    "time-mix": (one_token, "TIME_MIX_MAX_BATCH"),
    "channel-mix": (fused_rows, "CHANNEL_MIX_MAX_BATCH"),
    "head": (fused_rows, "HEAD_MAX_ROWS"),
}


def rule_limits(dtype: torch.dtype) -> dict:
    """The batch up to which each piece takes its kernel by default with weights of ``dtype`` (0: never; a missing
    constant, older wuneng: 0)."""
    limits = {piece: getattr(module, name, 0) if module is not None else 0 for piece, (module, name) in RULES.items()}
    if dtype == torch.bfloat16 and hasattr(fused_rows, "BF16_MAX_ROWS"):
        for piece in ("channel-mix", "head"):
            limits[piece] = min(limits[piece], fused_rows.BF16_MAX_ROWS)
    return limits


def grid_steps(steps: int, batch: int) -> int:
    """Timed steps per turn at ``batch``: ``steps`` up to batch 8, then fewer in proportion (at least 2), so that the
    large batches, whose steps take longest, do not dominate the run."""
    return max(2, round(steps * 8 / max(8, batch)))


def grid(args) -> None:
    """The table behind the kernel-vs-BLAS rule: at every size x threads x batch the whole step of the default path
    (``auto``) against the tensor path (every fused kernel off: the BLAS's products), and every kernel forced
    (``fused``), with each piece's fused / tensor ratio from the same steps; then, per piece, the largest batch up to
    which its kernel won at every size and thread count, beside the library's limit."""
    limits = rule_limits(DTYPES[args.dtype])
    print(
        f"torch {torch.__version__}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; dtype {args.dtype}; "
        f"median of {args.steps} steps per turn up to batch 8, fewer above (steps x 8 / batch, at least 2), x "
        f"{args.repeats} turns per path, 1 unrecorded step each; library limits for {args.dtype}: "
        + ", ".join(f"{p} {v}" for p, v in limits.items())
    )
    print(
        "auto: the default path (the kernels the limits pick); fused: every kernel forced; tensor: no kernel. "
        "Ratios below 1: the kernels faster. auto is timed only where it is neither of the others.\n"
    )
    print(
        f"{'size':>5} {'thr':>3} {'B':>3} {'steps':>5} {'auto ms':>8} {'fused ms':>9} {'tensor ms':>10} {'auto/t':>7} "
        f"{'fused/t':>8} {'tm f/t':>7} {'cm f/t':>7} {'head f/t':>9}  rule picks (tm cm head)"
    )
    wins = {piece: {} for piece in PIECES}  # piece -> (size, threads) -> {batch: fused/tensor}
    started = time.perf_counter()
    for size in args.sizes:
        model = build(size, DTYPES[args.dtype], quick_init=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                picks = {piece: batch <= limit for piece, limit in limits.items()}
                same_as = "fused" if all(picks.values()) else "tensor" if not any(picks.values()) else None
                paths = ["fused", "tensor"] + ([] if same_as else ["auto"])
                steps = grid_steps(args.steps, batch)
                caches, samples = {}, {path: [] for path in paths}
                for path in paths:
                    with decoding_path(model, path):
                        caches[path] = start(model, batch)
                for _ in range(args.repeats):  # the paths take turns
                    for path in paths:
                        with decoding_path(model, path), PieceTimers(model) as timers:
                            samples[path] += time_steps(model, *caches[path], steps, timers, warmup=1)
                med = {
                    path: {k: statistics.median(r[k] for r in rows) for k in (*PIECES, "step")}
                    for path, rows in samples.items()
                }
                med["auto"] = med[same_as or "auto"]
                f, t, a = med["fused"], med["tensor"], med["auto"]
                ratio = {piece: f[piece] / t[piece] for piece in PIECES}
                for piece in PIECES:
                    wins[piece].setdefault((size, threads), {})[batch] = ratio[piece]
                auto = f"{a['step'] * 1e3:>8.2f}" if same_as is None else f"{'=' + same_as[0]:>8}"
                rule = " ".join("kernel" if picks[p] else "BLAS" for p in PIECES)
                print(
                    f"{size:>5} {threads:>3} {batch:>3} {steps:>5} {auto} {f['step'] * 1e3:>9.2f} "
                    f"{t['step'] * 1e3:>10.2f} {a['step'] / t['step']:>7.2f} {f['step'] / t['step']:>8.2f} "
                    f"{ratio['time-mix']:>7.2f} {ratio['channel-mix']:>7.2f} {ratio['head']:>9.2f}  {rule}",
                    flush=True,
                )
        del model
    print(f"\n{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
    for piece in PIECES:
        won = []
        for ratios in wins[piece].values():
            up_to = 0
            for batch in sorted(ratios):
                if ratios[batch] >= 1:
                    break
                up_to = batch
            won.append(up_to)
        print(
            f"{piece}: the kernel won (fused / tensor < 1) at every batch up to {min(won)} at every size and thread "
            f"count measured (per size and thread count: {', '.join(map(str, won))}); library limit for "
            f"{args.dtype}: {limits[piece]}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default 0.1b; --grid: all three")
    parser.add_argument("--threads", type=int, nargs="+", help="default 2; --grid: 1 2")
    parser.add_argument("--batch", type=int, nargs="+", help="default 1; --grid: 1 2 4 8 16 32")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--paths", nargs="+", default=["fused", "tensor"], choices=["auto", "fused", "mv", "tensor"])
    parser.add_argument(
        "--steps", type=int, help="timed steps per repeat and path (default 10; --grid: 6 up to batch 8, fewer above)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds in which the paths take turns")
    parser.add_argument(
        "--flush",
        action="store_true",
        help="read twice the last-level cache before every timed step and streaming-rate repeat (the weights then come "
        "from memory, as in peers.py's decode loop, where the other program runs between steps)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="whole-step default vs tensor vs every kernel forced, with each piece's fused / tensor ratio (the table "
        "behind the kernel limits); paths fixed, --flush not used",
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(sizes=["20m", "0.1b", "0.4b"], threads=[1, 2], batch=[1, 2, 4, 8, 16, 32], steps=6)
        if args.grid
        else dict(sizes=["0.1b"], threads=[2], batch=[1], steps=10)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    (grid if args.grid else profile)(args)


if __name__ == "__main__":
    main()
