"""A warning that a failing condition would otherwise log on every batch or every retry, held to one per interval."""

from __future__ import annotations

import logging
import math
import threading
import time

__all__ = ["Throttled"]


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
