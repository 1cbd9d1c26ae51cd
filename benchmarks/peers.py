"""RWKV-7 on CPU against the official ``rwkv`` package, and both against the machine's own limits, in one process.

For each size (random weights, vocabulary 65536, head size 64; RWKV-LM x070 layout, so both programs load the
same ``.pth``):

    0.1b    L12-D768  (~0.19 B parameters with the 65536-token embedding and head)
    0.4b    L24-D1024 (~0.44 B)

it measures, the two programs taking turns inside every repeat (so that load from other processes hits both):

    prefill   tokens/s of one prompt of T tokens (``--prompts``, default 1024 and 4096); wuneng with
              ``logits_to_keep=1``, the package with ``forward(tokens, None)`` (last logits only)
    decode    ms/token at batch 1 after a 64-token prompt (the median step of ``--decode-steps``; the programs
              alternate every step, or with ``--decode-order blocks`` in blocks of consecutive steps)
    batched   tokens/s of one decoding step at batch B (``--batches``, default 8 and 32): wuneng decodes the B
              rows together; the package has no batch dimension, so its figure is B sequential single-row steps
    memory    the weights each program holds (bytes of the storages of its tensors), and the resident memory
              added by loading it (RSS after load minus before; ~0 when the allocator reuses what an earlier
              model of the run freed, then no ratio is printed)

in float32, and with ``--dtypes fp32,bf16`` also with bf16 weights (the package's ``cpu bf16`` strategy).

Machine limits, measured in the same run:

    matmul    float32 GFLOP/s of torch.mm at the model's width (the prefill limit: tokens/s = FLOP/s divided by
              the model's matmul FLOPs per token, 2 x its non-embedding parameters)
    stream    GB/s of torch.mv over a float32 matrix of the model's non-embedding size plus its head (the
              decode limit: tokens/s = bandwidth / bytes read per token, every weight once)

Second peer, optional: llama.cpp through ``llama-cpp-python`` (``--llama-converter PATH`` to llama.cpp's
``convert_hf_to_gguf.py``, e.g. the one vendored in the llama-cpp-python sdist). The checkpoint is exported to
fla-hub's layout (``to_fla``) with the RWKV world vocabulary file the converter requires, converted to GGUF
(f32 or bf16 like the run), and timed taking turns with the other two: prefill (last logits only, its logits
checked against wuneng's), decode at batch 1, resident memory (loaded without mmap). Skipped with a note when
``llama_cpp`` is not importable or no converter is given. See benchmarks/README.md, section llama.cpp.

Each result is printed as a ratio to the package and as a fraction of its limit. Targets (issue 17): decode at
batch 1 >= 1.2x the package and >= 85% of the bandwidth limit; bf16 decode >= 1.6x fp32; prefill >= 2.5x the
package and >= 75% of the matmul limit.

    python benchmarks/peers.py                           # both sizes, fp32, 2 threads
    python benchmarks/peers.py --sizes 0.1b --dtypes fp32,bf16
    python benchmarks/peers.py --quick                   # a tiny model, to check that it runs
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the rwkv package picks its model class and JIT mode at import time
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

from wuneng.cache import storage_nbytes  # noqa: E402
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM  # noqa: E402

SIZES = {
    "0.1b": dict(num_hidden_layers=12, hidden_size=768),
    "0.4b": dict(num_hidden_layers=24, hidden_size=1024),
    "tiny": dict(num_hidden_layers=2, hidden_size=128),  # --quick
}
VOCAB = 65536


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(width: int, repeats: int = 5) -> float:
    """float32 GFLOP/s of [1024, C] x [C, 4C] (the largest matmul shape of a prefill)."""
    a, b = torch.randn(1024, width), torch.randn(width, 4 * width)
    torch.mm(a, b)
    t = best_of(lambda: torch.mm(a, b), repeats)
    return 2 * 1024 * width * 4 * width / t / 1e9


def stream_gbps(num_floats: int, repeats: int = 5) -> float:
    """GB/s of torch.mv over a float32 matrix of ``num_floats`` elements (each weight read once per token)."""
    cols = 4096
    m, x = torch.randn(max(1, num_floats // cols), cols), torch.randn(cols)
    torch.mv(m, x)
    t = best_of(lambda: torch.mv(m, x), repeats)
    return m.numel() * 4 / t / 1e9


def build_checkpoint(size: str, folder: Path, seed: int = 0):
    """A random RWKV-7 of ``size`` (the model's own init, weights perturbed so that no path is zero), and its
    RWKV-LM ``.pth`` in ``folder``. Returns (config, path without .pth, non-embedding parameter count)."""
    torch.manual_seed(seed)
    config = RWKV7Config(vocab_size=VOCAB, head_size=64, **SIZES[size])
    model = RWKV7ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = folder / f"rwkv7-{size}.pth"
    torch.save(model.to_rwkv_lm_state_dict(), path)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    del model
    gc.collect()
    return config, str(path)[: -len(".pth")], total - embed - head, head


def load_ours(path: str, dtype: torch.dtype):
    before = rss_bytes()
    model = RWKV7ForCausalLM.from_rwkv_lm(path + ".pth").to(dtype).eval()
    return model, rss_bytes() - before


def package_tensors(model) -> list:
    """The tensors the rwkv package's model holds: its weight dict (``w``; ``z`` in its RWKV-7 class), found on the
    Python object behind the TorchScript wrapper when JIT is on."""
    inner = getattr(model, "_actual_script_module", model)
    found = []
    for obj in (model, inner):
        for name in ("w", "z"):
            try:
                d = getattr(obj, name)
            except AttributeError:
                continue
            if isinstance(d, dict):
                found.extend(t for t in d.values() if isinstance(t, torch.Tensor))
    return found


def load_package(path: str, dtype: str):
    from rwkv.model import RWKV

    before = rss_bytes()
    model = RWKV(model=path, strategy=f"cpu {dtype}")
    return model, rss_bytes() - before


def export_gguf(path: str, converter: str, dtype_name: str) -> str:
    """The RWKV-LM checkpoint ``path`` (without .pth) as a GGUF for llama.cpp, written beside it: exported to
    fla-hub's layout, plus ``rwkv_vocab_v20230424.txt`` (copied from the rwkv package; llama.cpp's converter
    reads the RWKV world vocabulary from the folder), then converted by llama.cpp's own ``convert_hf_to_gguf.py``
    (``converter``, run with this interpreter: it needs torch, numpy and pyyaml). Returns the GGUF's path."""
    import shutil
    import subprocess

    import rwkv

    fla = Path(f"{path}-{dtype_name}-fla")
    RWKV7ForCausalLM.from_rwkv_lm(path + ".pth").to_fla(fla)
    shutil.copy(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt", fla)
    out = f"{path}-{dtype_name}.gguf"
    outtype = {"fp32": "f32", "bf16": "bf16"}[dtype_name]
    cmd = [sys.executable, converter, str(fla), "--outtype", outtype, "--outfile", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{converter} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    shutil.rmtree(fla)
    return out


def load_llama(gguf: str, threads: int, n_ctx: int):
    from llama_cpp import Llama

    before = rss_bytes()
    llm = Llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, use_mmap=False, verbose=False)
    return llm, rss_bytes() - before


def llama_last_logits(llm) -> torch.Tensor:
    import llama_cpp

    return torch.tensor(llama_cpp.llama_get_logits_ith(llm.ctx, -1)[: llm.n_vocab()])


def measure(size: str, dtype_name: str, args, folder: Path) -> dict:
    config, path, non_embed, head = build_checkpoint(size, folder)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ours, ours_mem = load_ours(path, dtype)
    pkg, pkg_mem = load_package(path, dtype_name)
    out = {"size": size, "dtype": dtype_name, "non_embed": non_embed, "mem_ours": ours_mem, "mem_pkg": pkg_mem}
    out["held_ours"] = storage_nbytes(list(ours.parameters()) + list(ours.buffers()))
    out["held_pkg"] = storage_nbytes(package_tensors(pkg))
    llm = None
    if args.llama_converter:
        gguf = export_gguf(path, args.llama_converter, dtype_name)
        llm, out["mem_llama"] = load_llama(gguf, args.threads, max(args.prompts) + args.decode_steps + 128)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for T in args.prompts:
            tokens = torch.randint(0, VOCAB, (1, T), generator=g)
            ids = tokens[0].tolist()
            ours(tokens[:, :16], logits_to_keep=1)  # warm-up (kernel build, allocator)
            pkg.forward(ids[:16], None)
            if llm is not None:
                llm.reset()
                llm.eval(ids[:16])
            t_ours, t_pkg, t_llama = [], [], []
            for _ in range(args.repeats):  # the programs take turns
                t0 = time.perf_counter()
                logits = ours(tokens, logits_to_keep=1, use_cache=False).logits[0, -1].float()
                t_ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pkg.forward(ids, None)
                t_pkg.append(time.perf_counter() - t0)
                if llm is not None:
                    t0 = time.perf_counter()
                    llm.reset()
                    llm.eval(ids)
                    t_llama.append(time.perf_counter() - t0)
            out[f"prefill{T}_ours"] = T / min(t_ours)
            out[f"prefill{T}_pkg"] = T / min(t_pkg)
            if llm is not None:
                out[f"prefill{T}_llama"] = T / min(t_llama)
                diff = (llama_last_logits(llm) - logits).abs().max() / logits.abs().max()
                out["llama_logit_err"] = max(out.get("llama_logit_err", 0.0), float(diff))
        prompt = torch.randint(0, VOCAB, (1, 64), generator=g)
        cache = ours(prompt, use_cache=True).past_key_values
        _, state = pkg.forward(prompt[0].tolist(), None)
        tok = int(prompt[0, -1])
        if llm is not None:
            llm.reset()
            llm.eval(prompt[0].tolist())
        step_ours, step_pkg, step_llama = [], [], []
        # alternate: the programs take turns every step (each step then starts with the other program's weights in
        # the caches); blocks: each decodes a block of consecutive steps in turn (as one program decoding alone)
        block = 1 if args.decode_order == "alternate" else max(1, args.decode_steps // 4)
        for _ in range(0, args.decode_steps, block):
            for _ in range(block):
                t0 = time.perf_counter()
                cache = ours(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).past_key_values
                step_ours.append(time.perf_counter() - t0)
            for _ in range(block):
                t0 = time.perf_counter()
                _, state = pkg.forward([tok], state)
                step_pkg.append(time.perf_counter() - t0)
            for _ in range(block if llm is not None else 0):
                t0 = time.perf_counter()
                llm.eval([tok])
                step_llama.append(time.perf_counter() - t0)
        out["decode_ms_ours"] = 1000 * statistics.median(step_ours)
        out["decode_ms_pkg"] = 1000 * statistics.median(step_pkg)
        if llm is not None:
            out["decode_ms_llama"] = 1000 * statistics.median(step_llama)
        for B in args.batches:
            rows = torch.randint(0, VOCAB, (B, 16), generator=g)
            cache = ours(rows, use_cache=True).past_key_values
            step = rows[:, -1:]
            times = []
            for _ in range(max(3, args.decode_steps // 4)):
                t0 = time.perf_counter()
                cache = ours(step, past_key_values=cache, use_cache=True).past_key_values
                times.append(time.perf_counter() - t0)
            out[f"batch{B}_ours"] = B / statistics.median(times)
            out[f"batch{B}_pkg"] = 1000 / out["decode_ms_pkg"]  # B sequential single-row steps
    del ours, pkg, llm
    gc.collect()
    # limits at this model's size
    flops_per_token = 2 * non_embed
    gflops = matmul_gflops(config.hidden_size)
    bytes_per_token = (non_embed + head) * (4 if dtype_name == "fp32" else 2)
    gbps = stream_gbps(non_embed + head)
    out["limit_prefill"] = gflops * 1e9 / flops_per_token
    out["limit_decode_ms"] = 1000 * bytes_per_token / (gbps * 1e9)
    out["gflops"], out["gbps"] = gflops, gbps
    return out


def report(results: list, args) -> str:
    lines = []
    for r in results:
        lines.append(
            f"\n## RWKV-7 {r['size']} ({r['non_embed'] / 1e6:.0f} M non-embedding parameters), {r['dtype']}, "
            f"{torch.get_num_threads()} threads; machine: matmul {r['gflops']:.0f} GFLOP/s, stream {r['gbps']:.1f} GB/s"
        )
        lines.append(f"{'measure':<34}{'rwkv pkg':>12}{'wuneng':>12}{'wuneng/pkg':>12}{'limit':>12}{'of limit':>10}")
        for T in args.prompts:
            o, p, lim = r[f"prefill{T}_ours"], r[f"prefill{T}_pkg"], r["limit_prefill"]
            lines.append(f"{f'prefill {T} (tok/s)':<34}{p:>12.0f}{o:>12.0f}{o / p:>12.2f}{lim:>12.0f}{o / lim:>10.0%}")
        o, p, lim = r["decode_ms_ours"], r["decode_ms_pkg"], r["limit_decode_ms"]
        lines.append(f"{'decode batch 1 (ms/token)':<34}{p:>12.1f}{o:>12.1f}{p / o:>12.2f}{lim:>12.1f}{lim / o:>10.0%}")
        for B in args.batches:
            o, p = r[f"batch{B}_ours"], r[f"batch{B}_pkg"]
            lines.append(f"{f'decode batch {B} (tok/s)':<34}{p:>12.0f}{o:>12.0f}{o / p:>12.2f}{'':>12}{'':>10}")
        lines.append(
            f"{'weights held (MiB)':<34}{r['held_pkg'] / 2**20:>12.0f}{r['held_ours'] / 2**20:>12.0f}"
            f"{r['held_ours'] / max(1, r['held_pkg']):>12.2f}"
        )
        # the RSS delta reads ~0 when the allocator reuses memory an earlier model of this process freed: no ratio
        # where either delta is below 1% of the weights held
        small = min(r["mem_pkg"], r["mem_ours"]) < 0.01 * r["held_ours"]
        ratio = f"{'n/a':>12}" if small else f"{r['mem_ours'] / r['mem_pkg']:>12.2f}"
        lines.append(
            f"{'resident memory added (MiB)':<34}{r['mem_pkg'] / 2**20:>12.0f}{r['mem_ours'] / 2**20:>12.0f}{ratio}"
        )
        if "decode_ms_llama" in r:
            lines.append(f"{'llama.cpp (GGUF, same weights)':<34}{'llama.cpp':>12}{'wuneng':>12}{'wuneng/llama':>14}")
            for T in args.prompts:
                o, q = r[f"prefill{T}_ours"], r[f"prefill{T}_llama"]
                lines.append(f"{f'  prefill {T} (tok/s)':<34}{q:>12.0f}{o:>12.0f}{o / q:>14.2f}")
            o, q = r["decode_ms_ours"], r["decode_ms_llama"]
            lines.append(f"{'  decode batch 1 (ms/token)':<34}{q:>12.1f}{o:>12.1f}{q / o:>14.2f}")
            q, o = r["mem_llama"] / 2**20, r["mem_ours"] / 2**20
            lines.append(f"{'  resident memory added (MiB)':<34}{q:>12.0f}{o:>12.0f}{o / max(1, q):>14.2f}")
            lines.append(f"  last-token logits, max |llama.cpp - wuneng| / max |wuneng|: {r['llama_logit_err']:.1e}")
    lines.append(
        "\nwuneng/pkg: > 1 is wuneng faster (for decode ms: the package's time / wuneng's); limit: the "
        "machine's prefill tokens/s or decode ms/token for this model; of limit: wuneng's share of it."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.1b,0.4b")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--prompts", default="1024,4096")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--decode-order",
        default="alternate",
        choices=["alternate", "blocks"],
        help="decode at batch 1: the programs alternate every step (default), or take turns in blocks of a quarter "
        "of --decode-steps consecutive steps (a program decoding alone keeps part of its weights in the last-level "
        "cache between steps; alternating steps evict them)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model, prompts of 64, to check that it runs")
    ap.add_argument(
        "--llama-converter",
        default=None,
        metavar="PATH",
        help="llama.cpp's convert_hf_to_gguf.py: adds llama.cpp (llama-cpp-python) as a second peer",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.prompts, args.batches, args.decode_steps = "tiny", "64", "4", 4
    args.prompts = [int(x) for x in str(args.prompts).split(",")]
    args.batches = [int(x) for x in str(args.batches).split(",")]
    torch.set_num_threads(args.threads)
    try:
        import rwkv  # noqa: F401
    except ImportError:
        print("the official rwkv package is not installed: pip install 'wuneng[test]'", file=sys.stderr)
        return 2
    if args.llama_converter:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp peer skipped: llama_cpp is not importable (pip install llama-cpp-python)", file=sys.stderr)
            args.llama_converter = None
    else:
        print("llama.cpp peer skipped: no --llama-converter (see benchmarks/README.md, llama.cpp)", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for dtype in args.dtypes.split(","):
                t0 = time.perf_counter()
                results.append(measure(size, dtype, args, Path(tmp)))
                print(f"[{size} {dtype}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    from importlib.metadata import version

    peers = f"rwkv {version('rwkv')}"
    if args.llama_converter:
        import llama_cpp

        peers += f", llama-cpp-python {llama_cpp.__version__}"
    print(
        f"torch {torch.__version__}, {peers}, RWKV_JIT_ON={os.environ['RWKV_JIT_ON']}, decode order {args.decode_order}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
