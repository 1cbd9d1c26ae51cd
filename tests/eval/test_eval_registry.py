"""The task registry: every task can be generated and scored by name."""

import pytest
import torch

from wuneng.eval import TASKS, get_task, list_tasks


def test_list_and_lookup():
    assert list_tasks() == ["arithmetic", "mqar", "passkey", "perplexity", "state_tracking"]
    assert get_task("mqar") is TASKS["mqar"]
    with pytest.raises(ValueError, match="available: arithmetic"):
        get_task("mmlu")


@pytest.mark.parametrize("name", ["mqar", "state_tracking"])
def test_sequence_tasks_round_trip(name):
    torch.manual_seed(0)
    spec = get_task(name)
    for config in spec.presets.values():
        assert isinstance(config, spec.config_cls)
    data = spec.generate(spec.config_cls(), 8, seed=0)
    perfect = data.labels.clamp_min(0)
    result = spec.score(perfect, data.labels)
    accuracy = result if isinstance(result, float) else result["accuracy"]
    assert accuracy == 1.0
    wrong = (perfect + 1) % 7919  # never equal to a label here
    result = spec.score(wrong, data.labels)
    assert (result if isinstance(result, float) else result["accuracy"]) < 1.0


def test_generation_tasks_round_trip():
    passkey = get_task("passkey")
    ex = passkey.generate(passkey.config_cls(), [300], seed=0)
    assert passkey.score([e.answer for e in ex], ex)["accuracy"] == 1.0
    arith = get_task("arithmetic")
    test = arith.generate(arith.config_cls(), per_category=5, seed=0)
    assert arith.score([e.answer for e in test.examples], test.examples)["exact"] == 1.0
    assert get_task("perplexity").kind == "likelihood"
