"""Log records that dependencies write once per row, counted by the stage instead of printed.

img2dataset's downloader reads each image's EXIF with exifread, which logs the warning
`File format not recognized.` for every PNG, GIF or BMP (formats it has no EXIF reader for;
the row's `exif` is then "{}"). With no handler configured, Python's last-resort handler
prints each record on the worker's stderr: a folder of 3,652 PNGs gave 3,652 such lines.

`counting_row_logs()` wraps one shard's work: records of `ROW_LOGGERS` emitted by that thread
(img2dataset reads EXIF and resizes in the thread that runs the shard, its pool threads only
fetch) are counted by message and not printed, and the stage puts the counts in its shard's
counters (`logs` in `_stats.json`), so the summary shows each message once with its count.
Records from other threads, or outside such a block, pass unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
from collections.abc import Iterator

ROW_LOGGERS = ("exifread",)  # dependency loggers that speak once per row
_NUMBERS = re.compile(r"\d{3,}|0x[0-9a-fA-F]+")  # offsets and sizes make each row's message unique


class _RowLogCounter(logging.Filter):
    """A filter on the row loggers: counts, instead of passing on, the records of threads inside a block."""

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int, collections.Counter] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        counts = self.by_thread.get(threading.get_ident())
        if counts is None:
            return True
        counts[f"{record.name}: {_NUMBERS.sub('<…>', record.getMessage())[:160]}"] += 1
        return False


_COUNTER = _RowLogCounter()
_INSTALL_LOCK = threading.Lock()


def _install() -> None:
    """Put the counting filter on each row logger once per process."""
    with _INSTALL_LOCK:
        for name in ROW_LOGGERS:
            logger = logging.getLogger(name)
            if _COUNTER not in logger.filters:
                logger.addFilter(_COUNTER)


@contextlib.contextmanager
def counting_row_logs() -> Iterator[collections.Counter]:
    """Within the block, this thread's row-logger records are counted in the yielded Counter, not printed."""
    _install()
    counts: collections.Counter = collections.Counter()
    ident = threading.get_ident()
    _COUNTER.by_thread[ident] = counts
    try:
        yield counts
    finally:
        _COUNTER.by_thread.pop(ident, None)
