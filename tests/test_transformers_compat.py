"""wuneng with a transformers that has no ``transformers.cache_utils.DummyLayer`` (5.17, which GPU machine images
ship; pyproject.toml supports 5.17-5.23): ``wuneng.cache`` then defines its own, and generation through the hybrid
cache (attention layers with keys/values, ARWKV and RWKV-7 layers with none) gives the same tokens as with
transformers' class. Run in a fresh process with the class removed while wuneng is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import transformers.cache_utils as cache_utils

if sys.argv[1] == "without":
    # hidden while wuneng is imported (so that wuneng.cache defines its own), then put back: transformers 5.23's
    # own masking code refers to its class, which 5.17's code does not
    hidden = cache_utils.DummyLayer
    del cache_utils.DummyLayer
from wuneng.cache import DummyLayer
from wuneng.models import RWKV7Config, RWKV7ForCausalLM, WuNengConfig, WuNengForCausalLM
if sys.argv[1] == "without":
    cache_utils.DummyLayer = hidden

out = {"dummy_module": DummyLayer.__module__}
torch.manual_seed(0)
rwkv = RWKV7ForCausalLM(RWKV7Config(vocab_size=61, hidden_size=64, num_hidden_layers=2, head_size=32)).eval()
torch.manual_seed(1)
hybrid = WuNengForCausalLM(WuNengConfig(vocab_size=61, num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, head_size=16,
                                        hybrid_layers=[0], arwkv_layers=[2])).eval()
ids = torch.tensor([[1, 5, 9, 13, 2], [3, 4, 5, 6, 7]])
with torch.no_grad():
    for name, model in (("rwkv7", rwkv), ("wuneng", hybrid)):
        out[name] = model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
out["layer_kinds"] = hybrid.config.layer_kinds
print(json.dumps(out))
"""


def run(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generation_is_the_same_without_transformers_dummy_layer():
    import transformers.cache_utils

    if not hasattr(transformers.cache_utils, "DummyLayer"):  # 5.17 itself: the other tests run without the class
        pytest.skip("this transformers has no DummyLayer to compare with (the test hides the class of one that has)")
    with_class, without_class = run("with"), run("without")
    assert with_class["dummy_module"] == "transformers.cache_utils"
    assert without_class["dummy_module"] == "wuneng.cache"
    assert with_class["layer_kinds"] == ["hybrid", "attention", "arwkv"]
    for name in ("rwkv7", "wuneng"):
        assert without_class[name] == with_class[name], name
        assert len(with_class[name][0]) == 5 + 6
