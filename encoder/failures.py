"""Isolating what fails in a batch: which errors stop a run, a call's dead-letter reason, retries in halves,
warnings that a failing condition would otherwise repeat every batch (`encoder.throttled`), and the smaller
pieces batches run in once the batch size stops fitting. The GPU image path and the model's step
(`encoder.gpu_images`, `encoder.gpu_stream`, `encoder.model`) share them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from encoder.storage import describe_error
from encoder.throttled import Throttled

__all__ = ["MemoryBackoff", "Throttled", "attempt", "device_failed", "in_halves", "learning", "out_of_memory"]

log = logging.getLogger(__name__)

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


_OUT_OF_MEMORY = ("OutOfMemoryError", "MemoryError", "out of memory", "not enough memory")


def out_of_memory(reason: str) -> bool:
    """Whether a dead-letter reason (`attempt`) says the device ran out of memory: torch's `OutOfMemoryError`, an
    older "CUDA out of memory" RuntimeError, or the host's allocator failing."""
    return any(sign in reason for sign in _OUT_OF_MEMORY)


def learning(backoff: MemoryBackoff | None, fn: Callable[[Sequence], T]) -> Callable[[Sequence], T]:
    """`fn`, with `backoff` (if any) told of each call that fails (`MemoryBackoff.failed`, which learns from those
    that ran out of memory)."""

    def learned(part: Sequence) -> T:
        try:
            return fn(part)
        except Exception as err:
            if backoff is not None:
                backoff.failed(len(part), describe_error(err))
            raise

    return learned


class MemoryBackoff:
    """The piece size a run's batches go through in while the batch size does not fit the memory left.

    The batch size is fitted to the GPU's free memory when the model loads (`encoder.model.fit_batch_size`); memory
    can shrink later (another process on the GPU, fragmentation). A batch that then runs out of memory goes through
    in halves (`in_halves`), and each later batch would fail whole first: an exception, the allocator releasing its
    cache, a retry, every batch. Once a batch of n runs out of memory, the next batches go straight to pieces of
    n / 2 (halved again if those run out too), and every `probe_every` such batches one is tried whole again; each
    probe that fails doubles that interval (up to `max_probe_every`), and one that fits ends the backoff.
    `encoder.gpu_stream` keeps one for the model per stream of batches, or per caller that starts one stream after
    another; `encoder.gpu_images.GpuImages` one for its GPU decoder and one for its resize. `stage` names the step in
    the warnings (one a minute at most per backoff).
    """

    def __init__(self, probe_every: int = 16, max_probe_every: int = 1024, stage: str = "the model") -> None:
        if probe_every < 1 or max_probe_every < probe_every:
            raise ValueError(f"need 1 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        self.stage, self._warnings = stage, Throttled(log)
        self._first_probe, self._max_probe = probe_every, max_probe_every
        self.piece: int | None = None  # images per piece while backing off; None: whole batches
        self._probe_every, self._since = probe_every, 0
        self._lock = threading.Lock()

    @property
    def backing_off(self) -> bool:
        return self.piece is not None

    def piece_for(self, size: int) -> int | None:
        """The piece size to run a batch of `size` images in now; None: whole (while backing off, a probe). A batch
        no larger than a piece runs at its own size: padded to the batch size, as a compiled step pads it, it would
        need the memory of a whole one, and probing with it would say nothing about the batch size."""
        with self._lock:
            if self.piece is None:
                return None
            if size <= self.piece:
                return size
            self._since += 1
            if self._since >= self._probe_every:
                self._since = 0
                return None
            return min(self.piece, size)

    def failed(self, size: int, reason: str) -> None:
        """A launch of `size` images failed with `reason`; out of memory, the next batches go in smaller pieces."""
        if not out_of_memory(reason) or size < 2:
            return
        with self._lock:
            if self.piece is not None and size > self.piece:  # a probe: the whole batch still does not fit
                self._probe_every = min(2 * self._probe_every, self._max_probe)
            if self.piece is not None and self.piece <= size // 2:
                return
            self.piece, every = size // 2, self._probe_every
        self._warnings.warning("out of memory at %d images (%s): %s takes the next batches in pieces of %d, and a "
                               "whole batch again every %d", size, reason, self.stage, size // 2, every)  # fmt: skip

    def fitted(self) -> None:
        """A whole batch launched while backing off (a probe) went through: whole batches run again from now on."""
        with self._lock:
            piece, self.piece, self._probe_every, self._since = self.piece, None, self._first_probe, 0
        if piece is not None:
            log.info("a whole batch fits the memory again: %s takes batches whole, no longer in pieces of %d",
                     self.stage, piece)  # fmt: skip
