"""The ``wuneng`` command line (typer + rich). Each command imports its machinery lazily so that
``wuneng --help`` stays fast.

Errors: a command that fails prints one line ``error: ...`` on stderr (the file or key, what was expected,
what to do) and exits with

- 2, a usage error: the command line or the run configuration cannot be used as given (bad option values,
  a config or data file error, an input path that does not exist or is not a model folder, an output folder
  that is occupied, not replaceable with ``--overwrite``, or overlaps an input);
- 1, a failure: the inputs exist but cannot be used (truncated or corrupt weights, weights that disagree
  with config.json, an unknown ``model_type``, a teacher that does not fit the student, an unsupported
  architecture) or the work itself failed;
- 3, ``wuneng train`` stopped on a non-finite loss.

``wuneng --debug COMMAND ...`` shows the full traceback instead. ``wuneng --version`` prints the version; every
command's ``--help`` ends with examples (``_EXAMPLES``); a command that picks a device takes ``--device auto``
(the default: CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

_DEBUG = False  # set by the global --debug option for the command being run


def _usage_error_types() -> tuple:
    """Exception types that are usage errors (exit 2); imported lazily (the train modules are heavy)."""
    types_: list = [FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError]
    try:
        from wuneng.train.config import ConfigError
        from wuneng.train.data import DataError
        from wuneng.train.teacher_cache import TeacherCacheError

        types_ += [ConfigError, DataError, TeacherCacheError]
    except Exception:  # pragma: no cover - the package itself broken: everything else is a failure
        pass
    return tuple(types_)


def error_exit_code(err: BaseException) -> int:
    """The exit code of an uncaught exception: 2 usage error, 3 non-finite loss, 1 any other failure."""
    if isinstance(err, _usage_error_types()):
        return 2
    if type(err).__name__ == "NonFiniteLossError":
        return 3
    return 1


def error_line(err: BaseException) -> str:
    """One line for an exception: its message with whitespace collapsed; exception types that are not the
    library's expected ones (ValueError, TypeError, OSError and their subclasses) are named, with the hint to
    rerun with --debug."""
    message = " ".join(str(err).split()) or type(err).__name__
    if (
        isinstance(err, (ValueError, TypeError, OSError, LookupError, ImportError))
        or type(err).__name__ == "NonFiniteLossError"
    ):
        return f"error: {message}"
    return f"error: {type(err).__name__}: {message} (rerun as `wuneng --debug ...` for the traceback)"


def _command_line_exceptions() -> tuple:
    """The exceptions typer/click handle themselves (usage errors, exit, abort): passed through. typer may
    vendor its own click, so its classes are found from typer's."""
    found = [typer.Exit, typer.Abort] + [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found += [click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort]
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


class _OneLineErrors(TyperGroup):
    """Runs a command; an exception it does not handle becomes one line on stderr and an exit code
    (:func:`error_exit_code`), unless --debug was given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _command_line_exceptions():
            raise
        except Exception as err:
            if _DEBUG:
                raise
            typer.echo(error_line(err), err=True)
            raise typer.Exit(error_exit_code(err)) from None


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Build, convert, train, evaluate and run hybrid state + attention LMs.",
)

# The examples at the end of each command's --help (command -> lines of "command line  # what it does").
_EXAMPLES = {
    "demo": [
        "wuneng demo  # the full run (about 10 minutes on 2 CPU cores); report in runs/demo/report.md",
        "wuneng demo --fast --out runs/demo-fast  # a 3-minute smoke run of every stage",
    ],
    "bench-arch": [
        "wuneng bench-arch --quick  # a few minutes on the CPU",
        "wuneng bench-arch --jobs 2 --threads 1  # the default: both controls, 11 variants, 3 seeds",
        "wuneng bench-arch --jobs 2 --threads 1 --seeds 5  # later: trains only seeds 3 and 4",
        "wuneng bench-arch --variants rwkv7,wuneng-gate --lrs 1e-3,3e-3 --device cuda",
    ],
    "bench-convert": [
        "wuneng bench-convert --jobs 2 --threads 1  # the default: 4 arms x 3 seeds, about 20 minutes on 2 cores",
        "wuneng bench-convert --quick --out runs/bench-convert-quick  # a smoke run of every arm",
        "wuneng bench-convert --jobs 2 --threads 1 --seeds 5  # later: trains only seeds 3 and 4",
    ],
    "import-rwkv": [
        "wuneng import-rwkv RWKV-x070-World-0.1B.pth runs/rwkv7-0.1b",
        "wuneng import-rwkv model.pth runs/rwkv7 --dtype bfloat16 --overwrite",
    ],
    "import-fla": ["wuneng import-fla /models/rwkv7-0.1B-world runs/rwkv7 --dtype float32"],
    "export-fla": ["wuneng export-fla runs/rwkv7 runs/rwkv7-fla  # loads into fla's RWKV7ForCausalLM"],
    "train": [
        "wuneng train recipe.yaml --stage distill",
        "wuneng train recipe.yaml -o optim.lr=3e-4 -o data.seq_len=512 --max-steps 100",
        "wuneng train recipe.yaml --resume  # continue from the newest complete checkpoint",
    ],
    "cache-teacher": [
        "wuneng cache-teacher recipe.yaml -o distill.teacher_cache.path=cache/teacher -o distill.teacher_cache.top_k=64",
        "wuneng train recipe.yaml --stage distill  # then distils from the cache, without the teacher",
    ],
    "plot": [
        "wuneng plot runs/student-distill  # writes runs/student-distill/loss.png",
        "wuneng plot runs/student-distill --out loss.png --linear",
    ],
    "grow": ["wuneng grow runs/metastate runs/metastate-grown --heads 8 --param-tokens 64"],
    "eval": [
        "wuneng eval runs/student --tasks mqar,passkey --limit 64",
        "wuneng eval runs/student --tasks none --lm-eval wuneng_arith --json results.json --device cpu",
        "wuneng eval runs/student/final --teacher /models/Qwen2.5-0.5B --out runs/retention  # retention report",
    ],
    "convert": [
        "wuneng convert /models/Qwen2.5-0.5B-Instruct runs/student  # WuNeng hybrid, function-preserving",
        "wuneng convert /models/Qwen2.5-0.5B-Instruct runs/arwkv --arwkv --arwkv-init radlads",
    ],
    "select-layers": ["wuneng select-layers /models/Qwen2.5-0.5B-Instruct --data corpus/ --budget 200000 --keep 4"],
}


def _examples(command: str) -> str:
    """The --help epilog of ``command``: its examples, one per line."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in _EXAMPLES[command])


def resolve_device(value: str) -> str:
    """A ``--device`` value: ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; any other value must be a
    torch device string (``cpu``, ``cuda``, ``cuda:1``, ...), else a usage error."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(
            f"expected auto, cpu, cuda or cuda:N (a torch device), got {value!r}", param_hint="--device"
        ) from None
    return value


def _weights_dtype(name: str):
    """The torch dtype of a ``--dtype`` option (``keep`` -> None: the input's own); a usage error otherwise."""
    import torch

    dtypes = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise typer.BadParameter(f"must be one of {sorted(dtypes)}, got {name!r}", param_hint="--dtype")
    return dtypes[name]


def _rwkv7_summary(out_dir: str, model) -> str:
    """The one line import-rwkv and import-fla print about the RWKV-7 model they wrote."""
    c = model.config
    return (
        f"wrote {out_dir}: RWKV-7 L={c.num_hidden_layers} C={c.hidden_size} V={c.vocab_size} head_size={c.head_size} "
        f"ranks w/a/v/g={c.decay_low_rank_dim}/{c.a_low_rank_dim}/{c.v_low_rank_dim}/{c.gate_low_rank_dim} "
        f"dtype={model.dtype}"
    )


def _print_version(value: bool) -> None:
    if value:
        from wuneng import __version__

        typer.echo(f"wuneng {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error (default: one line on stderr)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log only warnings and errors (no progress lines)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log DEBUG messages."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """wuneng command line. Progress and messages go to stderr through `logging`: with a rich layout in a terminal,
    as plain timestamped lines otherwise (a log file: a line every $WUNENG_PROGRESS_INTERVAL seconds, default 10)."""
    global _DEBUG
    _DEBUG = debug
    if quiet and verbose:
        raise typer.BadParameter("choose one of --quiet and --verbose")
    from wuneng.progress import configure_logging

    configure_logging(-1 if quiet else 1 if verbose else 0)


@app.command("demo", epilog=_examples("demo"))
def demo_command(
    fast: bool = typer.Option(False, "--fast", help="A smoke-test run of every stage (under 3 minutes; CI)."),
    out: str = typer.Option(
        "runs/demo", "--out", help="Output folder (report.md, results.json, PNG plots, stage runs)."
    ),
    teacher_steps: int = typer.Option(None, help="Teacher pretraining steps (default: the budget's)."),
    align_steps: int = typer.Option(None, help="Stage 1 steps per student."),
    distill_steps: int = typer.Option(None, help="Stage 2 steps per student."),
    sft_steps: int = typer.Option(None, help="Stage 3 steps per student."),
    eval_per_category: int = typer.Option(None, help="Held-out problems per category."),
    seed: int = typer.Option(0, help="Seed of data, models and training."),
    threads: int = typer.Option(
        None, help="torch threads (default: one per core; use 1 on a machine shared with other jobs)."
    ),
    overwrite: bool = typer.Option(
        True,
        "--overwrite/--no-overwrite",
        help="Replace an earlier demo run in --out (only the demo's own stage runs, report and plots), or refuse it.",
    ),
) -> None:
    """The embedded default job: train a small Qwen2 teacher on generated problems, convert it into a WuNeng and
    an ARWKV student, run align -> distill -> SFT for both, evaluate everything and write report.md with plots."""
    import sys
    from dataclasses import replace

    from wuneng.apps.demo import DemoBudget, DemoConfig, run_demo
    from wuneng.train.plotting import pyplot

    pyplot()  # its figures need the plot extra: say so before the run, not after it

    budget = DemoBudget.fast() if fast else DemoBudget()
    chosen = dict(
        teacher_steps=teacher_steps,
        align_steps=align_steps,
        distill_steps=distill_steps,
        sft_steps=sft_steps,
        eval_per_category=eval_per_category,
    )
    try:
        budget = replace(budget, **{k: v for k, v in chosen.items() if v is not None})
        cfg = DemoConfig(budget=budget, output_dir=out, seed=seed, threads=threads, overwrite=overwrite)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:  # an earlier run in --out is refused before any work (run_demo checks first), as a usage error
        from rich.console import Console

        run_demo(cfg, console=Console(), command="wuneng " + " ".join(sys.argv[1:]) if sys.argv[1:] else "wuneng demo")
    except FileExistsError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


@app.command("bench-arch", epilog=_examples("bench-arch"))
def bench_arch_command(
    quick: bool = typer.Option(
        False, "--quick", help="A few minutes: small MQAR and A5 k=16, one learning rate, short runs."
    ),
    full: bool = typer.Option(
        False, "--full", help="Zoology-scale sweep for a GPU (V=8192, T up to 256, to 99% or 20k steps)."
    ),
    out: str = typer.Option(
        "runs/bench-arch",
        "--out",
        help="Run folder: results.jsonl (accumulates; finished runs are skipped), results.md, accuracy.png.",
    ),
    variants: str = typer.Option(
        None,
        "--variants",
        help="Comma-separated subset of: "
        + ", ".join(
            (
                "transformer",
                "rwkv7",
                "wuneng-gate",
                "wuneng-add",
                "wuneng-concat",
                "wuneng-hymba",
                "wuneng-none",
                "wuneng-gate-lambda0",
                "metastate",
                "arwkv",
                "arwkv-attn",
            )
        ),
    ),
    lrs: str = typer.Option(None, "--lrs", help="Comma-separated learning rates (the sweep)."),
    seeds: str = typer.Option(
        None,
        "--seeds",
        help="A count N (seeds 0..N-1; default 3) or a comma-separated list. Runs already in --out are reused, "
        "so a larger N extends a finished sweep and trains only the missing (setting, variant, lr, seed) runs.",
    ),
    steps: int = typer.Option(None, "--steps", help="Optimiser steps per run (the budget)."),
    max_seconds: float = typer.Option(None, "--max-seconds", help="Wall-clock cap per run, in seconds."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
    threads: int = typer.Option(
        None, help="torch threads (default: one per core; use 1 on a machine shared with other jobs)."
    ),
    jobs: int = typer.Option(
        1, "--jobs", help="Runs trained at once, each in its own CPU process with --threads (default 1) threads."
    ),
    only: str = typer.Option(
        None,
        "--only",
        help="Comma-separated setting-name substrings to run now, e.g. 'state A5 k=16' (same run keys as the whole sweep).",
    ),
) -> None:
    """Train Transformer, RWKV-7, WuNeng (gate/add/concat/hymba/none, lambda=0), Meta-State and ARWKV (with and
    without a kept attention layer) from scratch on MQAR and state tracking with equal budgets, over 3 seeds by
    default; print and plot the mean accuracy with its 95% t-interval per setting. The default sweep holds two
    positive controls (recall: the Transformer solves MQAR; state tracking: RWKV-7 solves parity where the
    Transformer stays near chance); results.md says at its top whether they reproduced."""
    from wuneng.apps.bench_arch import BenchConfig, run_bench
    from wuneng.train.plotting import pyplot

    pyplot()  # its figure needs the plot extra: say so before the run, not after it

    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    kw = {}
    try:
        if variants:
            kw["variants"] = tuple(v.strip() for v in variants.split(",") if v.strip())
        if lrs:
            kw["lrs"] = tuple(float(v) for v in lrs.split(",") if v.strip())
        if seeds:
            from wuneng.apps.bench_arch import parse_seeds

            kw["seeds"] = parse_seeds(seeds)
        for name, value in (
            ("steps", steps),
            ("max_seconds", max_seconds),
            ("device", resolve_device(device)),
            ("threads", threads),
            ("jobs", jobs),
        ):
            if value is not None:
                kw[name] = value
        kw["output_dir"] = out
        cfg = (BenchConfig.quick if quick else BenchConfig.full if full else BenchConfig.default)(**kw)
        if only:
            cfg = cfg.only([p.strip() for p in only.split(",") if p.strip()])
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    from rich.console import Console

    run_bench(cfg, console=Console())  # the results table on stdout; progress goes to the log (stderr)


@app.command("bench-convert", epilog=_examples("bench-convert"))
def bench_convert_command(
    quick: bool = typer.Option(False, "--quick", help="A smoke run of every arm (small budgets, 2 seeds)."),
    out: str = typer.Option(
        "runs/bench-convert",
        "--out",
        help="Run folder: the cached teacher, results.jsonl (accumulates; finished runs are skipped), results.md, "
        "accuracy.png.",
    ),
    arms: str = typer.Option(None, "--arms", help="Comma-separated subset of: wuneng, arwkv, arwkv-keep, teacher."),
    seeds: str = typer.Option(
        None, "--seeds", help="A count N (seeds 0..N-1; default 3) or a comma-separated list; finished runs are reused."
    ),
    teacher_steps: int = typer.Option(None, "--teacher-steps", help="Teacher pretraining steps (default 600)."),
    align_steps: int = typer.Option(None, "--align-steps", help="Stage-1 steps of the converted arms."),
    sft_steps: int = typer.Option(None, "--sft-steps", help="SFT steps of every arm (the common budget)."),
    parity_bits: int = typer.Option(None, "--parity-bits", help="Bits per parity line (default 16)."),
    parity_share: float = typer.Option(None, "--parity-share", help="Share of parity lines in the mix (default 0.5)."),
    threads: int = typer.Option(None, help="torch threads per process (default: one per core; 1 with --jobs > 1)."),
    jobs: int = typer.Option(1, "--jobs", help="(arm, seed) runs trained at once, each in its own CPU process."),
) -> None:
    """Does conversion add a capability? A teacher pretrained without a state-tracking subtask (parity) is converted to
    WuNeng, ARWKV and ARWKV keeping the attention layers select-layers chooses, and trained on beside itself, all with
    the same SFT steps and rows on a mix that holds the subtask; prints and writes parity, arithmetic and recall
    accuracy (mean and 95% t-interval over seeds) with retention relative to the teacher."""
    from pathlib import Path

    from wuneng.apps.bench_convert import ConvertBenchConfig, run_convert_bench
    from wuneng.train.plotting import pyplot

    pyplot()  # its figure needs the plot extra: say so before the run, not after it
    kw: dict = {"output_dir": out, "jobs": jobs}
    try:
        if arms:
            kw["arms"] = tuple(a.strip() for a in arms.split(",") if a.strip())
        if seeds:
            from wuneng.apps.bench_arch import parse_seeds

            kw["seeds"] = parse_seeds(seeds)
        for name, value in (
            ("teacher_steps", teacher_steps),
            ("align_steps", align_steps),
            ("sft_steps", sft_steps),
            ("parity_bits", parity_bits),
            ("parity_share", parity_share),
            ("threads", threads),
        ):
            if value is not None:
                kw[name] = value
        cfg = ConvertBenchConfig.quick(**kw) if quick else ConvertBenchConfig(**kw)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run_convert_bench(cfg)
    typer.echo((Path(cfg.output_dir) / "results.md").read_text(encoding="utf-8"))


@app.command("import-rwkv", epilog=_examples("import-rwkv"))
def import_rwkv(
    checkpoint: str = typer.Argument(
        ..., help="RWKV-LM x070 .pth state dict (read with torch.load(weights_only=True))."
    ),
    out_dir: str = typer.Argument(..., help="Output directory (config.json + model.safetensors)."),
    dtype: str = typer.Option("keep", help="Weights dtype: keep (the checkpoint's), float32, bfloat16 or float16."),
    head_size: int = typer.Option(None, help="Expected head size (checked against the checkpoint's r_k shape)."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT_DIR if it is a wuneng model folder (any other non-empty folder is refused).",
    ),
) -> None:
    """Convert a BlinkDL RWKV-LM RWKV-7 checkpoint into a wuneng RWKV7ForCausalLM directory."""
    from rich.console import Console

    from wuneng.models.rwkv7.convert_rwkv_lm import import_rwkv_lm_checkpoint

    weights_dtype = _weights_dtype(dtype)
    console = Console()
    model = import_rwkv_lm_checkpoint(
        checkpoint, out_dir, dtype=weights_dtype, overwrite=overwrite, head_size=head_size
    )
    console.print(f"{_rwkv7_summary(out_dir, model)} ({sum(p.numel() for p in model.parameters()):,} parameters)")


@app.command("import-fla", epilog=_examples("import-fla"))
def import_fla(
    src: str = typer.Argument(
        ...,
        help="flash-linear-attention RWKV-7 folder (fla-hub layout: config.json with model_type rwkv7 + safetensors).",
    ),
    out_dir: str = typer.Argument(..., help="Output directory (a wuneng RWKV7ForCausalLM folder)."),
    dtype: str = typer.Option("keep", help="Weights dtype: keep (the checkpoint's), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT_DIR if it is a wuneng model folder (any other non-empty folder is refused).",
    ),
) -> None:
    """Convert a flash-linear-attention (fla-hub) RWKV-7 folder into a wuneng RWKV7ForCausalLM directory."""
    from rich.console import Console

    from wuneng.models.rwkv7.convert_fla import import_fla_checkpoint

    weights_dtype = _weights_dtype(dtype)
    model = import_fla_checkpoint(src, out_dir, dtype=weights_dtype, overwrite=overwrite)
    Console().print(_rwkv7_summary(out_dir, model), markup=False, highlight=False)


@app.command("export-fla", epilog=_examples("export-fla"))
def export_fla(
    src: str = typer.Argument(..., help="wuneng RWKV7ForCausalLM folder (as import-rwkv or save_pretrained writes)."),
    out_dir: str = typer.Argument(..., help="Output directory in flash-linear-attention's layout (model_type rwkv7)."),
    dtype: str = typer.Option("keep", help="Weights dtype: keep (the model's), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT_DIR if it is a wuneng model folder (any other non-empty folder, an earlier fla export included, is refused).",
    ),
) -> None:
    """Write a wuneng RWKV-7 folder in flash-linear-attention's layout (loads into fla's RWKV7ForCausalLM)."""
    from rich.console import Console

    from wuneng.models.rwkv7.convert_fla import export_fla_checkpoint

    weights_dtype = _weights_dtype(dtype)
    model = export_fla_checkpoint(src, out_dir, dtype=weights_dtype, overwrite=overwrite)
    c = model.config
    Console().print(
        f"wrote {out_dir}: fla RWKV-7 L={c.num_hidden_layers} C={c.hidden_size} V={c.vocab_size} head_dim={c.head_size} "
        f"dtype={weights_dtype or model.dtype}",
        markup=False,
        highlight=False,
    )


@app.command("train", epilog=_examples("train"))
def train_command(
    config: str = typer.Argument(..., help="Run description (YAML); see docs/training.md."),
    stage: str = typer.Option(
        None, "--stage", help="pretrain | align | distill | sft (overrides `stage:` in the YAML)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", "-o", help="KEY=VALUE override, repeatable, e.g. -o optim.lr=3e-4 -o data.seq_len=512."
    ),
    output_dir: str = typer.Option(None, "--output-dir", help="Run folder (overrides `output_dir:`)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimiser steps (overrides `max_steps:`)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest complete checkpoint of the run folder."
    ),
) -> None:
    """Train one stage: pretrain, align (stage 1), distill (stage 2) or sft (stage 3)."""
    from rich.console import Console

    from wuneng.train.config import load_config

    console = Console(stderr=True, soft_wrap=True)  # paths in messages stay on one line
    # Errors (ConfigError, DataError, missing or occupied folders: exit 2; NonFiniteLossError: exit 3; others:
    # exit 1) become one line on stderr in _OneLineErrors.
    cfg = load_config(config, overrides, stage=stage, output_dir=output_dir, max_steps=max_steps)
    from wuneng.train.loop import train

    result = train(cfg, resume=resume)
    if result.is_main_process:
        console.print(f"[green]done[/]: step {result.step}, loss {result.loss:.4f}, run folder {result.output_dir}")


@app.command("cache-teacher", epilog=_examples("cache-teacher"))
def cache_teacher_command(
    config: str = typer.Argument(..., help="Distill run description (YAML) with `distill.teacher_cache.path`."),
    overrides: list[str] = typer.Option(
        [], "--set", "-o", help="KEY=VALUE override, repeatable, e.g. -o distill.teacher_cache.top_k=32."
    ),
) -> None:
    """Run the recipe's teacher once over its training rows and write the top-k logits (plus the log-sum-exp of the
    rest) to `distill.teacher_cache.path`; `wuneng train` then distils from them without loading the teacher.
    An interrupted build continues where it stopped when run again."""
    from rich.console import Console

    from wuneng.train.config import load_config
    from wuneng.train.teacher_cache import cache_teacher_for_config

    cfg = load_config(config, overrides, stage="distill")
    path = cache_teacher_for_config(cfg)
    Console(stderr=True, soft_wrap=True).print(f"[green]done[/]: teacher cache {path}")


@app.command("plot", epilog=_examples("plot"))
def plot_command(
    run_dir: str = typer.Argument(..., help="A training run folder (holds metrics.jsonl)."),
    out: str = typer.Option(None, "--out", help="PNG path (default RUN_DIR/loss.png)."),
    linear: bool = typer.Option(False, "--linear", help="Linear instead of logarithmic loss axis."),
) -> None:
    """Draw a run's loss curves (and lr, gradient norm) to PNG."""
    from wuneng.train.plotting import plot_run

    try:
        path = plot_run(run_dir, out, log_y=not linear)
    except ValueError as e:  # a metrics.jsonl that cannot be read: a usage error like a missing one
        _fail(e, 2)
    typer.echo(str(path))


@app.command("grow", epilog=_examples("grow"))
def grow_command(
    checkpoint: str = typer.Argument(
        ..., help="A Meta-State model folder (save_pretrained: config.json + model.safetensors)."
    ),
    out_dir: str = typer.Argument(..., help="Output folder for the grown model."),
    heads: int = typer.Option(
        None, "--heads", help="New WKV head count per layer (>= the current; default unchanged)."
    ),
    param_tokens: int = typer.Option(
        None, "--param-tokens", help="New parameter-token count per layer (>= the current)."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for the new rows' random initialisation."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT_DIR if it is a wuneng model folder (any other non-empty folder is refused).",
    ),
) -> None:
    """Grow a Meta-State model's WKV state (heads) and parameter tokens, keeping its function (SPEC section 4)."""
    from rich.console import Console

    from wuneng.grow import grow_checkpoint, state_report

    console = Console()
    if heads is None and param_tokens is None:
        _fail("nothing to grow; pass --heads and/or --param-tokens", 2)
    old, grown = grow_checkpoint(checkpoint, out_dir, heads, param_tokens, overwrite=overwrite, seed=seed)
    console.print(f"[bold]before[/bold] ({checkpoint})\n{state_report(old)}")
    console.print(f"[bold]after[/bold] ({out_dir})\n{state_report(grown)}")


@app.command("eval", epilog=_examples("eval"))
def eval_command(
    checkpoint: str = typer.Argument(
        ..., help="A saved model folder (save_pretrained: config.json + weights, and its tokenizer if any)."
    ),
    tasks: str = typer.Option(
        "arithmetic,mqar,state_tracking,passkey,perplexity",
        "--tasks",
        help="Comma-separated registry tasks ('none' for only --lm-eval).",
    ),
    limit: int = typer.Option(
        None, "--limit", help="Examples per task (lm-eval: documents per task); default: each task's standard size."
    ),
    lm_eval: str = typer.Option(
        None,
        "--lm-eval",
        help="Comma-separated lm-eval tasks too, e.g. wuneng_arith or mmlu,gsm8k (needs the eval extra).",
    ),
    presets: list[str] = typer.Option(
        [], "--preset", help="TASK=PRESET, repeatable, e.g. --preset mqar=T128_n8 (default: the first preset)."
    ),
    text: str = typer.Option(
        None, "--text", help="UTF-8 text file for perplexity (default: held-out generated arithmetic text)."
    ),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON here."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
    passkey_lengths: str = typer.Option("256,512,1024", "--passkey-lengths", help="Passkey prompt lengths in tokens."),
    context_length: int = typer.Option(512, "--context-length", help="Perplexity window in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward / generate call."),
    seed: int = typer.Option(1, "--seed", help="Data seed (1 = the held-out test seed)."),
    teacher: str = typer.Option(
        None,
        "--teacher",
        help="Retention report: score CHECKPOINT against this teacher folder (relative scores, passkey grid, cache "
        "bytes, tokens/s); needs --out.",
    ),
    out: str = typer.Option(
        None, "--out", help="With --teacher: folder for retention.md/.json and PNGs (existing ones are refused)."
    ),
    train_length: int = typer.Option(
        None,
        "--train-length",
        help="With --teacher: the student's training context in tokens (default: data.seq_len of its run's "
        "config.yaml).",
    ),
    lengths: str = typer.Option(
        None, "--lengths", help="With --teacher: grid lengths in tokens (default: 0.5,1,2,4 x the training length)."
    ),
    depths: str = typer.Option(None, "--depths", help="With --teacher: needle depths (default 0,0.25,0.5,0.75,1)."),
    trials: int = typer.Option(None, "--trials", help="With --teacher: keys per passkey cell (default 2)."),
    decode_tokens: int = typer.Option(
        None, "--decode-tokens", help="With --teacher: greedy steps timed after each prefill (default 32)."
    ),
) -> None:
    """Evaluate a saved checkpoint on the synthetic tasks, perplexity and optionally lm-eval tasks; print a table.
    With --teacher, write a retention report of CHECKPOINT against TEACHER instead."""
    from pathlib import Path

    from rich.console import Console

    from wuneng.eval.evaluate import evaluate_model, load_model_folder, rows_table, write_rows_json
    from wuneng.saving import ModelFolderError

    report_options = {
        "--out": out,
        "--train-length": train_length,
        "--lengths": lengths,
        "--depths": depths,
        "--trials": trials,
        "--decode-tokens": decode_tokens,
    }
    if teacher is None:
        given = [name for name, value in report_options.items() if value is not None]
        if given:
            _fail(f"{', '.join(given)} belong to the retention report: give --teacher TEACHER too", 2)
    else:
        from wuneng.eval.retention import REPORT_FILES, report_tables, retention_report

        try:
            if out is None:
                raise ValueError("--teacher writes a report: give --out FOLDER")
            other = {"--lm-eval": lm_eval, "--json": json_out, "--text": text, "--preset": presets or None}
            if any(value is not None for value in other.values()):
                raise ValueError(
                    f"{', '.join(k for k, v in other.items() if v is not None)} do not apply to the retention report "
                    "(--teacher); run them without --teacher"
                )
            names = [t.strip() for t in tasks.split(",") if t.strip() and t.strip() not in ("perplexity", "none")]
            settings = dict(
                tasks=tuple(names),
                limit=limit,
                seed=seed,
                batch_size=batch_size,
                lengths=tuple(int(x) for x in (lengths or "").split(",") if x.strip()),
                depths=tuple(float(x) for x in depths.split(",") if x.strip()) if depths else None,
                trials=trials,
                decode_tokens=decode_tokens,
            )
            report = retention_report(
                checkpoint,
                teacher,
                out,
                {k: v for k, v in settings.items() if v is not None},
                train_length=train_length,
                device=resolve_device(device),
            )
        except ModelFolderError:  # broken model files: a failure (exit 1)
            raise
        except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
            _fail(e, 2)
        console = Console()
        for table in report_tables(report):
            console.print(table)
        console.print(f"wrote {', '.join(str(Path(out) / name) for name in REPORT_FILES)}")
        return

    device = resolve_device(device)
    console = Console()
    try:
        task_list = [] if tasks.strip().lower() == "none" else [t.strip() for t in tasks.split(",") if t.strip()]
        preset_map = {}
        for item in presets:
            name, sep, value = item.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise ValueError(f"--preset expects TASK=PRESET, got {item!r}")
            preset_map[name.strip()] = value.strip()
        lengths = [int(x) for x in passkey_lengths.split(",") if x.strip()]
        lm_tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
        if not task_list and not lm_tasks:
            raise ValueError("nothing to run: give --tasks and/or --lm-eval")
        held_out = Path(text).read_text(encoding="utf-8") if text is not None else None
        model, tokenizer = load_model_folder(checkpoint, device=device)
        rows = evaluate_model(
            model,
            tokenizer,
            task_list,
            limit=limit,
            presets=preset_map,
            seed=seed,
            text=held_out,
            passkey_lengths=lengths,
            context_length=context_length,
            batch_size=batch_size,
            lm_eval_tasks=lm_tasks,
        )
    except ModelFolderError:  # the model folder's files are broken: a failure (exit 1), not a usage error
        raise
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:  # the options or the folder path
        _fail(e, 2)
    console.print(rows_table(rows, title=f"wuneng eval {checkpoint}"))
    if json_out:
        meta = {
            "checkpoint": str(checkpoint),
            "model_class": type(model).__name__,
            "tokenizer": type(tokenizer).__name__,
            "limit": limit,
            "seed": seed,
        }
        console.print(f"wrote {write_rows_json(json_out, rows, meta)}")


def _fail(err, code: int) -> None:
    """Print ``err`` (an exception or a message) as one ``error: ...`` line on stderr and exit with ``code``;
    with --debug an exception is raised again (full traceback)."""
    if _DEBUG and isinstance(err, BaseException):
        raise err
    typer.echo(error_line(err) if isinstance(err, BaseException) else f"error: {err}", err=True)
    raise typer.Exit(code=code)


def _layer_list(text: str | None, option: str):
    """A layer option's indices (None: all / not given): a list such as 0,2,5 or 0-3, or a JSON/YAML file in
    flash-linear-attention's ``attn: {layers: [...]}`` format (or a WuNeng model folder); its errors are usage
    errors naming the option."""
    from wuneng.convert import layer_selection

    try:
        return layer_selection(text, option)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(" ".join(str(err).split()), param_hint=option) from None


@app.command("convert", epilog=_examples("convert"))
def convert_command(
    teacher_dir: str = typer.Argument(
        ...,
        help="Local teacher checkpoint folder of a transformers causal LM (Llama, Qwen2/3, Mistral, Gemma 3, Phi-3, Qwen3-MoE, ...: config.json + safetensors + tokenizer).",
    ),
    out_dir: str = typer.Argument(..., help="Output folder (WuNeng config.json, model.safetensors, tokenizer files)."),
    fusion: str = typer.Option("gate", help="Cross-head fusion: gate | add | concat | hymba | none."),
    middle_heads: int = typer.Option(
        None, help="Middle heads H_m (default: 4, at most the teacher's attention heads; 0 = none)."
    ),
    state_query: bool = typer.Option(
        True, "--state-query/--no-state-query", help="State-query modulation q += lambda Y W^state."
    ),
    hybrid_layers: str = typer.Option(
        None,
        help="Layers that get state heads, e.g. 0,2,5 or 0-3 (default: all); the others keep attention. A JSON/YAML file in fla's format (attn: {layers: [...]}) names the layers that keep attention instead: all others get state heads.",
    ),
    keep_attention: str = typer.Option(
        None,
        "--keep-attention",
        help="ARWKV: the layers that keep full attention, e.g. 3,7 or 0-1, or a JSON/YAML file in fla's format (attn: {layers: [...]}, as `wuneng select-layers` writes); every other layer becomes an RWKV-7 replacement.",
    ),
    untie_embeddings: bool = typer.Option(
        False,
        "--untie-embeddings",
        help="Give a teacher's tied embeddings (tie_word_embeddings) an LM head of its own in the student (default: tied as the teacher).",
    ),
    arwkv: bool = typer.Option(
        False, "--arwkv", help="Converted layers become ARWKV RWKV-7 replacements (attention=False)."
    ),
    arwkv_layers: str = typer.Option(
        None, help="Comma-separated layers that become ARWKV replacements (beside hybrid ones)."
    ),
    arwkv_init: str = typer.Option("rwkv7", help="ARWKV layer init: rwkv7 | radlads (copy the teacher's q/k/v/o)."),
    dtype: str = typer.Option("keep", help="Weights dtype: keep (the teacher's), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT_DIR if it is a wuneng model folder (any other non-empty folder, or TEACHER_DIR itself, is refused).",
    ),
) -> None:
    """Convert a transformers decoder (the teacher) into a WuNeng hybrid (or ARWKV) model.

    Hybrid conversion is function-preserving: the logits equal the teacher's at step 0 (every fusion but
    hymba). ARWKV conversion (--arwkv, --arwkv-layers) is not function-preserving: those layers' attention is
    replaced by a new RWKV-7 time-mix (initialised as a fresh RWKV-7 layer, or from the teacher's q/k/v/o
    with --arwkv-init radlads), so its logits differ from the teacher's until the align and distill stages
    train it. Everything else (embeddings, MLPs, norms, LM head) is the teacher's.
    """
    from rich.console import Console

    from wuneng.convert import convert_checkpoint

    weights_dtype = _weights_dtype(dtype)
    from wuneng.convert import is_layer_file

    if keep_attention is not None and hybrid_layers is not None:
        raise typer.BadParameter(
            "give either --keep-attention or --hybrid-layers, not both", param_hint="--keep-attention"
        )
    layers = {"hybrid_layers": _layer_list(hybrid_layers, "--hybrid-layers")}
    if keep_attention is not None:  # ARWKV everywhere but the kept layers
        kept = _layer_list(keep_attention, "--keep-attention")
        if kept is None:
            raise typer.BadParameter(
                "expected the layers to keep, e.g. 3,7 or 0-1, or a file with fla's "
                "attn: {layers: [...]} (for no attention layer at all use --arwkv)",
                param_hint="--keep-attention",
            )
        layers = {"keep_attention": kept}
        arwkv = True
    elif hybrid_layers is not None and is_layer_file(hybrid_layers):  # fla's file lists the layers that stay attention
        layers = {"keep_attention": layers["hybrid_layers"]}
    console = Console()
    model = convert_checkpoint(
        teacher_dir,
        out_dir,
        overwrite=overwrite,
        dtype=weights_dtype,
        fusion=fusion,
        middle_heads=middle_heads,
        state_query=state_query,
        attention=not arwkv,
        arwkv_layers=_layer_list(arwkv_layers, "--arwkv-layers"),
        arwkv_init=arwkv_init,
        untie_embeddings=untie_embeddings,
        **layers,
    )
    c = model.config
    kinds = {k: [i for i, kind in enumerate(c.layer_kinds) if kind == k] for k in ("hybrid", "arwkv", "attention")}
    console.print(
        f"wrote {out_dir}: hybrid layers {kinds['hybrid']}, ARWKV layers {kinds['arwkv']}, attention layers "
        f"{kinds['attention']}; fusion={c.fusion}, middle_heads={c.middle_heads}, state_query={c.state_query}, "
        f"tied embeddings={c.tie_word_embeddings}, dtype={model.dtype}",
        markup=False,
        highlight=False,
    )
    console.print(model.format_parameter_breakdown(), markup=False, highlight=False)


@app.command("select-layers", epilog=_examples("select-layers"))
def select_layers_command(
    teacher_dir: str = typer.Argument(
        ..., help="Local teacher folder of a transformers causal LM (config.json + safetensors + tokenizer)."
    ),
    budget: int = typer.Option(
        ..., "--budget", help="Distillation tokens per run (one run per candidate layer, plus the baseline)."
    ),
    keep: int = typer.Option(..., "--keep", help="How many layers keep full attention (the top K of the ranking)."),
    data: list[str] = typer.Option(
        [],
        "--data",
        help="Training data, repeatable: files or folders (.txt/.md/.jsonl/.parquet), a datasets folder, or python:module:function (as `data.sources` of wuneng train). Required.",
    ),
    out: str = typer.Option(
        None,
        "--out",
        help="Where the chosen layers go, in fla's format (attn: {layers: [...]}) for `wuneng convert --keep-attention FILE` (default WORK_DIR/keep_attention.json).",
    ),
    work_dir: str = typer.Option(
        "runs/select-layers",
        "--work-dir",
        help="Folder of results.json (one entry per finished run; a rerun skips them) and the runs.",
    ),
    layers: str = typer.Option(None, "--layers", help="Candidate layers, e.g. 0-11 or 0,4,8 (default: all)."),
    align_tokens: int = typer.Option(
        None,
        "--align-tokens",
        help="Stage-1 alignment tokens, once, for the all-ARWKV base student (default: --budget; 0: none).",
    ),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training row."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per optimiser step."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate (constant after a short warm-up)."),
    eval_rows: int = typer.Option(
        8, "--eval-rows", help="Rows held out (the last rows of the data) to measure each run's KL."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the base student's init and of the data order (the same for every run)."
    ),
    arwkv_init: str = typer.Option(
        "rwkv7", "--arwkv-init", help="ARWKV layer init: rwkv7 | radlads (as wuneng convert)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Teacher and student dtype: float32, bfloat16 or float16."),
) -> None:
    """Rank layers for keeping full attention in an ARWKV student (KL-guided, arXiv 2512.20569) and write the top K.

    From the all-replaced ARWKV student, each candidate layer in turn keeps the teacher's softmax attention for one
    short distillation run of --budget tokens; layers are ranked by how far the held-out KL(teacher || student)
    falls below the run that keeps none. Cost: (candidates + 1) x --budget distillation tokens, plus
    --align-tokens once. See docs/wuneng.md, "Choosing layers".
    """
    from rich.console import Console
    from rich.table import Table

    from wuneng.convert import parse_layer_list
    from wuneng.select_layers import SelectionConfig, select_layers

    try:
        candidates = parse_layer_list(layers, "--layers") if layers else None
        cfg = SelectionConfig(
            teacher=teacher_dir,
            data=list(data),
            budget_tokens=budget,
            keep=keep,
            work_dir=work_dir,
            out=out,
            candidates=candidates,
            align_tokens=align_tokens,
            seq_len=seq_len,
            micro_batch_size=batch_size,
            lr=lr,
            eval_rows=eval_rows,
            seed=seed,
            arwkv_init=arwkv_init,
            dtype=dtype,
        )
        cfg.check()
    except ValueError as e:
        raise typer.BadParameter(" ".join(str(e).split())) from None
    result = select_layers(cfg)
    table = Table(
        title=f"select-layers {teacher_dir}: held-out KL per kept layer (baseline, none kept: {result.baseline_kl:.5f})"
    )
    for column in ("rank", "layer", "KL", "fall vs baseline", "chosen"):
        table.add_column(column, justify="right")
    for rank, row in enumerate(result.ranking, 1):
        table.add_row(
            str(rank),
            str(row["layer"]),
            f"{row['kl']:.5f}",
            f"{row['fall']:+.5f}",
            "yes" if row["layer"] in result.chosen else "",
        )
    console = Console()
    console.print(table)
    console.print(
        f"chosen layers {result.chosen} written to {result.out} ({result.runs} new runs); convert with "
        f"`wuneng convert {teacher_dir} OUT_DIR --keep-attention {result.out}`",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


if __name__ == "__main__":  # pragma: no cover
    app()
