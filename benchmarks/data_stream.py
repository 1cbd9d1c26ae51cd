"""Streamed training data (wuneng.train.streaming) on generated corpora of 10 MB to 1 GB: start-up time, resident
memory, and the time a training step of the 20M RWKV-7 model waits for its data.

Corpora: JSONL shards of 64 MB (``{"text": ...}`` per line, documents of 150-900 words drawn from a Zipf
vocabulary, each with a unique prefix), written once into ``--dir/corpus_<size>/`` (reused when present). The
tokenizer: a byte-level BPE of 8192 ids trained with ``tokenizers`` on 2000 of the documents (no download).

Each measurement runs in its own process (so its peak resident memory is its own):

    read    TokenStream over the corpus with --workers workers: seconds to the first batch of --batch x --seq
            tokens (start-up: listing the shards, forking the workers, the first tokenised blocks), then batches
            for --read-seconds; peak RSS of the training process (ru_maxrss) and of its largest worker
            (RUSAGE_CHILDREN after the workers exit), RSS after the first batch, sampled every 1000 batches and at
            the end; corpora named in --full-pass-sizes are read from start to end instead
    eager   (10 MB corpus only, for contrast) build_dataset: the eager path's seconds and peak RSS
    train   the 20M RWKV-7 (hidden 384, 7 layers, vocabulary 8192; float32) trains --steps AdamW steps on batches
            from the stream of the largest corpus; per step, the seconds spent in next_rows (waiting for data)
            and the whole step; reported: waiting as a share of the step, over the steps after the first; and the
            same with a simulated step of --fake-step-ms that leaves the CPU idle (a step on an accelerator; this
            machine has none), --fake-steps steps

    python benchmarks/data_stream.py                        # 10M, 100M, 1G corpora in a temp dir, 2 workers
    python benchmarks/data_stream.py --dir /data/bench --sizes 10M,100M --steps 5 --read-seconds 5   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 64 * 1024 * 1024


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _documents(seed: int):
    """Endless documents: 150-900 words from a 5000-word Zipf vocabulary, each with a unique prefix."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choice(letters[: rng.randint(6, 26)]) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    pool = [" ".join(rng.choices(vocab, weights, k=rng.randint(150, 900))) for _ in range(2000)]
    i = 0
    while True:
        yield f"document {i}: " + pool[(i * 7919) % len(pool)]
        i += 1


def make_corpus(folder: Path, size: int) -> Path:
    done = folder / "DONE"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    written, shard = 0, 0
    docs = _documents(0)
    while written < size:
        path = folder / f"shard_{shard:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            in_shard = 0
            while in_shard < SHARD_BYTES and written + in_shard < size:
                line = json.dumps({"text": next(docs)}) + "\n"
                f.write(line)
                in_shard += len(line)
        written += in_shard
        shard += 1
    done.write_text(str(written))
    return folder


def make_tokenizer(folder: Path) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<pad>", "<eos>"], show_progress=False)
    docs = _documents(0)
    tok.train_from_iterator((next(docs) for _ in range(2000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _stream(args):
    from transformers import PreTrainedTokenizerFast

    from wuneng.train.config import DataConfig
    from wuneng.train.streaming import TokenStream

    tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    cfg = DataConfig(
        sources=[str(Path(args.corpus) / "*.jsonl")],
        seq_len=args.seq,
        streaming=True,
        num_workers=args.workers,
        shuffle_window=args.shuffle_window,
    )
    return TokenStream(cfg, tok, "pretrain")


def run_read(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    stream = _stream(args)
    stream.next_rows(args.batch)
    first = time.perf_counter() - t0
    rss_first = _rss_mib()
    batches, tokens, rss_samples = 1, 0, []
    t1 = time.perf_counter()
    while True:
        if args.full_pass:  # the whole corpus: until the stream's next row is in epoch 1
            if stream.state_dict()["window_start"]["epoch"] >= 1:
                break
        elif time.perf_counter() - t1 >= args.read_seconds:
            break
        rows = stream.next_rows(args.batch)
        tokens += int(rows.attention_mask.sum())
        batches += 1
        if batches % 1000 == 0:
            rss_samples.append(round(_rss_mib(), 1))
    elapsed = time.perf_counter() - t1
    rss_end = _rss_mib()
    state = stream.state_dict()
    stream.close()
    import gc

    gc.collect()
    time.sleep(0.5)  # the workers exit; their peak shows in RUSAGE_CHILDREN
    return {
        "first_batch_s": round(first, 3),
        "tokens_per_s": round(tokens / elapsed),
        "batches": batches,
        "rss_start_mib": round(rss_start, 1),
        "rss_after_first_mib": round(rss_first, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_max_sampled_mib": max(rss_samples, default=round(rss_end, 1)),
        "tokens": tokens,
        "read_s": round(elapsed, 1),
        "peak_main_mib": round(_peak_mib(), 1),
        "peak_worker_mib": round(_peak_mib(resource.RUSAGE_CHILDREN), 1),
        "position": {k: state["window_start"][k] for k in ("shard", "offset", "record")},
    }


def run_eager(args) -> dict:
    from transformers import PreTrainedTokenizerFast

    from wuneng.train.config import DataConfig
    from wuneng.train.data import build_dataset

    tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(sources=[args.corpus], seq_len=args.seq), tok, "pretrain")
    return {
        "build_s": round(time.perf_counter() - t0, 2),
        "rows": len(ds),
        "rss_start_mib": round(rss_start, 1),
        "peak_main_mib": round(_peak_mib(), 1),
    }


def run_train(args) -> dict:
    import torch

    from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=8192, hidden_size=384, num_hidden_layers=7, head_size=64))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    if args.fake_step_ms:  # a step that takes this long and leaves the CPU idle (as one on an accelerator would)
        model, opt = None, None
    stream = _stream(args)
    waits, steps = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        rows = stream.next_rows(args.batch)
        t1 = time.perf_counter()
        if model is None:
            time.sleep(args.fake_step_ms / 1000.0)
        else:
            out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, labels=rows.labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t0)
    stream.close()
    w, s = sum(waits[1:]), sum(steps[1:])
    return {
        "params_m": round(n_params / 1e6, 2),
        "first_step_wait_s": round(waits[0], 3),
        "step_s": round(s / args.steps, 3),
        "wait_ms_per_step": round(1000 * w / args.steps, 2),
        "max_wait_ms": round(1000 * max(waits[1:]), 2),
        "wait_share": round(w / s, 5),
        "peak_main_mib": round(_peak_mib(), 1),
    }


def _child(args, mode: str, corpus: Path, **extra) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--corpus", str(corpus), "--tokenizer", str(args.tokenizer)]
    for key in ("workers", "batch", "seq", "steps", "threads", "read_seconds", "shuffle_window", "fake_step_ms"):
        cmd += [f"--{key.replace('_', '-')}", str(extra.get(key, getattr(args, key)))]
    if extra.get("full_pass"):
        cmd.append("--full-pass")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{mode} on {corpus} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the corpora and the tokenizer are written (default: a temp dir)")
    p.add_argument("--sizes", default="10M,100M,1G")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--read-seconds", type=float, default=20.0)
    p.add_argument("--shuffle-window", type=int, default=0)
    p.add_argument(
        "--fake-step-ms",
        type=float,
        default=50.0,
        help="also time a simulated step of this many ms that leaves the CPU idle (an accelerator's step); 0: skip",
    )
    p.add_argument("--fake-steps", type=int, default=200)
    p.add_argument(
        "--only", choices=["read", "train", "fake"], default=None, help="run only this part (read includes eager)"
    )
    p.add_argument(
        "--full-pass-sizes", default="100M", help="corpora read from start to end (not for --read-seconds); '' for none"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--full-pass", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["read", "eager", "train"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode is not None:
        result = {"read": run_read, "eager": run_eager, "train": run_train}[args.mode](args)
        print(json.dumps(result))
        return

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="wuneng-data-stream-")
        args.dir = tmp
    root = Path(args.dir)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    t0 = time.perf_counter()
    args.tokenizer = make_tokenizer(root / "tokenizer")
    corpora = {s: make_corpus(root / f"corpus_{s}", _parse_size(s)) for s in sizes}
    print(f"corpora and tokenizer ready in {time.perf_counter() - t0:.1f} s under {root}", flush=True)
    print(f"{args.workers} worker(s), batch {args.batch} x {args.seq} tokens, {args.threads} torch thread(s)")
    print()
    full = {s.strip() for s in args.full_pass_sizes.split(",") if s.strip()}
    if args.only in (None, "read"):
        print(
            "| corpus | shards | read | first batch (s) | tokens/s | RSS after 1st batch -> max -> end (MiB) "
            "| peak main / worker (MiB) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
    for s, corpus in corpora.items() if args.only in (None, "read") else ():
        r = _child(args, "read", corpus, full_pass=s in full)
        shards = len(list(corpus.glob("*.jsonl")))
        what = f"all, {r['tokens'] / 1e6:.1f} M tokens in {r['read_s']} s" if s in full else f"{r['read_s']} s"
        print(
            f"| {s} | {shards} | {what} | {r['first_batch_s']} | {r['tokens_per_s']} | {r['rss_after_first_mib']} -> "
            f"{r['rss_max_sampled_mib']} -> {r['rss_end_mib']} | {r['peak_main_mib']} / {r['peak_worker_mib']} |",
            flush=True,
        )
    if "10M" in corpora and args.only in (None, "read"):
        e = _child(args, "eager", corpora["10M"])
        print(
            f"\neager build_dataset of the 10M corpus: {e['build_s']} s, {e['rows']} rows, peak RSS "
            f"{e['peak_main_mib']} MiB (from {e['rss_start_mib']} MiB)",
            flush=True,
        )
    largest = sizes[-1]
    for workers in (0, args.workers):
        if args.only in (None, "train"):
            t = _child(args, "train", corpora[largest], workers=workers, fake_step_ms=0)
            print(
                f"\ntrain, {t['params_m']} M RWKV-7 on the {largest} stream, {workers} worker(s): step {t['step_s']} "
                f"s, waiting for data {t['wait_ms_per_step']} ms/step (max {t['max_wait_ms']} ms) = "
                f"{100 * t['wait_share']:.3f}% of the step; first batch {t['first_step_wait_s']} s; peak RSS "
                f"{t['peak_main_mib']} MiB",
                flush=True,
            )
        if args.fake_step_ms and args.only in (None, "fake"):
            t = _child(args, "train", corpora[largest], workers=workers, steps=args.fake_steps)
            print(
                f"\nsimulated {args.fake_step_ms:g} ms step (CPU idle), {args.fake_steps} steps on the {largest} stream, "
                f"{workers} worker(s): waiting for data {t['wait_ms_per_step']} ms/step (max {t['max_wait_ms']} ms) "
                f"= {100 * t['wait_share']:.3f}% of the step; first batch {t['first_step_wait_s']} s",
                flush=True,
            )
    if tmp is not None and not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
