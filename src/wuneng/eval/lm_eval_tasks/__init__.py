"""Local lm-evaluation-harness tasks shipped with wuneng (YAML + a small JSONL per task).

``wuneng_arith``: 48 arithmetic word problems from :mod:`wuneng.eval.tasks.arithmetic` (seeded, so
``wuneng_arith_records()`` regenerates the shipped JSONL exactly). Use with lm-eval 0.4.x::

    from wuneng.eval.lm_eval_tasks import prepare_include_path
    path = prepare_include_path("/tmp/wuneng_lm_eval_tasks")
    # lm_eval --model hf --model_args pretrained=... --tasks wuneng_arith --include_path /tmp/wuneng_lm_eval_tasks
    # or: lm_eval.tasks.TaskManager(include_path=str(path))

lm-eval itself is an optional dependency (``pip install wuneng[eval]``); nothing here imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import yaml

from wuneng.eval.scoring import parse_final_number
from wuneng.eval.tasks.arithmetic import ArithmeticConfig, make_test_set
from wuneng.saving import apply_umask

TASKS_DIR = Path(__file__).resolve().parent
WUNENG_ARITH_DIR = TASKS_DIR / "wuneng_arith"
WUNENG_ARITH_YAML = WUNENG_ARITH_DIR / "wuneng_arith.yaml"
WUNENG_ARITH_JSONL = WUNENG_ARITH_DIR / "wuneng_arith.jsonl"
# the shipped problems: +/- at 1 and 2 digits, 12 per category, seed 20261123 (no recall lines)
WUNENG_ARITH_CONFIG = ArithmeticConfig(ops=("+", "-"), two_digit_fraction=0.5, recall_fraction=0.0)
WUNENG_ARITH_SEED = 20261123
WUNENG_ARITH_PER_CATEGORY = 12


def wuneng_arith_records() -> list[dict]:
    """The JSONL rows of ``wuneng_arith``: ``{"question", "answer", "final", "category"}``."""
    test = make_test_set(WUNENG_ARITH_CONFIG, per_category=WUNENG_ARITH_PER_CATEGORY, seed=WUNENG_ARITH_SEED)
    return [
        {"question": e.prompt, "answer": e.answer, "final": str(parse_final_number(e.answer)), "category": e.category}
        for e in test.examples
    ]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)  # mkstemp made it 0o600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_wuneng_arith_jsonl(path: Union[str, Path] = WUNENG_ARITH_JSONL) -> Path:
    """(Re)write the ``wuneng_arith`` JSONL (one JSON object per line) and return its path."""
    path = Path(path)
    _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in wuneng_arith_records()))
    return path


def load_task_yaml(path: Union[str, Path] = WUNENG_ARITH_YAML) -> dict:
    """A task YAML as a dict (our YAMLs use no ``!function`` tags, so ``yaml.safe_load`` reads them)."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(config).__name__}")
    return config


def prepare_include_path(out_dir: Union[str, Path]) -> Path:
    """Write copies of the shipped task YAMLs into ``out_dir/<task>/`` with absolute ``data_files``.

    HF ``datasets`` resolves relative ``data_files`` against the working directory, so the shipped
    YAML only works when lm-eval runs from its folder; the copy works from anywhere. Returns
    ``out_dir`` (pass it to ``--include_path`` or ``TaskManager(include_path=...)``).
    """
    out_dir = Path(out_dir)
    for yaml_path in sorted(TASKS_DIR.glob("*/*.yaml")):
        config = load_task_yaml(yaml_path)
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        if isinstance(files, str):
            files = {"test": files}
        config["dataset_kwargs"]["data_files"] = {
            split: str((yaml_path.parent / p).resolve()) if not os.path.isabs(p) else p for split, p in files.items()
        }
        target = out_dir / yaml_path.parent.name / yaml_path.name
        _atomic_write(target, yaml.safe_dump(config, sort_keys=False))
    return out_dir
