"""Which layers a conversion touches (``--hybrid-layers``, ``--keep-attention``: lists, ranges and files in
flash-linear-attention's ``attn: {layers: [...]}`` format, exported back from a saved config) and tied embeddings
(kept tied or untied by ``--untie-embeddings``, the function preserved either way)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.convert import (
    convert_teacher,
    fla_attn_spec,
    layer_selection,
    parse_layer_list,
    read_layer_file,
    write_layer_file,
)
from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.tokenization import ByteLevelTokenizer

SHAPES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tied_teacher(tie: bool = True, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(ByteLevelTokenizer()), tie_word_embeddings=tie, **SHAPES)).eval()


def save_teacher(path, tie: bool = True):
    teacher = tied_teacher(tie)
    teacher.save_pretrained(path)
    ByteLevelTokenizer().save_pretrained(path)
    return teacher


def ids(batch=2, length=9):
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------ lists and ranges
def test_parse_layer_list_indices_ranges_and_negative_indices():
    assert parse_layer_list("0,2,5") == [0, 2, 5]
    assert parse_layer_list("0-3") == [0, 1, 2, 3]
    assert parse_layer_list(" 5, 0-1,1 ") == [0, 1, 5]
    assert parse_layer_list("-1,2") == [-1, 2]
    for bad in ("0,x", "3-1", "1-", ",", "0.5"):
        with pytest.raises(ValueError, match="--keep-attention"):
            parse_layer_list(bad, "--keep-attention")


def test_layer_selection_all_means_none_and_a_path_is_a_file(tmp_path):
    assert layer_selection(None) is None and layer_selection("all") is None
    (tmp_path / "sel.yaml").write_text("attn:\n  layers: [1, 3]\n")
    assert layer_selection(str(tmp_path / "sel.yaml")) == [1, 3]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        layer_selection(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------ fla's format
def test_fla_format_round_trip_with_fla_key_names(tmp_path):
    cfg = tied_teacher().config
    path = write_layer_file(tmp_path / "keep.json", cfg, [2, 0])
    data = json.loads(open(path).read())
    # the keys of fla's hybrid `attn` mapping (flash-linear-attention README, "Hybrid Models")
    assert data["attn"] == {
        "layers": [0, 2],
        "num_heads": 4,
        "num_kv_heads": 2,
        "qkv_bias": True,
        "rope_theta": float(cfg.rope_parameters["rope_theta"]),
        "window_size": None,
    }
    assert data["num_hidden_layers"] == 4
    assert read_layer_file(path) == [0, 2]
    assert fla_attn_spec(cfg, [3])["layers"] == [3]


def test_read_layer_file_yaml_list_form_and_a_whole_fla_config(tmp_path):
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump({"attn": [{"layers": [1, 3], "window_size": 2048}, {"layers": [5]}]})
    )
    assert read_layer_file(tmp_path / "a.yaml") == [1, 3, 5]
    fla_config = {
        "model_type": "rwkv7",
        "num_hidden_layers": 6,
        "hidden_size": 64,
        "attn": {"layers": [2], "num_heads": 4, "num_kv_heads": 4, "window_size": None},
    }
    (tmp_path / "config.json").write_text(json.dumps(fla_config))
    assert read_layer_file(tmp_path) == [2]  # a folder: its config.json
    (tmp_path / "linear.json").write_text(json.dumps({**fla_config, "attn": None}))  # fla: no attention layer
    assert read_layer_file(tmp_path / "linear.json") == []


@pytest.mark.parametrize(
    "content, message",
    [
        ({"layers": [1]}, r"bad\.json: expected `attn: \{layers"),
        ({"attn": {"layers": "1,2"}}, r"bad\.json: attn\.layers must be a list of layer indices"),
        ({"attn": [{"layers": [0]}, {"layers": [True]}]}, r"bad\.json: attn\[1\]\.layers must be a list"),
        (
            {"attn": {"layers": [0, 7]}, "num_hidden_layers": 4},
            r"bad\.json: layer indices \[0, 7\] out of range for its num_hidden_layers=4",
        ),
    ],
)
def test_read_layer_file_bad_files_name_the_file_and_key(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_layer_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{attn: ")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON/YAML"):
        read_layer_file(tmp_path / "broken.json")


# ------------------------------------------------------------------------------------ convert options
def test_keep_attention_converts_every_other_layer_to_arwkv():
    teacher = tied_teacher()
    student = convert_teacher(teacher, keep_attention=[1, -1], attention=False)
    assert student.config.layer_kinds == ["arwkv", "attention", "arwkv", "attention"]
    hybrid = convert_teacher(teacher, keep_attention=[0])  # attention=True: the others get state heads
    assert hybrid.config.layer_kinds == ["attention", "hybrid", "hybrid", "hybrid"]
    with pytest.raises(ValueError, match="keep_attention: layer index 4 is out of range"):
        convert_teacher(teacher, keep_attention=[4])
    with pytest.raises(ValueError, match="either keep_attention"):
        convert_teacher(teacher, keep_attention=[0], hybrid_layers=[1])
    with pytest.raises(ValueError, match=r"layers \[2\] are both in keep_attention and in arwkv_layers"):
        convert_teacher(teacher, keep_attention=[2], arwkv_layers=[2, 3])


def test_cli_keep_attention_file_and_export_back(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    (tmp_path / "sel.yaml").write_text("attn:\n  layers: [0, 2]\n  num_heads: 4\n")
    out = tmp_path / "arwkv"
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "teacher"), str(out), "--keep-attention", str(tmp_path / "sel.yaml")]
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_kinds"] == ["attention", "arwkv", "attention", "arwkv"]
    # the saved config exports back to fla's format: the same layers
    assert read_layer_file(out) == [0, 2]
    back = write_layer_file(tmp_path / "back.json", WuNengForCausalLM.from_pretrained(out).config)
    assert json.loads(open(back).read())["attn"]["layers"] == [0, 2]
    # a range on the command line
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "r"), "--keep-attention", "1-2"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["layer_kinds"] == [
        "arwkv",
        "attention",
        "attention",
        "arwkv",
    ]
    # --hybrid-layers with a file: the file's layers keep attention, all others get state heads; function preserved
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "h"), "--hybrid-layers", str(back)]
    )
    assert result.exit_code == 0, result.output
    student = WuNengForCausalLM.from_pretrained(tmp_path / "h")
    assert student.config.layer_kinds == ["attention", "hybrid", "attention", "hybrid"]
    with torch.no_grad():
        assert (student(ids()).logits - teacher(ids()).logits).abs().max() <= 1e-4


def test_cli_layer_option_errors_are_usage_errors(tmp_path):
    save_teacher(tmp_path / "teacher")
    both = CliRunner().invoke(
        app,
        ["convert", str(tmp_path / "teacher"), str(tmp_path / "o"), "--keep-attention", "0", "--hybrid-layers", "1"],
    )
    assert both.exit_code == 2 and "not both" in both.output
    (tmp_path / "bad.json").write_text(json.dumps({"layers": [1]}))
    bad = CliRunner().invoke(
        app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "o"), "--keep-attention", str(tmp_path / "bad.json")]
    )
    assert bad.exit_code == 2 and "bad.json" in bad.output and "attn" in bad.output
    everything = CliRunner().invoke(
        app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "o"), "--keep-attention", "all"]
    )
    assert everything.exit_code == 2 and "--arwkv" in everything.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ tied embeddings
@pytest.mark.parametrize("untie", [False, True])
def test_tied_teacher_converts_exactly_tied_or_untied_and_saves_that_way(tmp_path, untie):
    teacher = tied_teacher()
    student = convert_teacher(teacher, untie_embeddings=untie)
    assert student.config.tie_word_embeddings is (not untie)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) is (not untie)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    x = ids()
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)
    student.save_pretrained(tmp_path / "s")
    loaded = WuNengForCausalLM.from_pretrained(tmp_path / "s")
    assert loaded.config.tie_word_embeddings is (not untie)
    shared = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shared is (not untie)
    assert torch.equal(loaded.lm_head.weight, teacher.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, teacher(x).logits)


def test_untie_does_not_share_storage_with_the_teacher_or_the_embedding():
    teacher = tied_teacher()
    student = convert_teacher(teacher, untie_embeddings=True, share_teacher_weights=True)
    pointers = {student.lm_head.weight.data_ptr(), student.model.embed_tokens.weight.data_ptr()}
    assert len(pointers) == 2


@pytest.mark.parametrize("untie", [False, True])
def test_one_training_step_keeps_a_tied_student_tied(tmp_path, untie):
    """One distillation step through the project's loop: a tied student's input and output embeddings stay one
    tensor (equal); an untied one's LM head moves on its own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from wuneng.train.loop import train

    from train_helpers import TEXTS, quick_config

    teacher = tied_teacher()
    student = convert_teacher(teacher, untie_embeddings=untie)
    before = student.model.embed_tokens.weight.detach().clone()
    cfg = quick_config(tmp_path / "run", stage="distill", max_steps=1, micro_batch_size=2)
    cfg.data.seq_len = 16
    train(cfg, model=student, teacher=teacher, tokenizer=ByteLevelTokenizer(), data_sources=[TEXTS])
    emb, head = student.model.embed_tokens.weight, student.lm_head.weight
    assert not torch.equal(emb, before)  # the step changed the embedding
    assert torch.equal(emb, head) is (not untie)
    assert (emb is head) is (not untie)


def test_cli_untie_embeddings(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "u"), "--untie-embeddings"])
    assert result.exit_code == 0, result.output
    assert "tied embeddings=False" in result.output
    assert json.loads((tmp_path / "u" / "config.json").read_text())["tie_word_embeddings"] is False
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "u" / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], teacher.model.embed_tokens.weight)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "t")])
    assert (
        result.exit_code == 0
        and json.loads((tmp_path / "t" / "config.json").read_text())["tie_word_embeddings"] is True
    )
