"""Run lm-evaluation-harness (0.4.x) from Python on a wuneng model, a model folder, or any HF causal LM.

    from wuneng.eval.lm_eval_glue import run_lm_eval
    result = run_lm_eval("runs/x/final", ["wuneng_arith"], limit=8)
    result.metrics        # {"wuneng_arith": {"exact_match": 0.25}}
    result.num_samples    # {"wuneng_arith": 8}

The tasks shipped in :mod:`wuneng.eval.lm_eval_tasks` (``wuneng_arith``) are always available: their YAMLs
are copied into a temporary include path with absolute ``data_files``. When every requested task is a
shipped one, lm-eval's ~15 k built-in task configs are not indexed (that alone takes tens of seconds on
a small CPU); otherwise they are, and built-in tasks (``mmlu``, ``gsm8k``, ...) resolve as usual
(their data sets come from the HF Hub, so they need a network or a filled HF cache).

The command-line equivalent (a model folder written by wuneng's ``save_pretrained``)::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks wuneng_arith \\
        --include_path TASKS_DIR --device cpu

``trust_remote_code=True`` is how a process that never imported wuneng finds our classes (the folder's
``wuneng_auto.py`` shim, see :mod:`wuneng.auto_map`); here wuneng is imported, so it is not needed.

lm-eval is the optional ``eval`` extra (``pip install 'wuneng[eval]'``); it is imported lazily.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from wuneng.eval.lm_eval_tasks import TASKS_DIR, load_task_yaml, prepare_include_path

__all__ = ["LMEvalResult", "local_task_names", "require_lm_eval", "run_lm_eval", "summarize_results"]

INSTALL_HINT = "lm-evaluation-harness is not installed; install the eval extra: pip install 'wuneng[eval]'"


def require_lm_eval() -> Any:
    """Import and return the ``lm_eval`` module, or raise ImportError with the install command."""
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return lm_eval


def local_task_names() -> list[str]:
    """Names of the lm-eval tasks shipped with wuneng (``task:`` of each shipped YAML), sorted."""
    return sorted(load_task_yaml(p)["task"] for p in TASKS_DIR.glob("*/*.yaml"))


@dataclass
class LMEvalResult:
    """Attributes:
    metrics: ``{task: {metric: value}}``; a metric computed after a named filter is ``"metric/filter"``
        (e.g. gsm8k's ``"exact_match/strict-match"``), the default filter ``none`` is left out.
    stderr: the matching standard errors, same keys (a missing or non-numeric one is left out).
    num_samples: ``{task: documents evaluated}`` (after ``limit``).
    raw: the dict ``lm_eval.simple_evaluate`` returned (per-sample logs dropped).
    """

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    num_samples: dict[str, int]
    raw: dict = field(repr=False, default_factory=dict)


def _metric_name(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def summarize_results(raw: dict) -> LMEvalResult:
    """Turn lm-eval's results dict (``simple_evaluate`` or a ``results_*.json``) into :class:`LMEvalResult`."""
    if not isinstance(raw, dict) or "results" not in raw:
        raise ValueError("expected lm-eval results: a dict with a 'results' key")
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task, values in raw["results"].items():
        metrics[task], stderr[task] = {}, {}
        for key, value in values.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue  # alias, name, sample_len, and "N/A" stderrs
            if "_stderr," in key:
                stderr[task][_metric_name(key.replace("_stderr,", ",", 1))] = float(value)
            else:
                metrics[task][_metric_name(key)] = float(value)
    num_samples = {task: int(n["effective"]) for task, n in raw.get("n-samples", {}).items()}
    return LMEvalResult(metrics, stderr, num_samples, raw)


def run_lm_eval(
    model: Union[str, os.PathLike, Any],
    tasks: Sequence[str],
    *,
    tokenizer: Any = None,
    limit: Optional[Union[int, float]] = None,
    num_fewshot: Optional[int] = None,
    batch_size: Union[int, str] = 1,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    trust_remote_code: bool = True,
    include_path: Optional[Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]] = None,
    include_defaults: Optional[bool] = None,
    gen_kwargs: Optional[Union[str, dict]] = None,
    bootstrap_iters: int = 100_000,
    seed: int = 1234,
) -> LMEvalResult:
    """Evaluate ``model`` on lm-eval ``tasks`` with ``lm_eval.simple_evaluate`` and the ``hf`` model (HFLM).

    Args:
        model: a model folder (loaded by HFLM through the Auto classes) or a loaded HF causal LM
            (``PreTrainedModel``, e.g. a ``RWKV7ForCausalLM``; it stays on its device).
        tasks: lm-eval task or group names (shipped ones like ``wuneng_arith``, or built-in ones).
        tokenizer: for a loaded model: its tokenizer (default :class:`~wuneng.tokenization.ByteLevelTokenizer`);
            for a folder: a tokenizer or tokenizer folder (default: the model folder's).
        limit: documents per task (an int) or a fraction (a float < 1); None = all.
        num_fewshot: few-shot examples (None = each task's default).
        batch_size: an int or ``"auto"``.
        device: ``"cpu"``, ``"cuda"``, ... for a folder (default: cuda if available, else cpu).
        dtype: weights dtype for a folder, e.g. ``"bfloat16"`` (default: the saved one).
        trust_remote_code: let transformers run the folder's ``wuneng_auto.py`` shim (harmless here:
            wuneng is imported, so the registered classes are used anyway).
        include_path: more task folders, searched after the shipped tasks.
        include_defaults: index lm-eval's built-in tasks (default: unless every task is a shipped one
            and no ``include_path`` is given; indexing them takes tens of seconds on a small CPU).
        gen_kwargs: generation overrides for generate_until tasks (``"max_gen_toks=16"`` or a dict).
        bootstrap_iters: bootstrap resamples for the standard errors of non-mean metrics (0 = none).
        seed: python / numpy / torch / few-shot seed.

    Returns:
        :class:`LMEvalResult`.
    """
    require_lm_eval()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = [str(t).strip() for t in tasks]
    if not tasks or any(not t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    if limit is not None and (isinstance(limit, bool) or not limit > 0):
        raise ValueError(f"limit must be a positive int (documents) or a fraction in (0, 1), got {limit!r}")

    import wuneng.models  # noqa: F401  (registers the wuneng classes with the Auto classes)

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model folder (expected config.json from save_pretrained)")
        if tokenizer is None and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{path} holds no tokenizer (tokenizer_config.json); pass tokenizer=")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = HFLM(
            pretrained=str(path),
            tokenizer=tokenizer,
            backend="causal",
            device=device,
            dtype=dtype or "auto",
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        )
    else:
        if not hasattr(model, "config") or not callable(model):
            raise TypeError(f"model must be a model folder or a loaded HF causal LM, got {type(model).__name__}")
        if tokenizer is None:
            from wuneng.tokenization import ByteLevelTokenizer

            tokenizer = ByteLevelTokenizer()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)

    shipped = set(local_task_names())
    extra = (
        []
        if include_path is None
        else ([include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    )
    with tempfile.TemporaryDirectory(prefix="wuneng_lm_eval_tasks_") as tmp:
        local = prepare_include_path(tmp)
        manager = TaskManager(
            include_path=[str(local), *map(str, extra)],
            include_defaults=not (set(tasks) <= shipped and not extra)
            if include_defaults is None
            else include_defaults,
        )
        missing = [t for t in tasks if not manager.match_tasks([t])]
        if missing:
            where = "lm-eval's built-in tasks, " if manager.all_tasks != sorted(shipped) else ""
            raise ValueError(
                f"unknown lm-eval task(s) {missing}; searched {where}the shipped tasks {sorted(shipped)} and include_path {extra}"
            )
        raw = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if raw is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
    return summarize_results(dict(raw))
