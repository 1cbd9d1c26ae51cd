"""WuNeng and ARWKV against their Qwen2 teacher at Qwen2.5-0.5B shapes, on CPU, in one process (issue 17).

Three models built from one random teacher (Qwen2Config: 24 layers, hidden 896, 14 heads, 2 KV heads, head_dim
64, intermediate 4864, vocab 151936, tied embeddings; float32):

    teacher   transformers Qwen2ForCausalLM (sdpa attention)
    wuneng    WuNengForCausalLM.from_teacher(teacher) with the defaults (gate fusion, 4 middle heads, state-query
              modulation), its new parameters perturbed so that every path of the mixer is live
    arwkv     WuNengForCausalLM.from_teacher(teacher, attention=False): RWKV-7 time-mix in every layer

Measured, the models taking turns inside each repeat so that load from other processes hits them alike:

    prefill   tokens/s of one forward of a --prefill-token prompt (default 1024; also 4096 with --prefill 1024
              4096), no grad, ``logits_to_keep=1``: the best of --repeats
    decode    ms/token at batch 1, greedy, after a --context-token prompt (default 1024 and 8192): the median of
              --decode-steps steps (two warm-up steps first). The prompt's cache is built once per model and
              context, in chunks of --prefill-chunk tokens (not timed)
    memory    parameter bytes of each model, its cache bytes after the longest context, and the process's
              resident memory (VmRSS, VmHWM) at the end

and the ratios to the teacher (tokens/s ratio for prefill, teacher ms / model ms for decode: > 1 is faster).
Targets (issue 17): wuneng prefill >= 0.85x; wuneng decode >= 0.9x after 1024 and > 1x after 8192; arwkv decode
> 1x after 1024.

    python benchmarks/hybrid_real.py                       # the full run, 2 threads (about 6-8 minutes)
    python benchmarks/hybrid_real.py --quick               # tiny shapes, seconds (the test runs this)
    python benchmarks/hybrid_real.py --context 1024        # skip the slow 8192-token cache
    python benchmarks/hybrid_real.py --layers 4            # the same shapes with 4 decoder layers (profiling)
    python benchmarks/hybrid_real.py --kv-growth           # only the key/value buffer growth rules (seconds)

``--kv-growth`` times the appends of WuNeng's key/value cache layer (:class:`wuneng.cache.GrowingKVLayer`) at the
shapes' key/value size (24 layers, 2 KV heads x 64, float32), a --prefill-chunk prefill up to 1024 tokens and then
one token at a time up to the longest --context plus --decode-steps, under growth rules taking turns: the default
(needed/16 rounded up to 256 positions), doubling (the rule before) and a fixed 256-position step; it prints the
append time per token (mean and the worst token: a reallocation) and the bytes held at the end against the
teacher's exact-size cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from wuneng.cache import GrowingKVLayer
from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.runtime import tune_cpu_allocator

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
)
QUICK = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
MODELS = ("teacher", "wuneng", "arwkv")


def build_models(shapes: dict, seed: int = 0) -> dict:
    """{"teacher", "wuneng", "arwkv"} -> model in eval mode, float32, from one random teacher."""
    torch.manual_seed(seed)
    teacher = Qwen2ForCausalLM(Qwen2Config(**shapes, attn_implementation="sdpa")).eval()
    wuneng = WuNengForCausalLM.from_teacher(teacher).eval()
    with torch.no_grad():  # perturb the zero inits: every path of the mixer is live, as after training
        new = wuneng.new_parameter_names()
        for name, p in wuneng.named_parameters():
            if name in new:
                p.add_(0.01 * torch.randn_like(p))
    arwkv = WuNengForCausalLM.from_teacher(teacher, attention=False).eval()
    return {"teacher": teacher, "wuneng": wuneng, "arwkv": arwkv}


def new_cache(model):
    if isinstance(model, WuNengForCausalLM):
        return model.new_cache()
    return DynamicCache(config=model.config)


def tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from a cache (its layers' key/value buffers and recurrent
    states; not the weights a WuNeng cache keeps derived for its decoding session, ``derived_weights``)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, (torch.nn.Module, type)):
            stack.extend(v for k, v in vars(x).items() if k != "derived_weights")
    return total


def resident_memory() -> dict:
    """VmRSS and VmHWM of this process in bytes (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


@torch.no_grad()
def prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def measure_prefill(models: dict, ids, repeats: int) -> dict:
    """name -> tokens/s: the best of ``repeats`` forwards, the models taking turns (after one warm-up each)."""
    times = {name: [] for name in models}
    for model in models.values():
        prefill_seconds(model, ids)
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(prefill_seconds(model, ids))
    return {name: ids.shape[1] / min(t) for name, t in times.items()}


@torch.no_grad()
def build_cache(model, prompt, chunk: int):
    """(cache, next token [1, 1]) after feeding ``prompt`` [1, T] in chunks of ``chunk`` tokens."""
    cache = new_cache(model)
    for start in range(0, prompt.shape[1], chunk):
        out = model(prompt[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def measure_decode(models: dict, prompt, steps: int, chunk: int):
    """(name -> ms/token: the median step, the models taking turns one token at a time; name -> cache bytes at the
    end)."""
    state = {name: build_cache(model, prompt, chunk) for name, model in models.items()}
    times = {name: [] for name in models}
    for step in range(steps + 2):
        for name, model in models.items():
            cache, token = state[name]
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - start)
            state[name] = (out.past_key_values, token)
    cache_bytes = {name: tensor_bytes(state[name][0]) for name in models}
    del state
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}, cache_bytes


class _DoublingKVLayer(GrowingKVLayer):
    """The growth rule before session 9: twice the positions held (at least the positions needed)."""

    @classmethod
    def grown_capacity(cls, needed: int) -> int:
        return max(2 * (needed - 1), needed)


class _FixedStepKVLayer(GrowingKVLayer):
    """A fixed step: the positions needed rounded up to the next multiple of 256."""

    growth_divisor = 1 << 62


KV_GROWTH_RULES = {"needed/16": GrowingKVLayer, "doubling": _DoublingKVLayer, "fixed 256": _FixedStepKVLayer}


def measure_kv_growth(shapes: dict, context: int, chunk: int, repeats: int = 3) -> dict:
    """rule -> (mean ms per token, worst token ms, held bytes at the end): ``shapes``' layers of key/value buffers
    (batch 1) filled by a prefill in chunks of ``chunk`` up to 1024 tokens, then one token at a time up to
    ``context``; the rules take turns ``repeats`` times (the best mean, the worst token of that repeat)."""
    L, H, d = shapes["num_hidden_layers"], shapes["num_key_value_heads"], shapes["head_dim"]
    g = torch.Generator().manual_seed(2)
    prompt = min(1024, context)
    keys = torch.randn(1, H, context, d, generator=g)
    values = torch.randn(1, H, context, d, generator=g)
    best = {}
    for _ in range(repeats):
        for rule, layer_class in KV_GROWTH_RULES.items():
            layers = [layer_class() for _ in range(L)]
            with torch.no_grad():
                for start in range(0, prompt, chunk):
                    stop = min(start + chunk, prompt)
                    for layer in layers:
                        layer.update(keys[:, :, start:stop], values[:, :, start:stop])
                steps = []
                for t in range(prompt, context):
                    t0 = time.perf_counter()
                    for layer in layers:
                        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
                    steps.append(time.perf_counter() - t0)
            held = sum(layer.nbytes() for layer in layers)
            mean_ms = 1e3 * sum(steps) / max(len(steps), 1)
            if rule not in best or mean_ms < best[rule][0]:
                best[rule] = (mean_ms, 1e3 * max(steps, default=0.0), held)
            del layers
    return best


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, nargs="*", default=[1024], help="prompt lengths timed (default 1024)")
    parser.add_argument("--context", type=int, nargs="*", default=[1024, 8192], help="decode after these contexts")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="chunk of the (untimed) cache prefill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, prompts 64, contexts 64 and 256")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shapes' 24)")
    parser.add_argument("--kv-growth", action="store_true", help="only time the key/value buffer growth rules")
    args = parser.parse_args(argv)
    shapes = QWEN25_05B
    if args.quick:
        shapes, args.prefill, args.context, args.decode_steps, args.repeats = QUICK, [64], [64, 256], 4, 1
        args.prefill_chunk = 128
    if args.layers is not None:
        shapes = {**shapes, "num_hidden_layers": args.layers}
    warnings.filterwarnings("ignore")
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    if args.kv_growth:
        context = max(args.context) + args.decode_steps
        print(
            f"load average {load_average()}; key/value appends of {shapes['num_hidden_layers']} layers up to {context}"
        )
        growth = measure_kv_growth(shapes, context, args.prefill_chunk, args.repeats)
        exact = 2 * shapes["num_hidden_layers"] * shapes["num_key_value_heads"] * context * shapes["head_dim"] * 4
        print(f"{'rule':<12}{'ms/token':>10}{'worst ms':>10}{'held MiB':>10}{'/teacher':>10}")
        for rule, (mean_ms, worst_ms, held) in growth.items():
            print(f"{rule:<12}{mean_ms:>10.4f}{worst_ms:>10.2f}{held / 2**20:>10.1f}{held / exact:>9.3f}x")
        print(f"teacher (DynamicLayer) holds exactly {exact / 2**20:.1f} MiB; load average {load_average()}")
        return {"kv_growth": growth, "teacher_bytes": exact}
    t0 = time.perf_counter()
    models = build_models(shapes)
    models = {name: models[name] for name in args.models}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load_average()}, "
        f"models built in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:>8}: {n / 1e6:7.1f}M parameters", flush=True)
    g = torch.Generator().manual_seed(1)
    vocab = shapes["vocab_size"]
    results, labels = {}, {}
    for T in args.prefill:
        ids = torch.randint(0, vocab, (1, T), generator=g)
        results[f"prefill{T}"] = measure_prefill(models, ids, args.repeats)
        labels[f"prefill{T}"] = (f"prefill tok/s (T {T})", True)
        print(f"prefill {T}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[f"prefill{T}"].items()), flush=True)
    cache_bytes, cache_bytes_by_context = {}, {}
    for T in args.context:
        prompt = torch.randint(0, vocab, (1, T), generator=g)
        ms, cache_bytes = measure_decode(models, prompt, args.decode_steps, args.prefill_chunk)
        results[f"decode{T}"] = ms
        cache_bytes_by_context[T] = cache_bytes
        labels[f"decode{T}"] = (f"decode ms/token (B 1, after {T})", False)
        print(f"decode after {T}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)

    others = [n for n in models if n != "teacher"]
    print()
    header = f"{'measure':<34}" + "".join(f"{n:>10}" for n in models)
    if "teacher" in models:
        header += "".join(f"{n + '/T':>10}" for n in others)
    print(header)
    ratios = {}
    for key, row in results.items():
        label, higher_is_better = labels[key]
        line = f"{label:<34}" + "".join(f"{row[n]:>10.2f}" for n in models)
        if "teacher" in models:
            for n in others:
                r = row[n] / row["teacher"] if higher_is_better else row["teacher"] / row[n]
                ratios[(key, n)] = r
                line += f"{r:>9.2f}x"
        print(line)
    mib = 2**20
    params = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in models.items()}
    print(f"{'parameters MiB':<34}" + "".join(f"{params[n] / mib:>10.0f}" for n in models))
    if cache_bytes:
        last = args.context[-1]
        print(f"{f'cache MiB (after {last})':<34}" + "".join(f"{cache_bytes[n] / mib:>10.1f}" for n in models))
    rss = resident_memory()
    if rss:
        print(f"process VmRSS {rss['VmRSS'] / mib:.0f} MiB, VmHWM {rss['VmHWM'] / mib:.0f} MiB")
    print(f"load average at the end {load_average()}, total {time.perf_counter() - t0:.0f} s")
    return {"results": results, "ratios": ratios, "cache_bytes": cache_bytes_by_context, "param_bytes": params}


if __name__ == "__main__":
    sys.exit(main() and 0)
