"""The four stages on tiny seeded models: losses fall, masks and frozen parts hold, oracles agree."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from wuneng.layers.hybrid import HybridContext
from wuneng.train.config import AlignConfig, DataConfig, DistillConfig, OptimConfig
from wuneng.train.data import build_dataset
from wuneng.train.loop import NonFiniteLossError, train
from wuneng.train.stages import (
    AlignObjective,
    DistillObjective,
    capture_teacher_attention,
    chunked_kl_divergence_sum,
    kl_divergence_sum,
    reconcile_vocab_size,
    shifted_cross_entropy_sum,
)

from train_helpers import CHATS, TEXTS, quick_config, state_of, tiny_llama, tiny_qwen2


def run_config(tmp_path, stage="pretrain", steps=30, **kw):
    base = dict(output_dir=tmp_path / stage, stage=stage, micro_batch_size=4, max_steps=steps, save_every=1000)
    base.update(kw)
    return quick_config(**base)


def losses(result, key="loss"):
    return [h[key] for h in result.history]


# ------------------------------------------------------------------------------- pretrain
@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama], ids=["qwen2", "llama"])
def test_pretrain_lowers_cross_entropy(tmp_path, tokenizer, make):
    torch.manual_seed(0)
    result = train(run_config(tmp_path), model=make(), tokenizer=tokenizer, data_sources=[TEXTS])
    curve = losses(result)
    assert len(curve) == 30 and all(math.isfinite(v) for v in curve)
    assert math.log(259) * 0.85 < curve[0]  # starts near uniform over the byte vocabulary
    assert curve[-1] < 0.8 * curve[0], curve


def test_cross_entropy_sum_matches_hf_loss(tokenizer):
    torch.manual_seed(0)
    model = tiny_qwen2()
    ds = build_dataset(DataConfig(seq_len=32), tokenizer, "pretrain", [TEXTS[:4]])
    batch = ds.batch([0, 1])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    total, count = shifted_cross_entropy_sum(out.logits, batch["labels"])
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ sft
def test_sft_puts_no_loss_on_prompt_tokens(tokenizer):
    torch.manual_seed(0)
    model = tiny_qwen2()
    ds = build_dataset(DataConfig(seq_len=48), tokenizer, "sft", [CHATS[:6]])
    batch = ds.batch([0, 1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    total, _ = shifted_cross_entropy_sum(logits, batch["labels"])
    total.backward()
    grad_norm = logits.grad.norm(dim=-1)  # [B, T]: position t predicts token t + 1
    predicts_target = torch.zeros_like(grad_norm, dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != -100
    assert predicts_target.any() and (~predicts_target).any()
    assert (grad_norm[~predicts_target] == 0).all()
    assert (grad_norm[predicts_target] > 0).all()
    # the targets are exactly the responses: "add a b" -> "a+b<eos>\n"
    row = batch["labels"][0]
    assert tokenizer.decode(batch["input_ids"][0][:26].tolist()) == "user: add 0 0<eos>\nassistant: "
    assert tokenizer.decode(row[row != -100].tolist()) == "0<eos>\n"  # one conversation per row at seq_len 48


def test_sft_lowers_response_loss(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = run_config(tmp_path, "sft", data=DataConfig(seq_len=48))
    result = train(cfg, model=tiny_llama(), tokenizer=tokenizer, data_sources=[CHATS])
    curve = losses(result)
    assert curve[-1] < 0.7 * curve[0], curve


# -------------------------------------------------------------------------------- distill
def test_kl_oracle_float64():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tau = 2.0
    p = torch.softmax(t.double() / tau, -1)
    q = torch.softmax(s.double() / tau, -1)
    expected = ((p * (p.log() - q.log())).sum(-1) * mask).sum() * tau**2
    torch.testing.assert_close(kl_divergence_sum(t, s, mask, tau).double(), expected, rtol=1e-5, atol=1e-6)


def test_chunked_kl_matches_reference_value_and_gradient():
    torch.manual_seed(0)
    t = torch.randn(2, 7, 13)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    grads = []
    values = []
    for chunk in (None, 3):
        s = torch.randn(2, 7, 13, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        v = (
            kl_divergence_sum(t, s, mask, 1.5)
            if chunk is None
            else chunked_kl_divergence_sum(t, s, mask, 1.5, chunk_tokens=chunk)
        )
        v.backward()
        values.append(v.detach())
        grads.append(s.grad)
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_distill_kl_is_zero_when_student_is_teacher(tokenizer):
    torch.manual_seed(0)
    teacher = tiny_qwen2()
    student = copy.deepcopy(teacher).train()
    obj = DistillObjective(student, teacher, temperature=1.5, tokenizer_size=len(tokenizer))
    ds = build_dataset(DataConfig(seq_len=32), tokenizer, "distill", [TEXTS[:4]])
    out = obj(ds.batch([0, 1]))
    assert abs(float(out["kl"])) < 1e-6
    out["loss_sum"].backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-6


def sharpen(model, factor=8.0):
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)  # tied: also scales the embedding; peaky teacher distributions
    return model


def test_distill_lowers_kl(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = sharpen(tiny_qwen2(seed=0))
    cfg = run_config(tmp_path, "distill", distill=DistillConfig(temperature=1.0, ce_weight=0.5))
    result = train(cfg, model=tiny_qwen2(seed=1), teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    kl = losses(result, "kl")
    assert "ce" in result.history[0]
    assert kl[-1] < 0.7 * kl[0], kl


def test_distill_freeze_mlp_keeps_mlp_weights(tmp_path, tokenizer):
    torch.manual_seed(0)
    student = tiny_qwen2(seed=1)
    before = state_of(student)
    cfg = run_config(tmp_path, "distill", steps=3, distill=DistillConfig(freeze_mlp=True))
    train(cfg, model=student, teacher=sharpen(tiny_qwen2(seed=0)), tokenizer=tokenizer, data_sources=[TEXTS])
    after = state_of(student)
    mlp = [k for k in before if ".mlp." in k]
    assert mlp and all(torch.equal(before[k], after[k]) for k in mlp)
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )


def test_vocab_reconciliation():
    assert reconcile_vocab_size(260, 260, 259) == 260
    assert reconcile_vocab_size(272, 260, 259) == 260  # padded teacher embedding, shared tokenizer
    with pytest.raises(ValueError, match=r"teacher vocabulary \(300\) and student vocabulary \(260\) differ"):
        reconcile_vocab_size(300, 260, 280)
    torch.manual_seed(0)
    obj = DistillObjective(tiny_qwen2(vocab_size=260), tiny_qwen2(vocab_size=272), tokenizer_size=259)
    assert obj.vocab == 260


# ---------------------------------------------------------------------------------- align
class FakeHybridMixer(nn.Module):
    """Follows the WuNeng align contract: a copied attention plus new 'state' parameters.

    output = attn(h) + mix * state_proj(h) (function-preserving at mix = 0); state = o_proj(state_proj(h)).
    """

    def __init__(self, attn: nn.Module, width: int, hybrid: bool = True):
        super().__init__()
        self.attn = attn
        self.hybrid = hybrid
        self.state_proj = nn.Linear(width, width, bias=False)
        self.mix = nn.Parameter(torch.zeros(width))

    def align_forward(self, hidden_states, *args, wuneng_context=None, **kwargs):
        # the contract: what the teacher's attention received, and the per-batch context with the 2-D padding mask
        mask = wuneng_context.attention_mask
        assert mask is None or mask.ndim == 2
        s = self.state_proj(hidden_states)
        if not self.hybrid:  # ARWKV-like replacement: only an output
            return {"output": self.attn.o_proj(s)}
        a = self.attn(hidden_states, *args, **kwargs)[0]
        return {"output": a + self.mix * s, "state": self.attn.o_proj(s)}


class FakeStudent(nn.Module):
    def __init__(self, teacher, hybrid=True):
        super().__init__()
        self.model = copy.deepcopy(teacher.model)
        width = teacher.config.hidden_size
        for layer in self.model.layers:
            layer.self_attn = FakeHybridMixer(layer.self_attn, width, hybrid)

    def converted_layer_indices(self):
        return list(range(len(self.model.layers)))

    def new_parameter_names(self):
        return {n for n, _ in self.named_parameters() if n.endswith(("state_proj.weight", ".mix"))}


def test_capture_is_teacher_forced(tokenizer):
    """Captured inputs are the teacher's own normed hidden states; outputs are its attention outputs."""
    torch.manual_seed(0)
    teacher = tiny_qwen2()
    ids = torch.randint(0, 259, (2, 16))
    cap = capture_teacher_attention(teacher, [0, 1], ids)
    hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    for i in (0, 1):
        layer = teacher.model.layers[i]
        torch.testing.assert_close(cap[i]["hidden_states"], layer.input_layernorm(hs[i]), rtol=0, atol=0)
        torch.testing.assert_close(
            cap[i]["output"],
            layer.self_attn(cap[i]["hidden_states"], *cap[i]["args"], **cap[i]["kwargs"])[0],
            rtol=1e-6,
            atol=1e-6,
        )


def test_align_loss_oracle(tokenizer):
    torch.manual_seed(0)
    teacher = tiny_qwen2()
    student = FakeStudent(teacher)
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.mix.fill_(0.3)
    obj = AlignObjective(student, teacher)
    ds = build_dataset(DataConfig(seq_len=32), tokenizer, "align", [TEXTS[:4]])
    batch = ds.batch([0, 1])
    with torch.no_grad():
        out = obj(batch)
    cap = capture_teacher_attention(teacher, [0, 1], batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].double()
    terms = {"output": [], "state": []}
    for i in (0, 1):
        with torch.no_grad():
            r = student.model.layers[i].self_attn.align_forward(
                cap[i]["hidden_states"],
                *cap[i]["args"],
                wuneng_context=HybridContext(batch["attention_mask"]),
                **cap[i]["kwargs"],
            )
        for k in terms:
            d = (cap[i]["output"].double() - r[k].double()).norm(dim=-1) / math.sqrt(32)
            terms[k].append((d * mask).sum() / mask.sum())
    n = float(obj.count_tokens(batch))
    assert float(out["align_output"]) / n == pytest.approx(float(sum(terms["output"]) / 2), rel=1e-5)
    assert float(out["align_state"]) / n == pytest.approx(float(sum(terms["state"]) / 2), rel=1e-5)
    assert float(out["loss_sum"]) == pytest.approx(float(out["align_output"] + out["align_state"]), rel=1e-6)


@pytest.mark.parametrize("hybrid", [True, False], ids=["wuneng", "arwkv"])
def test_align_trains_only_new_parameters(tmp_path, tokenizer, hybrid):
    torch.manual_seed(0)
    teacher = tiny_qwen2()
    student = FakeStudent(teacher, hybrid=hybrid)
    new = student.new_parameter_names()
    before = state_of(student)
    cfg = run_config(tmp_path, "align", steps=25)
    result = train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    after = state_of(student)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in new)
    assert all(not torch.equal(before[k], after[k]) for k in new if k.endswith("state_proj.weight"))
    records = [json.loads(l) for l in open(tmp_path / "align" / "metrics.jsonl") if '"step"' in l and "event" not in l]
    if hybrid:
        assert records[0]["align_output"] < 1e-5  # function-preserving hybrid: output equals the teacher's
        state = losses(result, "align_state")
        assert state[-1] < 0.7 * state[0], state
        assert records[-1]["loss"] == pytest.approx(records[-1]["align_output"] + records[-1]["align_state"])
    else:
        assert all("align_state" not in r for r in records)
        out = losses(result, "align_output")
        assert out[-1] < 0.7 * out[0], out


@pytest.mark.parametrize("attention", [True, False], ids=["wuneng", "arwkv"])
def test_align_real_converted_student(tmp_path, tokenizer, attention):
    """The project's WuNengForCausalLM (hybrid, or ARWKV with attention=False) converted from a tiny Qwen2."""
    wuneng = pytest.importorskip("wuneng.models.wuneng")
    torch.manual_seed(0)
    teacher = tiny_qwen2(hidden=64)
    student = wuneng.WuNengForCausalLM.from_teacher(teacher, attention=attention)
    new, unused = student.new_parameter_names(), student.unused_parameter_names()
    before = state_of(student)
    result = train(
        run_config(tmp_path, "align", steps=20),
        model=student,
        teacher=teacher,
        tokenizer=tokenizer,
        data_sources=[TEXTS],
    )
    after = state_of(student)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in new or k in unused)
    if attention:
        assert all(h["align_output"] < 1e-5 for h in result.history)  # function-preserving hybrid output
        curve = losses(result, "align_state")
    else:
        assert "align_state" not in result.history[0]
        curve = losses(result, "align_output")
    assert curve[-1] < 0.7 * curve[0], curve


def test_align_a_later_layer_only(tmp_path, tokenizer):
    """Aligning layer 1 alone still runs layer 0's mixer (it publishes v_first), trains only layer 1's new
    parameters, and reports layer 1's terms alone."""
    wuneng = pytest.importorskip("wuneng.models.wuneng")
    torch.manual_seed(0)
    teacher = tiny_qwen2(hidden=64)
    student = wuneng.WuNengForCausalLM.from_teacher(teacher)
    before = state_of(student)
    result = train(run_config(tmp_path, "align", steps=3, align=AlignConfig(layers=[1])), model=student, teacher=teacher,
                   tokenizer=tokenizer, data_sources=[TEXTS])  # fmt: skip
    after = state_of(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.self_attn.") for k in changed)
    assert math.isfinite(result.loss) and "align_state" in result.history[0]


def test_align_rejects_a_plain_model(tokenizer):
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="needs a converted student"):
        AlignObjective(tiny_qwen2(), tiny_qwen2())


# ------------------------------------------------------------------------------ NaN guard
class NaNAfter(nn.Module):
    """Wraps a causal LM; its logits become NaN from the n-th forward call on."""

    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0
        self.config = inner.config

    def forward(self, **kw):
        self.calls += 1
        out = self.inner(**kw)
        if self.calls >= self.n:
            out.logits = out.logits * float("nan")
        return out


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = NaNAfter(tiny_qwen2(), n=5)
    cfg = run_config(tmp_path, steps=10, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*Last good checkpoint: .*step_00000004"):
        train(cfg, model=model, tokenizer=tokenizer, data_sources=[TEXTS])
    # the NaN step did not touch the weights: they equal checkpoint 4
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "pretrain" / "checkpoints" / "step_00000004" / "model.safetensors"))
    current = model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in saved.items())
    events = [json.loads(l) for l in open(tmp_path / "pretrain" / "metrics.jsonl")]
    assert events[-1]["event"] == "nonfinite" and events[-1]["step"] == 5


# ------------------------------------------------------------------------ loop options
def test_gradient_checkpointing_gives_the_same_training(tmp_path, tokenizer):
    runs = {}
    for gc in (False, True):
        torch.manual_seed(0)
        model = tiny_qwen2()
        cfg = run_config(tmp_path, steps=3, output_dir=str(tmp_path / f"gc{gc}"), gradient_checkpointing=gc)
        runs[gc] = (train(cfg, model=model, tokenizer=tokenizer, data_sources=[TEXTS]), state_of(model))
    assert losses(runs[False][0]) == losses(runs[True][0])
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=0, atol=1e-6)


def test_bf16_autocast_on_cpu(tmp_path, tokenizer):
    """mixed_precision: bf16 autocasts the forward (the loss moves by bf16 rounding, ~1e-3 relative)."""
    first = {}
    for mp in ("no", "bf16"):
        torch.manual_seed(0)
        cfg = run_config(tmp_path, steps=1, output_dir=str(tmp_path / mp), mixed_precision=mp)
        first[mp] = losses(train(cfg, model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS]))[0]
    assert first["bf16"] != first["no"]
    assert first["bf16"] == pytest.approx(first["no"], rel=2e-2)


def test_align_stop_loss_ends_the_run(tmp_path, tokenizer):
    teacher = tiny_qwen2()
    torch.manual_seed(0)
    full = train(
        run_config(tmp_path, "align", steps=25),
        model=FakeStudent(teacher),
        teacher=teacher,
        tokenizer=tokenizer,
        data_sources=[TEXTS],
    )
    curve = losses(full)
    threshold = 0.5 * (curve[0] + min(curve))
    expected = next(i for i, v in enumerate(curve, start=1) if v <= threshold)
    assert 1 < expected < 25
    torch.manual_seed(0)
    cfg = run_config(
        tmp_path, "align", steps=25, output_dir=str(tmp_path / "stop"), align=AlignConfig(stop_loss=threshold)
    )
    result = train(cfg, model=FakeStudent(teacher), teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    assert result.step == expected and (tmp_path / "stop" / "checkpoints" / f"step_{expected:08d}").is_dir()


@pytest.mark.parametrize("model_type", ["wuneng_rwkv7", "wuneng_metastate"])
def test_pretrain_project_models_from_config(tmp_path, tokenizer, model_type):
    """`model.config` with the project's model types (RWKV-7, Meta-State) builds and trains from scratch;
    the RWKV-7 decay biases (*w0) sit in the 2x-lr group."""
    pytest.importorskip("wuneng.models")
    from wuneng.train.config import ModelConfig

    torch.manual_seed(0)
    spec = {"model_type": model_type, "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2, "head_size": 16}
    cfg = run_config(
        tmp_path, steps=20, model=ModelConfig(config=spec), optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=3)
    )
    from wuneng.train.loop import load_model
    from wuneng.train.optim import param_groups

    model = load_model(cfg.model)
    w0 = [n for n, _ in model.named_parameters() if n.endswith("w0")]
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), cfg.optim)}
    assert w0 and len(groups["w0"]["params"]) == len(w0) and groups["w0"]["lr"] == 2 * cfg.optim.lr
    result = train(cfg, tokenizer=tokenizer, data_sources=[TEXTS])
    curve = losses(result)
    assert curve[-1] < 0.8 * curve[0], curve
