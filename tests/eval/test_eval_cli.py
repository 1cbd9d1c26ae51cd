"""``wuneng eval`` and wuneng.eval.evaluate on tiny saved checkpoints.

Scores of a random model are only checked for range; the rigged constant-token model (see
eval_helpers.constant_answer_model) has scores known in closed form, which pins the data seeds, limits,
vocabulary adaptation and the perplexity plumbing.
"""

import json
import math

import pytest
import torch
from eval_helpers import ANSWER, constant_answer_model, random_model, save_checkpoint, tiny_config
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.eval.evaluate import (
    EvalRow,
    evaluate_model,
    generate_continuations,
    heldout_text,
    load_model_folder,
    rows_table,
)
from wuneng.eval.registry import get_task
from wuneng.eval.tasks.state_tracking import generate_word_problems
from wuneng.models.rwkv7 import RWKV7ForCausalLM
from wuneng.tokenization import BYTE_VOCAB_SIZE, ByteLevelTokenizer

runner = CliRunner()
ALL_TASKS = ["arithmetic", "mqar", "state_tracking", "passkey", "perplexity"]
FAST = ["--limit", "4", "--passkey-lengths", "300", "--context-length", "64"]


def by_task(rows):
    out = {}
    for r in rows:
        out.setdefault(r["task"], []).append(r)
    return out


def check_ranges(row):
    v = row["value"]
    assert row["count"] > 0, row
    if row["metric"] in ("accuracy", "exact", "final", "exact_match"):
        assert 0.0 <= v <= 1.0, row
    elif row["metric"] == "ppl":
        assert 1.0 <= v < math.inf, row
    elif row["metric"] == "nll":
        assert 0.0 <= v < math.inf, row
    elif row["metric"] == "solved_up_to":
        assert v == int(v) and 0 <= v <= get_task("state_tracking").presets["S5"].seq_len, row
    else:
        raise AssertionError(f"unexpected metric {row}")


def test_cli_prints_and_writes_every_task(tmp_path):
    folder = save_checkpoint(random_model(), tmp_path / "ckpt")
    out = tmp_path / "out" / "results.json"
    result = runner.invoke(app, ["eval", str(folder), *FAST, "--json", str(out)])
    assert result.exit_code == 0, result.output
    for task in ALL_TASKS:
        assert task in result.output
    data = json.loads(out.read_text())
    assert data["meta"]["model_class"] == "RWKV7ForCausalLM" and data["meta"]["tokenizer"] == "ByteLevelTokenizer"
    tasks = by_task(data["results"])
    assert sorted(tasks) == sorted(ALL_TASKS)
    assert {r["metric"] for r in tasks["arithmetic"]} == {"exact", "final"}
    assert {r["metric"] for r in tasks["state_tracking"]} == {"accuracy", "solved_up_to"}
    assert {r["metric"] for r in tasks["perplexity"]} == {"ppl", "nll"}
    for row in data["results"]:
        check_ranges(row)
    ppl, nll = (next(r["value"] for r in tasks["perplexity"] if r["metric"] == m) for m in ("ppl", "nll"))
    assert ppl == pytest.approx(math.exp(nll), rel=1e-9)
    assert tasks["arithmetic"][0]["count"] == 4 and tasks["mqar"][0]["count"] == 4
    assert tasks["mqar"][0]["setting"] == f"T64_n4 V={BYTE_VOCAB_SIZE}"  # Zoology's 8192 shrunk to the model's


def test_cli_task_selection_presets_and_text_file(tmp_path):
    folder = save_checkpoint(random_model(), tmp_path / "ckpt", tokenizer=False)  # byte-level default tokenizer
    text = tmp_path / "held_out.txt"
    text.write_text("The grass is green. The sky is blue.\n" * 4, encoding="utf-8")
    out = tmp_path / "r.json"
    args = [
        "eval",
        str(folder),
        "--tasks",
        "state_tracking,perplexity",
        "--preset",
        "state_tracking=Z60",
        "--text",
        str(text),
        "--json",
        str(out),
        *FAST,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert sorted({r["task"] for r in rows}) == ["perplexity", "state_tracking"]
    assert {r["setting"] for r in rows} == {"Z60 k=16", "text file"}
    # every byte after the first is scored once
    assert next(r for r in rows if r["metric"] == "nll")["count"] == len(text.read_bytes()) - 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope"], "unknown evaluation task"),
        (["--preset", "mqar=T9"], "unknown preset"),
        (["--preset", "mqar"], "TASK=PRESET"),
        (["--tasks", "arithmetic", "--preset", "mqar=T64_n4"], "not among the tasks"),
        (["--tasks", "none"], "nothing to run"),
        (["--limit", "0"], "limit"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tmp_path, args, message):
    folder = save_checkpoint(random_model(), tmp_path / "ckpt")
    result = runner.invoke(app, ["eval", str(folder), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_cli_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a model folder" in " ".join(result.output.split())


def test_constant_model_scores_are_known_in_closed_form():
    """logits = margin at '8', 0 elsewhere, at every position: every score follows from the data alone."""
    margin, limit = 8.0, 6
    model = constant_answer_model(margin=margin)
    tok = ByteLevelTokenizer()
    rows = evaluate_model(model, tok, ALL_TASKS, limit=limit, passkey_lengths=(300,), context_length=64)
    value = {(r.task, r.metric, r.setting.split()[0]): r.value for r in rows}
    # mqar: labels are values in [V/2, V) = [129, 259); the model always says 56
    assert value[("mqar", "accuracy", "T64_n4")] == 0.0
    # state tracking (S5, seed 1): accuracy is the share of prefix products equal to 56
    data = generate_word_problems(get_task("state_tracking").presets["S5"], limit, seed=1)
    labelled = data.labels[data.labels != -100]
    assert value[("state_tracking", "accuracy", "S5")] == pytest.approx(float((labelled == ord(ANSWER)).float().mean()))
    # generation: "8888..." never equals an answer nor starts with a 5-digit key
    assert value[("arithmetic", "exact", "one_digit")] == 0.0 and value[("passkey", "accuracy", "classic")] == 0.0
    # perplexity: -log p(x) = log(e^m + V - 1) - m [x == '8'], averaged over bytes 1..L-1
    ids = list(heldout_text(limit).encode("utf-8"))[1:]
    log_z = math.log(math.exp(margin) + BYTE_VOCAB_SIZE - 1)
    want = sum(log_z - (margin if t == ord(ANSWER) else 0.0) for t in ids) / len(ids)
    assert value[("perplexity", "nll", "held-out")] == pytest.approx(want, rel=1e-6)


def test_generate_continuations_matches_the_cache_free_reference():
    """model.generate (recurrent cache) and the re-run-the-prefix reference give the same greedy text."""
    model, tok = random_model(seed=5), ByteLevelTokenizer()
    prompts = ["Q: Tom has 5 shells. A:", "k0=v5 k3?", "Q: Ann has 12 pens. A:", "hi"]
    fast = generate_continuations(model, tok, prompts, max_new_tokens=6, use_generate=True, batch_size=2)
    slow = generate_continuations(model, tok, prompts, max_new_tokens=6, use_generate=False, batch_size=2)
    assert fast == slow
    assert all("\n" not in g and len(g.encode("utf-8", errors="replace")) <= 6 * 3 for g in fast)


def test_generate_continuations_cuts_at_the_stop():
    model = constant_answer_model(token_id=ord("\n"))  # always answers a newline
    assert generate_continuations(model, ByteLevelTokenizer(), ["a", "bb"], max_new_tokens=4) == ["", ""]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_continuations(model, ByteLevelTokenizer(), ["a"], max_new_tokens=0)


def test_load_model_folder_and_skips(tmp_path):
    folder = save_checkpoint(random_model(), tmp_path / "ckpt")
    model, tok = load_model_folder(folder)
    assert type(model).__name__ == "RWKV7ForCausalLM" and not model.training
    assert isinstance(tok, ByteLevelTokenizer)
    # a model whose vocabulary cannot hold the tokenizer's ids or the S5 group: text and S5 tasks are skipped
    torch.manual_seed(0)
    small = RWKV7ForCausalLM(tiny_config(vocab_size=100)).eval()
    rows = evaluate_model(small, tok, ["arithmetic", "state_tracking", "mqar"], limit=2)
    notes = {r.task: r.note for r in rows}
    assert notes["arithmetic"].startswith("skipped") and notes["state_tracking"].startswith("skipped")
    assert "100" in notes["mqar"] and not notes["mqar"].startswith("skipped")
    table = rows_table(rows + [EvalRow("x", "", "ppl", float("nan"), 0)])
    assert table.row_count == len(rows) + 1


def test_cli_runs_lm_eval_tasks_too(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")
    folder = save_checkpoint(random_model(), tmp_path / "ckpt")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app, ["eval", str(folder), "--tasks", "none", "--lm-eval", "wuneng_arith", "--limit", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["task"], r["metric"], r["count"]) for r in rows] == [("lm-eval:wuneng_arith", "exact_match", 2)]
    check_ranges(rows[0])
