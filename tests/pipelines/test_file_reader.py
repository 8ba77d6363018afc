"""Reading files for the GPU worker: both readers agree with the Beam fetch step on every file, bad ones
included; the process reader's ring, its bounds, a reader process that dies, and a consumer that stops early."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

import pipelines.file_reader as file_reader
from benchmarks.common import realistic_jpegs
from encoder import DecodeLimits
from encoder.jpeg import cpu_reason
from pipelines.catalog import CatalogItem
from pipelines.embed_steps import fetch_item
from pipelines.file_reader import ProcessReader, ReadLimits, ThreadReader
from pipelines.records import Failure
from tests.encoder.test_gpu_images import _png

LIMITS = ReadLimits(max_bytes=200_000, max_pixels=100_000_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """JPEGs, a PNG, a cut-off JPEG, an oversized file, an empty file, a directory and a missing path."""
    folder = tmp_path_factory.mktemp("reader")
    jpegs = [str(p) for p in realistic_jpegs(folder / "jpegs", 23, width=160)]
    odd = {"shot.png": _png(1), "cut.jpg": open(jpegs[0], "rb").read()[:600], "huge.jpg": os.urandom(300_000),
           "empty.jpg": b""}  # fmt: skip
    for name, data in odd.items():
        (folder / name).write_bytes(data)
    (folder / "a-directory").mkdir()
    others = [str(folder / name) for name in [*odd, "a-directory", "missing.jpg"]]
    return jpegs[:9] + others[:3] + jpegs[9:] + others[3:]


def _expected(path: str) -> tuple:
    """What a reader must say about one file, worked out here the plain way (and as the Beam fetch step does)."""
    fetched = fetch_item(CatalogItem("x", path), DecodeLimits(max_bytes=LIMITS.max_bytes))
    if isinstance(fetched, Failure):
        return (fetched.stage, fetched.error)
    data = open(path, "rb").read()
    return (hashlib.sha256(data).hexdigest(), data, cpu_reason(data, LIMITS.max_bytes, LIMITS.max_pixels))


def _outcomes(reader, paths: list[str], batch_size: int) -> list[list[tuple]]:
    """Per batch, per file in input order: (digest, bytes, reason) or (stage, reason prefix)."""
    batches = []
    for batch in reader.read(paths, batch_size):
        got = {path: (digest, bytes(data), reason)
               for (path, digest), data, reason in zip(batch.keys, batch.datas, batch.reasons, strict=True)}  # fmt: skip
        for path, stage, reason in batch.failed:
            got[path] = (stage, reason)
        assert [key[0] for key in batch.keys] == [p for p in paths if p in dict(batch.keys)]  # input order
        batches.append([got[p] for p in sorted(got, key=paths.index)])
    return batches


@pytest.mark.parametrize("make", [ThreadReader, ProcessReader], ids=["threads", "processes"])
def test_every_file_is_read_hashed_and_routed_or_dead_lettered_in_order(corpus, make):
    with make(LIMITS, 3, chunk=4) as reader:
        batches = _outcomes(reader, corpus, batch_size=10)
    assert [len(b) for b in batches] == [10, 10, 9]  # 23 photos + 6 odd paths; nothing lost, nothing twice
    flat = [outcome for batch in batches for outcome in batch]
    assert flat == [_expected(p) for p in corpus]
    reasons = {os.path.basename(p): o[-1] for p, o in zip(corpus, flat, strict=True)}
    assert reasons["shot.png"] == "not a JPEG" and reasons["cut.jpg"] and reasons["empty.jpg"] == "not a JPEG"
    assert "max_bytes=200000" in reasons["huge.jpg"] and reasons["missing.jpg"] == "not found"


@pytest.mark.parametrize("make", [ThreadReader, ProcessReader], ids=["threads", "processes"])
def test_progressive_jpegs_are_routed_as_the_gpu_decoder_needs(tmp_path, make, caplog):
    """Also: reader processes get every `ReadLimits` field (one they could not parse would die, and their files
    would be read in this process instead, with a warning)."""
    from PIL import Image

    from encoder.jpeg import PROGRESSIVE_ON_CPU

    baseline = str(realistic_jpegs(tmp_path, 1, width=96)[0])
    progressive = str(tmp_path / "progressive.jpg")
    Image.open(baseline).save(progressive, "JPEG", progressive=True)
    for takes_them, expected in ((True, None), (False, PROGRESSIVE_ON_CPU)):
        with make(ReadLimits(LIMITS.max_bytes, LIMITS.max_pixels, progressive=takes_them), 1) as reader:
            (batch,) = reader.read([baseline, progressive], 2)
        assert batch.reasons == [None, expected]
    assert not [r for r in caplog.records if "stopped" in r.getMessage()]


def test_files_that_do_not_fit_their_slot_travel_in_the_reply(corpus):
    jpegs = [p for p in corpus if "/jpegs/" in p]
    with ProcessReader(LIMITS, 2, chunk=4, slot_bytes=20_000, slots=8) as reader:  # ~1-2 photos per slot
        batches = list(reader.read(jpegs, 8))
        kinds = {type(d) for b in batches for d in b.datas}
        got = [(digest, bytes(d)) for b in batches for (_, digest), d in zip(b.keys, b.datas, strict=True)]
    assert kinds == {np.ndarray, bytes}
    assert got == [_expected(p)[:2] for p in jpegs]


def test_a_batch_needing_more_slots_than_the_ring_has_is_refused(corpus):
    with ProcessReader(LIMITS, 1, chunk=2, slots=3) as reader, pytest.raises(ValueError, match="needs 4 slots"):
        next(reader.read(corpus, 8))


def test_reading_ahead_stops_at_the_ring_and_resumes_as_batches_are_dropped(corpus):
    jpegs = [p for p in corpus if "/jpegs/" in p][:20]
    with ProcessReader(LIMITS, 2, chunk=2, slots=4) as reader:  # two batches of 4 files in the ring
        stream = reader.read(jpegs, 4)
        held = [next(stream), next(stream)]
        assert reader._free.empty()  # both batches hold their slots: nothing more is read
        contents = [bytes(d) for b in held for d in b.datas]
        data = held[1].datas[0]
        del held  # the first batch's two slots come back, and the second's, but for the one `data` lies in
        assert reader._free.qsize() == 3
        del data
        assert reader._free.qsize() == 4
        rest = [bytes(d) for batch in stream for d in batch.datas]
    assert contents + rest == [_expected(p)[1] for p in jpegs]


def test_a_batch_due_while_the_caller_holds_every_slot_comes_without_the_ring(corpus):
    """Slots the caller itself keeps would never come back while it waits for its next batch: that batch's
    chunks wait `SLOT_WAIT_S` for one, then their bytes come in the reply."""

    jpegs = [p for p in corpus if "/jpegs/" in p][:16]
    with ProcessReader(LIMITS, 2, chunk=2, slots=4) as reader:
        stream = reader.read(jpegs, 4)
        held = [next(stream), next(stream)]  # every slot
        got: dict = {}
        waiting = threading.Thread(target=lambda: got.update(third=next(stream)), daemon=True)
        waiting.start()
        waiting.join(timeout=10)
        if waiting.is_alive():  # stuck: closing the reader ends the wait
            reader.close()
            waiting.join(timeout=10)
        assert "third" in got, "the read waited for slots only its caller could free"
        third = got["third"]
        assert all(type(d) is bytes for d in third.datas) and reader._free.empty()
        del held
        fourth = next(stream)  # slots free again: over the ring once more
        assert all(isinstance(d, np.ndarray) for d in fourth.datas)
        rest = [bytes(d) for d in fourth.datas]
        del fourth
        assert next(stream, None) is None and reader._free.qsize() == 4
    assert [bytes(d) for d in third.datas] + rest == [_expected(p)[1] for p in jpegs[8:]]


def _replies_waiting(reader: ProcessReader, timeout_s: float = 10.0) -> bool:
    """Whether every reader process with tasks has answered (a reply waiting to be received) within `timeout_s`."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(wait([w.replies], timeout=0) for w in reader._workers if w.pending):
            return True
        time.sleep(0.02)
    return False


def test_a_started_read_is_read_while_the_caller_waits_for_nothing(corpus):
    """`start` sends the chunks and returns; the reader processes read them meanwhile, and the result is every file
    in order, bad ones included, as `read` gives them."""
    with ProcessReader(LIMITS, 2, chunk=4, slots=12) as reader:
        pending = reader.start(corpus, keys=[f"k{i}" for i in range(len(corpus))])
        assert sum(len(w.pending) for w in reader._workers) == 8  # 29 files in chunks of 4: all sent
        assert _replies_waiting(reader)  # ...and read, with no call from here
        batch = pending.result()
        # the batch holds the slots its bytes lie in: 7 (the last chunk is one missing file)
        assert reader._free.qsize() == 5 and not reader._results
        got = {key: (digest, bytes(data), reason)
               for (key, digest), data, reason in zip(batch.keys, batch.datas, batch.reasons, strict=True)}  # fmt: skip
        got |= {key: (stage, reason) for key, stage, reason in batch.failed}
        assert [got[f"k{i}"] for i in range(len(corpus))] == [_expected(p) for p in corpus]
        with pytest.raises(RuntimeError, match="taken"):
            pending.result()
        del batch
        assert reader._free.qsize() == 12


def test_a_started_read_waits_for_no_slot_and_sends_the_rest_when_taken(corpus):
    """With the ring full, `start` sends nothing rather than wait; taking the result sends the chunks as a read
    does: without the ring, once they have waited a little for a slot."""
    jpegs = [p for p in corpus if "/jpegs/" in p][:12]
    with ProcessReader(LIMITS, 2, chunk=2, slots=4) as reader:
        stream = reader.read(jpegs, 4)
        held = [next(stream), next(stream)]  # every slot
        pending = reader.start(jpegs[8:])
        # nothing sent: a chunk that had waited for a slot would have gone without one, and be pending
        assert not any(w.pending for w in reader._workers)
        batch = pending.result()
        assert all(type(d) is bytes for d in batch.datas)
        assert [bytes(d) for d in batch.datas] == [_expected(p)[1] for p in jpegs[8:]]
        del held
        stream.close()
        assert reader._free.qsize() == 4


def test_a_cancelled_read_frees_its_slots_for_the_next(corpus):
    jpegs = [p for p in corpus if "/jpegs/" in p]
    with ProcessReader(LIMITS, 2, chunk=2, slots=6) as reader:
        pending = reader.start(jpegs[:8])
        assert reader._free.qsize() == 2
        pending.cancel()
        assert reader._free.qsize() == 6 and not reader._results and not any(w.pending for w in reader._workers)
        pending.cancel()  # twice: nothing more to do
        with pytest.raises(RuntimeError, match="cancelled"):
            pending.result()
        assert [o for b in _outcomes(reader, jpegs, 4) for o in b] == [_expected(p) for p in jpegs]


def test_threads_reading_at_once_each_get_their_own_files(corpus):
    """A runner's threads share a worker process's reader: their reads run together, each reply to the read
    that asked, and a ring too small for all of them at once stops none."""
    from concurrent.futures import ThreadPoolExecutor

    files = list(corpus)  # photos, and every kind of bad input
    lists = [files[i:] + files[:i] for i in range(0, 24, 3)]  # 8 reads of every file, each from elsewhere
    together = threading.Barrier(len(lists), timeout=30)

    def read(paths: list[str]) -> list:
        together.wait()
        return [o for batch in _outcomes(reader, paths, batch_size=8) for o in batch]

    pool = ThreadPoolExecutor(len(lists))
    try:
        with ProcessReader(LIMITS, 2, chunk=2, slots=6) as reader:
            got = [future.result(timeout=60) for future in [pool.submit(read, paths) for paths in lists]]
            assert reader._free.qsize() == 6 and not reader._results
    finally:  # a stuck read fails the test: closing the reader ends its wait
        pool.shutdown(wait=False, cancel_futures=True)
    assert got == [[_expected(p) for p in paths] for paths in lists]


def test_keys_name_the_files_in_the_batches(corpus):
    paths = [p for p in corpus if "/jpegs/" in p][:3] + [corpus[-1]]  # three photos, the missing path
    with ProcessReader(LIMITS, 1) as reader:
        (batch,) = list(reader.read(paths, 8, keys=["a", "b", "a", "z"]))  # keys need not be unique
    assert [k for k, _ in batch.keys] == ["a", "b", "a"] and batch.failed == [("z", "fetch", "not found")]


def test_a_reader_process_that_dies_has_its_files_read_here(corpus, caplog):
    jpegs = [p for p in corpus if "/jpegs/" in p]
    with ProcessReader(LIMITS, 2, chunk=2) as reader:
        reader._workers[0].proc.kill()
        reader._workers[0].proc.wait()
        with caplog.at_level(logging.WARNING, logger="pipelines.file_reader"):
            batches = _outcomes(reader, jpegs, batch_size=6)
    assert [o for b in batches for o in b] == [_expected(p) for p in jpegs]
    assert "read-0 stopped" in caplog.text


def test_a_consumer_that_stops_early_leaves_the_reader_ready_for_the_next_read(corpus):
    jpegs = [p for p in corpus if "/jpegs/" in p]
    with ProcessReader(LIMITS, 2, chunk=2, slots=6) as reader:
        stream = reader.read(jpegs, 4)
        next(stream)
        stream.close()  # chunks still in flight land before their slots are reused
        assert reader._free.qsize() == 6
        assert [o for b in _outcomes(reader, jpegs, 4) for o in b] == [_expected(p) for p in jpegs]


def test_closing_stops_the_reader_processes_without_waiting_for_their_exit(corpus, monkeypatch):
    """The processes are told to stop and reaped in a thread of their own (not a daemon: exit waits for it); one
    that will not stop within a second is killed there."""

    reader = ProcessReader(LIMITS, 2)
    workers = list(reader._workers)
    os.kill(workers[1].proc.pid, signal.SIGSTOP)  # a process that will not stop of itself
    before, start = set(threading.enumerate()), time.monotonic()
    reader.close()
    assert time.monotonic() - start < 0.5  # its end is not waited for here
    (reaper,) = [t for t in threading.enumerate() if t.name == "reader-reap" and t not in before]
    assert not reaper.daemon
    reaper.join(5)
    assert not reaper.is_alive() and all(w.proc.poll() is not None for w in workers)
    assert workers[1].proc.returncode == -signal.SIGKILL and workers[0].proc.returncode == 0
    assert all(w.tasks.closed and w.replies.closed for w in workers)
    with pytest.raises(RuntimeError, match="closed"):
        next(reader.read(corpus, 4))


def test_a_close_asked_to_wait_reaps_the_processes_itself():
    """As at interpreter exit (`atexit`), where no thread started after Python joined its threads would be waited for."""
    reader = ProcessReader(LIMITS, 2)
    workers = list(reader._workers)
    reader.close(wait=True)
    assert all(w.proc.poll() is not None and w.tasks.closed and w.ready_fd == -1 for w in workers)


def _unstarted_reader(processes: int, **kwargs) -> ProcessReader:
    """A reader whose processes are stopped (SIGSTOP) before they could say they started: made again until the stop
    comes first (an interpreter's start takes ~0.1 s; this a few ms)."""
    for _ in range(5):
        reader = ProcessReader(LIMITS, processes, **kwargs)
        for worker in reader._workers:
            os.kill(worker.proc.pid, signal.SIGSTOP)
        with reader._lock:
            if not reader._started(reader._workers):
                return reader
        _resume(reader)
        reader.close()
    raise AssertionError("the reader processes started before they could be stopped, five times")


def _resume(reader: ProcessReader) -> None:
    for worker in reader._workers:
        os.kill(worker.proc.pid, signal.SIGCONT)


def test_until_a_reader_process_starts_the_batch_due_is_read_here_and_the_rest_there(corpus, monkeypatch):
    """A run's first batch waited for eight interpreters to start and import the reader; it is read here meanwhile
    (its slots, bytes and outcomes as the processes' would be), the batches after it go to the processes."""
    jpegs = [p for p in corpus if "/jpegs/" in p][:16]
    here, read_chunk = [], file_reader.read_chunk
    monkeypatch.setattr(file_reader, "read_chunk", lambda paths, *a: here.append(list(paths)) or read_chunk(paths, *a))
    reader = _unstarted_reader(2, chunk=4, slots=8)
    unstuck = threading.Timer(5, _resume, [reader])  # were the batch sent to the stopped processes, it would wait
    try:
        batches = reader.read(jpegs, 8)
        unstuck.start()
        first = next(batches)  # read here while the processes are stopped
        unstuck.cancel()
        assert here == [jpegs[0:4], jpegs[4:8]] and [k[0] for k in first.keys] == jpegs[:8]
        assert [bytes(d) for d in first.datas] == [_expected(p)[1] for p in jpegs[:8]]
        assert all(d.base is not None for d in first.datas)  # over the ring's slots, as the processes place them
        del first
        _resume(reader)
        second = next(batches)
        assert here == [jpegs[0:4], jpegs[4:8]]  # the processes read the second batch
        assert [bytes(d) for d in second.datas] == [_expected(p)[1] for p in jpegs[8:16]]
        del second
        assert next(batches, None) is None
        assert [o for b in _outcomes(reader, jpegs, 8) for o in b] == [_expected(p) for p in jpegs]
        assert len(here) == 2  # started now: nothing more read here
    finally:
        unstuck.cancel()
        _resume(reader)
        reader.close()


def test_object_store_chunks_and_chunks_read_ahead_go_to_the_processes_even_before_they_start():
    """Object-store reads in turn here would take a round trip each; chunks not yet due can wait for the processes."""
    reader = _unstarted_reader(1)
    try:
        with reader._lock:
            assert not reader._started(reader._workers)
        due_here = reader._send(None, ["/nowhere/a.jpg"], due=True)
        ahead = reader._send(None, ["/nowhere/b.jpg"])
        remote = reader._send(None, ["gs://bucket/c.jpg", "/nowhere/d.jpg"], due=True)
        assert list(reader._local) == [due_here]
        assert list(reader._workers[0].pending) == [ahead, remote]
    finally:
        reader.close()  # the stopped process is killed by the reaper, its chunks never read


def _ring_address(reader: ProcessReader) -> int:
    ring = np.frombuffer(reader._ring, dtype=np.uint8)
    return ring.ctypes.data


def test_the_ring_is_page_locked_in_pieces_of_whole_slots_and_unlocked_on_close(corpus, monkeypatch):
    """`page_lock` gets the ring a piece at a time, in order, each piece whole slots (no file's bytes cross two
    pieces); reads are the same; closing unlocks every piece, once, the last first."""
    jpegs = [p for p in corpus if "/jpegs/" in p]
    calls = []

    def lock(address: int, size: int):
        calls.append(("lock", address, size))
        return lambda: calls.append(("unlock", address))

    monkeypatch.setattr(file_reader, "PAGE_LOCK_PIECE", 3 * (4 << 20) + 1)  # 3 slots of the default 4 MiB
    reader = ProcessReader(LIMITS, 2, chunk=4, slots=8, page_lock=lock)
    at, slot = _ring_address(reader), reader.slot_bytes
    assert reader.page_locked and reader.page_lock_completed and reader.page_lock_problem is None
    assert calls == [("lock", at, 3 * slot), ("lock", at + 3 * slot, 3 * slot), ("lock", at + 6 * slot, 2 * slot)]
    assert 0 <= reader.page_lock_longest_s <= reader.page_lock_s
    assert [o for b in _outcomes(reader, jpegs, 8) for o in b] == [_expected(p) for p in jpegs]
    reader.close()
    closed_s = reader.close_s
    reader.close()
    assert calls[3:] == [("unlock", at + 6 * slot), ("unlock", at + 3 * slot), ("unlock", at)]
    assert not reader.page_locked and reader.page_lock_completed  # unlocked now; it was locked whole
    # what the run's end waited for: the first close's, the unlocks a part of it
    assert reader.close_s == closed_s and 0 <= reader.page_unlock_s <= reader.close_s


def test_reads_do_not_wait_for_the_ring_to_be_page_locked(corpus):
    """Locking a large ring faults in and locks every page: it runs beside the reads."""

    jpegs = [p for p in corpus if "/jpegs/" in p]
    go, calls = threading.Event(), []

    def slow(address: int, size: int):
        go.wait(10)
        calls.append("lock")
        return lambda: calls.append("unlock")

    reader = ProcessReader(LIMITS, 2, chunk=4, slots=8, page_lock=slow)
    made = time.monotonic()
    assert [o for b in _outcomes(reader, jpegs, 8) for o in b] == [_expected(p) for p in jpegs]
    assert calls == [] and reader.page_lock_s is None  # read while the lock was still under way
    waited = time.monotonic() - made
    go.set()
    assert reader.page_locked
    reader.close()
    assert calls == ["lock", "unlock"]
    assert waited <= reader.page_lock_s < waited + 5  # how long the lock took, for the benchmarks


def test_closing_stops_the_lock_after_the_piece_under_way_and_unlocks_what_it_locked(corpus, monkeypatch):
    """A run shorter than the ring's lock does not wait for the rest of it."""

    calls, held, made = [], {}, threading.Event()

    def lock(address: int, size: int):
        calls.append("lock")
        if len(calls) == 2:  # the second piece is under way when the reader closes
            made.wait(10)
            held["reader"]._closed.wait(10)
        return lambda: calls.append("unlock")

    monkeypatch.setattr(file_reader, "PAGE_LOCK_PIECE", 4 << 20)  # a slot a piece
    reader = held["reader"] = ProcessReader(LIMITS, 2, chunk=4, slots=8, page_lock=lock)
    made.set()
    while len(calls) < 2:
        time.sleep(0.01)
    start = time.monotonic()
    reader.close()
    assert time.monotonic() - start < 3
    assert calls == ["lock", "lock", "unlock", "unlock"]  # the 6 pieces after were never locked
    assert not reader.page_locked and not reader.page_lock_completed and reader.page_lock_problem is None
    assert reader.page_lock_s is not None


def test_a_ring_that_cannot_be_page_locked_is_read_as_it_is_with_a_warning(corpus, caplog, monkeypatch):
    """A piece refused: the pieces locked before it are unlocked, and the ring is read pageable."""
    jpegs = [p for p in corpus if "/jpegs/" in p]
    calls = []

    def refuse_the_second(address: int, size: int):
        if calls:
            raise RuntimeError("cuMemHostRegister failed: CUDA_ERROR_OUT_OF_MEMORY")
        calls.append("lock")
        return lambda: calls.append("unlock")

    monkeypatch.setattr(file_reader, "PAGE_LOCK_PIECE", 4 * (4 << 20))
    with caplog.at_level(logging.WARNING), ProcessReader(LIMITS, 2, chunk=4, slots=8,
                                                         page_lock=refuse_the_second) as reader:  # fmt: skip
        assert not reader.page_locked and calls == ["lock", "unlock"]
        assert reader.page_lock_problem == "cuMemHostRegister failed: CUDA_ERROR_OUT_OF_MEMORY"
        assert [o for b in _outcomes(reader, jpegs, 8) for o in b] == [_expected(p) for p in jpegs]
    assert calls == ["lock", "unlock"]
    assert "could not page-lock the file readers' ring (cuMemHostRegister failed" in caplog.text


def _unmapped_in(reader: ProcessReader) -> list[int]:
    """The thread the reader's ring will be unmapped in, once it is."""
    import weakref

    where: list[int] = []
    weakref.finalize(reader._ring, lambda: where.append(threading.get_ident()))
    return where


def _wait_for(seen: list, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_readers_ring_is_unmapped_in_a_thread_of_its_own(corpus):
    """Freeing a resident ring's pages takes a tenth of a second or more: not in the thread that lets the reader go
    (a run's end)."""

    jpegs = [p for p in corpus if "/jpegs/" in p]
    reader = ProcessReader(LIMITS, 2, chunk=4, slots=8)
    assert [o for b in _outcomes(reader, jpegs[:4], 4) for o in b] == [_expected(p) for p in jpegs[:4]]
    unmapped_in = _unmapped_in(reader)
    reader.close()
    del reader
    _wait_for(unmapped_in)
    assert unmapped_in and unmapped_in[0] != threading.get_ident()


def test_an_array_over_the_ring_keeps_it_mapped_after_its_reader_is_gone(corpus):
    jpegs = [p for p in corpus if "/jpegs/" in p]
    reader = ProcessReader(LIMITS, 2, chunk=4, slots=8)
    batch = next(reader.read(jpegs[:4], 4))
    kept = batch.datas[0]
    unmapped_in = _unmapped_in(reader)
    reader.close()
    del reader, batch
    time.sleep(0.2)
    assert unmapped_in == [] and hashlib.sha256(kept).hexdigest() == _expected(jpegs[0])[0]
    del kept
    _wait_for(unmapped_in)
    assert unmapped_in


def test_reader_processes_start_without_numpy_torch_or_beam():
    """Each reader process pays its imports at every `ProcessReader`: numpy alone cost a 10,000-photo run on
    two cores a quarter of its speed."""
    import subprocess
    import sys

    code = "import sys, pipelines.file_reader; print(sorted({'numpy', 'torch', 'apache_beam'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_chunks_object_store_reads_are_in_flight_together(monkeypatch):
    """A read from gs:// waits on the network (~10-50 ms): a chunk's reads go out at once, in input order back."""

    import pipelines.file_reader as file_reader

    together = threading.Barrier(6, timeout=10)

    def read_image(path: str, max_bytes: int) -> bytes:
        together.wait()  # passes only once all six reads are in flight
        return path.encode()

    monkeypatch.setattr(file_reader, "read_image", read_image)
    paths = [f"gs://b/{i}.jpg" for i in range(6)]
    records = file_reader.read_chunk(paths, ReadLimits(max_bytes=1000, max_pixels=10**8, route=False))
    assert [(data, n) for _, _, data, n in records] == [(p.encode(), len(p)) for p in paths]


@pytest.mark.gcs
def test_reader_processes_read_gs_objects_as_the_beam_fetch_step_does(corpus, gcs_emulator, gcs_bucket, caplog):
    from encoder import storage

    uris = []
    for path in corpus:
        uri = f"gs://{gcs_bucket}/{os.path.basename(path)}"
        if os.path.isfile(path):
            storage.write_bytes(uri, open(path, "rb").read())
        uris.append(uri)  # the directory and the missing file: no such object

    def expected(uri: str) -> tuple:
        fetched = fetch_item(CatalogItem("x", uri), DecodeLimits(max_bytes=LIMITS.max_bytes))
        if isinstance(fetched, Failure):
            return (fetched.stage, fetched.error)
        data = storage.read_bytes(uri)
        return (hashlib.sha256(data).hexdigest(), data, cpu_reason(data, LIMITS.max_bytes, LIMITS.max_pixels))

    with caplog.at_level(logging.WARNING, logger="pipelines.file_reader"), ProcessReader(LIMITS, 2, chunk=4) as reader:
        flat = [outcome for batch in _outcomes(reader, uris, batch_size=10) for outcome in batch]
    assert flat == [expected(uri) for uri in uris]
    assert sum(len(o) == 3 for o in flat) == 26 and not caplog.records  # read in the reader processes, none lost


@pytest.mark.gcs
def test_reader_processes_keep_several_chunks_of_object_store_reads_in_flight(gcs_emulator, gcs_bucket):
    """Reads from gs:// wait on the network, so a reader process has several chunks of them under way: 2
    processes and chunks of 4 had at most 8 reads out at once, one chunk each; here 48 objects, each
    held 0.3 s by a proxy, are out at once (2 processes × up to 8 chunks × 4 reads)."""
    from urllib.parse import urlparse

    from encoder import storage
    from pipelines.file_reader import CHUNKS_PER_PROCESS
    from tests.support.fault_proxy import FaultProxy, through

    uris = [f"gs://{gcs_bucket}/{i}.bin" for i in range(48)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * (100 + i))
    limits = ReadLimits(max_bytes=1000, max_pixels=10**8, route=False)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=1.0, kinds=("slow",), slow_s=0.3) as proxy, through(proxy):
        with ProcessReader(limits, 2, chunk=4) as reader:  # started behind the proxy: its processes read through it
            batches = list(reader.read(uris, batch_size=48))
    assert [len(data) for batch in batches for data in batch.datas] == [100 + i for i in range(48)]
    assert 2 * 4 < proxy.most_in_flight <= 2 * CHUNKS_PER_PROCESS * 4


@pytest.mark.gcs
def test_a_reader_process_answers_a_straggling_read_with_a_second_request(gcs_emulator, gcs_bucket):
    """Once a reader process has seen enough reads land to know their latency, a read still out well past it gets
    a second request, and the chunk goes on with that request's bytes: here two objects whose first request the
    proxy holds 30 s arrive in seconds. Without hedging, the same read waits the 30 s out."""
    from urllib.parse import urlparse

    from encoder import storage
    from pipelines.hedged_reads import MIN_SAMPLES
    from tests.support.fault_proxy import FaultProxy, through

    class FirstRequestHeld(FaultProxy):
        def fate(self, method: str, path: str = "") -> str:
            first = "straggler" in path and not any(path == seen for _, seen in self.seen)
            super().fate(method, path)  # counted and recorded
            return "slow" if first else "pass"

    warm = [f"gs://{gcs_bucket}/warm{i}.bin" for i in range(MIN_SAMPLES)]
    stragglers = [f"gs://{gcs_bucket}/straggler{i}.bin" for i in range(2)]
    for uri in warm + stragglers:
        storage.write_bytes(uri, uri.encode())
    limits = ReadLimits(max_bytes=1000, max_pixels=10**8, route=False)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FirstRequestHeld(upstream, rate=0.0, slow_s=30) as proxy, through(proxy):
        with ProcessReader(limits, 1, chunk=8) as reader:
            assert sum(len(b.keys) for b in reader.read(warm, batch_size=64)) == MIN_SAMPLES  # latencies to hedge at
            start = time.monotonic()
            batches = list(reader.read([warm[0], *stragglers, warm[1]], batch_size=4))
            took = time.monotonic() - start
            counts = reader.object_read_stats()  # as the reader process's replies carry them
    assert [bytes(data) for batch in batches for data in batch.datas] == [
        uri.encode() for uri in [warm[0], *stragglers, warm[1]]
    ]
    assert took < 15
    assert sum("straggler" in path for _, path in proxy.seen) == 4  # a first and a second request each
    # The stragglers' two second requests at least (one of the two warm reads may pass the percentile too).
    assert counts.reads == MIN_SAMPLES + 4 and counts.hedged >= 2 and counts.won >= 2
