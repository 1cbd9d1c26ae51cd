"""Throughput of the WKV-7 operator forms on CPU.

Prints one table of tokens/s (B * T tokens per call), forward and forward+backward, for

    reference      wkv7_reference: the token-by-token loop (the oracle)
    chunked        wkv7_chunked at its default chunk size
    cpu            wkv7_cpu: the C kernel (sequential recurrence, checkpointed backward), when it builds
    fla-chunkwise  fla's pure-PyTorch dplr_chunkwise (CPU peer; forward+backward by autograd)

and the chunked form's effective GFLOP/s (its matmul FLOPs / time) as a fraction of the machine's float32 matmul
rate measured in the same run: a 1024^3 matmul and batched matmuls at the chunked form's shapes, each the best of
5, measured before the first sequence length and after each (the largest of all is the peak: load from other
processes lowers a measurement, never raises it); and the ratios chunked/reference, chunked/fla-chunkwise and
cpu/chunked. Every row prints the load average at the time.

Timing: warm-up call, then the median of ``--repeats`` calls; the methods take turns inside each
repeat so that load from other processes on the machine hits them alike (compare ratios of one run).
The reference loop's rate does not depend on T, so it is timed on the first ``--ref-tokens`` tokens
(default 256; its autograd graph holds every state, about 1.3 GB at T = 1024, B = H = 4, N = 64).

    python benchmarks/wkv7.py                 # B=4 H=4 N=64, T in {1024, 4096}
    python benchmarks/wkv7.py --quick --T 1024

To compare a change of the chunked form with an earlier version in the same process (interleaved, so that
load from other processes hits both alike), point ``--baseline-src`` at the ``src`` folder of another
checkout, e.g. ``git worktree add /tmp/base HEAD~1``, then ``--baseline-src /tmp/base/src``: its
``wkv7_chunked`` runs as ``chunked-baseline`` and the ratio chunked / chunked-baseline is printed; its C kernel
(when its ABI is this one's) runs as ``cpu-baseline`` under this checkout's Python side. ``--forms chunked cpu``
times only those rows.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from wuneng.ops.wkv7 import wkv7_chunked, wkv7_reference
from wuneng.ops.wkv7.chunk import DEFAULT_CHUNK_SIZE
from wuneng.ops.wkv7.cpu import cpu_kernel_available, cpu_kernel_error, wkv7_cpu


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0):
    """RWKV-7-shaped float32 inputs [B, T, H, N]: a = -kk, b = kk * alpha, log w in [-0.6065, 0)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g) * 0.5
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g)
    log_w = -0.6065306597126334 * torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    return [r, log_w, k, v, -kk, kk * alpha]


def chunked_matmul_flops(B: int, T: int, H: int, N: int, L: int, backward: bool) -> float:
    """Matmul FLOPs of wkv7_chunked (elementwise work not counted), forward or forward+backward."""
    chunks = B * H * math.ceil(T / L)
    forward = 16 * L * L * N + 4 * L**3 + L**3 / 3 + 6 * L * N * N + 2 * N**3
    total = forward + (34 * L * L * N + 8 * L**3 + 12 * L * N * N + 4 * N**3 if backward else 0)
    return chunks * total


#: the clock every timing reads: wall time, or with ``--clock cpu`` this process's CPU time (time.process_time; for
#: one thread on a machine shared with other work, where wall time counts the other processes' turns too)
_clock = time.perf_counter


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """float32 GFLOP/s of one size^3 matmul, the best of ``repeats`` (the least disturbed by other processes)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = _clock()
        a @ b
        times.append(_clock() - t0)
    return 2 * size**3 / min(times) / 1e9


def bmm_gflops(batch: int, m: int, k: int, n: int, repeats: int = 5, inner: int = 4) -> float:
    """float32 GFLOP/s of a batched [batch, m, k] x [batch, k, n] matmul (the chunked form's shape), best of
    ``repeats`` timings of ``inner`` calls each."""
    a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    torch.bmm(a, b)
    times = []
    for _ in range(repeats):
        t0 = _clock()
        for _ in range(inner):
            torch.bmm(a, b)
        times.append((_clock() - t0) / inner)
    return 2 * batch * m * k * n / min(times) / 1e9


def matmul_peaks(N: int, L: int) -> dict:
    """The machine's float32 matmul rate, measured now: a 1024^3 matmul, and batched matmuls at the chunked
    form's shapes (a group of about 96 matrices: [L, N] x [N, N] and [2L, N] x [N, 2L]); each the best of its
    repeats. The peak is the largest of them."""
    peaks = {
        "1024^3": matmul_gflops(),
        f"bmm 96x[{L},{N}]x[{N},{N}]": bmm_gflops(96, L, N, N),
        f"bmm 96x[{2 * L},{N}]x[{N},{2 * L}]": bmm_gflops(96, 2 * L, N, 2 * L),
    }
    peaks["peak"] = max(peaks.values())
    return peaks


def _load() -> str:
    """The 1-minute load average (what else the machine was running), or '?' where /proc is absent."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _fla_chunkwise():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.generalized_delta_rule.dplr.naive import dplr_chunkwise
    except Exception as exc:  # noqa: BLE001 - fla or triton missing
        print(f"(fla dplr_chunkwise unavailable: {exc})")
        return None
    return dplr_chunkwise


def _baseline_chunked(src: str):
    """``wkv7_chunked`` of the checkout whose ``src`` folder is given, imported beside this one."""
    folder = Path(src) / "wuneng" / "ops" / "wkv7"
    if not (folder / "chunk.py").is_file():
        raise SystemExit(f"--baseline-src: {folder / 'chunk.py'} not found; give the src folder of a wuneng checkout")
    package = types.ModuleType("wkv7_baseline")  # only the operator package: its modules import relatively
    package.__path__ = [str(folder)]
    sys.modules["wkv7_baseline"] = package
    return importlib.import_module("wkv7_baseline.chunk").wkv7_chunked


def _baseline_cpu(src: str):
    """``swapped(fn)``: fn run with the C kernel built from another checkout's ``csrc`` (same ABI) in place of this
    one's, or None (printed why).

    The library is built beside this one's in the kernel cache and swapped in for the whole of ``fn`` (forward and
    backward: the checkpoints one kernel stores are read by the same kernel's backward), so the Python side
    (checks, layouts, autograd) is this checkout's and only the kernel differs."""
    from wuneng.ops import c_library
    from wuneng.ops.wkv7 import cpu as cpu_mod

    csrc = Path(src) / "wuneng" / "ops" / "wkv7" / "csrc"
    sources = [p for p in sorted(csrc.glob("*")) if p.suffix in (".c", ".h")]
    if not (csrc / "wkv7_cpu.c").is_file():
        print(f"(cpu-baseline: {csrc / 'wkv7_cpu.c'} not found)")
        return None
    library = c_library.CLibrary(
        "wkv7_cpu_baseline",
        csrc / "wkv7_cpu.c",
        sources,
        abi=cpu_mod.KERNEL_ABI,
        logger=cpu_mod.logger,
        fallback="no cpu-baseline row",
        configure=cpu_mod._configure,
    )
    lib = library.load()
    if lib is None:
        print(f"(cpu-baseline unavailable: {library.error})")
        return None

    def swapped(fn):
        def run():
            current = cpu_mod._library
            cpu_mod._library = lambda: lib
            try:
                return fn()
            finally:
                cpu_mod._library = current

        return run

    return swapped


def build_calls(args, T: int):
    """name -> (forward(), forward_backward(), tokens per call)."""
    B, H, N = args.B, args.H, args.N
    x = make_inputs(B, T, H, N)
    calls = {}

    def with_grad(fn, inputs):
        def run():
            leaves = [t.detach().requires_grad_() for t in inputs]
            y, s = fn(*leaves)[:2]
            (y.sum() + s.sum()).backward()

        return run

    t_ref = min(T, args.ref_tokens)
    x_ref = [t[:, :t_ref].contiguous() for t in x]
    calls["reference"] = (lambda: wkv7_reference(*x_ref), with_grad(wkv7_reference, x_ref), B * t_ref)

    for i, size in enumerate(args.chunk):  # "chunked" at the first size, "chunked@L" at the others

        def chunked(*a, size=size):
            return wkv7_chunked(*a, chunk_size=size)

        calls["chunked" if i == 0 else f"chunked@{size}"] = (
            lambda fn=chunked: fn(*x),
            with_grad(chunked, x),
            B * T,
        )
    if args.baseline_src:
        baseline_fn = _baseline_chunked(args.baseline_src)

        def baseline(*a):
            return baseline_fn(*a, chunk_size=args.chunk[0])

        calls["chunked-baseline"] = (lambda: baseline(*x), with_grad(baseline, x), B * T)
    if cpu_kernel_available():
        calls["cpu"] = (lambda: wkv7_cpu(*x), with_grad(wkv7_cpu, x), B * T)
        swapped = _baseline_cpu(args.baseline_src) if args.baseline_src else None
        if swapped is not None:
            calls["cpu-baseline"] = (swapped(lambda: wkv7_cpu(*x)), swapped(with_grad(wkv7_cpu, x)), B * T)
    else:
        print(f"(C kernel unavailable: {cpu_kernel_error()})")

    dplr_chunkwise = _fla_chunkwise()
    if dplr_chunkwise is not None and T % args.fla_chunk == 0:
        # fla layout [B, H, T, D]; it scales q by D^-1/2, so pass r * sqrt(N); state [K, V] (zero here).
        xf = [t.transpose(1, 2).contiguous() for t in x]
        xf[0] = xf[0] * math.sqrt(N)

        def fla(r, log_w, k, v, a, b):
            return dplr_chunkwise(r, k, v, a, b, log_w, None, True, chunk_size=args.fla_chunk)

        calls["fla-chunkwise"] = (lambda: fla(*xf), with_grad(fla, xf), B * T)
    return calls


def time_calls(calls: dict, repeats: int) -> dict:
    """Median seconds per call for every (name, mode); methods interleaved within each repeat."""
    for fwd, fwd_bwd, _ in calls.values():  # warm-up
        fwd()
        fwd_bwd()
    samples = {(name, mode): [] for name in calls for mode in ("fwd", "fwd+bwd")}
    for _ in range(repeats):
        for name, (fwd, fwd_bwd, _) in calls.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                t0 = _clock()
                fn()
                samples[(name, mode)].append(_clock() - t0)
    return {key: statistics.median(v) for key, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=64)
    p.add_argument(
        "--chunk",
        type=int,
        nargs="+",
        default=[DEFAULT_CHUNK_SIZE],
        help="chunk sizes of wkv7_chunked: the first is the row 'chunked' (and the baseline's), the others 'chunked@L'",
    )
    p.add_argument("--fla-chunk", type=int, default=32, help="chunk size of fla's dplr_chunkwise")
    p.add_argument("--ref-tokens", type=int, default=256, help="tokens per sequence timed for the reference loop")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one timed repeat")
    p.add_argument(
        "--baseline-src",
        help="src folder of another checkout: time its wkv7_chunked (and its C kernel, same ABI) beside this one",
    )
    p.add_argument(
        "--forms",
        nargs="+",
        help="time only these rows (reference, chunked, chunked-baseline, cpu, cpu-baseline, fla-chunkwise)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default) or cpu: this process's CPU time, for --threads 1 on a shared machine",
    )
    args = p.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1 (CPU time adds up the threads' time)")
        global _clock
        _clock = time.process_time
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={args.B} H={args.H} N={args.N}, "
        f"chunk {args.chunk} (fla-chunkwise {args.fla_chunk}), median of {repeats}, {args.clock} clock; load {_load()}"
    )
    L = min(args.chunk[0], max(args.T))
    peaks = [matmul_peaks(args.N, L)]
    print("float32 matmul GFLOP/s (best of 5 each): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks[0].items()))
    header = f"{'T':>6} {'form':<16} {'fwd tok/s':>11} {'fwd+bwd tok/s':>14} {'GFLOP/s fwd':>12} {'GFLOP/s f+b':>12}"
    rows, ratios, chunked_rates = [header, "-" * len(header)], [], []
    for T in args.T:
        calls = build_calls(args, T)
        if args.forms:
            calls = {name: c for name, c in calls.items() if name in args.forms}
        times = time_calls(calls, repeats)
        load = _load()
        rate = {key: calls[key[0]][2] / t for key, t in times.items()}
        for name in calls:
            gf = ["", ""]
            if name.startswith("chunked"):
                size = int(name.split("@")[1]) if "@" in name else args.chunk[0]
                for i, (mode, bwd) in enumerate((("fwd", False), ("fwd+bwd", True))):
                    flops = chunked_matmul_flops(args.B, T, args.H, args.N, min(size, T), bwd)
                    gf[i] = f"{flops / times[(name, mode)] / 1e9:.1f}"
                chunked_rates.append((T, name, float(gf[1])))
            rows.append(
                f"{T:>6} {name:<16} {rate[(name, 'fwd')]:>11.0f} {rate[(name, 'fwd+bwd')]:>14.0f} {gf[0]:>12} "
                f"{gf[1]:>12}   load {load}"
            )
        pairs = (
            ("chunked", "reference"),
            ("chunked", "fla-chunkwise"),
            ("cpu", "chunked"),
            ("chunked", "chunked-baseline"),
            ("cpu", "cpu-baseline"),
        )
        for form, other in pairs:
            if form in calls and other in calls:
                digits = 3 if other.endswith("-baseline") else 1
                ratios.append(
                    f"T={T}: {form} / {other} (speed): fwd {rate[(form, 'fwd')] / rate[(other, 'fwd')]:.{digits}f}x, "
                    f"fwd+bwd {rate[(form, 'fwd+bwd')] / rate[(other, 'fwd+bwd')]:.{digits}f}x"
                )
        peaks.append(matmul_peaks(args.N, L))  # between the sequence lengths and after the last
    print("\n".join(rows))
    print("\n".join(ratios))
    print(
        "float32 matmul GFLOP/s after each T: "
        + "; ".join(", ".join(f"{k} {v:.1f}" for k, v in p.items()) for p in peaks[1:])
    )
    peak = max(p["peak"] for p in peaks)
    for T, name, gflops in chunked_rates:
        print(
            f"T={T}: {name} fwd+bwd {gflops:.1f} GFLOP/s = {gflops / peak:.0%} of the best matmul rate measured in "
            f"this run ({peak:.1f} GFLOP/s); load {_load()}"
        )


if __name__ == "__main__":
    main()
