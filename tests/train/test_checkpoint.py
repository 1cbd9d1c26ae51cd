"""Checkpoints: atomic and complete-or-ignored, keep-last-K, exact resume (also after a real SIGKILL)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.train.checkpoint import latest_checkpoint, list_checkpoints
from wuneng.train.config import OptimConfig
from wuneng.train.loop import train

from train_helpers import PYTHON, REPO, TEXTS, quick_config, saved_run_files, tiny_qwen2


def config(tmp_path, name, **kw):
    base = dict(micro_batch_size=2, grad_accum_steps=2, max_steps=10, save_every=2, keep_last=3)
    return quick_config(tmp_path / name, **{**base, **kw})


def weights(ckpt_dir):
    return load_file(str(ckpt_dir / "model.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:5]}"


def test_half_written_checkpoints_are_never_picked(tmp_path, tokenizer):
    torch.manual_seed(0)
    train(config(tmp_path, "run", max_steps=4), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])
    root = tmp_path / "run" / "checkpoints"
    good = root / "step_00000004"
    assert latest_checkpoint(tmp_path / "run") == good
    shutil.copytree(good, root / ".tmp-step_00000008")  # assembled but never renamed
    shutil.copytree(good, root / "step_00000006")
    (root / "step_00000006" / "trainer_state.json").unlink()  # killed before the last file
    shutil.copytree(good, root / "step_00000007")
    (root / "step_00000007" / "trainer_state.json").write_text('{"step": 7, "samp')  # truncated
    shutil.copytree(good, root / "step_00000009")  # state says another step
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert latest_checkpoint(tmp_path / "run") == good


def test_keep_last(tmp_path, tokenizer):
    torch.manual_seed(0)
    train(
        config(tmp_path, "run", max_steps=8, keep_last=2), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS]
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    torch.manual_seed(0)
    train(config(tmp_path, "full"), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])
    torch.manual_seed(0)
    train(config(tmp_path, "sliced", stop_at_step=4), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])
    result = train(
        config(tmp_path, "sliced"), model=tiny_qwen2(seed=5), tokenizer=tokenizer, data_sources=[TEXTS], resume=True
    )
    assert result.step == 10 and result.history[0]["step"] == 5
    assert_same(
        weights(tmp_path / "full/checkpoints/step_00000010"), weights(tmp_path / "sliced/checkpoints/step_00000010")
    )
    full_opt = torch.load(tmp_path / "full/checkpoints/step_00000010/optimizer.pt", weights_only=True)
    sliced_opt = torch.load(tmp_path / "sliced/checkpoints/step_00000010/optimizer.pt", weights_only=True)
    for k, st in full_opt["state"].items():
        assert torch.equal(st["exp_avg_sq"], sliced_opt["state"][k]["exp_avg_sq"])


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tokenizer):
    """A subprocess run is SIGKILLed after checkpoint 4; `wuneng train --resume` finishes it; the weights at
    step 12 equal those of a run that was never interrupted (bitwise: same data order, optimizer, RNG)."""
    path = saved_run_files(tmp_path, tokenizer, micro_batch_size=2, max_steps=1000, save_every=2, keep_last=50)
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PYTHON, "-m", "wuneng.cli", "train", str(path), "--output-dir", str(killed), "-o", "stop_at_step=400"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(step >= 4 for step, _ in list_checkpoints(killed)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    newest = list_checkpoints(killed)[-1][0]
    assert 4 <= newest < 12

    result = CliRunner().invoke(
        app, ["train", str(path), "--output-dir", str(killed), "--resume", "-o", "stop_at_step=12"]
    )
    assert result.exit_code == 0, result.output
    train_ref = CliRunner().invoke(
        app, ["train", str(path), "--output-dir", str(tmp_path / "ref"), "-o", "stop_at_step=12"]
    )
    assert train_ref.exit_code == 0, train_ref.output
    assert_same(weights(killed / "checkpoints/step_00000012"), weights(tmp_path / "ref/checkpoints/step_00000012"))
    # it really continued (a fresh start would also reach the same weights): resume event at the newest
    # checkpoint, and the first step logged after it is the next one
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(records) if r.get("event") == "resume")
    assert records[at]["step"] == newest and records[at]["checkpoint"].endswith(f"step_{newest:08d}")
    assert records[at + 1]["step"] == newest + 1


def test_sharded_optimizer_files_round_trip(tmp_path):
    """FSDP/ZeRO layout: each process keeps its own optimizer shard; resuming needs the same process count."""
    from wuneng.train.checkpoint import load_training_checkpoint, save_checkpoint
    from wuneng.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = tiny_qwen2()
    opt_cfg = OptimConfig(lr=1e-3)
    opt = build_optimizer(model, opt_cfg)
    sched = build_scheduler(opt, opt_cfg, 10)
    model(input_ids=torch.randint(0, 259, (2, 8)), labels=torch.randint(0, 259, (2, 8))).loss.backward()
    opt.step()
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=opt, scheduler=sched, trainer_state={}, keep_last=2, sharded_optimizer=True
    )
    assert (path / "optimizer_rank0.pt").is_file()
    model2 = tiny_qwen2(seed=3)
    opt2 = build_optimizer(model2, opt_cfg)
    state = load_training_checkpoint(path, model=model2, optimizer=opt2, scheduler=build_scheduler(opt2, opt_cfg, 10))
    assert state["step"] == 1
    assert_same(model.state_dict(), model2.state_dict())
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    with pytest.raises(ValueError, match="sharded over 1 processes; resume with that many"):
        load_training_checkpoint(path, model=model2, optimizer=opt2, rank=1)


def test_resume_with_another_batch_continues_the_data(tmp_path, tokenizer, monkeypatch):
    """Checkpoint 4 at 4 rows/step has consumed 16 samples; resumed at 8 rows/step, step 5 reads samples 16..23."""
    from wuneng.train.loop import GlobalSampler

    torch.manual_seed(0)
    train(
        config(tmp_path, "run", max_steps=6, stop_at_step=4),
        model=tiny_qwen2(),
        tokenizer=tokenizer,
        data_sources=[TEXTS],
    )
    state = json.loads((tmp_path / "run/checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["samples_consumed"] == 16
    seen = []
    original = GlobalSampler.rows

    def spy(self, start, count):
        seen.append((start, count))
        return original(self, start, count)

    monkeypatch.setattr(GlobalSampler, "rows", spy)
    cfg = config(tmp_path, "run", max_steps=6, micro_batch_size=4)
    train(cfg, model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS], resume=True)
    assert seen[:2] == [(16, 4), (20, 4)]  # step 5: two micro-batches of 4 from sample 16
    assert (
        json.loads((tmp_path / "run/checkpoints/step_00000006/trainer_state.json").read_text())["samples_consumed"]
        == 32
    )


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, tokenizer):
    torch.manual_seed(0)
    train(config(tmp_path, "run", max_steps=2), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])
    with pytest.raises(FileExistsError, match="already holds checkpoints .*pass --resume"):
        train(config(tmp_path, "run", max_steps=2), model=tiny_qwen2(), tokenizer=tokenizer, data_sources=[TEXTS])
