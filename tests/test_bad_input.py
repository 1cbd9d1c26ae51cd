"""Bad input gets one clear line (issue 13, item 10), at the library level: :func:`wuneng.saving.check_model_folder`
names the file or key of a corrupt, truncated or mismatched model folder and an unknown ``model_type``;
``model.config`` with an unknown ``model_type`` is a ConfigError listing wuneng's own names; a stage-1 teacher
of another architecture or other shapes than the student's is refused (it used to be accepted silently).
The same cases through the command line: tests/test_cli_errors.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wuneng.models import RWKV7Config, RWKV7ForCausalLM

OWN_TYPES = "wuneng, wuneng_metastate, wuneng_rwkv7"
SHAPES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=260, **{**SHAPES, **overrides})).eval()


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=260, **SHAPES)).eval()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "model"
    qwen2().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ check_model_folder
def test_a_sound_folder_passes_for_every_kind(tmp_path, folder):
    from wuneng.saving import check_model_folder

    assert check_model_folder(folder)["model_type"] == "qwen2"
    torch.manual_seed(0)
    RWKV7ForCausalLM(RWKV7Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16)).save_pretrained(
        tmp_path / "r"
    )
    assert check_model_folder(tmp_path / "r")["model_type"] == "wuneng_rwkv7"


@pytest.mark.parametrize("damage", ["truncated", "cut to its header", "garbage"])
def test_corrupt_weights_name_the_file(folder, damage):
    from wuneng.saving import ModelFolderError, check_model_folder

    weights = folder / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    elif damage == "cut to its header":
        truncate(weights, 0.01)
    else:
        weights.write_bytes(b"\x00not safetensors" * 64)
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder)
    message = str(err.value)
    assert message.startswith(f"{weights}: not a readable safetensors file") and "truncated or corrupt" in message
    assert one_line(message)


def test_weights_that_disagree_with_config_json_name_the_keys(folder):
    from wuneng.saving import ModelFolderError, check_model_folder

    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'model.safetensors'}: the weights do not match its config.json")
    assert "model.layers.0.mlp.up_proj.weight (checkpoint (96, 64) vs config (128, 64))" in message
    assert one_line(message)


@pytest.mark.parametrize("model_type", ["wuneng_rwkv8", None])
def test_an_unknown_model_type_lists_the_librarys_names(folder, model_type):
    from wuneng.saving import ModelFolderError, check_model_folder

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("model_type")
    if model_type is not None:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: ") and OWN_TYPES in message
    assert (f"unknown model_type {model_type!r}" if model_type else "no model_type") in message
    assert one_line(message)


def test_config_json_that_is_not_json(folder):
    from wuneng.saving import ModelFolderError, check_model_folder

    (folder / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ModelFolderError, match=r"config\.json: not readable JSON"):
        check_model_folder(folder)


def test_a_missing_shard_is_named(tmp_path):
    from wuneng.saving import ModelFolderError, check_model_folder

    qwen2().save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    check_model_folder(tmp_path / "m")
    shards[-1].unlink()
    with pytest.raises(ModelFolderError, match=rf"{shards[-1].name}: missing"):
        check_model_folder(tmp_path / "m")


# ------------------------------------------------------------------------------------------------ training inputs
def test_model_config_with_an_unknown_model_type_is_a_config_error():
    from wuneng.train.config import ConfigError, ModelConfig
    from wuneng.train.loop import load_model

    with pytest.raises(ConfigError) as err:
        load_model(ModelConfig(config={"model_type": "rwkv77", "hidden_size": 32}))
    assert "model.config.model_type: unknown 'rwkv77'" in str(err.value) and OWN_TYPES in str(err.value)
    assert one_line(str(err.value))


def test_model_config_file_or_dict_without_a_known_model_type(tmp_path):
    from wuneng.train.config import ConfigError, ModelConfig
    from wuneng.train.loop import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv77", "hidden_size": 32}))
    with pytest.raises(ConfigError) as err:
        load_model(ModelConfig(config=str(tmp_path / "config.json")))
    assert f"model.config {tmp_path / 'config.json'}: unknown model_type 'rwkv77'" in str(err.value)
    assert OWN_TYPES in str(err.value) and one_line(str(err.value))
    # fla's 'rwkv7' is refused whether or not this process imported fla (which registers it with transformers:
    # before, the outcome depended on the test order)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv7", "hidden_size": 32}))
    for spec in (str(tmp_path / "config.json"), {"model_type": "rwkv7", "hidden_size": 32}):
        with pytest.raises(ConfigError, match="'rwkv7' is flash-linear-attention's RWKV-7.*wuneng import-fla") as err:
            load_model(ModelConfig(config=spec))
        assert one_line(str(err.value))
    with pytest.raises(ConfigError, match=f"model.config needs a `model_type`: one of wuneng's own \\({OWN_TYPES}\\)"):
        load_model(ModelConfig(config={"hidden_size": 32}))
    torch.manual_seed(0)
    RWKV7Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16).save_pretrained(tmp_path / "ok")
    assert type(load_model(ModelConfig(config=str(tmp_path / "ok" / "config.json")))).__name__ == "RWKV7ForCausalLM"
    assert type(load_model(ModelConfig(config=str(tmp_path / "ok")))).__name__ == "RWKV7ForCausalLM"


def test_load_model_and_teacher_check_the_folder(folder):
    from wuneng.convert import load_teacher
    from wuneng.saving import ModelFolderError, load_causal_lm
    from wuneng.train.config import ModelConfig
    from wuneng.train.loop import load_model

    truncate(folder / "model.safetensors")
    for load in (lambda: load_model(ModelConfig(path=str(folder))), lambda: load_causal_lm(folder, what="teacher"),
                 lambda: load_teacher(folder)):  # fmt: skip
        with pytest.raises(ModelFolderError, match="model.safetensors: not a readable safetensors file"):
            load()


def test_load_causal_lm_checks_the_structure_on_a_skeleton_before_reading_weights(folder):
    """The caller's check (convert: the teacher's structure) runs on the meta-device model before any weight file
    is opened: a refused model with truncated weights gets the check's line (then the folder), not the weights'."""
    from wuneng.saving import load_causal_lm

    seen = []

    def refuse(model):
        seen.append(next(model.parameters()).device.type)
        raise ValueError("not this one")

    truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"^not this one \(teacher .*model\)$") as err:
        load_causal_lm(folder, what="teacher", check=refuse)
    assert seen == ["meta"] and one_line(str(err.value))


def test_load_causal_lm_keeps_the_checkpoint_dtype_or_takes_the_given_one(tmp_path):
    from wuneng.saving import load_causal_lm

    qwen2().to(torch.bfloat16).save_pretrained(tmp_path / "m")
    seen = []
    model = load_causal_lm(tmp_path / "m", check=lambda m: seen.append(next(m.parameters()).device.type))
    assert model.dtype == torch.bfloat16 and seen == ["meta", "cpu"]  # the check: skeleton, then the loaded model
    assert load_causal_lm(tmp_path / "m", torch.float32).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="teacher .*nope: not a model folder"):
        load_causal_lm(tmp_path / "nope", what="teacher")


def converted_student():
    from wuneng.convert import convert_teacher

    return convert_teacher(qwen2(), middle_heads=0).eval()


def test_align_accepts_the_teacher_the_student_was_converted_from():
    from wuneng.train.stages import AlignObjective

    AlignObjective(converted_student(), qwen2(seed=1))  # same architecture and shapes: accepted


def test_align_refuses_a_teacher_of_another_architecture():
    from wuneng.train.stages import AlignObjective

    with pytest.raises(ValueError) as err:  # a Llama of the same shapes used to be accepted silently
        AlignObjective(converted_student(), llama())
    message = str(err.value)
    assert "teacher is a 'llama' model (LlamaForCausalLM)" in message and "converted from a 'qwen2' teacher" in message
    assert "set `teacher:`" in message and one_line(message)


def test_align_refuses_a_teacher_of_other_shapes():
    from wuneng.train.stages import AlignObjective

    with pytest.raises(ValueError) as err:
        AlignObjective(converted_student(), qwen2(intermediate_size=128, num_key_value_heads=4))
    message = str(err.value)
    assert (
        "num_key_value_heads 4 (teacher) vs 2 (student)" in message
        and "intermediate_size 128 (teacher) vs 96 (student)" in message
    )
    assert one_line(message)


def test_align_refuses_a_teacher_without_attention_layers():
    from wuneng.train.stages import AlignObjective

    torch.manual_seed(0)
    rwkv = RWKV7ForCausalLM(RWKV7Config(vocab_size=260, hidden_size=64, num_hidden_layers=2, head_size=16))
    with pytest.raises(
        TypeError, match=r"align: the teacher \(RWKV7ForCausalLM\) is not a transformers decoder-only causal LM"
    ):
        AlignObjective(converted_student(), rwkv)
