"""Weight decay follows RWKV-LM (RWKV-v7 ``configure_optimizers``): only the ``.weight`` matrices of Linear and
Embedding layers decay; LoRA factors, ``r_k``, fusion tables stored as [H, d] matrices, parameter tokens, norms
and biases do not."""

import torch
from torch import nn

from wuneng.convert import convert_teacher
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.train.config import OptimConfig
from wuneng.train.optim import build_optimizer, param_groups

from train_helpers import tiny_qwen2


def decayed_names(model: nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), OptimConfig(weight_decay=0.1))}
    assert groups["decay"]["weight_decay"] == 0.1
    assert all(g["weight_decay"] == 0.0 for k, g in groups.items() if k != "decay")
    return {names[id(p)] for p in groups["decay"]["params"]}


def linear_and_embedding_weights(model: nn.Module) -> set[str]:
    """The reference: the weight of every nn.Linear / nn.Embedding (tied weights once, under their first name)."""
    first = {}
    for n, p in model.named_parameters():
        first.setdefault(id(p), n)
    out = set()
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod.weight.requires_grad:
            out.add(first[id(mod.weight)])
    return out


def test_rwkv7_decays_only_linear_and_embedding_weights():
    torch.manual_seed(0)
    m = RWKV7ForCausalLM(RWKV7Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, head_size=16))
    decayed = decayed_names(m)
    assert decayed == linear_and_embedding_weights(m)
    att = "model.blocks.0.att."
    for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "r_k"):  # 2-D, but LoRA factors / bonus table
        assert att + n not in decayed, n
    assert {att + "key.weight", "model.emb.weight", "head.weight", "model.blocks.0.ffn.value.weight"} <= decayed


def test_wuneng_lora_factors_and_fusion_tables_are_not_decayed():
    teacher = tiny_qwen2(hidden=64)
    m = convert_teacher(teacher, fusion="gate", middle_heads=2, state_query=True)
    decayed = decayed_names(m)
    assert decayed == linear_and_embedding_weights(m)
    p = "model.layers.0.self_attn."
    for n in ("receptance_lora_a", "receptance_lora_b", "gate_lora_a", "gate_lora_b", "gate_bias", "gate_scale",
              "middle_lora_a", "middle_lora_b", "state_query_proj", "state.r_k", "state.w1", "state.a2"):  # fmt: skip
        assert p + n not in decayed, n
    assert {p + "q_proj.weight", p + "o_middle.weight", "model.layers.0.mlp.up_proj.weight"} <= decayed
    add = convert_teacher(tiny_qwen2(hidden=64), fusion="add", middle_heads=0)
    assert not any(n.endswith("fusion_beta") for n in decayed_names(add))


def test_metastate_parameter_tokens_are_not_decayed():
    torch.manual_seed(0)
    m = MetaStateForCausalLM(MetaStateConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_size=16))
    decayed = decayed_names(m)
    assert decayed == linear_and_embedding_weights(m)
    two_d_not_weight = {n for n, p in m.named_parameters() if p.ndim >= 2 and not n.endswith(".weight")}
    assert any(n.endswith("param_keys") for n in two_d_not_weight)
    assert not (two_d_not_weight & decayed)


def test_a_1_by_c_weight_is_a_vector():
    """RWKV-LM squeezes before counting dimensions: a [1, C] weight is not decayed."""
    m = nn.ModuleDict({"row": nn.Linear(8, 1, bias=False), "mat": nn.Linear(8, 4, bias=False)})
    assert decayed_names(m) == {"mat.weight"}


def test_one_step_with_zero_gradients_shrinks_only_decayed_weights():
    torch.manual_seed(0)
    m = RWKV7ForCausalLM(RWKV7Config(vocab_size=64, hidden_size=64, num_hidden_layers=1, head_size=16))
    opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = decayed_names(m)
    for n, p in m.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)
