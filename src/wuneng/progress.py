"""Progress that reads the same in a terminal and in a log file (nohup, Slurm, CI).

Long-running library code (training, evaluation, the demo) reports through :class:`ProgressLog`: a plain line
through ``logging`` every ``interval`` seconds, e.g.::

    pretrain: step 40/100 (40%), loss 2.3171, 1,903 tokens/s, elapsed 0:00:21, ETA 0:00:31

The interval is :func:`progress_interval` (``$WUNENG_PROGRESS_INTERVAL`` seconds, default 10; 0 logs every
update). Library modules never print; the command line attaches the one handler (:func:`configure_logging`):
a rich handler when stderr is a terminal, else plain ``time level logger: message`` lines.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, Optional

__all__ = [
    "DEFAULT_INTERVAL",
    "ENV_INTERVAL",
    "ProgressLog",
    "progress_interval",
    "format_duration",
    "configure_logging",
    "stderr_is_terminal",
]

DEFAULT_INTERVAL = 10.0
ENV_INTERVAL = "WUNENG_PROGRESS_INTERVAL"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_log = logging.getLogger(__name__)


def progress_interval(value: Optional[float] = None) -> float:
    """Seconds between progress lines: ``value`` when given, else ``$WUNENG_PROGRESS_INTERVAL``, else 10.
    A negative or unreadable environment value is refused with a ValueError naming the variable."""
    if value is not None:
        if not value >= 0:
            raise ValueError(f"progress interval must be >= 0 seconds, got {value!r}")
        return float(value)
    raw = os.environ.get(ENV_INTERVAL)
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise ValueError(f"${ENV_INTERVAL}={raw!r}: expected a number of seconds >= 0 (0 = a line at every step)")
    return seconds


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLog:
    """Plain progress lines: ``LABEL: UNIT done/total (pct%), PARTS..., RATE, elapsed H:MM:SS, ETA H:MM:SS``.

    Args:
        label: what runs (``"pretrain"``, ``"eval mqar"``).
        total: the last value of ``done`` (None: no percentage, no ETA).
        start: ``done`` at the start (a resumed run's step): the ETA uses the pace since then.
        amount_start: ``amount`` at the start (a resumed run's tokens seen).
        interval: seconds between lines (None: :func:`progress_interval`); the first update after it has
            passed logs, and so does reaching ``total``.
        unit: the word before the count (``"step"``, ``"batch"``).
        rate_unit: name of the throughput of ``amount`` (``"tokens/s"``); None: no throughput.
        logger: where the lines go (default this module's logger).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        total: Optional[int],
        *,
        start: int = 0,
        amount_start: float = 0.0,
        interval: Optional[float] = None,
        unit: str = "step",
        rate_unit: Optional[str] = "tokens/s",
        logger: Optional[logging.Logger] = None,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.start, self.unit, self.rate_unit = label, total, start, unit, rate_unit
        self.interval = progress_interval(interval)
        self.logger = logger or _log
        self.level = level
        self.clock = clock
        self.t0 = self.t_last = clock()
        self.amount_last = float(amount_start)
        self.lines = 0

    def update(self, done: int, *parts: str, amount: Optional[float] = None, force: bool = False) -> Optional[str]:
        """Report ``done`` (with extra ``parts`` such as ``"loss 2.3171"`` and the cumulative ``amount`` behind
        the rate, e.g. tokens seen); logs and returns the line when it is due, else returns None."""
        now = self.clock()
        finished = self.total is not None and done >= self.total
        if not (force or finished or now - self.t_last >= self.interval):
            return None
        elapsed = now - self.t0
        count = f"{self.unit} {done}/{self.total}" if self.total is not None else f"{self.unit} {done}"
        if self.total:
            count += f" ({100.0 * done / self.total:.0f}%)"
        fields = [count, *parts]
        if self.rate_unit is not None and amount is not None:
            window = now - self.t_last
            rate = (amount - self.amount_last) / window if window > 0 else float("nan")
            fields.append(f"{rate:,.0f} {self.rate_unit}" if math.isfinite(rate) else f"- {self.rate_unit}")
            self.amount_last = amount
        fields.append(f"elapsed {format_duration(elapsed)}")
        if self.total is not None:
            fields.append(f"ETA {format_duration(self.eta(done, elapsed))}")
        line = f"{self.label}: " + ", ".join(fields)
        self.t_last = now
        self.lines += 1
        self.logger.log(self.level, "%s", line)
        return line

    def eta(self, done: int, elapsed: float) -> float:
        """Seconds left at the pace since ``start`` (inf before the first unit of progress)."""
        if self.total is None:
            return float("nan")
        if done >= self.total:
            return 0.0
        progressed = done - self.start
        return (self.total - done) * elapsed / progressed if progressed > 0 else float("inf")


# ------------------------------------------------------------------------------------------------- logging
def stderr_is_terminal() -> bool:
    """Whether stderr (where logs and progress bars go) is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def configure_logging(verbosity: int = 0, rich: Optional[bool] = None) -> logging.Handler:
    """Give the ``wuneng`` loggers one handler to stderr (replacing the one an earlier call installed).

    verbosity: -1 warnings and errors only (``--quiet``), 0 also progress and information (INFO), 1 also
    DEBUG (``--verbose``). rich: a ``rich`` handler (default: when stderr is a terminal); otherwise plain
    ``time level logger: message`` lines, one per record, flushed as they come (and no tqdm bars from
    Hugging Face libraries: ``HF_HUB_DISABLE_PROGRESS_BARS``).
    """
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger("wuneng")
    for h in list(root.handlers):
        if getattr(h, "_wuneng_cli", False):
            root.removeHandler(h)
    use_rich = stderr_is_terminal() if rich is None else rich
    if use_rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        # tqdm bars (transformers' "Loading weights") are carriage-return noise in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    handler._wuneng_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
