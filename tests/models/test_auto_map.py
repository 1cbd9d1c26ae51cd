"""Self-describing save folders (wuneng.auto_map): ``save_pretrained`` writes ``auto_map`` and the
``wuneng_auto.py`` shim, so plain transformers loads the folder with ``trust_remote_code=True`` in a
process that never imported wuneng, and getting the classes that way never copies source files."""

import json
import os
import subprocess
import sys

import pytest
import torch

from wuneng.auto_map import SHIM_FILENAME, AutoMapMixin, model_auto_map, registered_classes, write_shim
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from wuneng.tokenization import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, ByteLevelTokenizer

EXPECTED_MODEL_MAP = {
    "AutoConfig": "wuneng_auto.RWKV7Config",
    "AutoModel": "wuneng_auto.RWKV7Model",
    "AutoModelForCausalLM": "wuneng_auto.RWKV7ForCausalLM",
}


def tiny_model(seed: int = 0) -> RWKV7ForCausalLM:
    torch.manual_seed(seed)
    config = RWKV7Config(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, head_size=16,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip
    return RWKV7ForCausalLM(config).eval()


def save(model, folder):
    model.save_pretrained(folder)
    ByteLevelTokenizer().save_pretrained(folder)
    return folder


def shim_namespace(folder) -> dict:
    namespace: dict = {}
    exec(compile((folder / SHIM_FILENAME).read_text(), SHIM_FILENAME, "exec"), namespace)  # noqa: S102
    return namespace


def test_save_pretrained_writes_auto_map_and_one_shim(tmp_path):
    folder = save(tiny_model(), tmp_path / "ckpt")
    assert (
        json.loads((folder / "config.json").read_text())["auto_map"]
        == EXPECTED_MODEL_MAP
        == model_auto_map(RWKV7Config)
    )
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["auto_map"] == {"AutoTokenizer": ["wuneng_auto.ByteLevelTokenizer", None]}
    # the tokenizer's save merged its class into the model's shim
    ns = shim_namespace(folder)
    assert ns["RWKV7Config"] is RWKV7Config and ns["RWKV7Model"] is RWKV7Model
    assert ns["RWKV7ForCausalLM"] is RWKV7ForCausalLM and ns["ByteLevelTokenizer"] is ByteLevelTokenizer
    # saving again (tokenizer first this time) keeps the same shim
    before = (folder / SHIM_FILENAME).read_text()
    ByteLevelTokenizer().save_pretrained(folder)
    tiny_model().save_pretrained(folder)
    assert (folder / SHIM_FILENAME).read_text() == before
    assert not list(folder.glob("modeling_*.py")) and not list(folder.glob("configuration_*.py"))
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_registered_classes_come_from_the_transformers_registries():
    assert registered_classes(RWKV7Config) == {
        "AutoConfig": RWKV7Config,
        "AutoModel": RWKV7Model,
        "AutoModelForCausalLM": RWKV7ForCausalLM,
    }
    from transformers import LlamaConfig

    with pytest.raises(TypeError, match="wuneng package"):
        registered_classes(LlamaConfig)


def test_register_for_auto_class_is_a_no_op():
    """transformers calls it on classes loaded through auto_map; it must not flag ours for source copying."""
    for cls in (RWKV7ForCausalLM, ByteLevelTokenizer):
        assert issubclass(cls, AutoMapMixin)
        cls.register_for_auto_class()
        assert cls._auto_class is None


def test_a_config_flagged_by_transformers_is_not_copied(tmp_path):
    """What AutoConfig's remote-code path does to RWKV7Config must not make save_pretrained copy its source."""
    RWKV7Config.register_for_auto_class()  # transformers' own classmethod: sets RWKV7Config._auto_class
    try:
        assert RWKV7Config._auto_class == "AutoConfig"
        folder = save(tiny_model(), tmp_path / "ckpt")
        assert RWKV7Config._auto_class is None
        assert json.loads((folder / "config.json").read_text())["auto_map"] == EXPECTED_MODEL_MAP
        assert not (folder / "configuration_rwkv7.py").exists()
    finally:
        RWKV7Config._auto_class = None


def test_write_shim_refuses_a_foreign_file_and_non_wuneng_classes(tmp_path):
    (tmp_path / SHIM_FILENAME).write_text("import os\n")
    with pytest.raises(FileExistsError, match="not written by wuneng"):
        write_shim(tmp_path, [RWKV7Config])
    assert (tmp_path / SHIM_FILENAME).read_text() == "import os\n"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(TypeError, match="wuneng package"):
        write_shim(fresh, [dict])
    assert not (fresh / SHIM_FILENAME).exists()
    with pytest.raises(FileNotFoundError):
        write_shim(tmp_path / "missing", [RWKV7Config])


@pytest.mark.slow
def test_plain_transformers_loads_the_folder_without_importing_wuneng(tmp_path):
    """A fresh process that imports only transformers: load with trust_remote_code, compare logits with the
    saved model's, save again and load that copy too."""
    model = tiny_model(seed=3)
    folder = save(model, tmp_path / "ckpt")
    again = tmp_path / "again"
    ids = [[72, 105, 33, 10]]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
m.save_pretrained({str(again)!r}); t.save_pretrained({str(again)!r})
m2 = AutoModelForCausalLM.from_pretrained({str(again)!r}, trust_remote_code=True)
with torch.no_grad():
    a = m(input_ids=torch.tensor({ids})).logits; b = m2(input_ids=torch.tensor({ids})).logits
print(json.dumps({{"cls": type(m).__module__ + "." + type(m).__name__, "tok": type(t).__name__,
                  "ids": t("Hi!\\n")["input_ids"], "logits": a.tolist(), "same": bool(torch.equal(a, b))}}))
"""
    # -c with a script that never imports wuneng: the shim is the only way the classes can be found
    assert "import wuneng" not in code and "from wuneng" not in code
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"] == "wuneng.models.rwkv7.modeling_rwkv7.RWKV7ForCausalLM"
    assert out["tok"] == "ByteLevelTokenizer" and out["ids"] == ids[0]
    torch.testing.assert_close(torch.tensor(out["logits"]), want, rtol=0, atol=0)
    assert out["same"]
    assert json.loads((again / "config.json").read_text())["auto_map"] == EXPECTED_MODEL_MAP
    assert not list(again.glob("configuration_*.py")) and not list(again.glob("modeling_*.py"))


def test_without_trust_remote_code_a_fresh_process_is_refused(tmp_path):
    """The documented failure: plain transformers without trust_remote_code cannot resolve our model_type."""
    folder = save(tiny_model(), tmp_path / "ckpt")
    code = f"""
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=False)
except ValueError as e:
    print("refused", "trust_remote_code" in str(e))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "refused True"


@pytest.mark.parametrize("family", ["wuneng", "metastate"])
def test_every_model_family_writes_its_auto_map(tmp_path, family):
    """WuNeng (converted from a tiny Qwen2) and Meta-State folders name their own classes in auto_map."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wuneng import MetaStateConfig, MetaStateForCausalLM, WuNengForCausalLM

    if family == "wuneng":
        teacher = Qwen2ForCausalLM(
            Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
        )  # fmt: skip
        model, expected = WuNengForCausalLM.from_teacher(teacher), "wuneng_auto.WuNengForCausalLM"
    else:
        config = MetaStateConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, head_size=16)
        model, expected = MetaStateForCausalLM(config), "wuneng_auto.MetaStateForCausalLM"
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        auto_map = json.load(f)["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == expected
    assert expected.split(".")[1] in shim_namespace(tmp_path)
