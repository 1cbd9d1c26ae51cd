"""Helpers of the training tests: tiny seeded Qwen2/Llama models, toy data, file writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wuneng.train.config import DataConfig, OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")

TEXTS = [
    "the cat sat on the mat. the cat sat on the mat.",
    "abc abc abc abc abc abc abc abc",
    "one two three four five six seven",
    "hello world, hello world, hello world",
] * 6

CHATS = [
    {"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(6)
    for b in range(4)
]


def tiny_qwen2(seed: int = 0, vocab_size: int = 260, layers: int = 2, hidden: int = 32) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0, vocab_size: int = 260) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Quiet, deterministic, fast: no progress bar, no TensorBoard, no final save, full precision.
QUIET = {"progress": False, "tensorboard": False, "save_final": False, "mixed_precision": "no"}


def quick_config(output_dir: Any, **overrides: Any) -> TrainConfig:
    """A TrainConfig for tiny in-process runs (seq_len 32, lr 3e-3 -> 3e-4, 3 warm-up steps)."""
    base = dict(
        output_dir=str(output_dir),
        data=DataConfig(seq_len=32),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3),
        **QUIET,
    )
    base.update(overrides)
    return TrainConfig(**base)


def saved_run_files(tmp_path: Path, tokenizer, hidden: int = 32, **config: Any) -> Path:
    """A tiny Qwen2 (width ``hidden``, + tokenizer) saved to ``tmp_path/model``, TEXTS as one line each in ``data.txt``, and
    a run YAML pointing at both (``config`` adds/overrides keys); returns the YAML path."""
    torch.manual_seed(0)
    tiny_qwen2(hidden=hidden).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    cfg = {
        "model": {"path": str(tmp_path / "model")},
        "data": {"sources": [str(tmp_path / "data.txt")], "seq_len": 16, "text_unit": "line"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        **QUIET,
        **config,
    }
    return write_yaml(tmp_path / "run.yaml", cfg)
