"""Meta-State progressive scaling (SPEC section 4): ``wuneng.grow_model`` and ``wuneng grow``.

Exactness metric: max |logits_grown - logits_old| / max |logits_old| <= 1e-5 (float32 round-off), on models
whose every parameter was perturbed first (so eta, W_o, V_P, LoRAs are non-zero and all paths are live).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

import wuneng
from wuneng.cli import app
from wuneng.grow import grow_checkpoint, grow_model, state_report
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

from _helpers import perturb_

V, C, L, N = 64, 32, 2, 16  # C / N = 2 heads at the start; layer 1 uses layer 0's v_first


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def trained_like(seed: int = 0, **kw) -> MetaStateForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N)
    cfg.update(kw)
    model = MetaStateForCausalLM(MetaStateConfig(**cfg))
    return perturb_(model, 0.2).eval()


@pytest.mark.parametrize("heads,tokens", [(5, None), (None, 200), (4, 160)], ids=["heads", "param_tokens", "both"])
def test_growth_preserves_logits(heads, tokens):
    model = trained_like(0)
    ids = torch.randint(0, V, (2, 24))
    before = model(ids).logits
    grown = grow_model(model, num_heads=heads, num_param_tokens=tokens, seed=1).eval()
    assert grown.config.num_heads == (heads or 2)
    assert grown.config.num_param_tokens == (tokens or 4 * C)
    assert rel_max(grown(ids).logits, before) <= 1e-5
    # the input model is untouched
    assert model.config.num_heads == 2 and torch.equal(model(ids).logits, before)
    # token-by-token decoding of the grown model too (step form with the wider state)
    cache, steps = None, []
    for t in range(8):
        out = grown(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache, _ = out.past_key_values, steps.append(out.logits)
    assert rel_max(torch.cat(steps, 1), before[:, :8]) <= 1e-5


def test_grown_parameters_follow_the_rules():
    model = trained_like(2)
    grown = grow_model(model, num_heads=3, num_param_tokens=160, seed=0)
    A, A2, M = 2 * N, 3 * N, 4 * C
    for old, new in zip(model.model.blocks, grown.model.blocks):
        # old values kept as the leading block
        assert torch.equal(new.att.receptance.weight[:A], old.att.receptance.weight)
        assert torch.equal(new.att.w2[:, :A], old.att.w2)
        assert torch.equal(new.att.r_k[:2], old.att.r_k)
        assert torch.equal(new.ffn.param_keys[:M], old.ffn.param_keys)
        # zeros where the function must not change
        assert torch.count_nonzero(new.att.output.weight[:, A:]) == 0
        assert torch.count_nonzero(new.ffn.sse.eta[2:]) == 0
        assert torch.count_nonzero(new.ffn.param_values[M:]) == 0
        # section-2 init for the new channels: random rows at the init scale, per-channel constants
        assert new.att.receptance.weight.shape == (A2, C)
        assert torch.allclose(new.att.receptance.weight[A:].norm(dim=1), torch.ones(N), atol=0.35)
        # K_P rows: orthogonal init of gain 1 scaled by sqrt(M / C), i.e. mean squared row norm 1 (as the old rows at init)
        assert abs(new.ffn.param_keys[M:].norm(dim=1).square().mean().item() - 1.0) < 0.3
        assert torch.all(new.att.k_a[A:] == 1.02) and torch.all(new.att.r_k[2:] == -0.04)
        assert new.att.ln_x.num_groups == 3
        assert torch.count_nonzero(new.att.w2[:, A:]) > 0


def test_grown_model_trains():
    model = trained_like(3)
    grown = grow_model(model, num_heads=4, num_param_tokens=192, seed=0).train()
    ids = torch.randint(0, V, (4, 24))
    opt = torch.optim.Adam(grown.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss = grown(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            block = grown.model.blocks[1]
            # gradients reach the zero-initialised new pieces, so the new heads and tokens learn
            assert block.att.output.weight.grad[:, 2 * N :].abs().sum() > 0
            assert block.ffn.param_values.grad[4 * C :].abs().sum() > 0
            assert block.ffn.sse.eta.grad[2:].abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_grown_model_saves_and_loads(tmp_path):
    model = trained_like(4)
    grown = grow_model(model, num_heads=3, seed=0).eval()
    grown.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_heads"] == 3
    loaded = MetaStateForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (1, 10))
    assert torch.equal(loaded(ids).logits, grown(ids).logits)


def test_growth_with_sparse_routing_keeps_groups():
    """With routing on, new tokens are appended inside every group; with top_k = E (all groups) it is exact."""
    model = trained_like(5, num_param_tokens=96, moe_groups=4, moe_top_k=4)
    grown = grow_model(model, num_param_tokens=128, seed=0).eval()
    old_k = model.model.blocks[0].ffn.param_keys.unflatten(0, (4, 24))
    new_k = grown.model.blocks[0].ffn.param_keys.unflatten(0, (4, 32))
    assert torch.equal(new_k[:, :24], old_k)
    assert torch.count_nonzero(grown.model.blocks[0].ffn.param_values.unflatten(0, (4, 32))[:, 24:]) == 0
    ids = torch.randint(0, V, (1, 12))
    assert rel_max(grown(ids).logits, model(ids).logits) <= 1e-5


def test_state_report():
    model = trained_like(6)
    report = state_report(model)
    assert report.per_layer == [2 * N * N] * L and report.total == L * 2 * N * N == model.num_states
    grown_report = state_report(grow_model(model, num_heads=6))
    assert grown_report.total == 3 * report.total
    text = str(grown_report)
    assert "total" in text and f"{grown_report.total:,}" in text
    with pytest.raises(TypeError, match="state_report"):
        state_report(torch.nn.Linear(2, 2))


def test_package_exports_grow_model_and_the_module_is_a_plain_module():
    import types

    import wuneng.grow as grow_module

    assert wuneng.grow_model is grow_model and wuneng.state_report is state_report
    model = trained_like(7)
    assert wuneng.grow_model(model, num_heads=3).config.num_heads == 3
    # no callable-module trick: ``wuneng.grow`` is the module, of the ordinary module type
    assert wuneng.grow is grow_module and type(grow_module) is types.ModuleType and not callable(grow_module)


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_growth_requests_raise_clear_errors():
    model = trained_like(8, num_param_tokens=96, moe_groups=2)
    with pytest.raises(ValueError, match="cannot shrink num_heads from 2 to 1"):
        grow_model(model, num_heads=1)
    with pytest.raises(ValueError, match="cannot shrink num_param_tokens"):
        grow_model(model, num_param_tokens=64)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        grow_model(model, num_heads=2.5)
    with pytest.raises(ValueError, match="multiple of moe_groups=2"):
        grow_model(model, num_param_tokens=97)
    rwkv = RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=1, head_size=N))
    with pytest.raises(TypeError, match="expected a MetaStateForCausalLM.*wuneng_rwkv7"):
        grow_model(rwkv, num_heads=4)


# -- the command line -----------------------------------------------------------------------------------------
def test_cli_grow(tmp_path):
    model = trained_like(9)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    result = CliRunner().invoke(app, ["grow", str(src), str(out), "--heads", "3", "--param-tokens", "160"])
    assert result.exit_code == 0, result.output
    assert "total" in result.output and f"{L * 3 * N * N:,}" in result.output
    grown = MetaStateForCausalLM.from_pretrained(out).eval()
    assert grown.config.num_heads == 3 and grown.config.num_param_tokens == 160
    ids = torch.randint(0, V, (1, 9))
    assert rel_max(grown(ids).logits, model(ids).logits) <= 1e-5


def test_cli_grow_errors(tmp_path):
    runner = CliRunner()
    rwkv_dir = tmp_path / "rwkv"
    RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=1, head_size=N)).save_pretrained(
        rwkv_dir
    )
    result = runner.invoke(app, ["grow", str(rwkv_dir), str(tmp_path / "o1"), "--heads", "4"])
    assert result.exit_code == 1 and "wuneng_rwkv7" in result.output and "Meta-State" in result.output
    result = runner.invoke(app, ["grow", str(tmp_path / "missing"), str(tmp_path / "o2"), "--heads", "4"])
    assert result.exit_code == 2 and "not a model folder" in result.output  # a missing input: usage error
    src = tmp_path / "ms"
    trained_like(10).save_pretrained(src)
    result = runner.invoke(app, ["grow", str(src), str(tmp_path / "o3"), "--heads", "1"])
    assert result.exit_code == 1 and "cannot shrink" in result.output
    assert not (tmp_path / "o3").exists()
    result = runner.invoke(app, ["grow", str(src), str(tmp_path / "o4")])
    assert result.exit_code == 2 and "nothing to grow" in result.output
    with pytest.raises(FileExistsError, match="overwrite"):
        grow_checkpoint(str(src), str(rwkv_dir), num_heads=4)
