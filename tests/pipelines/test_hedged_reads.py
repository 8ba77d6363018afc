"""Hedged object-store reads: a straggler's second request wins, within a budget, and neither request's failure
hides the other's bytes."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.hedged_reads import HedgedReads


class Store:
    """Stands in for an object store: reads answer at once, except a path's `held` requests (by their number: 1 is
    its first), which wait until released, and `gs://b/odd`'s requests in `fail`, which fail (reason, after how
    long)."""

    def __init__(self, held: dict[str, set[int]] | None = None,
                 fail: dict[int, tuple[str, float]] | None = None) -> None:  # fmt: skip
        self.held, self.fail = dict(held or {}), dict(fail or {})
        self.requests: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def read(self, path: str, max_bytes: int) -> bytes | str:
        with self._lock:
            self.requests.append(path)
            nth = sum(p == path for p in self.requests)
            failure = self.fail.get(nth) if path == "gs://b/odd" else None
        if failure is not None:
            time.sleep(failure[1])
            return failure[0]
        if nth in self.held.get(path, ()):
            assert self.release.wait(30), "a held request was never released"
        return path.encode()[:max_bytes]


def warmed(store: Store, burst: float = 4.0, threads: int = 8) -> HedgedReads:
    """Reads whose delay is known: 16 fast reads landed, the budget at its burst."""
    reads = HedgedReads(store.read, threads, min_samples=16, budget=1.0, burst=burst, min_delay_s=0.3)
    assert reads.delay_s() is None
    reads.map([f"gs://b/warm{i}" for i in range(16)], 100)
    assert reads.delay_s() == 0.3  # the reads took microseconds: the floor (well past a busy machine's scheduling)
    store.requests.clear()
    return reads


@pytest.fixture
def store():
    store = Store(held={"gs://b/straggler": {1}})
    yield store
    store.release.set()


def test_a_straggler_is_answered_by_its_second_request(store):
    reads = warmed(store)
    start = time.monotonic()
    got = reads.map(["gs://b/a", "gs://b/straggler", "gs://b/c"], 100)
    assert time.monotonic() - start < 10  # the first request is held for good
    assert got == [b"gs://b/a", b"gs://b/straggler", b"gs://b/c"]  # in order, the straggler's bytes from its second
    assert store.requests.count("gs://b/straggler") == 2 and len(store.requests) == 4
    assert (reads.stats.hedged, reads.stats.won) == (1, 1)


def test_no_second_request_before_enough_reads_have_landed_nor_when_asked_not_to(store):
    reads = HedgedReads(store.read, 8, min_samples=16)
    pending = threading.Thread(target=lambda: reads.map(["gs://b/straggler"], 100))
    pending.start()
    time.sleep(0.3)
    assert store.requests == ["gs://b/straggler"]  # no latencies yet to hedge at
    store.release.set()
    pending.join(10)

    store = Store(held={"gs://b/straggler": {1}})
    reads = warmed(store)
    pending = threading.Thread(target=lambda: reads.map(["gs://b/straggler"], 100, hedge=False))
    pending.start()
    time.sleep(0.3)
    assert store.requests == ["gs://b/straggler"]
    store.release.set()
    pending.join(10)
    assert reads.stats.hedged == 0


def test_a_read_waiting_for_a_thread_is_not_a_straggler():
    """Out past the delay counts from when a read leaves the queue: here the one thread is held by a straggler
    while another read waits its turn well past the delay, and only the straggler gets a second request."""
    store = Store(held={"gs://b/straggler": {1}})
    reads = warmed(store, threads=1)
    release = threading.Timer(1.0, store.release.set)
    release.start()
    try:
        assert reads.map(["gs://b/straggler", "gs://b/queued"], 100) == [b"gs://b/straggler", b"gs://b/queued"]
    finally:
        release.cancel()
        store.release.set()
    assert reads.stats.hedged == 1 and store.requests.count("gs://b/queued") == 1


def test_second_requests_stay_within_the_budget():
    store = Store(held={f"gs://b/s{i}": {1} for i in range(4)})
    reads = warmed(store, burst=2.0)  # two second requests banked, and one more per landed read
    reads.budget = 0.0
    pending = threading.Thread(target=lambda: reads.map([f"gs://b/s{i}" for i in range(4)], 100))
    pending.start()
    deadline = time.monotonic() + 10
    while reads.stats.hedged < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert reads.stats.hedged == 2 and len(store.requests) == 6  # four first requests, two second
    store.release.set()
    pending.join(10)


@pytest.mark.parametrize(
    ("held", "fail", "expected"),
    [({2}, {1: ("ConnectionError: reset", 0.6)}, b"gs://b/odd"),  # the first fails first: the second's bytes
     ({1}, {2: ("NotFound: gone", 0.0)}, b"gs://b/odd"),  # the second fails first: the first's bytes
     (set(), {1: ("first: no", 0.9), 2: ("second: no", 0.0)}, "first: no")],  # both fail: the first's reason
    ids=["first-fails", "second-fails", "both-fail"],
)  # fmt: skip
def test_a_failure_never_hides_bytes_and_the_first_requests_reason_stands(held, fail, expected):
    """The hedging delay is 0.3 s; held requests land at 1.2 s."""
    store = Store(held={"gs://b/odd": held}, fail=fail)
    reads = warmed(store)
    release = threading.Timer(1.2, store.release.set)
    release.start()
    try:
        assert reads.map(["gs://b/odd"], 100) == [expected]
    finally:
        release.cancel()
        store.release.set()
    assert store.requests.count("gs://b/odd") == 2
    assert reads.stats.won == (1 if 1 in fail and isinstance(expected, bytes) else 0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="quantile"):
        HedgedReads(lambda path: b"", 4, quantile=1.0)
    with pytest.raises(ValueError, match="threads"):
        HedgedReads(lambda path: b"", 0)


def test_a_first_request_that_lost_does_not_hold_the_process_at_exit():
    """The first request a second one beat may still be waiting on the network when a run ends: the process exits
    without waiting for it (with a `ThreadPoolExecutor`, it waited the 60 s out)."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import time
from pipelines.hedged_reads import HedgedReads
seen = set()
def read(path, max_bytes):
    if path == "gs://b/slow" and path not in seen:
        seen.add(path)
        time.sleep(60)
    return path.encode()
reads = HedgedReads(read, 4, min_samples=4, min_delay_s=0.05, budget=1.0)
reads.map([f"gs://b/warm{i}" for i in range(4)], 100)
assert reads.map(["gs://b/slow"], 100) == [b"gs://b/slow"] and reads.stats.won == 1
print("read")
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=50)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "read", done.stderr
    assert time.monotonic() - start < 20
