"""``wuneng select-layers``: KL-guided layer selection (arXiv 2512.20569). The ranking arithmetic, resuming from
results.json (finished runs are never rerun), refusing changed settings, and end to end on a tiny Qwen2 teacher
whose one strong attention layer must be chosen, the choice feeding ``wuneng convert --keep-attention``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.convert import read_layer_file
from wuneng.select_layers import BASELINE, SelectionConfig, rank_layers, select_layers
from wuneng.tokenization import ByteLevelTokenizer
from wuneng.train.config import ConfigError

TEXT = "the cat sat on the mat. one two three four five six seven."


def save_teacher(path, layers=3, hidden=64, strong_layer=None):
    """A tiny byte-level Qwen2 (+ tokenizer). ``strong_layer``: that layer's attention output is scaled up 4x and
    every other layer's attention output is zero, so that keeping it as attention is what matters most."""
    torch.manual_seed(0)
    tok = ByteLevelTokenizer()
    teacher = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            initializer_range=0.2,
        )
    )
    if strong_layer is not None:
        with torch.no_grad():
            for i, layer in enumerate(teacher.model.layers):
                layer.self_attn.o_proj.weight.mul_(4.0 if i == strong_layer else 0.0)
    teacher.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_data(path, lines=40):
    path.write_text("\n".join([TEXT] * lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ ranking arithmetic
def test_rank_layers_by_the_fall_of_the_kl_below_the_baseline():
    ranking, chosen = rank_layers({0: 1.0, 1: 0.2, 2: 0.5, 3: 1.3}, baseline_kl=1.1, keep=2)
    assert [r["layer"] for r in ranking] == [1, 2, 0, 3]
    assert [round(r["fall"], 10) for r in ranking] == [0.9, 0.6, 0.1, -0.2]
    assert [r["kl"] for r in ranking] == [0.2, 0.5, 1.0, 1.3]
    assert chosen == [1, 2]
    _, chosen = rank_layers({5: 0.4, 2: 0.4, 7: 0.9}, baseline_kl=1.0, keep=1)  # a tie: the lower layer first
    assert chosen == [2]
    _, chosen = rank_layers({5: 0.1, 2: 0.4, 7: 0.3}, baseline_kl=1.0, keep=2)  # chosen ascending, not by rank
    assert chosen == [5, 7]
    with pytest.raises(ValueError, match="keep=4 layers asked but only 3"):
        rank_layers({0: 1.0, 1: 1.0, 2: 1.0}, 1.0, keep=4)


# ------------------------------------------------------------------------------------ resume
def _count_runs(monkeypatch):
    from wuneng.train import loop

    calls = []
    real = loop.train

    def counting(config, **kwargs):
        calls.append(config.stage)
        return real(config, **kwargs)

    monkeypatch.setattr(loop, "train", counting)
    return calls


def test_a_second_run_does_no_new_candidate_runs(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="wuneng.select_layers")
    teacher = save_teacher(tmp_path / "teacher", layers=2)
    data = write_data(tmp_path / "data.txt", lines=12)
    cfg = SelectionConfig(
        teacher=str(teacher),
        data=[str(data)],
        budget_tokens=32,
        keep=1,
        work_dir=str(tmp_path / "w"),
        seq_len=16,
        micro_batch_size=2,
        eval_rows=2,
        align_tokens=0,
        lr=1e-3,
    )
    calls = _count_runs(monkeypatch)
    first = select_layers(cfg)
    assert calls == ["distill"] * 3 and first.runs == 3  # baseline + 2 layers
    progress = [r.getMessage() for r in caplog.records if r.name == "wuneng.select_layers"]
    assert "select-layers: run 1/3: baseline (no layer kept)" in progress
    assert any(
        m.startswith("select-layers: layer 1 kept as attention: held-out KL ") and "(3/3 runs" in m for m in progress
    )
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert sorted(results["runs"]) == ["0", "1", BASELINE]
    assert not (tmp_path / "w" / "runs" / "layer_000" / "checkpoints").exists()  # dropped once the result is in
    calls.clear()
    again = select_layers(cfg)
    assert calls == [] and again.runs == 0
    assert again.ranking == first.ranking and again.chosen == first.chosen
    # one missing result: exactly that run again; another --keep needs no run at all
    del results["runs"]["1"]
    (tmp_path / "w" / "results.json").write_text(json.dumps(results))
    calls.clear()
    third = select_layers(cfg)
    assert calls == ["distill"] and third.runs == 1
    assert abs(third.results["1"]["kl"] - first.results["1"]["kl"]) <= 1e-6  # the same run: same base, seed, data
    calls.clear()
    cfg.keep = 2
    assert select_layers(cfg).chosen == [0, 1] and calls == []
    assert read_layer_file(tmp_path / "w" / "keep_attention.json") == [0, 1]


def test_changed_settings_are_refused_and_a_foreign_out_file_is_kept(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", layers=2)
    data = write_data(tmp_path / "data.txt", lines=12)
    work = tmp_path / "w"
    work.mkdir()
    settings = SelectionConfig(
        teacher=str(teacher), data=[str(data)], budget_tokens=64, keep=1, work_dir=str(work)
    ).settings()
    (work / "results.json").write_text(json.dumps({"settings": {**settings, "lr": 0.5}, "runs": {}}))
    cfg = SelectionConfig(teacher=str(teacher), data=[str(data)], budget_tokens=64, keep=1, work_dir=str(work))
    with pytest.raises(
        ConfigError, match=r"results\.json holds results made with other settings \(lr: 0\.5 then, 0\.0001 now\)"
    ):
        select_layers(cfg)
    mine = tmp_path / "mine.json"
    mine.write_text('{"attn": {"layers": [0]}}')
    cfg.out = str(mine)
    with pytest.raises(FileExistsError, match="mine.json exists and was not written by select-layers"):
        select_layers(cfg)
    assert mine.read_text() == '{"attn": {"layers": [0]}}'


def test_too_little_data_for_the_held_out_rows(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", layers=2)
    data = write_data(tmp_path / "data.txt", lines=1)
    cfg = SelectionConfig(
        teacher=str(teacher),
        data=[str(data)],
        budget_tokens=32,
        keep=1,
        work_dir=str(tmp_path / "w"),
        seq_len=64,
        eval_rows=8,
    )
    with pytest.raises(ConfigError, match="8 are held out for the KL"):
        select_layers(cfg)


def test_cli_usage_errors(tmp_path):
    runner = CliRunner()
    no_data = runner.invoke(app, ["select-layers", str(tmp_path), "--budget", "100", "--keep", "1"])
    assert no_data.exit_code == 2 and "data source" in no_data.output
    bad_keep = runner.invoke(app, ["select-layers", str(tmp_path), "--budget", "100", "--keep", "0", "--data", "x.txt"])
    assert bad_keep.exit_code == 2 and "keep must be a positive integer" in bad_keep.output
    bad_init = runner.invoke(
        app,
        ["select-layers", str(tmp_path), "--budget", "100", "--keep", "1", "--data", "x.txt", "--arwkv-init", "zeros"],
    )
    assert bad_init.exit_code == 2 and "arwkv_init must be rwkv7 or radlads" in bad_init.output


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_select_layers_end_to_end_chooses_the_layer_that_matters_and_feeds_convert(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", layers=3, strong_layer=1)
    data = write_data(tmp_path / "data.txt")
    runner = CliRunner()
    args = [
        "select-layers",
        str(teacher),
        "--budget",
        "256",
        "--keep",
        "1",
        "--data",
        str(data),
        "--seq-len",
        "32",
        "--eval-rows",
        "4",
        "--lr",
        "1e-3",
        "--align-tokens",
        "64",
        "--work-dir",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "keep.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "chosen layers [1]" in result.output and "(4 new runs)" in result.output
    saved = json.loads((tmp_path / "keep.json").read_text())
    ranking = saved["wuneng_selection"]["ranking"]
    assert [r["layer"] for r in ranking][0] == 1 and saved["attn"]["layers"] == [1]
    runs = json.loads((tmp_path / "w" / "results.json").read_text())["runs"]
    for r in ranking:  # the printed fall is the baseline's KL minus the layer's, as measured
        assert abs(r["fall"] - (runs[BASELINE]["kl"] - runs[str(r["layer"])]["kl"])) <= 1e-12
    assert runs["1"]["kl"] < 0.5 * runs[BASELINE]["kl"]  # the strong layer kept: most of the KL is gone
    assert (tmp_path / "w" / "base.safetensors").exists()  # the aligned base student, shared by every run
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "(0 new runs)" in again.output
    converted = runner.invoke(
        app, ["convert", str(teacher), str(tmp_path / "student"), "--keep-attention", str(tmp_path / "keep.json")]
    )
    assert converted.exit_code == 0, converted.output
    kinds = json.loads((tmp_path / "student" / "config.json").read_text())["layer_kinds"]
    assert kinds == ["arwkv", "attention", "arwkv"]


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A run stopped after a checkpoint (here: at step 1 of 2, then an error) is continued by the next call, and
    gives the KL of the run done in one go."""
    from wuneng.train import loop

    teacher = save_teacher(tmp_path / "teacher", layers=2)
    data = write_data(tmp_path / "data.txt", lines=12)

    def config(work):
        return SelectionConfig(
            teacher=str(teacher),
            data=[str(data)],
            budget_tokens=64,
            keep=1,
            work_dir=str(work),
            seq_len=16,
            micro_batch_size=2,
            eval_rows=2,
            align_tokens=0,
            lr=1e-3,
            candidates=[1],
        )

    whole = select_layers(config(tmp_path / "whole"))
    real = loop.train
    resumed = []

    def interrupted(cfg, **kwargs):
        if cfg.output_dir.endswith("layer_001") and not kwargs.get("resume"):
            cfg.stop_at_step = 1
            real(cfg, **kwargs)
            raise KeyboardInterrupt
        resumed.append(kwargs.get("resume"))
        return real(cfg, **kwargs)

    monkeypatch.setattr(loop, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        select_layers(config(tmp_path / "w"))
    assert sorted(json.loads((tmp_path / "w" / "results.json").read_text())["runs"]) == [BASELINE]
    resumed.clear()
    again = select_layers(config(tmp_path / "w"))
    assert resumed == [True] and again.runs == 1
    assert again.results["1"]["steps"] == 2
    assert abs(again.results["1"]["kl"] - whole.results["1"]["kl"]) <= 1e-6
