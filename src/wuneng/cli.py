"""The ``wuneng`` command line (typer + rich). Each command imports its machinery lazily so that
``wuneng --help`` stays fast."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build, convert, train, evaluate and run hybrid state + attention LMs.")


@app.callback()
def _main() -> None:
    """wuneng command line."""


if __name__ == "__main__":  # pragma: no cover
    app()
