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

The machine may be shared: absolute times move with its load, ratios inside one run are what to compare.

    python benchmarks/decode_step.py --sizes 0.1b --threads 2
    python benchmarks/decode_step.py --sizes 0.1b 0.4b --dtype bf16 --paths auto
    python benchmarks/decode_step.py --grid --sizes 20m 0.1b 0.4b --threads 1 2 --batch 1 2 4 8 16 32 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
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
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, modeling_rwkv7

SIZES = {
    "20m": dict(num_hidden_layers=5, hidden_size=384, vocab_size=8192),
    "0.1b": dict(num_hidden_layers=12, hidden_size=768, vocab_size=65536),
    "0.4b": dict(num_hidden_layers=24, hidden_size=1024, vocab_size=65536),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PIECES = ("time-mix", "channel-mix", "head")


def build(size: str, dtype: torch.dtype, seed: int = 0) -> RWKV7ForCausalLM:
    """A random model of ``size`` (its own init, perturbed so that no weight is zero), in ``dtype``, eval mode."""
    torch.manual_seed(seed)
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


ROW_LIMITS = ("CHANNEL_MIX_MAX_BATCH", "HEAD_MAX_ROWS")


@contextlib.contextmanager
def decoding_path(model: RWKV7ForCausalLM, path: str):
    """``auto`` (as shipped), ``fused`` (every kernel's batch limit lifted), ``mv`` (as shipped but the channel-mix
    and the head by torch.mv / the BLAS: the row kernels off) or ``tensor`` (no kernel)."""
    max_batch = getattr(one_token, "TIME_MIX_MAX_BATCH", None)  # None: an older wuneng (auto and tensor only)
    limits = {n: getattr(fused_rows, n) for n in ROW_LIMITS} if fused_rows is not None else {}
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


def time_steps(model, cache, token, steps: int, timers: PieceTimers = None, flush: CacheFlush = None) -> list:
    """``steps`` decoding steps (after 2 unrecorded ones; each after ``flush``, if given); each a dict of piece times
    and ``step``."""
    rows = []
    with torch.no_grad():
        for i in range(steps + 2):
            if flush is not None:
                flush.flush()
            if timers is not None:
                timers.take()
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            total = time.perf_counter() - t0
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if i >= 2:
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


def grid(args) -> None:
    """Whole-step fused vs tensor at every size x threads x batch (the table behind the preference rule)."""
    print(
        f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}; dtype {args.dtype}; "
        f"median of {args.steps} steps x {args.repeats} repeats; rule: TIME_MIX_MAX_BATCH {one_token.TIME_MIX_MAX_BATCH}"
    )
    print(f"{'size':>5} {'thr':>3} {'B':>3} {'fused ms':>9} {'tensor ms':>10} {'f/t':>6} {'rule picks':>10}")
    for size in args.sizes:
        model = build(size, DTYPES[args.dtype])
        weights = model.model.blocks[1].att.one_token_weights()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                caches = {}
                for path in ("fused", "tensor"):
                    with decoding_path(model, path):
                        caches[path] = start(model, batch)
                times = {"fused": [], "tensor": []}
                for _ in range(args.repeats):
                    for path in ("fused", "tensor"):
                        with decoding_path(model, path):
                            times[path] += [r["step"] for r in time_steps(model, *caches[path], args.steps)]
                f, t = statistics.median(times["fused"]), statistics.median(times["tensor"])
                pick = "fused" if one_token.one_token_kernel_preferred(weights, batch) else "tensor"
                print(f"{size:>5} {threads:>3} {batch:>3} {f * 1e3:>9.2f} {t * 1e3:>10.2f} {f / t:>6.2f} {pick:>10}")
        del model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1b"], choices=sorted(SIZES))
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--paths", nargs="+", default=["fused", "tensor"], choices=["auto", "fused", "mv", "tensor"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat and path")
    parser.add_argument("--repeats", type=int, default=3, help="rounds in which the paths take turns")
    parser.add_argument(
        "--flush",
        action="store_true",
        help="read twice the last-level cache before every timed step and streaming-rate repeat (the weights then come "
        "from memory, as in peers.py's decode loop, where the other program runs between steps)",
    )
    parser.add_argument("--grid", action="store_true", help="whole-step fused vs tensor table (the preference rule)")
    args = parser.parse_args(argv)
    (grid if args.grid else profile)(args)


if __name__ == "__main__":
    main()
