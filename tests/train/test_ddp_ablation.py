"""DDP without find_unused_parameters needs every trainable parameter to get a gradient in every step. The
objectives freeze what a model declares unused (``unused_parameter_names()``): layer 0's value-residual LoRA of
RWKV-7 / Meta-State / ARWKV, and the whole state side of a WuNeng layer whose output does not read the state
(the ablation ``fusion="none"``, ``state_query=False``, ``middle_heads=0``). The fast tests check that invariant
per model and stage; the slow one trains two steps with 2 processes (torchrun, gloo)."""

import os
import socket
import subprocess

import pytest
import torch

from wuneng.convert import convert_teacher
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.train.stages import AlignObjective, CausalLMObjective, DistillObjective

from train_helpers import PYTHON, REPO, saved_run_files, tiny_qwen2

ABLATION = dict(fusion="none", state_query=False, middle_heads=0)


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "rwkv7":
        return RWKV7ForCausalLM(RWKV7Config(vocab_size=260, hidden_size=32, num_hidden_layers=2, head_size=16))
    if kind == "metastate":
        return MetaStateForCausalLM(MetaStateConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, head_size=16))
    if kind == "arwkv":
        return convert_teacher(tiny_qwen2(hidden=64), attention=False, arwkv_head_size=16)
    options = {"wuneng": {}, "wuneng-ablation": ABLATION, "wuneng-no-fusion": dict(fusion="none")}[kind]
    return convert_teacher(tiny_qwen2(hidden=64), **options)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trainable_without_gradient(obj) -> tuple[list[str], int]:
    """One forward/backward of the objective: trainable parameters that got no gradient, and how many train."""
    out = obj(batch())
    out["loss_sum"].backward()
    trainable = [(n, p) for n, p in obj.student.named_parameters() if p.requires_grad]
    return [n for n, p in trainable if p.grad is None], len(trainable)


@pytest.mark.parametrize("kind", ["rwkv7", "metastate", "arwkv", "wuneng", "wuneng-no-fusion", "wuneng-ablation"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    obj = CausalLMObjective(build(kind).train())
    obj.set_trainable()
    missing, n = trainable_without_gradient(obj)
    assert n > 0 and missing == []


def test_ablation_freezes_the_unread_state_side_in_sft_and_distill():
    student = build("wuneng-ablation").train()
    state_side = {n for n in student.new_parameter_names() if ".state." in n or "receptance_lora" in n}
    assert state_side and state_side <= student.unused_parameter_names()
    distill = DistillObjective(student, tiny_qwen2(hidden=64), ce_weight=0.5)
    distill.set_trainable()
    missing, n = trainable_without_gradient(distill)
    assert n > 0 and missing == []
    assert not any(p.requires_grad for name, p in student.named_parameters() if name in state_side)


def test_ablation_align_still_trains_the_state_side():
    """Stage 1's state term reads the state heads even where the layer output does not."""
    teacher = tiny_qwen2(hidden=64)
    student = convert_teacher(teacher, **ABLATION).train()
    obj = AlignObjective(student, teacher)
    obj.set_trainable()
    missing, n = trainable_without_gradient(obj)
    assert missing == []
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert (
        "model.layers.0.self_attn.state.w1" in trainable and "model.layers.1.self_attn.receptance_lora_a" in trainable
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wuneng-ablation", "rwkv7"])
def test_two_process_ddp_trains_without_find_unused_parameters(tmp_path, tokenizer, kind):
    """torchrun, 2 CPU processes (gloo), 2 optimiser steps: DDP raises at the second step when a trainable
    parameter got no gradient in the first."""
    build(kind).save_pretrained(tmp_path / "student")
    model = {"path": str(tmp_path / "student")}
    path = saved_run_files(tmp_path, tokenizer, model=model, max_steps=2, save_every=2)
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "wuneng.cli", "train", str(path),
        "--output-dir", str(tmp_path / "run"), "-o", "micro_batch_size=1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
