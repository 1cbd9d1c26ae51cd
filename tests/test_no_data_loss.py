"""Nothing a user made is ever lost (issue 13, item 5).

- ``save_pretrained_atomic`` (convert, grow, import-rwkv): an exception injected at every step of a write
  (mid-save, at the rename-in, at the deletion of the old folder) leaves the old folder or the new one whole,
  and no temporary folder, or one whose name says what it is;
- ``--overwrite`` replaces only a wuneng model folder, never another directory, never an input;
- ``wuneng train`` refuses a folder holding an earlier run before writing anything, and a failed start
  leaves no run files behind; a checkpoint written again is swapped in the same way;
- folders and files are written with the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

import wuneng.saving as saving
from wuneng.cli import app
from wuneng.models import MetaStateConfig, MetaStateForCausalLM, RWKV7Config, RWKV7ForCausalLM
from wuneng.saving import check_output_dir, save_pretrained_atomic
from wuneng.tokenization import ByteLevelTokenizer
from wuneng.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from wuneng.train.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from wuneng.train.loop import train

runner = CliRunner()
TEXTS = [
    "the cat sat on the mat. the cat sat on the mat.",
    "abc abc abc abc abc abc abc abc",
    "one two three four five six seven",
    "hello world, hello world, hello world",
] * 4


# ------------------------------------------------------------------------------------------------ helpers
def tree(path: Path) -> dict:
    """{relative path: sha256 of the bytes (files) or 'dir'} of everything under ``path``."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        out[str(p.relative_to(path))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiny_rwkv7(seed: int) -> RWKV7ForCausalLM:
    torch.manual_seed(seed)
    return RWKV7ForCausalLM(RWKV7Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16)).eval()


def tiny_metastate(seed: int) -> MetaStateForCausalLM:
    torch.manual_seed(seed)
    return MetaStateForCausalLM(
        MetaStateConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, head_size=16)
    ).eval()


def save_teacher(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = ByteLevelTokenizer()
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".wuneng-" in p.name)


@pytest.fixture
def old_folder(tmp_path):
    """A wuneng model folder (RWKV-7, seed 1) at tmp_path/out, and the tree it holds."""
    out = tmp_path / "out"
    save_pretrained_atomic(tiny_rwkv7(1), out)
    return out, tree(out)


# ------------------------------------------------------------------------------------------------ save_pretrained_atomic
def test_overwrite_interrupted_mid_write_leaves_the_old_folder_whole(old_folder, monkeypatch):
    out, before = old_folder
    new = tiny_rwkv7(2)
    real_save = type(new).save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:  # half a file, as a crash would leave it
            f.truncate(100)
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(type(new), "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(new, out, overwrite=True)
    assert tree(out) == before
    assert leftovers(out.parent) == []


def test_overwrite_interrupted_at_the_rename_in_puts_the_old_folder_back(old_folder, monkeypatch):
    out, before = old_folder
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if ".wuneng-new-" in os.path.basename(src):  # the rename-in of the new folder
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(tiny_rwkv7(2), out, overwrite=True)
    assert tree(out) == before  # the old code deleted the old folder before this rename
    assert leftovers(out.parent) == []
    ours = [(src, dst) for src, dst in calls if "out" in (src, dst)]  # (os.replace is also transformers')
    assert len(ours) == 3 and ours[0][0] == "out" and ours[0][1].startswith(".out.wuneng-old-")  # aside,
    assert ours[1][0].startswith(".out.wuneng-new-") and ours[1][1] == "out"  # the failed rename-in,
    assert ours[2] == (ours[0][1], "out")  # and back


def test_between_the_two_renames_both_folders_are_whole(old_folder, monkeypatch):
    """A process killed between the rename-aside and the rename-in: the old folder is whole under its aside
    name and the new one whole under its temporary name (both named for what they are)."""
    out, before = old_folder
    new = tiny_rwkv7(2)
    real_replace = os.replace
    seen = {}

    def replace(src, dst):
        if ".wuneng-new-" in os.path.basename(src):
            aside = [p for p in out.parent.iterdir() if ".out.wuneng-old-" in p.name]
            assert len(aside) == 1 and not out.exists()
            seen["aside"] = tree(aside[0])
            seen["new"] = tree(Path(src))
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)
    save_pretrained_atomic(new, out, overwrite=True)
    assert seen["aside"] == before
    assert seen["new"] == tree(out) and tree(out) != before
    assert leftovers(out.parent) == []
    reloaded = RWKV7ForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), new.state_dict().values()))


def test_a_failed_deletion_of_the_old_folder_keeps_the_new_one_and_names_the_old(old_folder, monkeypatch, caplog):
    out, before = old_folder
    real_rmtree = saving.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".wuneng-old-" in os.path.basename(path):
            raise PermissionError("busy")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(saving.shutil, "rmtree", rmtree)
    with caplog.at_level("WARNING", logger="wuneng.saving"):
        save_pretrained_atomic(tiny_rwkv7(2), out, overwrite=True)
    (old,) = leftovers(out.parent)
    assert old.startswith(".out.wuneng-old-") and tree(out.parent / old) == before
    assert tree(out) != before and (out / "model.safetensors").is_file()
    assert old in caplog.text


def test_without_overwrite_an_occupied_folder_is_refused_before_the_work(old_folder):
    out, before = old_folder
    with pytest.raises(FileExistsError, match="not an empty directory.*--overwrite"):
        save_pretrained_atomic(tiny_rwkv7(2), out)
    assert tree(out) == before


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_wuneng_model_folder(tmp_path):
    save_teacher(tmp_path / "teacher")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(notes), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "not a wuneng model folder" in result.stderr and "choose another output folder" in result.stderr
    assert (notes / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(notes)) == ["thesis.tex"]
    # a model folder of another library (the teacher itself, a Qwen2 folder) is not replaced either
    other = tmp_path / "qwen"
    save_teacher(other, seed=3)
    before = tree(other)
    result = runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(other), "--overwrite"])
    assert result.exit_code == 2 and "'qwen2'" in result.stderr
    assert tree(other) == before
    # a wuneng model folder with a user's file in it: refused, the file named
    save_pretrained_atomic(tiny_rwkv7(1), tmp_path / "m")
    (tmp_path / "m" / "results.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="results.csv"):
        check_output_dir(tmp_path / "m", overwrite=True)


def test_overwrite_replaces_a_wuneng_model_folder(tmp_path):
    save_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    assert runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(out)]).exit_code == 0
    first = json.loads((out / "config.json").read_text())["layer_kinds"]
    result = runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(out), "--arwkv", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert first == ["hybrid", "hybrid"] and json.loads((out / "config.json").read_text())["layer_kinds"] == [
        "arwkv",
        "arwkv",
    ]
    assert sorted(os.listdir(tmp_path)) == ["student", "teacher"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_convert_never_writes_over_its_teacher(tmp_path, where):
    teacher = save_teacher(tmp_path / "models" / "teacher")
    before = tree(tmp_path / "models")
    out = {"same": teacher, "inside": teacher / "student", "parent": tmp_path / "models"}[where]
    result = runner.invoke(app, ["convert", str(teacher), str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "input" in result.stderr and "Traceback" not in result.output
    assert tree(tmp_path / "models") == before


def test_grow_and_import_rwkv_never_write_over_their_input(tmp_path):
    src = tmp_path / "ms"
    save_pretrained_atomic(tiny_metastate(0), src)
    before = tree(src)
    result = runner.invoke(app, ["grow", str(src), str(src), "--heads", "3", "--overwrite"])
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert tree(src) == before
    ckpt_dir = tmp_path / "rwkv"
    ckpt_dir.mkdir()
    torch.save(tiny_rwkv7(0).to_rwkv_lm_state_dict(), ckpt_dir / "model.pth")
    before = tree(ckpt_dir)
    result = runner.invoke(app, ["import-rwkv", str(ckpt_dir / "model.pth"), str(ckpt_dir), "--overwrite"])
    assert result.exit_code == 2 and "holds the input" in result.stderr
    assert tree(ckpt_dir) == before


# ------------------------------------------------------------------------------------------------ train
def run_config(out: Path, **overrides) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        max_steps=2,
        save_every=100,
        data=DataConfig(seq_len=16),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1),
        progress=False,
        tensorboard=False,
        save_final=False,
        mixed_precision="no",
    )
    base.update(overrides)
    return TrainConfig(**base)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=260,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def run(out: Path, resume: bool = False, **overrides):
    return train(
        run_config(out, **overrides),
        model=tiny_qwen2(),
        tokenizer=ByteLevelTokenizer(),
        data_sources=[TEXTS],
        resume=resume,
    )


@pytest.mark.parametrize("earlier", ["finished without checkpoints", "checkpoints", "config only"])
def test_train_refuses_a_folder_holding_an_earlier_run_before_writing_anything(tmp_path, earlier):
    out = tmp_path / "run"
    if earlier == "config only":
        out.mkdir()
        (out / "config.yaml").write_text("stage: pretrain\n")
    else:
        run(out, save_every=1 if earlier == "checkpoints" else 100, keep_last=5)
        if earlier != "checkpoints":  # a finished run with its checkpoint removed (or save_every beyond max_steps)
            for _, path in list_checkpoints(out):
                import shutil

                shutil.rmtree(path)
            (out / "checkpoints").rmdir()
    before = tree(out)
    with pytest.raises(FileExistsError, match="already holds .*nothing was written: pass --resume"):
        run(out, max_steps=3, seed=5)
    assert tree(out) == before  # the old code rewrote config.yaml and appended a second run to metrics.jsonl


def test_a_fresh_run_leaves_other_files_alone_and_metrics_never_mix(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    run(out)
    assert (out / "notes.md").read_text() == "my notes"
    events = [json.loads(line).get("event") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1


def test_a_failed_start_leaves_no_run_files(tmp_path):
    """A run that fails while loading (here: a teacher folder that does not exist) writes nothing, so the
    corrected command is not refused as an 'earlier run'."""
    out = tmp_path / "run"
    cfg = run_config(out, stage="distill", teacher=str(tmp_path / "no-teacher"))
    with pytest.raises(FileNotFoundError, match="no-teacher"):
        train(cfg, model=tiny_qwen2(), tokenizer=ByteLevelTokenizer(), data_sources=[TEXTS])
    assert not out.exists() or tree(out) == {}


def test_resume_keeps_the_first_config_and_refuses_another_stage(tmp_path):
    out = tmp_path / "run"
    run(out, save_every=1)
    first = (out / "config.yaml").read_text()
    run(out, resume=True, max_steps=3, save_every=1)
    assert (out / "config.yaml").read_text() == first
    resumed = yaml.safe_load((out / "config.resume-step_00000002.yaml").read_text())
    assert resumed["max_steps"] == 3
    before = tree(out)
    with pytest.raises(ConfigError, match="'pretrain' run but this run's stage is 'sft'"):
        train(
            run_config(out, stage="sft", max_steps=4),
            model=tiny_qwen2(),
            tokenizer=ByteLevelTokenizer(),
            data_sources=[[{"prompt": "a", "response": "b"}] * 8],
            resume=True,
        )
    assert tree(out) == before


def test_resume_with_nothing_to_resume_writes_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(out, resume=True)
    assert tree(out) == {}


def test_a_resumed_run_replaces_final_only_once_the_new_one_is_whole(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, save_every=1, save_final=True)
    before = tree(out / "final")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".final.wuneng-new-"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        run(out, resume=True, max_steps=3, save_every=1, save_final=True)
    assert tree(out / "final") == before and leftovers(out) == []
    monkeypatch.undo()
    run(out, resume=True, max_steps=4, save_every=1, save_final=True)
    assert tree(out / "final") != before and leftovers(out) == []


def test_a_checkpoint_interrupted_mid_write_leaves_the_earlier_ones(tmp_path, monkeypatch):
    import wuneng.train.checkpoint as checkpoint

    out = tmp_path / "run"
    run(out, save_every=1)
    before = tree(out / "checkpoints")
    real_save = checkpoint.save_model

    def save_then_fail(model, filename, *args, **kwargs):
        real_save(model, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(64)
        raise KeyboardInterrupt("killed while writing the weights")

    monkeypatch.setattr(checkpoint, "save_model", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run(out, resume=True, max_steps=3, save_every=1)
    assert [step for step, _ in list_checkpoints(out)] == [1, 2]
    assert {k: v for k, v in tree(out / "checkpoints").items() if not k.startswith(".tmp-")} == before
    monkeypatch.undo()
    assert run(out, resume=True, max_steps=3, save_every=1).step == 3  # the half checkpoint is never resumed from


def test_a_checkpoint_written_again_is_swapped_whole(tmp_path, monkeypatch):
    """The same step written again whose rename-in fails: the earlier checkpoint is put back whole."""
    out = tmp_path / "run"
    run(out, save_every=1)
    ckpt = latest_checkpoint(out)
    before = tree(ckpt)
    model = tiny_qwen2(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-step_"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            out, 2, model=model, optimizer=opt, scheduler=sched, trainer_state={"stage": "pretrain"}, keep_last=3
        )
    assert latest_checkpoint(out) == ckpt and tree(ckpt) == before
    assert not [p for p in (out / "checkpoints").iterdir() if "wuneng-old" in p.name]


# ------------------------------------------------------------------------------------------------ permissions
@pytest.fixture
def umask():
    def set_mask(mask):
        previous = os.umask(mask)
        restore.append(previous)

    restore = []
    yield set_mask
    for mask in restore[:1]:
        os.umask(mask)


def modes(path: Path) -> set:
    """{(kind, permission bits)} of ``path`` and everything under it."""
    found = {("dir", stat.S_IMODE(path.stat().st_mode))}
    for p in path.rglob("*"):
        found.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return found


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_convert_grow_import_write_with_the_users_umask(tmp_path, umask, mask):
    umask(mask)
    want = {("dir", 0o777 & ~mask), ("file", 0o666 & ~mask)}
    save_teacher(tmp_path / "teacher")
    assert runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "student")]).exit_code == 0
    assert modes(tmp_path / "student") == want  # was 0o700 / 0o600 for the weights whatever the umask
    tiny_metastate(0).save_pretrained(tmp_path / "ms")
    assert runner.invoke(app, ["grow", str(tmp_path / "ms"), str(tmp_path / "grown"), "--heads", "3"]).exit_code == 0
    assert modes(tmp_path / "grown") == want
    torch.save(tiny_rwkv7(0).to_rwkv_lm_state_dict(), tmp_path / "rwkv.pth")
    assert runner.invoke(app, ["import-rwkv", str(tmp_path / "rwkv.pth"), str(tmp_path / "imported")]).exit_code == 0
    assert modes(tmp_path / "imported") == want


def test_training_runs_write_with_the_users_umask(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "run"
    run(out, save_every=1, save_final=True)
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}  # checkpoint and final weights were 0o600


def test_plain_save_pretrained_of_a_library_model_writes_weights_with_the_users_umask(tmp_path, umask):
    """The demo, user code and every other plain ``save_pretrained`` of a wuneng model: safetensors writes
    0o600 whatever the umask; a file of the user's that already sits in the folder keeps its mode."""
    umask(0o022)
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    os.chmod(out / "notes.txt", 0o600)
    tiny_rwkv7(0).save_pretrained(out)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "notes.txt").stat().st_mode) == 0o600
