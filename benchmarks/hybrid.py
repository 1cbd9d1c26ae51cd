"""WuNeng hybrid vs its Qwen2 teacher vs the ARWKV replacement, on CPU, in one run.

Three models of the same shapes (a Qwen2 teacher of about 20M parameters, random weights):

    teacher   transformers Qwen2ForCausalLM (sdpa attention)
    wuneng    WuNengForCausalLM.from_teacher(teacher) with the defaults (gate fusion, 4 middle heads,
              state-query modulation), its new parameters perturbed so that nothing is skipped
    arwkv     WuNengForCausalLM.from_teacher(teacher, attention=False): RWKV-7 time-mix in every layer
    attn      WuNengForCausalLM.from_teacher(teacher, hybrid_layers=[]): the teacher's own function in this
              library's implementation (a control: wuneng / attn is the cost of the state heads alone, free of
              the differences between two implementations of the same attention, e.g. the KV cache)

Measured (tokens/s; the models take turns, so that load from other processes hits them alike; train and
prefill: the best of --repeats; decode: the median step of --decode-steps):

    train     forward + backward + AdamW step, batch 8 x 512 (B x T tokens per step)
    prefill   forward of one 2048-token prompt, no grad
    decode    one token at a time at batch 1 after a 2048-token prompt (its cache), greedy, no grad

and the ratios to the teacher (and wuneng / attn). Targets (issue 3): wuneng train >= 0.7x, wuneng decode
>= 0.7x, arwkv decode > 1x the teacher.

    python benchmarks/hybrid.py
    python benchmarks/hybrid.py --quick          # batch 2 x 256, prompt 512, for a smoke run
    python benchmarks/hybrid.py --threads 2      # default 1 thread (least sensitive to other processes)
    python benchmarks/hybrid.py --skip-train --skip-prefill --prompt 8192     # decode at a longer context
    python benchmarks/hybrid.py --allocator system --wkv-impl chunked          # as in sessions 1-3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.ops.wkv7.cpu import cpu_kernel_available, cpu_kernel_error
from wuneng.runtime import cpu_allocator_tuned, tune_cpu_allocator

TEACHER_SHAPES = dict(
    vocab_size=8192,
    hidden_size=384,
    intermediate_size=2048,
    num_hidden_layers=5,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = Qwen2ForCausalLM(Qwen2Config(**TEACHER_SHAPES, attn_implementation="sdpa"))
    wuneng = WuNengForCausalLM.from_teacher(teacher)
    with torch.no_grad():  # perturb the zero inits: every path of the mixer is live, as after training
        new = wuneng.new_parameter_names()
        for name, p in wuneng.named_parameters():
            if name in new:
                p.add_(0.01 * torch.randn_like(p))
    arwkv = WuNengForCausalLM.from_teacher(teacher, attention=False)
    attn = WuNengForCausalLM.from_teacher(teacher, hybrid_layers=[])
    return {"teacher": teacher, "wuneng": wuneng, "arwkv": arwkv, "attn": attn}


def new_cache(model):
    if isinstance(model, WuNengForCausalLM):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def time_train(model, opt, ids) -> float:
    model.train()
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def time_prefill(model, ids) -> float:
    model.eval()
    start = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def decode_rates(models, prompt, steps: int):
    """Decoded tokens/s per model at batch 1 after prefilling ``prompt`` (the prefill is not timed): the models
    decode in turns, one token each, and each rate is 1 / the median step time."""
    state = {}
    for name, model in models.items():
        model.eval()
        cache = new_cache(model)
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    times = {name: [] for name in models}
    for step in range(steps + 2):
        for name, model in models.items():
            cache, token = state[name]
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step >= 2:  # the first two steps warm up
                times[name].append(time.perf_counter() - start)
            state[name] = (out.past_key_values, token)
    return {name: 1.0 / statistics.median(t) for name, t in times.items()}


def measure(models, fn, repeats: int):
    """Best (minimum) seconds per call of fn(name, model) over ``repeats``, the models taking turns inside each
    repeat (after a warm-up): the minimum is the least disturbed by other processes."""
    times = {name: [] for name in models}
    for name, model in models.items():
        fn(name, model)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(fn(name, model))
    return {name: min(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed CPU more threads wait on each other)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 256, prompt 512, 8 decode steps, 1 repeat")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument(
        "--allocator",
        choices=("tuned", "system"),
        default="tuned",
        help="tuned (default): wuneng.runtime.tune_cpu_allocator() for the whole process, as "
        "`wuneng train` does on CPU; system: the C library's defaults. All models share it.",
    )
    parser.add_argument(
        "--wkv-impl",
        choices=("auto", "chunked"),
        default="auto",
        help="WKV-7 form of the wuneng/arwkv models (auto: the C kernel on CPU when it builds)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.prompt, args.decode_steps, args.repeats = 2, 256, 512, 16, 1
    warnings.filterwarnings("ignore")
    if args.allocator == "tuned":
        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models()
    for name in ("wuneng", "arwkv"):
        for module in models[name].modules():
            if hasattr(module, "wkv_impl"):
                module.wkv_impl = args.wkv_impl
    vocab = TEACHER_SHAPES["vocab_size"]
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)

    kernel = "C kernel" if cpu_kernel_available() else f"unavailable ({cpu_kernel_error()})"
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, allocator {args.allocator} "
        f"(tuned: {cpu_allocator_tuned()}), wkv {args.wkv_impl} [{kernel}]"
    )
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:>8}: {n / 1e6:6.2f}M parameters")
    results = {}
    if not args.skip_train:
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
        sec = measure(models, lambda name, m: time_train(m, opts[name], train_ids), args.repeats)
        results["train"] = {k: args.batch * args.seq / v for k, v in sec.items()}
        del opts
    if not args.skip_prefill:
        sec = measure(models, lambda name, m: time_prefill(m, prompt), args.repeats)
        results["prefill"] = {k: args.prompt / v for k, v in sec.items()}
    results["decode"] = decode_rates(models, prompt, args.decode_steps)

    labels = {
        "train": f"train step tok/s (B {args.batch} x T {args.seq})",
        "prefill": f"prefill tok/s (T {args.prompt})",
        "decode": f"decode tok/s (B 1, after {args.prompt})",
    }
    print()
    print(
        f"{'measure':<40}{'teacher':>10}{'wuneng':>10}{'arwkv':>10}{'attn':>10}"
        f"{'wuneng/T':>10}{'arwkv/T':>10}{'wuneng/attn':>12}"
    )
    for key, row in results.items():
        t = row["teacher"]
        print(
            f"{labels[key]:<40}{row['teacher']:>10.1f}{row['wuneng']:>10.1f}{row['arwkv']:>10.1f}{row['attn']:>10.1f}"
            f"{row['wuneng'] / t:>10.2f}{row['arwkv'] / t:>10.2f}{row['wuneng'] / row['attn']:>12.2f}"
        )
    return results


if __name__ == "__main__":
    main()
