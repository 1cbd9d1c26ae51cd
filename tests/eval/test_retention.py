"""The retention report (``wuneng eval STUDENT --teacher TEACHER``, :mod:`wuneng.eval.retention`).

Known answers only: the relative-score arithmetic, each task's chance level from its definition, a passkey grid
of stub models whose retrieval is known per cell, the cache bytes of a tiny RWKV-7 (state only, constant in the
length), a tiny Qwen2 (keys and values, linear in the length) and a tiny WuNeng (state plus keys/values with the
spare room its growing buffers hold) against hand computations, and the command end to end on tiny saved models.
"""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
import yaml
from eval_helpers import random_model, save_checkpoint
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.eval.retention import (
    LengthMeasurement,
    ModelMeasurements,
    PasskeyGrid,
    RetentionSettings,
    TaskScore,
    build_report,
    cache_bytes,
    find_train_length,
    measure_lengths,
    passkey_grid,
    relative_score,
    report_markdown,
)
from wuneng.eval.tasks.arithmetic import ArithmeticConfig
from wuneng.eval.tasks.mqar import MQARConfig
from wuneng.eval.tasks.passkey import PasskeyConfig
from wuneng.eval.tasks.state_tracking import StateTrackingConfig
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.tokenization import BYTE_VOCAB_SIZE, ByteLevelTokenizer

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- scores
def test_relative_score_arithmetic_and_teacher_at_chance():
    assert relative_score(0.55, 0.9, 0.2) == pytest.approx(0.35 / 0.7, rel=1e-12)
    assert relative_score(0.9, 0.9, 0.2) == pytest.approx(1.0, rel=1e-12)
    assert relative_score(0.1, 0.6, 0.2) == pytest.approx(-0.25, rel=1e-12)  # a student below chance: negative
    assert relative_score(0.2, 0.2, 0.2) is None  # teacher == chance: undefined, not a division by zero
    assert relative_score(0.5, 0.1, 0.2) is None  # teacher below chance: the ratio's sign would flip
    assert relative_score(float("nan"), 0.9, 0.2) is None  # a skipped task


def test_chance_comes_from_the_task_definitions():
    # MQAR: a value guessed uniformly among the V - V//2 value tokens
    assert MQARConfig(vocab_size=259).chance == pytest.approx(1 / 130)
    assert MQARConfig().chance == pytest.approx(1 / 4096)
    # state tracking: one of |G| group elements
    assert StateTrackingConfig(group="S5").chance == pytest.approx(1 / 120)
    assert StateTrackingConfig(group="Z60").chance == pytest.approx(1 / 60)
    # passkey: a d-digit key with a non-zero first digit
    assert PasskeyConfig().chance == pytest.approx(1 / 90000)
    assert PasskeyConfig(num_digits=1).chance == pytest.approx(1 / 9)
    # arithmetic: operands copied from the prompt, the result guessed among the values the operation can give
    one = ArithmeticConfig()
    assert one.chance("+1d") == pytest.approx(1 / 17)  # 1+1 .. 9+9: 2..18
    assert one.chance("-1d") == pytest.approx(1 / 9)  # larger first: 0..8
    assert one.chance("recall") == pytest.approx(1 / 10)  # v0..v9
    assert ArithmeticConfig(ops=("*",)).chance("*1d") == pytest.approx(
        1 / len({a * b for a in range(1, 10) for b in range(1, 10)})
    )
    assert ArithmeticConfig(two_digit_fraction=0.5).chance("+2d") == pytest.approx(1 / 179)  # 20..198
    with pytest.raises(ValueError, match="category"):
        one.chance("/1d")


def _measurements(name, scores, cells=None, lengths=()):
    grid = PasskeyGrid(
        lengths=[300],
        depths=[0.0, 1.0],
        cells=cells or {(300, 0.0): 1.0, (300, 1.0): 0.5},
        counts={},
        notes=[],
        intro=True,
    )
    return ModelMeasurements(name=name, scores=scores, grid=grid, lengths=list(lengths), settings={})


def test_report_rows_pair_student_and_teacher_and_say_undefined():
    chance = 1 / 120
    student = _measurements(
        "student",
        [
            TaskScore("state_tracking", "S5 k=16", "accuracy", 0.5, 8, chance),
            TaskScore("mqar", "T64_n4 V=259", "accuracy", 0.3, 8, 1 / 130),
        ],
    )
    teacher = _measurements(
        "teacher",
        [
            TaskScore("state_tracking", "S5 k=16", "accuracy", chance, 8, chance),
            TaskScore("mqar", "T64_n4 V=259", "accuracy", 0.6, 8, 1 / 130),
        ],
    )
    report = build_report(student, teacher, train_length=150)
    rows = {}
    for r in report.rows:  # the first row of each task (passkey: over all cells; then within / beyond the length)
        rows.setdefault(r.task, r)
    assert [r.setting for r in report.rows if r.task == "passkey"] == ["all lengths", "<= 150", "> 150"]
    assert rows["state_tracking"].relative is None and "undefined" in rows["state_tracking"].note
    assert rows["mqar"].relative == pytest.approx((0.3 - 1 / 130) / (0.6 - 1 / 130), rel=1e-12)
    # passkey rows come from the grids: all cells, within and beyond the training length (150 < 300)
    assert rows["passkey"].student == pytest.approx(0.75)
    md = report_markdown(report)
    assert "undefined" in md and f"{rows['mqar'].relative:.3f}" in md


# ------------------------------------------------------------------------------------------- passkey grid
class RetrieverStub:
    """Answers the pass key of its prompt when the prompt has at most ``window`` tokens, else ``00000`` (a model
    that retrieves only within its training length); ``window=0`` never retrieves."""

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window, self.calls = tokenizer, window, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id):
        self.calls += 1
        rows = []
        for ids in input_ids.tolist():
            key = re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(ids)).group(1)
            answer = key if len(ids) <= self.window else "0" * len(key)
            rows.append(ids + self.tokenizer.encode(" " + answer + "\n", add_special_tokens=False))
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_passkey_grid_scores_each_cell_of_a_model_with_known_retrieval():
    tok = ByteLevelTokenizer()
    depths = [0.0, 0.5, 1.0]
    lengths = [60, 150, 300]  # 60 bytes cannot hold even the prompt without its intro
    within = passkey_grid(RetrieverStub(tok, window=200), tok, lengths, depths, trials=2, seed=3)
    assert within.intro is False  # the shortest usable grid... cannot hold the 160-byte intro: dropped everywhere
    for d in depths:
        assert within.cells[(150, d)] == 1.0
        assert within.cells[(300, d)] == 0.0
        assert within.cells[(60, d)] is None
        assert within.counts[(150, d)] == 2
    assert any("60" in note for note in within.notes)
    never = passkey_grid(RetrieverStub(tok, window=0), tok, lengths, depths, trials=2, seed=3)
    assert all(v == 0.0 for k, v in never.cells.items() if k[0] != 60)
    assert within.accuracy(max_length=150) == 1.0 and within.accuracy(min_length=151) == 0.0


def test_passkey_grid_keeps_the_intro_when_every_length_holds_it():
    tok = ByteLevelTokenizer()
    grid = passkey_grid(RetrieverStub(tok, window=10_000), tok, [300, 400], [0.0, 1.0], trials=1, seed=0)
    assert grid.intro is True and set(grid.cells.values()) == {1.0}


def test_the_demo_grid_asks_in_its_training_format_at_every_length_from_half_the_rows():
    from wuneng.apps.demo import DemoConfig, retention_settings

    tok = ByteLevelTokenizer()
    settings = retention_settings(DemoConfig())
    assert settings.grid_lengths() == [64, 128, 256, 512]  # 0.5, 1, 2 and 4 x the 128-byte rows
    seen: list = []

    class Recorder(RetrieverStub):
        def generate(self, input_ids, **kwargs):
            seen.extend(tok.decode(ids) for ids in input_ids.tolist())
            return super().generate(input_ids, **kwargs)

    measured = {}
    for name, window in (("teacher", 128), ("student", 64)):  # each retrieves within its window only
        grid = passkey_grid(
            Recorder(tok, window=window),
            tok,
            settings.grid_lengths(),
            settings.depths,
            settings.trials,
            settings.seed,
            settings.passkey,
        )
        assert grid.notes == [] and None not in grid.cells.values()  # even 64 bytes hold a prompt
        measured[name] = ModelMeasurements(name, [], grid, [])
    assert all(p.startswith(("The ", "Here ")) and p.endswith(". What is the pass key?") for p in seen)
    t = measured["teacher"].grid
    assert [t.accuracy(n, n) for n in t.lengths] == [1.0, 1.0, 0.0, 0.0]
    rows = {r.setting: r for r in build_report(measured["student"], measured["teacher"], 128).rows}
    assert rows["<= 128"].relative == pytest.approx((0.5 - t.chance) / (1.0 - t.chance), rel=1e-12)
    assert rows["> 128"].relative is None  # the teacher at 0 beyond the rows: undefined, not a number


# ------------------------------------------------------------------------------------------- cache bytes
def _tiny_rwkv7():
    torch.manual_seed(0)
    return RWKV7ForCausalLM(RWKV7Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_size=16)).eval()


def _tiny_qwen2(vocab: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def test_rwkv7_cache_is_its_state_and_constant_in_length():
    model = _tiny_rwkv7()
    rows = measure_lengths(model, [8, 32, 96], decode_tokens=2)
    # per layer: time_shift [1, 32] and channel_shift [1, 32] float32, wkv [1, 2 heads, 16, 16] float32
    state = 2 * (2 * 32 * 4 + 2 * 16 * 16 * 4)
    assert [(r.length, r.state_bytes, r.kv_bytes) for r in rows] == [(8, state, 0), (32, state, 0), (96, state, 0)]
    assert all(r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 for r in rows)


def test_qwen2_kv_cache_grows_linearly():
    model = _tiny_qwen2()
    rows = measure_lengths(model, [8, 32, 96], decode_tokens=2)
    # per layer keys and values [1, 1 kv head, L, 16] float32: 2 layers x 2 x 16 x 4 = 256 bytes per position
    assert [(r.length, r.state_bytes, r.kv_bytes) for r in rows] == [(8, 0, 2048), (32, 0, 8192), (96, 0, 24576)]


def test_wuneng_cache_counts_the_room_its_buffers_hold():
    from wuneng.models.wuneng import WuNengForCausalLM

    torch.manual_seed(1)
    student = WuNengForCausalLM.from_teacher(_tiny_qwen2()).eval()
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        cache = student(ids, use_cache=True, logits_to_keep=1).past_key_values
    state, kv = cache_bytes(cache)
    # keys/values live in buffers of max(256, L) positions (GrowingKVLayer.min_capacity): 2 layers x 2 x 256 x 16 x 4
    assert kv == 2 * 2 * 1 * 256 * 16 * 4
    assert state > 0 and state + kv == cache.nbytes()
    rows = measure_lengths(student, [8, 32], decode_tokens=1)
    assert [r.kv_bytes for r in rows] == [kv, kv] and [r.state_bytes for r in rows] == [state, state]


# ------------------------------------------------------------------------------------------- training length
def test_train_length_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"seq_len": 96}}))
    assert find_train_length(run / "final") == 96
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 48}}))
    assert find_train_length(own) == 48
    assert find_train_length(tmp_path / "nothing") is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("data: [unclosed")
    assert find_train_length(bad) is None
    with pytest.raises(ValueError, match="train_length"):
        RetentionSettings(train_length=0)
    assert RetentionSettings(train_length=64).grid_lengths() == [32, 64, 128, 256]


# ------------------------------------------------------------------------------------------- command
def _png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, path
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_eval_with_teacher_writes_the_report_and_never_overwrites(tmp_path):
    run = tmp_path / "run"
    student = save_checkpoint(random_model(), run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"seq_len": 64}}))
    teacher = save_checkpoint(_tiny_qwen2(vocab=BYTE_VOCAB_SIZE), tmp_path / "teacher")
    out = tmp_path / "report"
    args = ["eval", str(student), "--teacher", str(teacher), "--out", str(out), "--device", "cpu"]
    args += ["--tasks", "arithmetic,mqar", "--limit", "2", "--trials", "1", "--decode-tokens", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "relative" in result.output and "passkey" in result.output

    from wuneng.eval.retention import REPORT_FILES
    from wuneng.saving import current_umask

    modes = {name: (out / name).stat().st_mode & 0o777 for name in REPORT_FILES}
    assert modes == {name: 0o666 & ~current_umask() for name in REPORT_FILES}  # the umask, not mkstemp's 0o600

    data = json.loads((out / "retention.json").read_text())
    assert data["meta"]["train_length"] == 64  # from the run's config.yaml
    assert data["meta"]["lengths"] == [32, 64, 128, 256]
    md = (out / "retention.md").read_text()
    tasks = {r["task"] for r in data["relative"]}
    assert {"arithmetic", "mqar", "passkey"} <= tasks
    for row in data["relative"]:
        for key in ("student", "teacher"):
            if row[key] is not None:
                assert f"{row[key]:.3f}" in md, (row, key)
        assert f"{row['chance']:.3g}" in md, row
        assert (f"{row['relative']:.3f}" if row["relative"] is not None else "undefined") in md
    st_rows = {r["length"]: r for r in data["memory"]["student"]}
    te_rows = {r["length"]: r for r in data["memory"]["teacher"]}
    state = 2 * (2 * 32 * 4 + 2 * 16 * 16 * 4)  # eval_helpers.tiny_config: 2 layers, C 32, 2 heads of 16
    assert all(r["state_bytes"] == state and r["kv_bytes"] == 0 for r in st_rows.values())
    assert all(r["kv_bytes"] == 256 * length and r["state_bytes"] == 0 for length, r in te_rows.items())
    assert f"{te_rows[256]['kv_bytes']:,}" in md and f"{state:,}" in md
    for png in ("passkey_grid.png", "memory_speed.png"):
        w, h = _png_size(out / png)
        assert w > 300 and h > 200
        assert f"]({png})" in md
    assert {c["length"] for c in data["passkey"]["student"]} == {32, 64, 128, 256}
    assert all(c["accuracy"] is None for c in data["passkey"]["student"] if c["length"] <= 64)  # too short

    # the same command again: refused, nothing replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "retention.md" in again.output, again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_eval_with_teacher_refuses_a_users_file_before_any_work(tmp_path):
    student = save_checkpoint(random_model(), tmp_path / "student")
    teacher = save_checkpoint(random_model(seed=1), tmp_path / "teacher")
    out = tmp_path / "out"
    out.mkdir()
    (out / "passkey_grid.png").write_text("mine")
    args = ["eval", str(student), "--teacher", str(teacher), "--out", str(out), "--train-length", "300"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "passkey_grid.png" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == ["passkey_grid.png"]
    assert (out / "passkey_grid.png").read_text() == "mine"


def test_eval_with_teacher_needs_a_training_length(tmp_path):
    student = save_checkpoint(random_model(), tmp_path / "student")
    teacher = save_checkpoint(random_model(seed=1), tmp_path / "teacher")
    result = runner.invoke(app, ["eval", str(student), "--teacher", str(teacher), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--train-length" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_report_options_without_teacher_are_refused(tmp_path):
    student = save_checkpoint(random_model(), tmp_path / "student")
    result = runner.invoke(app, ["eval", str(student), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--teacher" in result.output, result.output


def test_options_of_the_plain_eval_are_refused_with_teacher(tmp_path):
    student = save_checkpoint(random_model(), tmp_path / "student")
    args = ["eval", str(student), "--teacher", str(student), "--out", str(tmp_path / "o"), "--json", "r.json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--json" in result.output and "--teacher" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_length_measurements_markdown_has_the_bytes():
    rows = [LengthMeasurement(64, 4608, 0, 1000.0, 200.0), LengthMeasurement(128, 4608, 0, 1100.0, 210.0)]
    te = [LengthMeasurement(64, 0, 16384, 900.0, 300.0), LengthMeasurement(128, 0, 32768, 950.0, 290.0)]
    report = build_report(_measurements("s", [], lengths=rows), _measurements("t", [], lengths=te), train_length=64)
    md = report_markdown(report)
    for n in ("4,608", "16,384", "32,768"):
        assert n in md
    assert not math.isnan(report.rows[0].student)
