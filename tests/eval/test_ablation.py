"""wuneng.eval.ablation: the state heads zeroed at evaluation (Y = 0 in the query modulation, the fusion and the
middle heads, on the training, no-grad and fused one-token paths) against hand-made Y = 0 references in float64,
exact restoration afterwards, and the learned state-head magnitudes per layer.

The model is a tiny random Qwen2 (2 layers hybrid, 1 ARWKV) converted to WuNeng with its new parameters
perturbed, so that Y changes the output."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from wuneng.eval.ablation import state_head_magnitudes, state_heads_zeroed
from wuneng.layers.hybrid import HybridMixer
from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.ops.wkv7.cpu import cpu_kernel_available

from _helpers import perturb_

VOCAB = 61
TOL = 1e-10  # float64 throughout
KINDS = ["hybrid", "arwkv", "hybrid"]


def tiny_student(fusion: str = "gate", middle_heads: int = 2, state_query: bool = True, seed: int = 0):
    """A float64 WuNeng student of a random 3-layer Qwen2 (hidden 32, 2 heads of 16), new parameters perturbed."""
    torch.manual_seed(seed)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            pad_token_id=VOCAB - 1,
        )
    )
    student = WuNengForCausalLM.from_teacher(
        teacher, layer_kinds=KINDS, fusion=fusion, middle_heads=middle_heads, state_query=state_query
    )
    perturb_(student, 0.3, only=student.new_parameter_names().__contains__, seed=seed + 100)
    return student.to(torch.float64).eval()


def ids(batch: int = 2, length: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed))


def mixers(model) -> list:
    return [m for m in model.modules() if isinstance(m, HybridMixer)]


@pytest.mark.parametrize("fusion", ["gate", "add", "concat", "hymba", "none"])
def test_each_layer_under_the_context_is_the_attention_fused_with_zero_state_heads(fusion):
    """Per hybrid layer, on the layer's own inputs under the context: the teacher's attention of the unmodulated
    query, fused (middle heads included) with Y = zeros by the mixer's own ``fuse``."""
    model = tiny_student(fusion)
    x = ids()
    checked = []

    def reference(module, args, kwargs, output):
        kwargs = dict(kwargs)
        u = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        args = args[1:] if "hidden_states" not in kwargs and args else args
        kwargs.pop("wuneng_context", None)
        q, k, v = module.project(u)
        o_proj = module.o_proj  # the teacher's, captured before _teacher_attention puts its stand-in there
        zeros = torch.zeros_like(q)
        ref, _ = module._teacher_attention(
            u, q, k, v, lambda a: module.fuse(u, a.view_as(q), zeros, None, o_proj), args, kwargs
        )
        checked.append((output[0] - ref).abs().max().item())

    with torch.no_grad():
        normal = model(x).logits
        handles = [m.register_forward_hook(reference, with_kwargs=True) for m in mixers(model)]
        try:
            with state_heads_zeroed(model):
                zeroed = model(x).logits
        finally:
            for h in handles:
                h.remove()
    assert len(checked) == 2 and max(checked) < TOL, checked
    assert (normal - zeroed).abs().max() > 1e-3  # Y mattered: the ablation changed the logits


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_whole_model_equals_a_copy_whose_state_parameters_are_zeroed(fusion):
    """Without middle heads, Y = 0 is exactly lambda = 0 plus beta = 0 (add) or W^O_s = 0 (concat): the logits
    under the context equal such a copy's, in evaluation and in training mode (the autograd path). (Not gate:
    there Y = 0 gives (1 - gamma rho) A, which no parameter value reproduces.)"""
    model = tiny_student(fusion, middle_heads=0)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in mixers(ref_model):
            m.state_query_scale.zero_()
            (m.fusion_beta if fusion == "add" else m.o_state.weight).zero_()
    x = ids()
    with torch.no_grad():
        ref = ref_model(x).logits
        with state_heads_zeroed(model):
            got = model(x).logits
    assert (got - ref).abs().max() < TOL
    model.train()
    with state_heads_zeroed(model):
        trained_path = model(x).logits  # grad enabled: the low-rank maps with autograd
    assert trained_path.requires_grad and (trained_path.detach() - ref).abs().max() < TOL


def test_token_by_token_decoding_under_the_context_equals_the_full_forward(monkeypatch):
    model = tiny_student("gate")
    x = ids(length=8)
    served = []
    original = HybridMixer._state_one_token

    def spy(self, *args):
        out = original(self, *args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(HybridMixer, "_state_one_token", spy)
    with torch.no_grad(), state_heads_zeroed(model):
        full = model(x).logits
        cache, steps = model.new_cache(), []
        for t in range(x.shape[1]):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        chunked_cache = model.new_cache()
        chunked = [model(x[:, :5], past_key_values=chunked_cache, use_cache=True).logits]
        chunked.append(model(x[:, 5:], past_key_values=chunked_cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < TOL
    assert (torch.cat(chunked, 1) - full).abs().max() < TOL
    if cpu_kernel_available():
        assert any(served), "the fused one-token path never ran"
    with torch.no_grad():
        assert (model(x).logits - full).abs().max() > 1e-3  # the context zeroed something that matters


def test_the_model_is_restored_exactly_also_when_the_body_raises():
    model = tiny_student("gate")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        with state_heads_zeroed(model):
            with state_heads_zeroed(model):  # nested: the outer override survives the inner exit
                inner = model(x).logits
            outer = model(x).logits
        assert torch.equal(inner, outer)
        with pytest.raises(RuntimeError, match="boom"):
            with state_heads_zeroed(model):
                raise RuntimeError("boom")
        after = model(x).logits
    assert torch.equal(after, before)
    for m in mixers(model):
        assert "state_heads" not in m.__dict__ and "_state_one_token" not in m.__dict__


def test_a_model_without_hybrid_layers_is_refused():
    with pytest.raises(ValueError, match="no WuNeng hybrid"):
        with state_heads_zeroed(torch.nn.Linear(2, 2)):
            pass


def test_magnitudes_equal_hand_computed_means():
    gate = tiny_student("gate")
    got = state_head_magnitudes(gate)
    assert [r["layer"] for r in got] == [0, 1, 2]
    assert [r["kind"] for r in got] == KINDS
    assert got[1] == {"layer": 1, "kind": "arwkv", "fusion": None}
    for r in (got[0], got[2]):
        m = gate.model.layers[r["layer"]].self_attn
        lam, rho = m.state_query_scale.detach().tolist(), m.gate_scale.detach().flatten().tolist()
        assert r["fusion"] == "gate"
        assert r["lambda_mean_abs"] == pytest.approx(sum(map(abs, lam)) / len(lam), rel=1e-12)
        assert r["lambda_max_abs"] == pytest.approx(max(map(abs, lam)), rel=1e-12)
        assert r["rho_mean_abs"] == pytest.approx(sum(map(abs, rho)) / len(rho), rel=1e-12)
        o_middle = m.o_middle.weight.detach().flatten().tolist()
        assert r["o_middle_mean_abs"] == pytest.approx(sum(map(abs, o_middle)) / len(o_middle), rel=1e-12)
        assert "beta_mean_abs" not in r
    add = state_head_magnitudes(tiny_student("add", middle_heads=0, state_query=False))
    beta = add[0]
    b = tiny_student("add", middle_heads=0, state_query=False).model.layers[0].self_attn.fusion_beta.detach()
    assert beta["lambda_mean_abs"] is None and beta["lambda_max_abs"] is None and beta["o_middle_mean_abs"] is None
    assert beta["beta_mean_abs"] == pytest.approx(b.abs().mean().item(), rel=1e-12)
    none = state_head_magnitudes(tiny_student("none"))
    assert none[0]["fusion"] == "none" and set(none[0]) == {
        "layer",
        "kind",
        "fusion",
        "lambda_mean_abs",
        "lambda_max_abs",
        "o_middle_mean_abs",
    }
