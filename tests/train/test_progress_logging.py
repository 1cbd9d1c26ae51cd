"""Progress people can read in a log file: `wuneng train > log 2>&1` (and `wuneng eval`) write plain lines with
step, loss, tokens/s and ETA while running; a resume says from which checkpoint and step; `--resume` with nothing
to resume is one error line (exit 2); library modules never print."""

import ast
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wuneng.cli import app
from wuneng.progress import ProgressLog, configure_logging, format_duration, progress_interval

from train_helpers import PYTHON, REPO, saved_run_files

# one progress line of the training loop, e.g.
# "... INFO wuneng.train.loop: pretrain: step 2/4 (50%), loss 5.5946, 1,328 tokens/s, elapsed 0:00:00, ETA 0:00:00"
STEP_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO wuneng\.train\.loop: pretrain: step (\d+)/(\d+) \(\d+%\), loss (\d+\.\d{4}), "
    r"([\d,]+) tokens/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$"
)


def run_cli(args, log: Path, interval: str = "0", cwd=REPO) -> int:
    """`python -m wuneng.cli ARGS > log 2>&1` (not a terminal), with $WUNENG_PROGRESS_INTERVAL = interval."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WUNENG_PROGRESS_INTERVAL=interval)
    env.pop("COLUMNS", None)
    with open(log, "w") as f:
        proc = subprocess.run(
            [PYTHON, "-m", "wuneng.cli", *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    return proc.returncode


def invoke(args, monkeypatch, interval: str = "0"):
    """The CLI in this process (CliRunner: stderr is not a terminal); (exit code, stderr)."""
    monkeypatch.setenv("WUNENG_PROGRESS_INTERVAL", interval)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


@pytest.fixture
def run_yaml(tmp_path, tokenizer):
    return saved_run_files(tmp_path, tokenizer, max_steps=4, save_every=2, progress=True)


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """The CLI installs a handler on the `wuneng` logger: remove it after each test."""
    yield
    root = logging.getLogger("wuneng")
    for h in [h for h in root.handlers if getattr(h, "_wuneng_cli", False)]:
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)


@pytest.mark.slow
def test_train_to_a_file_logs_every_step_with_loss_tokens_per_s_and_eta(tmp_path, run_yaml):
    log = tmp_path / "train.log"
    assert run_cli(["train", run_yaml, "--output-dir", tmp_path / "run"], log) == 0
    text = log.read_text()
    steps = [STEP_LINE.match(line) for line in text.splitlines()]
    steps = [m for m in steps if m]
    assert [int(m.group(1)) for m in steps] == [1, 2, 3, 4], text
    assert all(m.group(2) == "4" and int(m.group(4).replace(",", "")) > 0 for m in steps)
    assert "pretrain: starting at step 0 (runs to step 4)" in text
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000002'} written" in text
    assert "pretrain: finished at step 4" in text
    assert "\r" not in text and "\x1b[" not in text  # no bars, no terminal escapes
    # the logged loss is the step's loss in metrics.jsonl
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"event"' not in line]
    assert [f"{__import__('json').loads(r)['loss']:.4f}" for r in records] == [m.group(3) for m in steps]


def test_interval_from_the_config_spaces_the_lines(tmp_path, run_yaml, monkeypatch):
    """progress_interval 3600 s (over the environment's 0): no line before the last step, which always logs."""
    code, err = invoke(
        ["train", run_yaml, "--output-dir", tmp_path / "run", "-o", "progress_interval=3600"], monkeypatch
    )
    assert code == 0, err
    steps = [m for m in map(STEP_LINE.match, err.splitlines()) if m]
    assert [int(m.group(1)) for m in steps] == [4]


def test_quiet_logs_no_progress(tmp_path, run_yaml, monkeypatch):
    code, err = invoke(["--quiet", "train", run_yaml, "--output-dir", tmp_path / "run"], monkeypatch)
    assert code == 0, err
    assert "INFO" not in err and "done: step 4" in err


def test_resume_says_from_which_checkpoint_and_step(tmp_path, run_yaml, monkeypatch):
    run = tmp_path / "run"
    assert invoke(["train", run_yaml, "--output-dir", run, "--max-steps", 4], monkeypatch)[0] == 0
    code, text = invoke(["train", run_yaml, "--output-dir", run, "--max-steps", 6, "--resume"], monkeypatch)
    assert code == 0, text
    assert (
        f"pretrain: resuming from checkpoint {run / 'checkpoints' / 'step_00000004'} at step 4 (runs to step 6)" in text
    )
    steps = [m for m in map(STEP_LINE.match, text.splitlines()) if m]
    assert [(int(m.group(1)), int(m.group(2))) for m in steps] == [(5, 6), (6, 6)]


def test_resume_with_nothing_to_resume_is_one_error_line(tmp_path, run_yaml, monkeypatch):
    empty = tmp_path / "empty"
    code, err = invoke(["train", run_yaml, "--output-dir", empty, "--resume"], monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --resume:") and "no complete checkpoint" in lines[0] and str(empty) in lines[0]
    assert not (empty / "metrics.jsonl").exists()


@pytest.mark.slow
def test_eval_to_a_file_logs_batches_and_tasks(tmp_path, run_yaml):
    model = tmp_path / "model"  # the tiny Qwen2 + byte tokenizer of saved_run_files
    log = tmp_path / "eval.log"
    assert run_cli(["eval", model, "--tasks", "mqar,arithmetic", "--limit", "8", "--batch-size", "4"], log) == 0
    text = log.read_text()
    assert re.search(
        r"INFO wuneng\.eval\.evaluate: eval mqar: batch 1/2 \(50%\), [\d,]+ tokens/s, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d",
        text,
    ), text
    assert re.search(r"eval arithmetic: batch \d+/\d+ \(\d+%\), [\d,]+ new tokens/s, .*ETA", text)
    assert re.search(r"eval: task 1/2 mqar done in [\d.]+ s \(accuracy \d\.\d{4}\), elapsed .*, ETA", text)
    assert "eval: task 2/2 arithmetic done" in text
    assert "Loading weights" not in text and "\r" not in text  # no tqdm bars in a log file


# ---------------------------------------------------------------------------------------------- units
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_log_interval_rate_and_eta(caplog):
    clock = FakeClock()
    log = ProgressLog(
        "job", 10, start=2, amount_start=100, interval=10, clock=clock, logger=logging.getLogger("wuneng.test")
    )
    with caplog.at_level(logging.INFO, logger="wuneng.test"):
        clock.t = 5.0
        assert log.update(3, "loss 1.0000", amount=200) is None  # 5 s < 10 s
        clock.t = 10.0
        line = log.update(4, "loss 0.5000", amount=600)
        clock.t = 12.0
        assert log.update(5, amount=700) is None
        last = log.update(10, amount=900)  # the end always logs
    # 2 steps since start in 10 s -> 6 steps left take 30 s; 500 tokens in 10 s
    assert line == "job: step 4/10 (40%), loss 0.5000, 50 tokens/s, elapsed 0:00:10, ETA 0:00:30"
    assert last == "job: step 10/10 (100%), 150 tokens/s, elapsed 0:00:12, ETA 0:00:00"
    assert caplog.messages == [line, last]


def test_progress_interval_sources(monkeypatch):
    monkeypatch.delenv("WUNENG_PROGRESS_INTERVAL", raising=False)
    assert progress_interval() == 10.0 and progress_interval(0) == 0.0
    monkeypatch.setenv("WUNENG_PROGRESS_INTERVAL", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv("WUNENG_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="WUNENG_PROGRESS_INTERVAL"):
        progress_interval()
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "-:--:--"


def test_configure_logging_plain_lines_one_handler(capsys):
    try:
        configure_logging(0, rich=False)
        handler = configure_logging(0, rich=False)  # a second call replaces the first handler
        ours = [h for h in logging.getLogger("wuneng").handlers if getattr(h, "_wuneng_cli", False)]
        assert ours == [handler]
        logging.getLogger("wuneng.somewhere").info("hello %d", 3)
        logging.getLogger("wuneng.somewhere").debug("hidden")
        err = capsys.readouterr().err
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO wuneng\.somewhere: hello 3\n", err), err
        configure_logging(-1, rich=False)
        logging.getLogger("wuneng.somewhere").info("quiet")
        assert capsys.readouterr().err == ""
    finally:
        root = logging.getLogger("wuneng")
        for h in [h for h in root.handlers if getattr(h, "_wuneng_cli", False)]:
            root.removeHandler(h)
        root.setLevel(logging.NOTSET)


def test_demo_logs_its_evaluations(caplog):
    from wuneng.apps.demo import log_evaluation

    with caplog.at_level(logging.INFO, logger="wuneng.apps.demo"):
        line = log_evaluation("wuneng after sft", {"exact": 0.5, "recall": 0.25, "ppl": 1.2345}, 12.3)
    assert caplog.records[0].name == "wuneng.apps.demo" and caplog.messages == [line]
    assert line.startswith("wuneng after sft: exact ") and line.endswith("ppl 1.234 (12 s)")


def test_library_modules_never_print():
    """Only the command line prints; every other module of the package logs (a call of the print builtin)."""
    src = Path(__file__).resolve().parents[2] / "src" / "wuneng"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []


def test_run_progress_bar_in_a_terminal_lines_otherwise(caplog, monkeypatch):
    """The loop's display: a rich bar (no log lines) when stderr is a terminal, plain lines when it is not."""
    from wuneng.train.loop import _RunProgress

    monkeypatch.setenv("WUNENG_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="wuneng.train.loop"):
        with _RunProgress(True, 3, 1, "sft", tokens_seen=10, terminal=True) as bar:
            bar.update(2, 1.5, 50, 40.0)
            assert bar.lines is None and bar.bar.tasks[0].completed == 2 and bar.bar.tasks[0].fields["loss"] == "1.5000"
        assert caplog.messages == []
        with _RunProgress(True, 3, 1, "sft", tokens_seen=10, terminal=False) as plain:
            plain.update(2, 1.5, 50)
        assert plain.bar is None and len(caplog.messages) == 1
        assert caplog.messages[0].startswith("sft: step 2/3 (67%), loss 1.5000, ")
        with _RunProgress(False, 3, 1, "sft", terminal=False) as off:
            off.update(2, 1.5, 50)
        assert off.bar is None and off.lines is None and len(caplog.messages) == 1
