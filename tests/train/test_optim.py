"""AdamW groups (wd only on Linear/Embedding .weight matrices, 2x lr for *w0; see test_weight_decay.py) and the lr schedules."""

import io

import pytest
import torch
from torch import nn

from wuneng.train.config import OptimConfig
from wuneng.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)  # weight 2-D (decay), bias 1-D (no decay)
        self.norm = nn.LayerNorm(4)
        self.w0 = nn.Parameter(torch.zeros(1, 1, 4))  # RWKV-7 decay bias: 3-D but never decayed, 2x lr
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def test_groups():
    torch.manual_seed(0)
    m = Toy()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, w0_lr_scale=2.0)
    groups = {g["name"]: g for g in param_groups(m.named_parameters(), cfg)}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["decay"]) == {id(m.proj.weight)}
    assert ids(groups["no_decay"]) == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    assert ids(groups["w0"]) == {id(m.w0)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["w0"]["lr"] == 2e-3 and groups["w0"]["weight_decay"] == 0.0
    assert all(id(m.frozen) not in ids(g) for g in groups.values())


def test_tied_weights_appear_once():
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    groups = param_groups(m.named_parameters(), OptimConfig())
    assert sum(len(g["params"]) for g in groups) == 1


def test_w0_gets_twice_the_step_and_no_decay():
    """One AdamW step with zero gradients: only decayed weights move, by lr*wd*w."""
    torch.manual_seed(0)
    m = Toy()
    opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(m.proj.weight, before["proj.weight"] * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    assert torch.equal(m.w0, before["w0"]) and torch.equal(m.proj.bias, before["proj.bias"])


def test_schedule_values():
    cfg = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=50, schedule="exponential")
    assert lr_factor(0, cfg, 1000) == pytest.approx(0.01)
    assert lr_factor(25, cfg, 1000) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(50, cfg, 1000) == pytest.approx(1.0)
    assert lr_factor(1000, cfg, 1000) == pytest.approx(0.1)
    assert lr_factor(525, cfg, 1000) == pytest.approx(0.1**0.5)  # geometric mid-point
    cos = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0, schedule="cosine")
    assert lr_factor(500, cos, 1000) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(1000, cos, 1000) == pytest.approx(0.1)
    const = OptimConfig(warmup_steps=0, schedule="constant")
    assert lr_factor(999, const, 1000) == 1.0


def test_scheduler_state_loads_with_weights_only():
    torch.manual_seed(0)
    m = Toy()
    cfg = OptimConfig(lr=1e-3, warmup_steps=2)
    opt = build_optimizer(m, cfg)
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = build_optimizer(Toy(), cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    sched2.load_state_dict(state["s"])
    assert sched2.last_epoch == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
