"""Every saved model runs in a fresh process: RWKV-7, WuNeng (hybrid), ARWKV, Meta-State and a grown Meta-State
are saved here, then a new Python process (``sys.executable``, one per model kind) loads each folder

1. with ``AutoModelForCausalLM`` before anything imported wuneng, and after a bare ``import wuneng`` (lazy: it
   registers nothing): refused, naming ``trust_remote_code``;
2. with ``AutoModelForCausalLM(..., trust_remote_code=True)`` (and ``AutoTokenizer`` likewise);
3. with ``AutoModelForCausalLM`` / ``AutoTokenizer`` without ``trust_remote_code`` once wuneng's model package is
   imported (step 2 imported it through the folder's ``wuneng_auto.py``);
4. through the model class (``XForCausalLM.from_pretrained``);

and after every load runs a forward (logits equal to the saving process's within 1e-5 of their scale), greedy
``generate()`` (the same tokens) and one training step (loss equal to the saving process's, finite gradients,
an AdamW step that changes the weights). The first load of the process builds the model under transformers'
meta-device context, which is where a cached tensor made at construction time broke every later forward
(``NotImplementedError: Cannot copy out of meta tensor``) of a Meta-State model.

Also here: ``from_pretrained(..., ignore_mismatched_sizes=True)`` re-initialises differently shaped tensors and
loads the rest, as transformers' Llama does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from wuneng.grow import grow_model
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.models.wuneng import WuNengConfig, WuNengForCausalLM
from wuneng.tokenization import BYTE_VOCAB_SIZE, ByteLevelTokenizer

from _helpers import perturb_

KINDS = ("rwkv7", "wuneng", "arwkv", "metastate", "grown_metastate")
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 4


def build(kind: str):
    torch.manual_seed(0)
    if kind == "rwkv7":
        model = RWKV7ForCausalLM(
            RWKV7Config(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, head_size=16)
        )
    elif kind in ("metastate", "grown_metastate"):
        model = MetaStateForCausalLM(MetaStateConfig(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, head_size=16, num_param_tokens=48,
        ))  # fmt: skip
    else:
        model = WuNengForCausalLM(WuNengConfig(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, middle_heads=1, arwkv_head_size=16,
            layer_kinds=["hybrid", "attention"] if kind == "wuneng" else ["arwkv", "arwkv"],
        ))  # fmt: skip
    perturb_(model, 0.2, seed=1)  # the zero-initialised paths (eta, fusion, LoRAs) matter
    if kind == "grown_metastate":
        model = grow_model(model, num_heads=3, num_param_tokens=64, seed=2)  # 3 heads > C / N = 2: blocks reused
        perturb_(model, 0.1, seed=4)
    return model


def reference(model) -> dict:
    """What the child must reproduce: logits, greedy tokens, and the training loss."""
    model.eval()
    with torch.no_grad():
        logits = model(IDS).logits.float()
        tokens = model.generate(
            IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    model.train()
    loss = model(IDS, labels=IDS).loss.detach().reshape(1)
    model.eval()
    return {"ids": IDS, "logits": logits, "tokens": tokens, "loss": loss}


CHILD = textwrap.dedent(
    """
    import importlib, json, sys
    import torch
    from safetensors.torch import load_file

    folder, module_name, class_name = sys.argv[1:4]
    ref = load_file(folder + "/reference.safetensors")
    report = {}

    def check(model, label):
        model.eval()
        with torch.no_grad():
            logits = model(ref["ids"]).logits.float()
            tokens = model.generate(ref["ids"], attention_mask=torch.ones_like(ref["ids"]), max_new_tokens=%(new)d,
                                    do_sample=False, pad_token_id=0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(ref["ids"], labels=ref["ids"]).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        opt.step()
        changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
        report[label] = {
            "class": type(model).__module__ + "." + type(model).__name__,
            "logits_err": float((logits - ref["logits"]).abs().max() / ref["logits"].abs().max()),
            "tokens_equal": bool(torch.equal(tokens, ref["tokens"])),
            "loss_err": abs(float(loss) - float(ref["loss"])),
            "grads_finite": bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads),
            "changed": changed,
            "parameters": len(before),
        }

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        AutoModelForCausalLM.from_pretrained(folder)
        report["plain"] = "loaded"
    except ValueError as error:
        report["plain"] = "trust_remote_code" in str(error)
    report["wuneng_imported_before"] = any(m.startswith("wuneng") for m in sys.modules)
    import wuneng  # the package alone is lazy (a fast CLI): it registers nothing with transformers

    try:
        AutoModelForCausalLM.from_pretrained(folder)
        report["after_import_wuneng"] = "loaded"
    except ValueError as error:
        report["after_import_wuneng"] = "trust_remote_code" in str(error)
    report["models_imported_by_import_wuneng"] = "wuneng.models" in sys.modules

    check(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), "auto_trust")
    report["tokenizer_trust"] = type(AutoTokenizer.from_pretrained(folder, trust_remote_code=True)).__name__
    check(AutoModelForCausalLM.from_pretrained(folder), "auto_registered")
    report["tokenizer_registered"] = type(AutoTokenizer.from_pretrained(folder)).__name__
    cls = getattr(importlib.import_module(module_name), class_name)
    check(cls.from_pretrained(folder), "class")
    print()  # after any prompt text left on the line
    print("REPORT " + json.dumps(report))
    """
) % {"new": NEW_TOKENS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_loads_runs_generates_and_trains_in_a_fresh_process(kind, tmp_path):
    model = build(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    ByteLevelTokenizer().save_pretrained(folder)
    ref = reference(model)
    save_file(ref, str(folder / "reference.safetensors"))
    loss_tolerance = 1e-5 * max(1.0, float(ref["loss"]))
    cls = type(model)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(__import__("wuneng").__file__)), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), cls.__module__, cls.__name__],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,  # no prompt
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["plain"] is True and not report["wuneng_imported_before"], report  # needs trust_remote_code
    assert report["after_import_wuneng"] is True and not report["models_imported_by_import_wuneng"], report
    assert report["tokenizer_trust"] == report["tokenizer_registered"] == "ByteLevelTokenizer", report
    for label in ("auto_trust", "auto_registered", "class"):
        r = report[label]
        assert r["class"] == f"{cls.__module__}.{cls.__name__}", (label, r)  # wuneng's own class, not a copy
        assert r["logits_err"] <= 1e-5 and r["tokens_equal"] and r["loss_err"] <= loss_tolerance, (label, r)
        assert r["grads_finite"] and r["changed"] >= r["parameters"] // 2, (label, r)


# -------------------------------------------------------------------------------------------------------------
# ignore_mismatched_sizes, as in transformers' Llama
# -------------------------------------------------------------------------------------------------------------
def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


@pytest.mark.parametrize("kind", ["llama", "rwkv7", "metastate", "wuneng"])
def test_from_pretrained_honours_ignore_mismatched_sizes(kind, tmp_path):
    """Loading with a new ``vocab_size``: without ``ignore_mismatched_sizes`` an error (as Llama); with it the
    embedding and head are re-initialised at the new size (the model's own init, finite) and reported in
    ``mismatched_keys``, every other tensor is the saved one."""
    model = _llama() if kind == "llama" else build(kind)
    model.save_pretrained(tmp_path)
    saved = model.state_dict()
    cls = type(model)
    new_vocab = model.config.vocab_size + 9
    with pytest.raises((RuntimeError, ValueError), match="mismatch"):
        cls.from_pretrained(tmp_path, vocab_size=new_vocab)
    loaded, info = cls.from_pretrained(
        tmp_path, vocab_size=new_vocab, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = {entry[0] for entry in info["mismatched_keys"]}
    resized = {name for name, t in loaded.state_dict().items() if t.shape != saved[name].shape}
    assert mismatched == resized and len(resized) == 2, (mismatched, resized)
    for name, t in loaded.state_dict().items():
        if name in resized:
            assert t.shape[0] == new_vocab and bool(torch.isfinite(t).all()) and float(t.abs().max()) > 0, name
        else:
            assert torch.equal(t, saved[name]), name
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, new_vocab)


# -------------------------------------------------------------------------------------------------------------
# teacher families other than Llama/Qwen2 (issue 14 item 2): the saved folder names the teacher's classes
# -------------------------------------------------------------------------------------------------------------
FAMILY_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = sys.argv[1]
    ref = load_file(folder + "/reference.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"], attention_mask=ref["mask"]).logits
        tokens = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=%(new)d,
                                min_new_tokens=%(new)d, do_sample=False, pad_token_id=0)
    print()
    print("REPORT " + json.dumps({
        "class": type(model).__name__,
        "teacher_model_type": model.config.teacher_config.model_type,
        "mixers": [type(layer.self_attn).__name__ for layer in model.model.layers],
        "logits_equal": bool(torch.equal(logits, ref["logits"])),
        "tokens_equal": bool(torch.equal(tokens, ref["tokens"])),
    }))
    """
) % {"new": NEW_TOKENS}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_non_llama_family_loads_in_a_fresh_process_with_identical_logits(family, tmp_path):
    """A converted Gemma 3 (sliding/full layers, tied embeddings) and Phi-3 (fused projections) student with
    state heads that act, saved here and loaded by ``AutoModelForCausalLM`` in a new process: bit-identical logits
    on a left-padded batch and the same greedy tokens."""
    from test_teacher_families import make_teacher, padded_batch, perturb_new_parameters

    student = perturb_new_parameters(WuNengForCausalLM.from_teacher(make_teacher(family), keep_attention=[1]))
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = student(ids, attention_mask=mask).logits
        tokens = student.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    student.save_pretrained(tmp_path)
    save_file({"ids": ids, "mask": mask, "logits": logits, "tokens": tokens}, str(tmp_path / "reference.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(__import__("wuneng").__file__)), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", FAMILY_CHILD, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["class"] == "WuNengForCausalLM" and report["teacher_model_type"] == family, report
    assert report["mixers"] == [type(layer.self_attn).__name__ for layer in student.model.layers], report
    assert report["logits_equal"] and report["tokens_equal"], report
