"""Lines that would otherwise be logged on every batch or every retry, held to one per interval: a failing
condition's warning, and progress where no progress bar is drawn (a log read by an orchestrator)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["ProgressLog", "Throttled", "progress"]


class Throttled:
    """Logs a warning the first time, then at most one every `every_s` seconds, saying how many it held back:
    a condition that fails every batch (a batch size that no longer fits) would otherwise log each one."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._log, self._every_s, self._lock = logger, every_s, threading.Lock()
        self._last, self._held = -math.inf, 0

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._every_s:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        self._log.warning(message + (f" ({held} more since the last such warning)" if held else ""), *args,
                          stacklevel=2)  # fmt: skip


class ProgressLog:
    """Thread-safe counters that log a progress line to `logger` at most every `every_s` seconds."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, every_s: float = 10.0,
                 where: str = "in this worker") -> None:  # fmt: skip
        self._log, self._what, self._total, self._every_s, self._where = logger, what, total, every_s, where
        self._lock = threading.Lock()
        self._count = 0
        self._start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n
            now = time.monotonic()
            if now - self._last < self._every_s:
                return
            self._last = now
            count, elapsed = self._count, now - self._start
        share = f"/{self._total} ({100 * count / self._total:.0f}%)" if self._total else ""
        where = f" {self._where}" if self._where else ""
        self._log.info("%s: %d%s, %.0f/s%s", self._what, count, share, count / max(elapsed, 1e-9), where)


@contextlib.contextmanager
def progress(logger: logging.Logger, what: str, total: int | None = None, unit: str = "it",
             every_s: float = 60.0) -> Iterator[Callable[[int], None]]:  # fmt: skip
    """`add(n)` for work done: a bar on a terminal, elsewhere (an orchestrator's log) a `ProgressLog` line at most
    every `every_s` seconds."""
    from tqdm.auto import tqdm

    with tqdm(desc=what, total=total, unit=unit, disable=not sys.stderr.isatty()) as bar:
        yield ProgressLog(logger, what, total, every_s=every_s, where="").add if bar.disable else bar.update
