"""PEFT options of a stage: frozen MLPs/embeddings stay bit-identical, LoRA trains only its adapters on the
teacher-derived linears, merging gives the adapter model's logits, and the merged final folder loads as usual."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.train.config import ConfigError, DistillConfig, PeftConfig, config_from_dict, validate
from wuneng.train.loop import train
from wuneng.train.peft_options import apply_peft_options, lora_is_active, merge_lora, teacher_linear_names

from train_helpers import TEXTS, quick_config, state_of, tiny_qwen2

pytest.importorskip("peft")

# Merged vs adapter logits, float32: W + B A * (alpha / r) is summed once instead of per forward.
LOGITS_ATOL = 1e-5


def run_config(tmp_path, name, stage="pretrain", steps=3, **kw):
    # distill with a CE term: the converted hybrid starts equal to its teacher (KL gradient ~0), the CE moves it
    base = dict(output_dir=tmp_path / name, stage=stage, micro_batch_size=4, max_steps=steps, save_every=1000)
    base["distill"] = DistillConfig(ce_weight=1.0)
    base.update(kw)
    return quick_config(**base)


def student_and_teacher():
    torch.manual_seed(0)
    teacher = tiny_qwen2(hidden=64)
    student = WuNengForCausalLM.from_teacher(teacher)
    return student, teacher


def probe_ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def test_freeze_mlp_and_embeddings_stay_bit_identical(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = tiny_qwen2(seed=1)
    before = state_of(model)
    cfg = run_config(tmp_path, "frozen", peft=PeftConfig(freeze=["mlp", "embeddings"]))
    train(cfg, model=model, tokenizer=tokenizer, data_sources=[TEXTS])
    after = state_of(model)
    frozen = [k for k in before if ".mlp." in k or "embed_tokens" in k or "lm_head" in k]
    assert any(".mlp." in k for k in frozen) and any("embed_tokens" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k in before if k not in frozen]
    assert any(not torch.equal(before[k], after[k]) for k in trained if "self_attn" in k)


def test_teacher_linears_are_the_copied_projections_only():
    student, _ = student_and_teacher()
    names = teacher_linear_names(student)
    teacher_params = student.teacher_parameter_names()
    assert names and all(f"{n}.weight" in teacher_params for n in names)
    assert "lm_head" not in names
    assert any(n.endswith("mlp.down_proj") for n in names) and any(n.endswith("self_attn.q_proj") for n in names)
    # every teacher-copied linear is there; no new (state-head) linear is
    linears = {n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(names) == {n for n in linears if f"{n}.weight" in teacher_params}
    assert linears - set(names), "the converted student should have new linears that LoRA leaves alone"


def test_lora_trains_adapters_and_new_parameters_not_base_weights(tmp_path, tokenizer):
    student, teacher = student_and_teacher()
    before = state_of(student)
    new = student.new_parameter_names() - student.unused_parameter_names()
    cfg = run_config(tmp_path, "lora", stage="distill", steps=4, peft=PeftConfig(lora_r=4, lora_alpha=8))
    train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    assert lora_is_active(student)  # save_final false: nothing merged
    after = state_of(student)
    targets = teacher_linear_names_of_lora(student)
    assert targets == set(teacher_linear_names(WuNengForCausalLM.from_teacher(tiny_qwen2(hidden=64))))
    for t in targets:  # base weights of adapted linears: bit-identical; adapter B (zero at init) moved
        assert torch.equal(after[f"{t}.base_layer.weight"], before[f"{t}.weight"])
    lora_b = [k for k in after if ".lora_B." in k]
    assert lora_b and all(after[k].abs().max() > 0 for k in lora_b)
    # the new state-head parameters stay trainable under LoRA
    assert any(not torch.equal(before[n], after[n]) for n in new if n in after)
    # everything teacher-derived and not adapted (norms, embeddings) keeps the stage's setting: trained in distill
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert not any(".base_layer." in n for n in trainable)
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= trainable


def teacher_linear_names_of_lora(model):
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_merged_model_equals_adapter_model(tmp_path, tokenizer):
    student, teacher = student_and_teacher()
    cfg = run_config(tmp_path, "lora", stage="distill", steps=4, peft=PeftConfig(lora_r=4, lora_alpha=8))
    train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    student.eval()
    ids = probe_ids()
    with torch.no_grad():
        adapter_logits = student(input_ids=ids).logits
        base_logits = WuNengForCausalLM.from_teacher(tiny_qwen2(hidden=64)).eval()(input_ids=ids).logits
        assert merge_lora(student) == len(teacher_linear_names(student))
        merged_logits = student(input_ids=ids).logits
    assert not lora_is_active(student)
    assert set(student.state_dict()) == set(WuNengForCausalLM.from_teacher(tiny_qwen2(hidden=64)).state_dict())
    torch.testing.assert_close(merged_logits, adapter_logits, atol=LOGITS_ATOL, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapters did change the model


def test_final_folder_is_merged_and_loads_with_the_usual_class(tmp_path, tokenizer):
    student, teacher = student_and_teacher()
    cfg = run_config(
        tmp_path, "final", stage="distill", steps=4, save_final=True, peft=PeftConfig(lora_r=4, lora_alpha=8)
    )
    result = train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    ids = probe_ids()
    # the adapter model from the last checkpoint (LoRA injected into a fresh conversion, weights loaded)
    adapter = WuNengForCausalLM.from_teacher(tiny_qwen2(hidden=64))
    apply_peft_options(adapter, cfg.peft, "distill")
    adapter.load_state_dict(load_file(result.last_checkpoint / "model.safetensors"), strict=False)
    loaded = WuNengForCausalLM.from_pretrained(result.final_dir).eval()
    assert not lora_is_active(loaded)
    with torch.no_grad():
        adapter_logits = adapter.eval()(input_ids=ids).logits
        final_logits = loaded(input_ids=ids).logits
    torch.testing.assert_close(final_logits, adapter_logits, atol=LOGITS_ATOL, rtol=0)


def test_resume_with_adapters_equals_uninterrupted_run(tmp_path, tokenizer):
    peft = PeftConfig(lora_r=4, lora_alpha=8)
    student, teacher = student_and_teacher()
    train(
        run_config(tmp_path, "full", "distill", 4, peft=peft, save_every=2),
        model=student,
        teacher=teacher,
        tokenizer=tokenizer,
        data_sources=[TEXTS],
    )
    student, teacher = student_and_teacher()
    cfg = run_config(tmp_path, "sliced", "distill", 4, peft=peft, save_every=2, stop_at_step=2)
    train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    student, teacher = student_and_teacher()
    cfg = run_config(tmp_path, "sliced", "distill", 4, peft=peft, save_every=2)
    result = train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS], resume=True)
    assert result.history[0]["step"] == 3
    full = load_file(tmp_path / "full/checkpoints/step_00000004/model.safetensors")
    sliced = load_file(tmp_path / "sliced/checkpoints/step_00000004/model.safetensors")
    assert any(".lora_B." in k for k in full) and full.keys() == sliced.keys()
    assert all(torch.equal(full[k], sliced[k]) for k in full)


def test_missing_peft_gives_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    student, _ = student_and_teacher()
    with pytest.raises(ImportError) as info:
        apply_peft_options(student, PeftConfig(lora_r=4), "sft")
    message = str(info.value)
    assert "pip install 'wuneng[peft]'" in message and "\n" not in message
    assert not lora_is_active(student)


def test_config_section_is_strict():
    cfg = config_from_dict({"peft": {"lora_r": 8, "target_modules": ["q_proj", "v_proj"], "freeze": ["mlp"]}})
    assert cfg.peft.lora_r == 8 and cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.peft.merge_at_end
    with pytest.raises(ConfigError, match="peft.freeze"):
        config_from_dict({"peft": {"freeze": ["attention"]}})
    with pytest.raises(ConfigError, match="peft.lora_r"):
        validate(config_from_dict({"peft": {"lora_r": 0}}), has_model=True, has_data=True)


def test_align_refuses_lora():
    student, _ = student_and_teacher()
    with pytest.raises(ValueError, match="align"):
        apply_peft_options(student, PeftConfig(lora_r=4), "align")


def test_cli_distill_with_lora_and_frozen_embeddings(tmp_path, tokenizer):
    """`wuneng train --stage distill -o peft.lora_r=4 -o peft.freeze=[embeddings]`: final/ holds the merged weights
    under the converted model's own names, embeddings bit-identical, adapted projections changed."""
    from typer.testing import CliRunner

    from wuneng.cli import app

    from train_helpers import QUIET, write_yaml

    student, teacher = student_and_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    (tmp_path / "data.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    recipe = {
        **QUIET,
        "save_final": True,
        "teacher": str(tmp_path / "teacher"),
        "model": {"path": str(tmp_path / "student")},
        "data": {"sources": [str(tmp_path / "data.txt")], "seq_len": 16, "text_unit": "line"},
        "distill": {"ce_weight": 1.0},
        "micro_batch_size": 4,
        "max_steps": 3,
    }
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    args = ["train", str(path), "--stage", "distill", "--output-dir", str(tmp_path / "run")]
    args += ["-o", "peft.lora_r=4", "-o", "peft.freeze=[embeddings]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    before = load_file(tmp_path / "student" / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert final.keys() == before.keys()
    assert torch.equal(final["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(
        final["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_unmerged_final_is_base_model_plus_peft_adapter(tmp_path, tokenizer):
    """merge_at_end false: final/ holds the converted model's base weights (bit-identical for the adapted linears)
    and final/adapter/ a PEFT adapter that peft.PeftModel.from_pretrained puts back: the adapter model's logits."""
    import peft

    student, teacher = student_and_teacher()
    before = state_of(student)
    options = PeftConfig(lora_r=4, lora_alpha=8, merge_at_end=False)
    cfg = run_config(tmp_path, "unmerged", stage="distill", steps=4, save_final=True, peft=options)
    result = train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, data_sources=[TEXTS])
    ids = probe_ids()
    adapter = WuNengForCausalLM.from_teacher(tiny_qwen2(hidden=64))
    apply_peft_options(adapter, cfg.peft, "distill")
    adapter.load_state_dict(load_file(result.last_checkpoint / "model.safetensors"), strict=False)
    base = WuNengForCausalLM.from_pretrained(result.final_dir).eval()
    saved = state_of(base)
    for name in teacher_linear_names(base):
        assert torch.equal(saved[f"{name}.weight"], before[f"{name}.weight"])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        restored = peft.PeftModel.from_pretrained(base, result.final_dir / "adapter").eval()
        adapter_logits = adapter.eval()(input_ids=ids).logits
        restored_logits = restored(input_ids=ids).logits
    torch.testing.assert_close(restored_logits, adapter_logits, atol=LOGITS_ATOL, rtol=0)
    assert (restored_logits - base_logits).abs().max() > 1e-3  # the adapter is really applied
