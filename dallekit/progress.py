"""Progress for people and for logs: tqdm's bar on a terminal, one plain line every N seconds otherwise.

A batch job (CI, Slurm, `nohup`, a pipe) does not want a bar: tqdm redraws it with carriage
returns, and a log then holds single lines of thousands of updates. When stderr is not a
terminal, `progress` prints `download: 12/40 shards, 0.4 shards/s, eta 1m` every
`DALLEKIT_PROGRESS_SECONDS` seconds (30 by default) and once at the end. Notebooks keep tqdm's
widgets.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_SECONDS = 30.0


def log_interval() -> float:
    """Seconds between two progress lines in a log: DALLEKIT_PROGRESS_SECONDS, or 30."""
    try:
        return max(0.0, float(os.environ.get("DALLEKIT_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
             disable: bool = False, stream: TextIO | None = None) -> Any:
    """A progress bar with tqdm's interface (update, set_postfix, close, iteration): tqdm on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if disable or _in_notebook() or stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream)
    return LineProgress(iterable, total, initial, desc, unit, stream, log_interval())


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class LineProgress:
    """tqdm's interface, printing one newline-terminated line per `interval` seconds and a last one on close."""

    def __init__(self, iterable: Iterable | None, total: int | None, initial: int, desc: str, unit: str, stream: TextIO,
                 interval: float):
        self.iterable, self.desc, self.unit, self.stream, self.interval = iterable, desc, unit, stream, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = initial
        self.start = self.last = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count n more; print a line when the interval has passed."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (loss, PSNR...)."""
        self.postfix = values

    def close(self) -> None:
        """Print the last line (once)."""
        if not self.closed:
            self.closed = True
            self._print(time.monotonic())

    def line(self, now: float) -> str:
        """`desc: n/total units, rate units/s, eta T` and the postfix."""
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}s, {rate:.3g} {self.unit}/s"
        if self.total is not None and self.n < self.total:
            text += f", eta {_duration((self.total - self.n) / rate if rate > 0 else math.inf)}"
        elif self.total is not None:
            text += f", done in {_duration(elapsed)}"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
