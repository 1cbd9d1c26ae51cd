"""Meta-State against RWKV-7 and a Qwen2 Transformer of similar size: decode time per token at several
context lengths, and training throughput, in one run.

Models (float32, CPU by default), all of width C and depth L, byte vocabulary (256 + 3):

    metastate   MetaStateForCausalLM: RWKV-7 time-mix + Meta-State layer (M = 4C parameter tokens, all heads SSE)
    rwkv7       RWKV7ForCausalLM (channel-mix width 4C): the same state, no SSE
    qwen2       transformers' Qwen2ForCausalLM, C / 64 heads of 64 (no GQA), SwiGLU width 8C/3 (so its
                parameter count is close), decoded with its KV cache (DynamicCache)

Decode: the context (``--contexts``, default 256 2048 8192) is prefilled in one forward for every (model, context)
pair, then the pairs take turns decoding one token with their cache, ``--decode-steps`` timed tokens each (after
3 untimed ones); ms/token is the median.
Training: forward + backward + AdamW step on [B, T] = ``--train-batch`` x ``--train-len`` batches; tokens/s is
B * T / median step time. The models take turns inside each repeat so that load from other processes hits them
alike: compare the ratios of one run (printed at the end), not absolute numbers across machines. One thread by
default: on a loaded machine torch's intra-op threads wait for each other and a 1-token step takes 10x longer.

Targets (issue 4): Meta-State ms/token at the longest context within 1.1x of the shortest; Meta-State training
tokens/s >= 0.8x RWKV-7's.

    python benchmarks/metastate.py                      # C=256, L=4; contexts 256 2048 8192
    python benchmarks/metastate.py --quick              # C=128, L=2; contexts 256 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

VOCAB = 259  # the byte tokenizer: 256 bytes + pad / bos / eos


def build_models(hidden: int, layers: int, head_size: int = 64) -> dict:
    """The three peers at width ``hidden`` and depth ``layers``, float32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, head_size=head_size)
    meta = MetaStateForCausalLM(MetaStateConfig(**common))
    rwkv = RWKV7ForCausalLM(RWKV7Config(**common))
    # trained-like weights: the zero inits (W_o, V_P, eta, ...) would make every block the identity
    with torch.no_grad():
        for model in (meta, rwkv):
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    heads = hidden // head_size
    qwen_cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=(8 * hidden) // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    qwen_cfg._attn_implementation = "sdpa"
    qwen = Qwen2ForCausalLM(qwen_cfg)
    return {"metastate": meta.eval(), "rwkv7": rwkv.eval(), "qwen2": qwen.eval()}


class Decoder:
    """One (model, context) pair: the cache after prefilling ``context`` tokens, advanced one token per call."""

    def __init__(self, model, context: int):
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(0, VOCAB, (1, context), generator=g)
        self.model = model
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
        self.cache, self.token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(self) -> float:
        """Decode one token with the cache; returns the seconds it took."""
        t0 = time.perf_counter()
        out = self.model(self.token, past_key_values=self.cache, use_cache=True)
        dt = time.perf_counter() - t0
        self.cache, self.token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return dt


def decode_ms_per_token(models: dict, contexts, steps: int, warmup: int = 3) -> dict:
    """ms/token (median of ``steps``) for every model and context. All pairs are prefilled first, then they take
    turns one token at a time, so that load from other processes falls on every pair alike."""
    decoders = {(n, c): Decoder(m, c) for c in contexts for n, m in models.items()}
    times = {key: [] for key in decoders}
    for i in range(warmup + steps):
        for key, dec in decoders.items():
            dt = dec.step()
            if i >= warmup:
                times[key].append(dt)
    return {n: {c: 1e3 * statistics.median(times[(n, c)]) for c in contexts} for n in models}


def cache_bytes(model, context: int) -> int:
    """Bytes the decode cache holds after ``context`` tokens (recurrent state or KV cache)."""
    with torch.no_grad():
        cache = model(torch.zeros(1, context, dtype=torch.long), use_cache=True, logits_to_keep=1).past_key_values
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def train_step_seconds(model, optimizer, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = model(ids, labels=ids).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared machine more threads wait on each other)",
    )
    parser.add_argument("--quick", action="store_true", help="C=128, L=2, contexts 256 2048, fewer steps")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.contexts, args.decode_steps, args.train_steps = 128, 2, [256, 2048], 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    models = build_models(args.hidden, args.layers)
    names = list(models)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print(f"C={args.hidden} L={args.layers} vocab={VOCAB} threads={torch.get_num_threads()} torch {torch.__version__}")
    for n in names:
        print(f"  {n:<10} {params[n] / 1e6:6.2f} M parameters")

    decode = decode_ms_per_token(models, args.contexts, args.decode_steps)
    ends = (args.contexts[0], args.contexts[-1])
    cache = {n: {c: cache_bytes(m, c) for c in ends} for n, m in models.items()}
    print("\ndecode, ms/token (batch 1, after prefilling the context)")
    print(
        f"{'model':<10}"
        + "".join(f"{c:>10}" for c in args.contexts)
        + f"{'last/first':>12}"
        + f"{'cache first->last':>26}"
    )
    for n in names:
        row = "".join(f"{decode[n][c]:>10.2f}" for c in args.contexts)
        ratio = decode[n][args.contexts[-1]] / decode[n][args.contexts[0]]
        c0, c1 = cache[n][args.contexts[0]], cache[n][args.contexts[-1]]
        print(f"{n:<10}{row}{ratio:>11.2f}x{f'{c0 / 2**20:.2f} -> {c1 / 2**20:.2f} MiB':>26}")

    # training: interleaved steps, one optimiser per model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.train_batch, args.train_len), generator=g)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    for m in models.values():
        m.train()
    times = {n: [] for n in names}
    for step in range(args.train_steps + 1):
        for n in names:
            dt = train_step_seconds(models[n], opts[n], ids)
            if step > 0:  # the first step warms up allocator and autograd
                times[n].append(dt)
    tps = {n: args.train_batch * args.train_len / statistics.median(times[n]) for n in names}
    print(f"\ntraining, tokens/s (forward + backward + AdamW, B={args.train_batch}, T={args.train_len})")
    for n in names:
        print(f"{n:<10}{tps[n]:>10.0f}")

    flat = decode["metastate"][args.contexts[-1]] / decode["metastate"][args.contexts[0]]
    train_ratio = tps["metastate"] / tps["rwkv7"]
    print("\ntargets")
    print(
        f"  Meta-State decode ms/token at {args.contexts[-1]} / at {args.contexts[0]}: {flat:.2f}x (target <= 1.10x) "
        f"{'PASS' if flat <= 1.10 else 'MISS'}"
    )
    print(
        f"  Meta-State / RWKV-7 training tokens/s: {train_ratio:.2f}x (target >= 0.80x) {'PASS' if train_ratio >= 0.8 else 'MISS'}"
    )
    print(
        f"  Qwen2 decode ms/token at {args.contexts[-1]} / at {args.contexts[0]}: "
        f"{decode['qwen2'][args.contexts[-1]] / decode['qwen2'][args.contexts[0]]:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "params": params,
                    "decode_ms": decode,
                    "cache_bytes": cache,
                    "train_tokens_per_s": tps,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
