"""Conventions every ``wuneng`` command follows (issue 15 item 6): ``--help`` shows examples; a usage error (an
unknown option, a missing argument) is reported on stderr with exit 2 and nothing on stdout; ``wuneng --version``;
``--device auto`` (CUDA when present) wherever a command chooses a device; a missing optional extra is one line
naming the extra to install."""

from __future__ import annotations

import sys

import pytest
import typer
from typer.testing import CliRunner

import wuneng
from wuneng import cli
from wuneng.cli import app

runner = CliRunner()


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert len(names) >= 8, names  # the walk found the commands (demo, train, eval, convert, ...)
    return names


def required_arguments(name: str) -> list[str]:
    command = typer.main.get_command(app).commands[name]
    return [p.name for p in command.params if p.required]


@pytest.mark.parametrize("name", command_names())
def test_help_shows_examples(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples" in result.stdout, f"wuneng {name} --help has no examples"
    assert f"wuneng {name}" in result.stdout


@pytest.mark.parametrize("name", command_names())
def test_an_unknown_option_is_a_usage_error_on_stderr(name):
    result = runner.invoke(app, [name, "--no-such-option"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "--no-such-option" in result.stderr


@pytest.mark.parametrize("name", [n for n in command_names() if required_arguments(n)])
def test_a_missing_argument_is_a_usage_error_on_stderr(name):
    result = runner.invoke(app, [name])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Missing" in result.stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wuneng {wuneng.__version__}"


@pytest.mark.parametrize("cuda", [True, False])
def test_device_auto_is_cuda_when_present(monkeypatch, cuda):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cli.resolve_device("auto") == ("cuda" if cuda else "cpu")
    assert cli.resolve_device("cpu") == "cpu"
    assert cli.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(typer.BadParameter, match="auto, cpu, cuda"):
        cli.resolve_device("gpu0")


def test_every_device_option_defaults_to_auto():
    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        for param in command.params:
            if "--device" in getattr(param, "opts", ()):
                found[name] = param.default
    assert {"eval", "bench-arch"} <= set(found), found
    assert set(found.values()) == {"auto"}, found


@pytest.mark.parametrize("name", ["eval", "bench-arch"])
def test_a_bad_device_is_a_usage_error(tmp_path, name):
    args = (
        [name, str(tmp_path), "--device", "gpu0"]
        if name == "eval"
        else [name, "--device", "gpu0", "--out", str(tmp_path)]
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "gpu0" in result.stderr and result.stdout == ""


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'wuneng[plot]'" in lines[0] and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output and "ImportError" not in lines[0]  # an expected error: no type name
