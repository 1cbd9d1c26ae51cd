"""Meta-State reuses RWKV-7's block: one block class parameterised by its mixers (issue 15, item 4).

The saved names must not move: the state_dict keys and config.json keys below are those the code wrote before
the blocks were shared (taken from commit 3894c0f), so checkpoints saved before still load.
"""

import json

import torch

from wuneng import MetaStateConfig, MetaStateForCausalLM, RWKV7Config, RWKV7ForCausalLM
from wuneng.models.metastate import MetaStateBlock, MetaStateModel
from wuneng.models.rwkv7 import RWKV7Block, RWKV7Model

ATT = "a0 a1 a2 g1 g2 k_a k_k key.weight ln_x.bias ln_x.weight output.weight r_k receptance.weight v0 v1 v2"
ATT += " value.weight w0 w1 w2 x_a x_g x_k x_r x_v x_w"
NORMS = "ln1.bias ln1.weight ln2.bias ln2.weight"
COMMON_CONFIG = {
    "a_low_rank_dim", "architectures", "auto_map", "bos_token_id", "decay_low_rank_dim", "dtype", "eos_token_id",
    "gate_low_rank_dim", "head_size", "hidden_size", "layer_norm_eps", "model_type", "num_hidden_layers",
    "pad_token_id", "tie_word_embeddings", "transformers_version", "use_cache", "v_low_rank_dim", "vocab_size",
    "wkv_impl",
}  # fmt: skip


def expected_keys(ffn: str) -> set[str]:
    keys = {"head.weight", "model.emb.weight", "model.ln_out.bias", "model.ln_out.weight"}
    keys |= {"model.blocks.0.ln0.bias", "model.blocks.0.ln0.weight"}
    for i in range(2):
        keys |= {f"model.blocks.{i}.att.{k}" for k in ATT.split()}
        keys |= {f"model.blocks.{i}.ffn.{k}" for k in ffn.split()}
        keys |= {f"model.blocks.{i}.{k}" for k in NORMS.split()}
    return keys


def saved_config_keys(model, tmp_path) -> set[str]:
    model.save_pretrained(tmp_path)
    return set(json.loads((tmp_path / "config.json").read_text()))


def test_metastate_block_is_the_rwkv7_block_with_other_mixers():
    assert issubclass(MetaStateBlock, RWKV7Block)
    assert "forward" not in vars(MetaStateBlock) or MetaStateBlock.forward.__qualname__ == "RWKV7Block.forward"
    assert issubclass(MetaStateModel, RWKV7Model) and MetaStateModel.block_class is MetaStateBlock
    assert "__init__" not in vars(MetaStateModel)


def test_saved_names_unchanged(tmp_path):
    torch.manual_seed(0)
    rwkv7 = RWKV7ForCausalLM(RWKV7Config(vocab_size=37, hidden_size=32, num_hidden_layers=2, head_size=16))
    assert set(rwkv7.state_dict()) == expected_keys("key.weight value.weight x_k")
    assert saved_config_keys(rwkv7, tmp_path / "rwkv7") == COMMON_CONFIG | {"intermediate_size"}

    cfg = MetaStateConfig(vocab_size=37, hidden_size=32, num_hidden_layers=2, head_size=16, sse_heads=1)
    meta = MetaStateForCausalLM(cfg)
    assert set(meta.state_dict()) == expected_keys("param_keys param_values sse.eta x_k")
    meta_only = {"moe_groups", "moe_top_k", "num_heads", "num_param_tokens", "sse_heads"}
    assert saved_config_keys(meta, tmp_path / "meta") == COMMON_CONFIG | meta_only
    assert [type(b) for b in meta.model.blocks] == [MetaStateBlock, MetaStateBlock]
