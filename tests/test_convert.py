"""wuneng.convert and ``wuneng convert``: teacher checkpoint folders -> WuNeng folders (weights, config,
tokenizer files), the RADLADS option, and the errors for bad teachers and bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.convert import convert_checkpoint, convert_teacher, load_teacher
from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.tokenization import ByteLevelTokenizer, load_tokenizer

SHAPES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def save_teacher(path, arch="qwen2", seed=0, with_tokenizer=True):
    torch.manual_seed(seed)
    tok = ByteLevelTokenizer()
    vocab = len(tok)
    if arch == "qwen2":
        teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SHAPES))
    else:
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attention_bias=True, **SHAPES))
    teacher.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return teacher.eval()


def ids(vocab=200, batch=2, length=9):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_convert_checkpoint_writes_a_loadable_function_preserving_folder(tmp_path, arch):
    teacher = save_teacher(tmp_path / "teacher", arch)
    out = tmp_path / "student"
    convert_checkpoint(tmp_path / "teacher", out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "teacher"]  # no temporary folder left
    student = WuNengForCausalLM.from_pretrained(out)
    assert student.config.teacher_model_type == arch and student.config.fusion == "gate"
    x = ids()
    with torch.no_grad():
        assert (student(x).logits - teacher(x).logits).abs().max() <= 1e-4
    tok = load_tokenizer(str(out))
    assert tok.decode(tok.encode("hi", add_special_tokens=False)) == "hi"


def test_cli_convert_with_options(tmp_path):
    save_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "teacher"), str(out), "--fusion", "add",
                                      "--middle-heads", "0", "--no-state-query", "--hybrid-layers", "0,2"])
    assert result.exit_code == 0, result.output
    assert "hybrid layers [0, 2]" in result.output and "extra (student - teacher)" in result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_kinds"] == ["hybrid", "attention", "hybrid"]
    assert cfg["fusion"] == "add" and cfg["middle_heads"] == 0 and cfg["state_query"] is False
    # a second run into the same folder needs --overwrite
    again = CliRunner().invoke(app, ["convert", str(tmp_path / "teacher"), str(out), "--arwkv"])
    assert again.exit_code == 2 and "not an empty directory" in again.output  # an occupied output: usage error
    again = CliRunner().invoke(app, ["convert", str(tmp_path / "teacher"), str(out), "--arwkv", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["layer_kinds"] == ["arwkv"] * 3


def test_cli_rejects_bad_layer_list(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "o"), "--hybrid-layers", "0,x"])
    assert result.exit_code == 2


def test_radlads_init_copies_the_teacher_attention(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", with_tokenizer=False)
    student = convert_teacher(tmp_path / "teacher", attention=False, arwkv_init="radlads")
    mixer = student.model.layers[1].self_attn
    att = teacher.model.layers[1].self_attn
    assert mixer.head_size == 16 and mixer.num_heads == 4
    assert torch.equal(mixer.receptance.weight, att.q_proj.weight)
    assert torch.equal(mixer.output.weight, att.o_proj.weight)
    k = att.k_proj.weight.view(2, 16, 64)  # kv head j serves query heads 2j, 2j + 1
    assert torch.equal(mixer.key.weight.view(4, 16, 64)[0], k[0]) and torch.equal(mixer.key.weight.view(4, 16, 64)[3], k[1])
    assert torch.equal(mixer.value.weight.view(4, 16, 64)[2], att.v_proj.weight.view(2, 16, 64)[1])


def test_convert_to_bfloat16(tmp_path):
    save_teacher(tmp_path / "teacher", with_tokenizer=False)
    student = convert_checkpoint(tmp_path / "teacher", tmp_path / "out", dtype=torch.bfloat16)
    assert student.dtype == torch.bfloat16
    with torch.no_grad():
        out = student(ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unsupported_teacher_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported teacher architecture GPT2LMHeadModel"):
        load_teacher(tmp_path / "gpt2")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "GPT2LMHeadModel" in result.output
    assert not (tmp_path / "out").exists()


def test_teacher_checkpoint_whose_config_does_not_match_its_weights(tmp_path):
    save_teacher(tmp_path / "teacher", with_tokenizer=False)
    cfg_path = tmp_path / "teacher" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not match its config.*mlp\.down_proj\.weight"):
        load_teacher(tmp_path / "teacher")
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 4
    cfg.pop("layer_types", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.3\."):
        convert_checkpoint(tmp_path / "teacher", tmp_path / "out")


def test_missing_teacher_folder_and_unreadable_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "nope")
    save_teacher(tmp_path / "teacher", with_tokenizer=False)
    cfg_path = tmp_path / "teacher" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 4  # layer_types still lists 3 layers
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot read the teacher config"):
        load_teacher(tmp_path / "teacher")
