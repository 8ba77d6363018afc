"""Object-store reads with a second request for the stragglers ("hedged" requests).

An object store's latency has a long tail: most small reads land in tens of milliseconds, a
few take ten times that. The GPU worker reads a batch of images and embeds it once all of it
has landed, so each batch waits for its slowest read, and with 256 reads per batch almost every
batch has one from the tail. A read still out past the 95th percentile of the recent reads'
latency gets a second, identical request; whichever answers first with the bytes wins, and the
other is left to finish on its thread. Behind a proxy holding each read a lognormal time
(σ 1.0, median 200 ms), this took the GPU worker's fetch step from 119 to 286 images/s at 1.05
requests per image (BENCHMARKS.md, "Reads out to gs:// at once").

Second requests are capped at a tenth of the reads (`BUDGET`, with a small burst), so a store
that slows down for everyone gets ~10% more requests, not twice as many; and none are sent until
`MIN_SAMPLES` reads have given a percentile to hedge at.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

__all__ = ["HedgedReads", "HedgeStats"]

QUANTILE = 0.95  # a read still out past this quantile of recent latencies gets a second request
WINDOW = 512  # recent successful reads whose latencies set that quantile
MIN_SAMPLES = 64  # no second requests before this many reads have landed
BUDGET = 0.1  # second requests per read, at most (plus `BURST`)
BURST = 8.0
MIN_DELAY_S = 0.01  # never sooner: a read that fast is not a straggler, and threads take that long to be scheduled


@dataclass
class HedgeStats:
    reads: int = 0  # first requests
    hedged: int = 0  # second requests sent
    won: int = 0  # second requests whose bytes were used

    def __add__(self, other: HedgeStats) -> HedgeStats:
        return HedgeStats(self.reads + other.reads, self.hedged + other.hedged, self.won + other.won)

    def __sub__(self, other: HedgeStats) -> HedgeStats:
        return HedgeStats(self.reads - other.reads, self.hedged - other.hedged, self.won - other.won)


class HedgedReads:
    """`read(path, *args)` for many paths at once on threads of its own, results in order, with a second request
    for reads still out past the recent `quantile` of latency. A `read` result that is a `str` is a failure
    (a dead-letter reason): a second request's failure never replaces a first request's bytes, nor the other way
    round; when both fail, the first request's reason stands."""

    def __init__(self, read: Callable[..., object], threads: int, *, quantile: float = QUANTILE,
                 window: int = WINDOW, min_samples: int = MIN_SAMPLES, budget: float = BUDGET,
                 burst: float = BURST, min_delay_s: float = MIN_DELAY_S) -> None:  # fmt: skip
        if not 0 < quantile < 1 or min(threads, window, min_samples) < 1 or budget < 0 or burst < 1:
            raise ValueError("need 0 < quantile < 1, threads, window and min_samples >= 1, budget >= 0, burst >= 1")
        self._read, self.quantile, self.min_samples = read, quantile, min_samples
        self.budget, self.burst, self.min_delay_s = budget, burst, min_delay_s
        # More threads than first requests the callers keep out: a second request must not queue behind them, and
        # a first request that lost still holds its thread until it lands.
        self._pool = _DaemonThreads(threads, "fetch")
        self._lock = threading.Lock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self._fresh = 0  # latencies added since the quantile was last computed
        self._delay: float | None = None
        self._tokens = 0.0
        self.stats = HedgeStats()

    def map(self, paths: Sequence[str], *args, hedge: bool = True) -> list:
        """`read(path, *args)` of every path, in order; with `hedge`, a second request for each read still out past
        the hedging delay (if the budget allows)."""
        started: list[float | None] = [None] * len(paths)  # when each first request left its queue
        first = [self._pool.submit(self._timed, path, *args, started=(started, i)) for i, path in enumerate(paths)]
        with self._lock:
            self.stats.reads += len(paths)
            delay = self._delay if hedge else None
        second: dict[int, Future | None] = {}  # None: none sent (the budget was spent)
        if delay is not None and not wait(first, timeout=delay).not_done:  # most chunks: all landed within the delay
            delay = None
        while delay is not None:
            now = time.monotonic()
            # Out past the delay since it left the queue, not since it was queued: a read waiting for a thread
            # is not slow, and a second request would wait behind it.
            for i, f in enumerate(first):
                if i not in second and not f.done() and started[i] is not None and now - started[i] >= delay:
                    second[i] = self._pool.submit(self._timed, paths[i], *args) if self._spend() else None
            waiting = [i for i, f in enumerate(first) if i not in second and not f.done()]
            if not waiting:
                break
            due = [started[i] + delay for i in waiting if started[i] is not None]
            wait([first[i] for i in waiting], timeout=max(0.0, min(due) - now) if due else delay)
        return [self._first_success(f, second[i]) if second.get(i) else f.result() for i, f in enumerate(first)]

    def snapshot(self) -> HedgeStats:
        """The counts so far, as a copy."""
        with self._lock:
            return dataclasses.replace(self.stats)

    def delay_s(self) -> float | None:
        """How long a read may be out before it gets a second request; None until `min_samples` reads landed."""
        with self._lock:
            return self._delay

    def _timed(self, path: str, *args, started: tuple[list, int] | None = None):
        start = time.monotonic()
        if started is not None:
            started[0][started[1]] = start
        result = self._read(path, *args)
        if not isinstance(result, str):
            self._landed(time.monotonic() - start)
        return result

    def _landed(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)
            self._tokens = min(self.burst, self._tokens + self.budget)
            self._fresh += 1
            # Recomputed every few reads, not per read: a sort of the window costs ~50 µs.
            if len(self._latencies) >= self.min_samples and (self._delay is None or self._fresh >= 32):
                ordered = sorted(self._latencies)
                self._delay = max(self.min_delay_s, ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))])
                self._fresh = 0

    def _spend(self) -> bool:
        with self._lock:
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            self.stats.hedged += 1
            return True

    def _first_success(self, first: Future, second: Future):
        done, _ = wait([first, second], return_when=FIRST_COMPLETED)
        winner = first if first in done else second
        if isinstance(winner.result(), str):  # a failure: the other request may still bring the bytes
            other = second if winner is first else first
            if isinstance(other.result(), str):
                return first.result()
            winner = other
        second.cancel()  # the first won: its second request, if still queued, is not sent
        if winner is second:
            with self._lock:
                self.stats.won += 1
        return winner.result()

    def close(self) -> None:
        self._pool.shutdown()


class _DaemonThreads:
    """`size` daemon threads running what is submitted. Not a `ThreadPoolExecutor`: its threads are joined when the
    interpreter exits, so a first request that lost to its second, still waiting on the network (and retrying, up
    to a minute), would hold the end of a run."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(err)

    def shutdown(self) -> None:
        """Cancel what is queued and let the threads end once their current task does."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
