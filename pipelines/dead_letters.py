"""Why items were dead-lettered, in a few lines, and when there are too many for a run to go on.

A dead letter's reason (`records.Failure.error`) often names its item: "12345 bytes exceeds
max_bytes=52428800", "Forbidden: 403 GET gs://bucket/…". Reasons are counted by kind
(`reason_kind`: the words before the first ": ", numbers as N), so a run's summary says
"fetch · Forbidden 20,000" instead of 20,000 different lines.

A run whose dead letters pass `max_share` of its items (`EmbedConfig.max_dead_letters`) is
refused: not marked complete, so nothing indexes or reuses it. Most such runs are one cause,
not many bad images (a bucket the workers may not read, a proxy that refuses every
connection, images moved), and one that retries every read costs minutes per chunk on a GPU
worker paid by the hour: so each worker also stops the run once more than `max_share` of the
last `WINDOW_ITEMS` items it fetched were dead-lettered (`DeadLetterWatch`). The runner passes that stop
on in its own ways (the step's name appended, or a worker's whole traceback as text); the launcher
raises it as one line (`watch_stop`) and keeps the runner from logging it (`quiet_runner_logs`); a Beam worker
process, which prints every failed bundle's traceback to its stderr (the launcher's terminal, on the local
runner), leaves a stop's unprinted (`quiet_worker_prints`: it is still in the worker's log).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterable

__all__ = [
    "MAX_KINDS",
    "OTHER_REASONS",
    "WINDOW_ITEMS",
    "DeadLetterWatch",
    "TooManyDeadLetters",
    "check_share",
    "describe_reasons",
    "quiet_runner_logs",
    "quiet_worker_prints",
    "reason_kind",
    "watch_stop",
]

MAX_KINDS = 32  # reasons a worker counts by name; the rest count as OTHER_REASONS
OTHER_REASONS = "other reasons"
WINDOW_ITEMS = 5_000  # the items a worker's mid-run check looks back over

_HEX = re.compile(r"\b(?=[0-9]*[a-fA-F])[0-9a-fA-F]{8,}\b")  # digests (a letter in them: not a plain number)
_NUMBER = re.compile(r"\d{2,}")  # "0 bytes" says more as it is


class TooManyDeadLetters(RuntimeError):
    """More of a run's items were dead-lettered than it allows; the run is not complete."""


def reason_kind(error: str) -> str:
    """What a dead letter's reason says without the parts that name its item: the words before the first ": " on
    one line, digests as "…", numbers of two digits or more as N, at most 80 characters."""
    head = " ".join(error.split(": ", 1)[0].split()) or "no reason given"  # one line: it names a counter
    return _NUMBER.sub("N", _HEX.sub("…", head))[:80]


def describe_reasons(reasons: Iterable[tuple[str, str, int]], top: int = 3, sep: str = "; ") -> str:
    """`(stage, kind, count)`s, the `top` commonest: "fetch · not found 64; decode · empty file (0 bytes) 2"."""
    ranked = sorted(reasons, key=lambda r: (-r[2], r[0], r[1]))
    shown = [f"{stage} · {kind} {count:,}" for stage, kind, count in ranked[:top]]
    if rest := sum(count for *_, count in ranked[top:]):
        shown.append(f"{rest:,} more, {len(ranked) - top} other kind(s)")
    return sep.join(shown)


def check_share(run_id: str, dead: int, items: int, max_share: float, reasons: Iterable[tuple[str, str, int]],
                failures_dir: str) -> None:  # fmt: skip
    """Refuse a run whose dead letters are more than `max_share` of its `items`.

    Raises:
        TooManyDeadLetters: with the share, the most common reasons and where the dead letters are.
    """
    if items and dead > max_share * items:
        raise TooManyDeadLetters(
            f"run {run_id}: {dead:,} of {items:,} items were dead-lettered ({100 * dead / items:.1f}%, more than "
            f"--max-dead-letters {max_share:g}): {describe_reasons(reasons)}. The run is not marked complete; its "
            f"dead letters, one per item with its reason, are in {failures_dir}"
        )


class DeadLetterWatch:
    """A worker's look at the items it fetched: once more than `max_share` of the last `window` items were
    dead-lettered (and at least `window` were seen), `add` raises `TooManyDeadLetters`. Thread-safe.

    A window rather than the whole run: an outage that begins hours in stops the run within `window` items.
    A window of thousands, not a chunk: a few hundred broken listings in a row do not stop a healthy run.
    """

    def __init__(self, max_share: float, window: int | None = None) -> None:
        self.max_share, self.window = max_share, window or WINDOW_ITEMS
        self._chunks: collections.deque[tuple[int, collections.Counter]] = collections.deque()
        self._items, self._failed = 0, collections.Counter()  # over the chunks in `_chunks`
        self._lock = threading.Lock()

    def add(self, items: int, failures: Iterable[tuple[str, str]]) -> None:
        """A chunk of `items` fetched, with the `(stage, error)` of those dead-lettered; `items` 0 for failures of
        items counted when they were fetched (a GPU worker's decodes, in the embed step after the fetch: they
        leave the window after the chunks fetched before them).

        Raises:
            TooManyDeadLetters: the window is full and more than `max_share` of it failed.
        """
        if self.max_share >= 1:
            return
        failed = collections.Counter((stage, reason_kind(error)) for stage, error in failures)
        with self._lock:
            self._chunks.append((items, failed))
            self._items += items
            self._failed.update(failed)
            while self._chunks and self._items - self._chunks[0][0] >= self.window:
                gone_items, gone_failed = self._chunks.popleft()
                self._items -= gone_items
                self._failed.subtract(gone_failed)
            dead, seen = min(self._failed.total(), self._items), self._items  # late failures: at most all
            if seen < self.window or dead <= self.max_share * seen:
                return
            reasons = [(stage, kind, n) for (stage, kind), n in self._failed.items() if n > 0]
        raise TooManyDeadLetters(
            f"stopped: {dead:,} of the last {seen:,} items a worker fetched were dead-lettered "
            f"({100 * dead / seen:.1f}%, more than --max-dead-letters {self.max_share:g}): "
            f"{describe_reasons(reasons)}. The run is not marked complete. Mend the cause and rerun, or raise "
            f"--max-dead-letters (1 never stops a run)"
        )


# ---------------------------------------------------------------- a worker's stop, as the launcher sees it


_WATCH_STOP = re.compile(r"(?:^|TooManyDeadLetters: )(stopped: .+?)(?= \[while running |\\n|\n|$)")


class _WatchStops(logging.Filter):
    """Drops the runner's log of a worker's `TooManyDeadLetters`, traceback and all: the launcher raises it again
    as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TooManyDeadLetters):
            return False
        return "TooManyDeadLetters: " not in record.getMessage()


class _RunnerNoise(logging.Filter):
    """Drops what local worker processes say at start-up that concerns Beam's own type registry, not a run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No semi_persistent_directory found" not in record.getMessage()


_RUNNER_LOGS = ("apache_beam.runners.common", "apache_beam.runners.portability.local_job_service")


@contextlib.contextmanager
def quiet_runner_logs():
    """While a run runs here: the runner's log of a worker's stop left out (the launcher raises it as one line)."""
    quiet, noise = _WatchStops(), _RunnerNoise()
    for name in _RUNNER_LOGS:
        logging.getLogger(name).addFilter(quiet)
        logging.getLogger(name).addFilter(noise)
    try:
        yield
    finally:
        for name in _RUNNER_LOGS:
            logging.getLogger(name).removeFilter(quiet)
            logging.getLogger(name).removeFilter(noise)


_PRINTED_STOP = f"{TooManyDeadLetters.__module__}.{TooManyDeadLetters.__qualname__}: stopped: "


class _StopsUnprinted:
    """A text stream that passes everything on but a printed traceback of a watch's stop (and the newline
    `print` writes after it)."""

    def __init__(self, stream) -> None:
        self._stream, self._dropped = stream, False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, _PRINTED_STOP in text
        if self._dropped or (dropped and text == "\n"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def quiet_worker_prints() -> None:
    """In a Beam worker process (started by Beam or forked, `pipelines.worker_fork`), from now on: a watch's stop is
    not printed to stderr with its traceback. The worker prints every failed bundle's traceback as well as logging
    it; on the local runner its stderr is the launcher's terminal, where the launcher says why in one line.
    Elsewhere (workers in the launcher's process): nothing changes."""
    from pipelines.worker_plugin import in_sdk_worker

    if in_sdk_worker() and not isinstance(sys.stderr, _StopsUnprinted):
        sys.stderr = _StopsUnprinted(sys.stderr)


def watch_stop(err: Exception) -> str | None:
    """The message of a worker's `TooManyDeadLetters` from a failed run, without what the runner added: the local
    runner raises it again (its step's name added), worker processes and remote runners pass on its traceback."""
    if isinstance(err, TooManyDeadLetters) or "TooManyDeadLetters: " in str(err):
        found = _WATCH_STOP.search(str(err))
        return found.group(1) if found else None
    return None
