"""The embedded default job: train a small byte-level RWKV-7 on arithmetic word problems it generates
itself, then print the loss curve, the held-out accuracy and a few samples.

Nothing is downloaded. The data comes from :mod:`wuneng.eval.tasks.arithmetic` (1-digit problems and
short key-value recall, loss on answer bytes only, per ``shared/reference/feasibility.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class DemoConfig:
    """Sizes and budget of the demo (defaults: about 3 minutes on 2 CPU cores)."""

    hidden_size: int = 128
    num_layers: int = 2
    head_size: int = 32
    context: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    seconds: float = 180.0
    max_steps: Optional[int] = None
    num_examples: int = 40_000
    eval_per_category: int = 20
    seed: int = 0


def _batches(ids: np.ndarray, answer: np.ndarray, cfg: DemoConfig, rng: np.random.Generator):
    """Random windows [B, T] of the byte stream; labels only on answer bytes (-100 elsewhere)."""
    T = cfg.context
    while True:
        starts = rng.integers(0, len(ids) - T - 1, size=cfg.batch_size)
        x = np.stack([ids[s : s + T] for s in starts])
        y = np.stack([np.where(answer[s : s + T], ids[s : s + T], -100) for s in starts])
        yield torch.from_numpy(x).long(), torch.from_numpy(y).long()


def _sparkline(values: list[float], width: int = 60) -> str:
    """A one-line text plot of a loss curve (resampled to ``width`` points)."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    idx = np.linspace(0, len(values) - 1, num=min(width, len(values))).astype(int)
    pts = [values[i] for i in idx]
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    return "".join(bars[min(len(bars) - 1, int((p - lo) / span * (len(bars) - 1)))] for p in pts)


def run_demo(cfg: DemoConfig = DemoConfig(), console=None) -> dict:
    """Train, evaluate, print. Returns {"losses": [...], "exact": float, "final": float, "steps": int}."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .eval.generation import generate_text
    from .eval.tasks.arithmetic import ArithmeticConfig, make_test_set, score_arithmetic, training_corpus
    from .models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    from .tokenization import ByteLevelTokenizer

    console = console or Console()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tok = ByteLevelTokenizer()
    task = ArithmeticConfig()
    test = make_test_set(task, per_category=cfg.eval_per_category, seed=cfg.seed + 1)
    corpus = training_corpus(task, cfg.num_examples, seed=cfg.seed, test_set=test)
    ids = np.frombuffer(corpus.text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if len(ids) != len(corpus.answer_mask):
        raise RuntimeError("demo corpus must be ASCII so that the answer mask aligns with bytes")

    model = RWKV7ForCausalLM(
        RWKV7Config(
            vocab_size=len(tok),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            head_size=cfg.head_size,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]wuneng demo[/]: RWKV-7, {cfg.num_layers} layers x {cfg.hidden_size} wide ({n_params / 1e6:.2f} M parameters), "
        f"{corpus.num_examples} generated problems, loss on answer bytes, budget {cfg.seconds:.0f} s"
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95)
    )
    warmup = 50
    losses: list[float] = []
    ema = None
    batches = _batches(ids, corpus.answer_mask, cfg, rng)
    start = time.perf_counter()
    step = 0
    model.train()
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        bar = progress.add_task("training", total=cfg.seconds, info="")
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= cfg.seconds or (cfg.max_steps is not None and step >= cfg.max_steps):
                break
            frac = min(1.0, elapsed / cfg.seconds)
            lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = next(batches)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            losses.append(ema)
            tok_s = step * cfg.batch_size * cfg.context / max(elapsed, 1e-9)
            progress.update(bar, completed=min(elapsed, cfg.seconds), info=f"step {step} loss {ema:.3f} {tok_s:,.0f} tok/s")

    model.eval()
    examples = list(test.examples)
    with torch.no_grad():
        gens = generate_text(
            model,
            [e.prompt for e in examples],
            encode=lambda s: list(s.encode("utf-8")),
            decode=lambda ids_: bytes(i for i in ids_ if i < 256).decode("utf-8", errors="replace"),
            max_new_tokens=24,
            stop_ids=[ord("\n")],
        )
    scores = score_arithmetic([" " + g.lstrip() for g in gens], examples)

    console.print(f"\nloss (answer bytes, EMA) over {step} steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    console.print(_sparkline(losses))
    table = Table(title="held-out problems (greedy)")
    table.add_column("category")
    table.add_column("count", justify="right")
    table.add_column("exact", justify="right")
    for cat, row in sorted(scores["per_category"].items()):
        table.add_row(cat, str(row["count"]), f"{row['exact']:.0%}")
    table.add_row("[bold]all[/]", str(len(examples)), f"[bold]{scores['exact']:.0%}[/]")
    console.print(table)
    console.print("[bold]samples[/]:")
    for e, g in list(zip(examples, gens))[:: max(1, len(examples) // 5)][:5]:
        console.print(f"  {e.prompt} [cyan]{g.strip()}[/]   (expected {e.answer})")
    return {"losses": losses, "exact": scores["exact"], "final": scores["final"], "steps": step}
