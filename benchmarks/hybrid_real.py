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
    python benchmarks/hybrid_real.py --layers 6 --threads 1 --context 1024 --breakdown   # where the time goes

``--breakdown`` adds where the time goes, per decoder layer (1 thread recommended: per-piece clocks of a 2-thread
step are blurred by the OpenMP pools): for prefill at the first --prefill length and decode after the first
--context, the models taking turns, each layer's mixer split by forward hooks and method timers into the q/k/v/o
projections, the WuNeng state side (the fused C call at decode; the low-rank maps and the state heads with the WKV-7
kernel at prefill), the state-query product, the fusion and middle heads (outside o_proj) and the rest of the
teacher's attention (RoPE, cache, SDPA); the MLP; the rest of the model. Beside it, the work that a model cannot
avoid: weight and state bytes read per decoded token (decoding at batch 1 streams them from memory) and matmul
FLOPs per prefilled token, and the ratio to the teacher each would allow if time followed it alone, so that the
measured ratio's distance to its target splits into extra work and overhead. The timers add a few microseconds per
piece; their totals are printed beside the untimed numbers.

``--kv-growth`` times the appends of WuNeng's key/value cache layer (:class:`wuneng.cache.GrowingKVLayer`) at the
shapes' key/value size (24 layers, 2 KV heads x 64, float32), a --prefill-chunk prefill up to 1024 tokens and then
one token at a time up to the longest --context plus --decode-steps, under growth rules taking turns: the default
(needed/16 rounded up to 256 positions), doubling (the rule before) and a fixed 256-position step; it prints the
append time per token (mean and the worst token: a reallocation) and the bytes held at the end against the
teacher's exact-size cache.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from wuneng.cache import GrowingKVLayer
from wuneng.layers.hybrid import ARWKVMixer, HybridMixer
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


#: the pieces of a decoder layer that --breakdown prints, in order (ms per layer)
PIECES = (
    ("mixer", "mixer (attention / hybrid / time-mix)"),
    ("proj", "  q/k/v/o projections"),
    ("state", "  state side (C call | state heads, WKV-7)"),
    ("lowrank", "  low-rank maps (prefill)"),
    ("state_query", "  state-query product"),
    ("fusion", "  fusion + middle heads (beyond o_proj)"),
    ("attn_core", "  rest of attention (RoPE, cache, SDPA)"),
    ("mlp", "MLP"),
    ("other", "rest of the model (norms, head), /layer"),
)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
_HYBRID_METHODS = {
    "_state_one_token": "state",
    "low_rank_outputs": "lowrank",
    "state_heads": "state",
    "modulate_query": "state_query",
    "fuse": "fuse",
}


@contextlib.contextmanager
def timed_pieces(model, acc: dict):
    """Accumulate seconds per piece of ``model``'s decoder layers into ``acc`` while the block runs: forward hooks
    on each layer's mixer (``self_attn``) and MLP, and timers around the projections' ``forward`` and a hybrid
    mixer's methods (instance attributes shadowing the class's, removed at the end)."""

    def add(key, seconds):
        acc[key] = acc.get(key, 0.0) + seconds

    def hook_pair(module, key):
        start = []

        def pre(_module, _args):
            start.append(time.perf_counter())

        def post(_module, _args, _out):
            add(key, time.perf_counter() - start.pop())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def timer(fn, key):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(key, time.perf_counter() - t)

        return timed

    handles, patched = [], []
    for layer in model.model.layers:
        mixer = layer.self_attn
        handles += hook_pair(mixer, "mixer") + hook_pair(layer.mlp, "mlp")
        if not isinstance(mixer, ARWKVMixer):
            # the projections' own forward timed (not a hook: a hooked o_proj makes the hybrid fusion keep its
            # output and add into a new tensor, a path the untimed run does not take)
            for name in _PROJECTIONS:
                proj = mixer._modules.get(name)
                if proj is not None:
                    proj.__dict__["forward"] = timer(proj.forward, "o_proj" if name == "o_proj" else "proj")
                    patched.append((proj, "forward"))
        if isinstance(mixer, HybridMixer):
            for name, key in _HYBRID_METHODS.items():
                mixer.__dict__[name] = timer(getattr(mixer, name), key)
                patched.append((mixer, name))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
        for owner, name in patched:
            del owner.__dict__[name]


def pieces_per_layer(acc: dict, step_seconds: float, layers: int) -> dict:
    """Seconds per piece (:data:`PIECES`) per layer from one step's accumulated hook times. o_proj runs inside a hybrid
    mixer's ``fuse``; the fusion is what ``fuse`` takes beyond it."""
    out = {k: acc.get(k, 0.0) for k in ("mixer", "state", "lowrank", "state_query", "mlp")}
    out["proj"] = acc.get("proj", 0.0) + acc.get("o_proj", 0.0)
    out["fusion"] = max(acc.get("fuse", 0.0) - acc.get("o_proj", 0.0), 0.0) if "fuse" in acc else 0.0
    if "proj" in acc:  # attention or hybrid: what the mixer spends outside the named pieces
        named = ("proj", "state", "lowrank", "state_query", "fusion")
        out["attn_core"] = out["mixer"] - sum(out[k] for k in named)
    else:
        out["attn_core"] = 0.0
    out["other"] = step_seconds - out["mixer"] - out["mlp"]
    return {k: v / layers for k, v in out.items()}


def work_per_token(model, context: int) -> dict:
    """What a model must move or compute per token at batch 1, float32 (the limits if time followed work alone):
    ``decode_bytes``: every parameter read once (tied embeddings once: the LM head reads the whole matrix) plus the
    key/value cache read at ``context`` tokens plus the recurrent states read and written; ``prefill_flops``: 2 x the
    matmul weights (2-D parameters except the token embedding; the LM head runs for one token per forward:
    ``logits_to_keep=1``) plus causal attention over (context + 1) / 2 keys on average (2 products of A
    per key) plus a WKV-7 step of ~10 FLOPs per state element (S a, the rank-2 update, S r); ``kv_copy_bytes``: what the
    teacher's cache (transformers' concatenating DynamicLayer) reads and writes again per token, 0 for WuNeng's."""
    config = model.config
    L = config.num_hidden_layers
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p for p in model.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    matmul = sum(p.numel() for p in params.values() if p.dim() >= 2 and p is not embed and p is not head)
    attention_layers, state_layers, state_elems = 0, 0, 0
    for layer in model.model.layers:
        mixer = layer.self_attn
        if isinstance(mixer, ARWKVMixer):
            state_layers += 1
            state_elems += mixer.num_heads * mixer.head_size**2
            continue
        attention_layers += 1
        if isinstance(mixer, HybridMixer):
            state_layers += 1
            state_elems += mixer.num_heads * mixer.head_dim**2
            if mixer.state_query:  # one d x d matrix applied per head
                matmul += (mixer.num_heads - 1) * mixer.head_dim**2
    teacher_config = getattr(config, "teacher_config", config)
    kv_heads = getattr(teacher_config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(teacher_config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_bytes = attention_layers * 2 * kv_heads * head_dim * context * 4
    state_bytes = 2 * state_elems * 4  # read and written
    # transformers' DynamicLayer (the teacher's cache) concatenates: every token reads and writes its whole cache once
    # more; WuNeng's GrowingKVLayer appends in place
    kv_copy_bytes = 0 if isinstance(model, WuNengForCausalLM) else 2 * kv_bytes
    flops = 2 * matmul + attention_layers * 4 * q_width * (context + 1) / 2 + 10 * state_elems
    return {
        "decode_bytes": weight_bytes + kv_bytes + state_bytes,
        "weight_bytes": weight_bytes,
        "cache_read_bytes": kv_bytes + state_bytes,
        "kv_copy_bytes": kv_copy_bytes,
        "prefill_flops": flops,
        "layers": L,
        "attention_layers": attention_layers,
        "state_layers": state_layers,
    }


@torch.no_grad()
def measure_breakdown(models: dict, ids, prompt, steps: int, chunk: int, repeats: int) -> dict:
    """Prefill of ``ids`` [1, T] and decode after ``prompt`` with the pieces timed (:func:`timed_pieces`), the models
    taking turns: per model the median over ``repeats`` forwards (prefill) or ``steps`` tokens (decode) of the step's
    seconds and of each piece's seconds per layer (:func:`pieces_per_layer`).
    Returns {"prefill" | "decode": {name: {"step": seconds, piece: seconds per layer}}}."""
    out = {}
    for phase in ("prefill", "decode"):
        runs = {name: [] for name in models}
        state = {}
        if phase == "decode":
            state = {name: build_cache(model, prompt, chunk) for name, model in models.items()}
            for _ in range(2):  # warm-up steps
                for name, model in models.items():
                    cache, token = state[name]
                    model(token, past_key_values=cache, use_cache=True)
        else:
            for model in models.values():
                model(ids, use_cache=False, logits_to_keep=1)
        for _ in range(repeats if phase == "prefill" else steps):
            for name, model in models.items():
                acc = {}
                with timed_pieces(model, acc):
                    start = time.perf_counter()
                    if phase == "prefill":
                        model(ids, use_cache=False, logits_to_keep=1)
                    else:
                        cache, token = state[name]
                        model(token, past_key_values=cache, use_cache=True)
                    seconds = time.perf_counter() - start
                row = pieces_per_layer(acc, seconds, model.config.num_hidden_layers)
                row["step"] = seconds
                runs[name].append(row)
        out[phase] = {
            name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()
        }
        del state
    return out


def piece_bytes(model, context: int) -> dict:
    """Bytes one decoded token reads per layer in each piece of :data:`PIECES` (float32 weights of the last decoder
    layer, a typical one: the first hybrid layer has no value-residual LoRA; its key/value cache at ``context``
    tokens, its recurrent state read and written): what the decode breakdown divides by its times to give each
    piece's streaming rate."""
    layer = model.model.layers[-1]
    mixer = layer.self_attn

    def nbytes(module_or_tensors) -> int:
        tensors = (
            module_or_tensors.parameters() if isinstance(module_or_tensors, torch.nn.Module) else module_or_tensors
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    out = {key: 0 for key, _ in PIECES}
    out["mlp"] = nbytes(layer.mlp)
    if isinstance(mixer, ARWKVMixer):
        out["mixer"] = nbytes(mixer) + 2 * mixer.num_heads * mixer.head_size**2 * 4
        return out
    out["proj"] = sum(nbytes(mixer._modules[n]) for n in _PROJECTIONS if mixer._modules.get(n) is not None)
    kv_heads, d = mixer.config.num_key_value_heads, mixer.head_dim
    out["attn_core"] = 2 * kv_heads * d * context * 4
    if isinstance(mixer, HybridMixer):
        weights = mixer.one_token_weights()
        out["state"] = nbytes(weights[:-1]) + 2 * mixer.num_heads * d * d * 4
        out["state_query"] = nbytes([mixer.state_query_proj]) if mixer.state_query else 0
        # the output projections of the middle heads and (concat fusion) of Y; the per-channel vectors are negligible
        out["fusion"] = nbytes(mixer.o_middle) if mixer.num_middle_heads > 0 else 0
        out["fusion"] += nbytes(mixer.o_state) if mixer.fusion == "concat" else 0
    out["mixer"] = sum(out[k] for k in ("proj", "attn_core", "state", "state_query", "fusion"))
    return out


def print_breakdown(models: dict, breakdown: dict, prefill_tokens: int, context: int, results: dict) -> None:
    """The per-piece tables of :func:`measure_breakdown` and the work per token (:func:`work_per_token`) with the
    ratio to the teacher each limit allows beside the measured ratio."""
    names = list(models)
    others = [n for n in names if n != "teacher"]
    for phase, label in (("prefill", f"prefill {prefill_tokens}"), ("decode", f"decode after {context}")):
        rows = breakdown[phase]
        print(f"\nwhere the time goes, {label}, ms per layer (median; hooks on):")
        print(f"{'piece':<42}" + "".join(f"{n:>10}" for n in names) + "".join(f"{n + '-T':>10}" for n in others))
        for key, text in PIECES:
            line = f"{text:<42}" + "".join(f"{1e3 * rows[n][key]:>10.3f}" for n in names)
            if "teacher" in rows:
                line += "".join(f"{1e3 * (rows[n][key] - rows['teacher'][key]):>+10.3f}" for n in others)
            print(line)
        step = {n: rows[n]["step"] for n in names}
        per_token = {n: step[n] / (prefill_tokens if phase == "prefill" else 1) for n in names}
        print(
            f"{'whole step with hooks, ms':<42}"
            + "".join(f"{1e3 * step[n]:>10.2f}" for n in names)
            + ("".join(f"{per_token['teacher'] / per_token[n]:>9.3f}x" for n in others) if "teacher" in step else "")
        )
    decode = breakdown["decode"]
    moved = {n: piece_bytes(m, context) for n, m in models.items()}
    print(f"\ndecode after {context}: MB read per layer and token by each piece / its rate in GB/s (hooks on):")
    print(f"{'piece':<42}" + "".join(f"{n:>20}" for n in names))
    for key, text in PIECES:
        if key in ("other", "lowrank"):
            continue
        cells = []
        for n in names:
            mb, seconds = moved[n][key] / 1e6, decode[n][key]
            cells.append(f"{mb:>9.2f} / {mb / 1e3 / seconds:>6.2f}" if mb > 0 and seconds > 0 else f"{'-':>20}")
        print(f"{text:<42}" + "".join(f"{c:>20}" for c in cells))
    if "teacher" not in models:
        return
    work = {n: work_per_token(m, context) for n, m in models.items()}
    prefill_work = {n: work_per_token(m, prefill_tokens) for n, m in models.items()}
    print("\nwork per token (float32, batch 1) and the ratio to the teacher it allows:")
    print(f"{'':<42}" + "".join(f"{n:>10}" for n in names) + "".join(f"{n + '/T':>10}" for n in others))
    rows = [
        ("weights read per decoded token, MB", {n: work[n]["weight_bytes"] / 1e6 for n in names}, False),
        ("cache read (+ states written), MB", {n: work[n]["cache_read_bytes"] / 1e6 for n in names}, False),
        (f"bytes per decoded token after {context}, MB", {n: work[n]["decode_bytes"] / 1e6 for n in names}, False),
        (
            "  + cache copy (teacher's DynamicLayer), MB",
            {n: (work[n]["decode_bytes"] + work[n]["kv_copy_bytes"]) / 1e6 for n in names},
            False,
        ),
        (
            f"FLOPs per prefill token (T {prefill_tokens}), M",
            {n: prefill_work[n]["prefill_flops"] / 1e6 for n in names},
            False,
        ),
    ]
    for text, row, _ in rows:
        print(
            f"{text:<42}"
            + "".join(f"{row[n]:>10.2f}" for n in names)
            + "".join(f"{row['teacher'] / row[n]:>9.3f}x" for n in others)
        )
    for key, measured_key, what in (
        ("decode_bytes", f"decode{context}", "decode (bytes)"),
        ("prefill_flops", f"prefill{prefill_tokens}", "prefill (FLOPs)"),
    ):
        source = work if key == "decode_bytes" else prefill_work
        for n in others:
            bound = source["teacher"][key] / source[n][key]
            if key == "decode_bytes":
                copy = source["teacher"]["kv_copy_bytes"]
                what = (
                    f"decode (bytes; {(source['teacher'][key] + copy) / source[n][key]:.3f}x with the teacher's copy)"
                )
            row = results.get(measured_key)
            if row is None:
                continue
            measured = row[n] / row["teacher"] if measured_key.startswith("prefill") else row["teacher"] / row[n]
            gap = 1 - measured
            share = (1 - bound) / gap if gap > 0 else float("nan")
            print(
                f"{n} {what}: work allows {bound:.3f}x, measured {measured:.3f}x"
                + (f": extra work explains {100 * share:.0f}% of the distance to 1x" if gap > 0 else "")
            )


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
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each piece of a layer (prefill at the first --prefill, decode after the first --context) and "
        "print the work per token each model cannot avoid (bytes per decoded token, FLOPs per prefill token)",
    )
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
    breakdown = None
    if args.breakdown:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, vocab, (1, args.prefill[0]), generator=g)
        prompt = torch.randint(0, vocab, (1, args.context[0]), generator=g)
        breakdown = measure_breakdown(models, ids, prompt, args.decode_steps, args.prefill_chunk, args.repeats)
        print_breakdown(models, breakdown, args.prefill[0], args.context[0], results)
    rss = resident_memory()
    if rss:
        print(f"process VmRSS {rss['VmRSS'] / mib:.0f} MiB, VmHWM {rss['VmHWM'] / mib:.0f} MiB")
    print(f"load average at the end {load_average()}, total {time.perf_counter() - t0:.0f} s")
    return {
        "results": results,
        "ratios": ratios,
        "cache_bytes": cache_bytes_by_context,
        "param_bytes": params,
        "breakdown": breakdown,
    }


if __name__ == "__main__":
    sys.exit(main() and 0)
