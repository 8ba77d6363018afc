"""Isolating what fails in a batch: which errors stop a run, a call's dead-letter reason, retries in halves,
and warnings that a failing condition would otherwise repeat every batch. The GPU image path and the model's
step (`encoder.gpu_images`, `encoder.gpu_stream`, `encoder.model`) share them."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from encoder.storage import describe_error

__all__ = ["Throttled", "attempt", "device_failed", "in_halves"]

T = TypeVar("T")

_DEVICE_ERRORS = tuple(t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)


def device_failed(err: BaseException) -> bool:
    """A CUDA error that leaves the device unusable (an illegal address, a device-side assert: every later call
    fails too), unlike one image's failure or running out of memory: the run must stop and be retried, not
    dead-letter the rest of the catalog image by image."""
    return isinstance(err, _DEVICE_ERRORS)


def attempt(fn: Callable[..., T], *args) -> tuple[T | None, str | None]:
    """(fn(*args), None), or (None, the dead-letter reason it failed with). Only the reason is kept: the exception's
    traceback would keep its frames' tensors, and the GPU memory a retry needs, alive. A device failure
    (`device_failed`) is raised."""
    try:
        return fn(*args), None
    except Exception as err:  # noqa: BLE001 - the caller isolates the item(s) that failed
        if device_failed(err):
            raise
        return None, describe_error(err)


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


def in_halves(fn: Callable[[Sequence], T], items: Sequence, reason: str) -> tuple[list[tuple[int, T]], dict[int, str]]:
    """`fn` of each half of `items`, which failed whole with `reason`, then of the halves of each half that fails,
    down to single items: (start, result) for the slices it took, in order, and position → dead-letter reason for
    the items that fail alone (`attempt`). One culprit among n costs ~2 log2 n calls, not n, and a batch too large
    for the memory left goes through in two or four pieces instead of one item at a time."""
    done, failed = [], {}
    split = [(0, len(items), reason)] if len(items) else []  # slices that failed whole
    while split:
        start, stop, why = split.pop()
        if stop - start == 1:
            failed[start] = why
            continue
        middle = (start + stop) // 2
        for first, last in ((start, middle), (middle, stop)):
            result, why = attempt(fn, items[first:last])
            if why is None:
                done.append((first, result))
            else:
                split.append((first, last, why))
    return sorted(done, key=lambda slice_done: slice_done[0]), failed
