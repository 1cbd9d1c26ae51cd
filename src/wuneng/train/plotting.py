"""``wuneng plot RUN_DIR``: loss curves of a run (``metrics.jsonl``) to PNG with matplotlib (Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["read_metrics", "plot_run", "pyplot"]

# Drawn on the loss panel when present; everything else numeric (but lr / throughput) gets its own panel.
LOSS_KEYS = ("loss", "ce", "kl", "align_output", "align_state")
SIDE_KEYS = ("lr", "grad_norm")


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend. matplotlib is the optional ``plot`` extra, imported
    only here, when a figure is drawn: ImportError with the command that installs it when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing PNG figures needs matplotlib, the plot extra: pip install 'wuneng[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-step records of ``RUN_DIR/metrics.jsonl`` (event lines skipped), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run folder?")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if "event" not in rec and "step" in rec:
                records.append(rec)
    return records


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None, log_y: bool = True) -> Path:
    """Draw the loss terms (and lr, grad-norm) against the step; returns the PNG path
    (default ``RUN_DIR/loss.png``). A resumed run's repeated steps keep the latest value."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no step records to plot")
    plt = pyplot()
    by_step: dict[int, dict] = {}
    for rec in records:
        by_step[int(rec["step"])] = rec
    steps = sorted(by_step)
    loss_keys = [k for k in LOSS_KEYS if any(k in by_step[s] for s in steps)]
    # a term identical to the total (pretrain/sft: ce == loss) would only hide the loss curve
    loss_keys = [k for k in loss_keys if k == "loss" or any(by_step[s].get(k) != by_step[s].get("loss") for s in steps)]
    side_keys = [k for k in SIDE_KEYS if any(k in by_step[s] for s in steps)]
    fig, axes = plt.subplots(1, 1 + len(side_keys), figsize=(6 + 3.5 * len(side_keys), 4), squeeze=False)
    ax = axes[0][0]
    for k in loss_keys:
        xs = [s for s in steps if k in by_step[s]]
        ax.plot(xs, [by_step[s][k] for s in xs], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log_y and all(by_step[s].get(k, 1.0) > 0 for s in steps for k in loss_keys):
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ScalarFormatter())
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(Path(run_dir).name)
    for j, k in enumerate(side_keys, start=1):
        xs = [s for s in steps if k in by_step[s]]
        axes[0][j].plot(xs, [by_step[s][k] for s in xs])
        axes[0][j].set_xlabel("step")
        axes[0][j].set_title(k)
        axes[0][j].grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out) if out is not None else Path(run_dir) / "loss.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
