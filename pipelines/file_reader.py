"""Image files for the GPU worker: each file's bytes, sha256 and decoder route, read ahead in input order.

The GPU worker's loop is capped by per-image Python under one interpreter lock
(BENCHMARKS.md, "GPU embedding"): on the H200's 16-vCPU host, reading and hashing alone
topped out at 12k files/s on 8 threads, before any decoding. `ProcessReader` moves that
work — open, read, sha256, and the JPEG header that routes a file to the GPU or the CPU
decoder — into processes of its own that write the bytes into one shared ring of memory;
the embedding process receives a few small tuples per chunk of files and 1-D uint8 arrays
over the ring, no copies. `ThreadReader` does the same work in threads of this process: no
start-up and no shared memory, for small runs and as the reference in tests.

Both yield `ReadBatch`es in input order. A file is read as `pipelines.storage.read_image`
reads it, so a file that cannot be read gets the same "fetch" dead letter in every worker.
A ring slot is written again once nothing refers to the arrays over it any more (the
embedding is done and the batch dropped); a reader process that dies (killed, out of
memory) has its pending files read in this process instead, with a warning.

Reader processes import neither torch, nor numpy, nor Beam: each starts in ~30 ms, which
every `ProcessReader` pays once (measured: importing numpy there as well cost a 10,000-photo
run on 2 cores a quarter of its speed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import mmap
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from encoder import storage as object_store
from encoder.jpeg import cpu_reason
from pipelines.hedged_reads import HedgedReads, HedgeStats
from pipelines.storage import read_image

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CHUNKS_PER_PROCESS",
    "PendingRead",
    "ProcessReader",
    "ReadBatch",
    "ReadLimits",
    "ThreadReader",
    "object_read_stats",
    "object_reads",
    "read_chunk",
    "reads_in_readers",
]

log = logging.getLogger(__name__)

# What a reader hands back per file, always a 4-tuple (cheap to pickle, no per-file objects):
#   (sha256, cpu_reason, offset in the slot, length)  the bytes are in the ring
#   (sha256, cpu_reason, bytes, length)               they did not fit: carried in the message
#   (None, "fetch", reason, 0)                        not read: the dead letter
Record = tuple


@dataclass(frozen=True)
class ReadLimits:
    """What the readers check per file, and whether they hedge object-store reads; plain values so that reader
    processes need not import torch."""

    max_bytes: int
    max_pixels: int
    route: bool = True  # parse the JPEG header for `encoder.jpeg.cpu_reason`; False: every reason is None
    progressive: bool = True  # the GPU decoder batches progressive JPEGs (`encoder.gpu_images.batches_progressive`)
    hedge: bool = True  # object-store reads in the tail get a second request (`pipelines.hedged_reads`)

    @classmethod
    def of(cls, limits, route: bool = True, progressive: bool = True, hedge: bool = True) -> ReadLimits:
        """From an `encoder.DecodeLimits`."""
        return cls(limits.max_bytes, limits.max_pixels, route, progressive, hedge)


@dataclass
class ReadBatch:
    """One batch of files: what was read (in input order) and what was not."""

    keys: list[tuple[Hashable, str]] = field(default_factory=list)  # (key, sha256) per file read
    datas: list[bytes | np.ndarray] = field(default_factory=list)  # their bytes: bytes, or 1-D uint8 ring views
    reasons: list[str | None] = field(default_factory=list)  # why each must be decoded on the CPU; None: GPU
    failed: list[tuple[Hashable, str, str]] = field(default_factory=list)  # (key, stage, reason)


def reads_in_readers(uri: str) -> bool:
    """Whether the readers take `uri`: local files, gs:// objects and http(s) URLs (lookalike's own clients); other
    schemes need Beam's FileSystems, which the reader processes do not import."""
    return "://" not in uri or object_store.reads_itself(uri)


FETCHES_PER_PROCESS = 96  # threads for object-store reads per process: 8 chunks' reads and their second requests
_OBJECT_READS: HedgedReads | None = None
_OBJECT_READS_LOCK = threading.Lock()


def object_reads() -> HedgedReads:
    """This process's threads for object-store reads, which wait on the network (`pipelines.hedged_reads`)."""
    global _OBJECT_READS
    with _OBJECT_READS_LOCK:
        if _OBJECT_READS is None:
            # read_image looked up per read, not bound here, so that tests can stand in for it
            _OBJECT_READS = HedgedReads(lambda path, max_bytes: read_image(path, max_bytes), FETCHES_PER_PROCESS)
        return _OBJECT_READS


def object_read_stats() -> HedgeStats:
    """This process's object-store reads and second requests so far (none if it made none)."""
    with _OBJECT_READS_LOCK:
        reads = _OBJECT_READS
    return reads.snapshot() if reads is not None else HedgeStats()


def read_chunk(paths: Sequence[str], limits: ReadLimits, out: memoryview | None = None) -> list[Record]:
    """Read, hash and route `paths`, placing their bytes in `out` while they fit (`Record`s, in order).
    Object-store reads in the chunk are in flight together, stragglers hedged (`limits.hedge`); local files are
    read in turn."""
    records, used = [], 0
    remote = [path for path in paths if "://" in path]
    fetched = iter(object_reads().map(remote, limits.max_bytes, hedge=limits.hedge) if remote else ())
    for data in (next(fetched) if "://" in path else read_image(path, limits.max_bytes) for path in paths):
        if isinstance(data, str):
            records.append((None, "fetch", data, 0))
            continue
        digest = hashlib.sha256(data).hexdigest()  # releases the GIL on large buffers
        reason = cpu_reason(data, limits.max_bytes, limits.max_pixels, limits.progressive) if limits.route else None
        n = len(data)
        if out is not None and used + n <= len(out):
            out[used : used + n] = data
            records.append((digest, reason, used, n))
            used += n
        else:
            records.append((digest, reason, data, n))
    return records


def _assemble(keys: Sequence[Hashable], records: Sequence[Record], slot: np.ndarray | None, batch: ReadBatch) -> None:
    for key, (digest, second, where, n) in zip(keys, records, strict=True):
        if digest is None:
            batch.failed.append((key, second, where))
            continue
        batch.keys.append((key, digest))
        batch.datas.append(slot[where : where + n] if isinstance(where, int) else where)
        batch.reasons.append(second)


def _chunks(count: int, batch_size: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(batch index, start, stop) of each chunk of at most `chunk` inputs; a chunk never spans two batches."""
    for b, first in enumerate(range(0, count, batch_size)):
        last = min(first + batch_size, count)
        for start in range(first, last, chunk):
            yield b, start, min(start + chunk, last)


class ThreadReader:
    """Reads chunks of files on threads of this process, at most `ahead` chunks in flight."""

    def __init__(self, limits: ReadLimits, threads: int = 8, chunk: int = 16, ahead: int = 32) -> None:
        self.limits, self.chunk, self.ahead = limits, chunk, ahead
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="read")

    def read(self, paths: Sequence[str], batch_size: int, keys: Sequence[Hashable] | None = None,
             ) -> Iterator[ReadBatch]:  # fmt: skip
        """`ReadBatch`es of `batch_size` files, in order; `keys` (default: the paths) name them in the batches."""
        keys = paths if keys is None else keys
        pending: collections.deque = collections.deque()
        current, batch = 0, ReadBatch()
        for index, start, stop in itertools.chain(_chunks(len(paths), batch_size, self.chunk), [(None, 0, 0)]):
            if index is not None:
                pending.append((index, start, stop, self._pool.submit(read_chunk, paths[start:stop], self.limits)))
            while pending and (index is None or len(pending) >= self.ahead):
                done_index, done_start, done_stop, future = pending.popleft()
                if done_index != current:
                    yield batch
                    current, batch = done_index, ReadBatch()
                _assemble(keys[done_start:done_stop], future.result(), None, batch)
        if batch.keys or batch.failed:
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ThreadReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shared_ring(size: int) -> tuple[int, mmap.mmap]:
    """`size` bytes to share with the reader processes, as a file descriptor they inherit and its mapping
    here. A memfd: not capped by /dev/shm's mount (64 MiB in many containers) and never written back to
    disk. Pages are resident only once written."""
    fd = os.memfd_create("lookalike-read-ring", 0) if hasattr(os, "memfd_create") else _unlinked_file()
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def _unlinked_file() -> int:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        fd = os.dup(f.fileno())
    os.unlink(f.name)
    return fd


# The ring is page-locked this much at a time (in whole slots): each registration holds a lock in the CUDA driver
# that the process's other CUDA calls wait on (`encoder.page_lock`), and the ring's 640-896 MiB in one call held it
# for the whole of it at a run's start.
PAGE_LOCK_PIECE = 64 << 20
SLOT_WAIT_S = 0.05  # how long a chunk of the batch a read needs next waits for a ring slot before going without
CHUNKS_PER_PROCESS = 8  # chunks with object-store reads that a reader process has under way at once (8 of 8 reads)


def _serve(tasks_fd: int, replies_fd: int, ring_fd: int, size: int, slot_bytes: int, chunks_at_once: int,
           ready_fd: int, limits: ReadLimits) -> None:  # fmt: skip
    """A reader process: (task, slot, paths) in, (task, records, object-store counts) out, until None or the pipe
    closes.

    A chunk of local files is read here, in turn. Chunks that wait on the network run on threads, up to
    `chunks_at_once`, their replies in the order they finish: one chunk at a time kept a process's reads
    in flight to one chunk's (8), so a GPU worker's 8 processes had 64 reads out to an object store
    whatever the batch, ~2,000 images/s at 30 ms a read."""
    tasks, replies = Connection(tasks_fd, writable=False), Connection(replies_fd, readable=False)
    view = memoryview(mmap.mmap(ring_fd, size))
    sending = threading.Lock()
    remote = ThreadPoolExecutor(chunks_at_once, thread_name_prefix="chunk")
    os.write(ready_fd, b"r")  # started: the embedding process stops reading the batch due itself
    os.close(ready_fd)

    def read(task_id: int, slot: int | None, paths: Sequence[str]) -> None:
        try:
            records = read_chunk(paths, limits, None if slot is None else _slot_of(view, slot, slot_bytes))
            with sending:  # with the process's object-store counts so far, so that a run can report them
                replies.send((task_id, records, dataclasses.astuple(object_read_stats())))
        except BaseException:  # noqa: BLE001 - a reader that fails stops: its chunks are read in the embedding process
            traceback.print_exc()
            os._exit(1)

    while True:
        try:
            task = tasks.recv()
        except EOFError:
            return
        if task is None:
            return
        if any("://" in path for path in task[2]):
            remote.submit(read, *task)
        else:
            read(*task)


def _slot_of(ring: memoryview, slot: int, slot_bytes: int) -> memoryview:
    return ring[slot * slot_bytes : (slot + 1) * slot_bytes]


class ProcessReader:
    """Reads chunks of files in `processes` processes of its own into a shared ring of `slots` × `slot_bytes`,
    each process with up to `chunks_at_once` chunks of object-store reads under way.

    Each chunk of `chunk` files gets a slot; files that do not fit in it travel in the reply
    instead (correct, one copy more). The ring bounds what is read ahead: a chunk of a later
    batch is sent only when a slot is free, and a slot is free again when the last array over
    it is gone. A chunk of the batch a read needs next waits up to `SLOT_WAIT_S` for a slot and
    then goes without one, its bytes in the reply: slots held by batches the caller keeps, or
    by other threads' reads, slow a read down but never stop it. The defaults hold ten batches
    of 256 and take 640 MiB of address space, resident only where written: ~180 MiB for 70 KB
    photos. Several threads may read at once; one of them at a time receives the replies for all.

    `page_lock(address, size)`, when given, page-locks part of the ring for a GPU and returns the call that unlocks
    it (`encoder.page_lock.page_locker`): the GPU decoders then copy the bytes from it by DMA. The whole ring is then
    resident, not only what was written. It runs in a thread of its own while the reader starts and reads (every
    page of the ring is faulted in and locked, which a run need not wait for), in pieces of whole slots from the
    first (`PAGE_LOCK_PIECE`); copies made from a slot before it is locked go through pageable memory, as without
    it. Closing stops it after the piece under way: a short run does not wait for the rest. If a piece fails,
    the pieces locked are unlocked, the reader goes on with the ring as it is, and says why in `page_lock_problem`.
    """

    def __init__(self, limits: ReadLimits, processes: int = 8, chunk: int = 16, slot_bytes: int = 4 << 20,
                 slots: int = 160, chunks_at_once: int = CHUNKS_PER_PROCESS,
                 page_lock: Callable[[int, int], Callable[[], None]] | None = None) -> None:  # fmt: skip
        if min(processes, chunk, slot_bytes, slots, chunks_at_once) < 1:
            raise ValueError("processes, chunk, slot_bytes, slots and chunks_at_once must be positive")
        self.limits, self.chunk, self.slot_bytes, self.slots = limits, chunk, slot_bytes, slots
        self.chunks_at_once = chunks_at_once
        self._fd, self._ring = _shared_ring(slots * slot_bytes)
        self._view = memoryview(self._ring)
        weakref.finalize(self, _release_elsewhere, [self._ring, self._view])  # unmapped off the thread that lets go
        self._unlocks: list[Callable[[], None]] = []  # each piece of the ring locked, in order
        self.page_lock_completed = False  # the whole ring was locked (it stays True once closing unlocks it)
        self.page_lock_problem: str | None = None  # why `page_lock` failed
        self.page_lock_s: float | None = None  # how long locking the ring took (or ran, if stopped), once it is over
        self.page_lock_longest_s: float | None = None  # the longest `page_lock` call: the driver's lock held
        self.close_s: float | None = None  # how long `close` took: the processes stopped, the lock's end, the unlocks
        self.page_unlock_s: float | None = None  # of it, unlocking the ring (None: nothing was locked)
        self._locking: threading.Thread | None = None
        self._closed = threading.Event()
        if page_lock is not None:
            self._locking = threading.Thread(target=self._page_lock, args=(page_lock,), name="ring-page-lock",
                                             daemon=True)  # fmt: skip
            self._locking.start()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        # Guarded by `_lock`: what each reader process has to do (`_Worker.pending`), what is left to read here,
        # replies not yet taken by their read, and whether a thread is receiving replies (`_collect`).
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._local: dict[int, tuple[int | None, Sequence[str]]] = {}  # task id → (slot, paths) to read here
        self._results: dict[int, list[Record]] = {}
        self._receiving = False
        self._any_started = False  # a reader process has said it started (`_started`)
        self._next_id = 0
        self._workers = [self._start(i) for i in range(processes)]

    @property
    def page_locked(self) -> bool:
        """Whether the whole ring is page-locked for a GPU (`page_lock`), once the attempt is over."""
        if self._locking is not None:
            self._locking.join()
        return self.page_lock_completed and bool(self._unlocks)

    def _page_lock(self, page_lock: Callable[[int, int], Callable[[], None]]) -> None:
        import ctypes

        anchor = ctypes.c_char.from_buffer(self._ring)  # let go at once: an export would keep the ring mapped
        address = ctypes.addressof(anchor)
        del anchor
        size = self.slots * self.slot_bytes
        piece = max(1, PAGE_LOCK_PIECE // self.slot_bytes) * self.slot_bytes  # no file's bytes cross two pieces
        started = time.monotonic()
        try:
            for offset in range(0, size, piece):
                if self._closed.is_set():
                    return
                called = time.monotonic()
                self._unlocks.append(page_lock(address + offset, min(piece, size - offset)))
                self.page_lock_longest_s = max(self.page_lock_longest_s or 0.0, time.monotonic() - called)
            self.page_lock_completed = True
            log.info("file readers' ring page-locked for the GPU (%d MiB in %d pieces) in %.2f s", size >> 20,
                     len(self._unlocks), time.monotonic() - started)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - only slower without it: say so and go on
            self._unlock_ring()
            self.page_lock_problem = str(err) or type(err).__name__
            log.warning("could not page-lock the file readers' ring (%s); the GPU decoder copies from pageable "
                        "memory", self.page_lock_problem)  # fmt: skip
        finally:
            self.page_lock_s = time.monotonic() - started

    def _unlock_ring(self) -> None:
        while self._unlocks:
            self._unlocks.pop()()

    def _start(self, index: int) -> _Worker:
        """A fresh interpreter running `_serve`: multiprocessing's spawn and forkserver would run the
        caller's main script again in it (its imports, and anything not under a `__main__` guard), and a
        fork of this process would copy a CUDA context and locks held by other threads."""
        task_r, task_w = os.pipe()
        reply_r, reply_w = os.pipe()
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        args = [task_r, reply_w, self._fd, self.slots * self.slot_bytes, self.slot_bytes, self.chunks_at_once,
                ready_w, *dataclasses.astuple(self.limits)]  # fmt: skip
        # This interpreter's import path, as multiprocessing's spawn passes it: a source checkout or an install.
        code = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import _main; _main(sys.argv[1:])"
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                pass_fds=(task_r, reply_w, self._fd, ready_w), stdin=subprocess.DEVNULL)  # fmt: skip
        os.close(task_r)
        os.close(reply_w)
        os.close(ready_w)
        return _Worker(f"read-{index}", proc, Connection(task_w, readable=False), Connection(reply_r, writable=False),
                       ready_fd=ready_r)  # fmt: skip

    def _started(self, alive: list[_Worker]) -> bool:
        """(Holding the lock.) Whether one of the `alive` reader processes has started (`_serve` said so)."""
        if self._any_started:
            return True
        for worker in alive:
            if worker.ready_fd >= 0:
                try:
                    said = os.read(worker.ready_fd, 1)
                except BlockingIOError:
                    continue
                if said:  # b"": it died before it started; its chunks are read here once that is found
                    self._any_started = True
        return self._any_started

    def read(self, paths: Sequence[str], batch_size: int, keys: Sequence[Hashable] | None = None,
             ) -> Iterator[ReadBatch]:  # fmt: skip
        """`ReadBatch`es of `batch_size` files, in order; `keys` (default: the paths) name them in the batches.
        Several threads may read at once (a runner's threads, each its own chunk of a catalog)."""
        sends = _Sends(self, paths, batch_size)
        keys = paths if keys is None else keys
        try:
            while True:
                sends.send()
                if not sends.submitted:
                    return
                yield sends.take(keys)  # built in the yield itself: a local would keep its slots while this waits
        finally:  # the consumer stopped early: let the chunks in flight land before their slots are reused
            sends.abandon()

    def start(self, paths: Sequence[str], keys: Sequence[Hashable] | None = None) -> PendingRead:
        """Send `paths` to the reader processes as one batch and return at once: their chunks are read while the
        caller does other work, and `PendingRead.result()` waits for them. Chunks go now while ring slots are free
        (without waiting for one), the rest when the result is taken, as `read` sends them."""
        sends = _Sends(self, paths, max(1, len(paths)))
        sends.send(ahead=True)
        return PendingRead(sends, paths if keys is None else keys)

    def _batch(self, tasks: list[tuple], results: dict[int, list[Record]], keys: Sequence[Hashable]) -> ReadBatch:
        batch = ReadBatch()
        for task_id, _, slot, start, stop in tasks:
            _assemble(keys[start:stop], results.pop(task_id), None if slot is None else self._slot_array(slot), batch)
        return batch

    def _slot_array(self, slot: int) -> np.ndarray:
        """The slot as a uint8 array that hands the slot back when it and every view of it are gone."""
        import numpy as np  # here, not at the top: reader processes start without it (~0.1 s of CPU each)

        array = np.frombuffer(self._ring, dtype=np.uint8, count=self.slot_bytes, offset=slot * self.slot_bytes)
        weakref.finalize(array, self._free.put, slot)
        return array

    def _take_slot(self, wait_s: float) -> int | None:
        """A free slot, waiting up to `wait_s` for one; None if none came."""
        if self._closed.is_set():
            raise RuntimeError("the file reader is closed")
        try:
            return self._free.get(timeout=wait_s) if wait_s > 0 else self._free.get_nowait()
        except queue.Empty:
            return None

    def _send(self, slot: int | None, paths: Sequence[str], due: bool = False) -> int:
        """Hand `paths` to the reader process with the least to do (or to this process, with none left); the task's
        id. `due`: a chunk of the batch the caller waits for next, read here while no reader process has started
        yet, if its files are local: the first batch of a run waited ~0.3 s on a 2-core CPU for eight interpreters
        to start and import this module, and reading it here took ~0.05 s (the GPU threads wait for it anyway)."""
        with self._lock:
            task_id, self._next_id = self._next_id, self._next_id + 1
            alive = [w for w in self._workers if w.alive]
            if not alive or (due and not self._started(alive) and not any("://" in path for path in paths)):
                self._local[task_id] = (slot, paths)
                return task_id
            worker = min(alive, key=lambda w: len(w.pending))
            worker.pending[task_id] = (slot, paths)
            try:
                worker.tasks.send((task_id, slot, list(paths)))
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self._lost(worker)
            return task_id

    def _lost(self, worker: _Worker) -> None:
        """(Holding the lock.) `worker` stopped: its chunks are read in this process."""
        worker.alive = False
        log.warning("file reader process %s stopped (exit code %s); reading its %d chunk(s) here",
                    worker.name, worker.proc.poll(), len(worker.pending))  # fmt: skip
        self._local.update(worker.pending)
        worker.pending.clear()

    def _collect(self, wanted: set[int]) -> dict[int, list[Record]]:
        """The records of every `wanted` task. One thread at a time receives replies, for every read under way;
        the others wait for theirs to be handed over."""
        while True:
            with self._lock:
                here = {t: self._local.pop(t) for t in [t for t in self._local if t in wanted]}
            for task_id, (slot, paths) in here.items():
                out = None if slot is None else _slot_of(self._view, slot, self.slot_bytes)
                records = read_chunk(paths, self.limits, out)
                with self._lock:
                    self._results[task_id] = records
            with self._lock:
                if wanted <= self._results.keys():
                    return {t: self._results.pop(t) for t in wanted}
                if self._receiving:
                    self._arrived.wait(0.1)
                    continue
                busy = {w.replies: w for w in self._workers if w.alive and w.pending}
                if not busy and not (wanted & self._local.keys()):
                    raise RuntimeError("file reader lost track of a chunk")  # a bug, not bad input
                self._receiving = True
            try:
                self._receive(busy)
            finally:
                with self._lock:
                    self._receiving = False
                    self._arrived.notify_all()

    def _receive(self, busy: dict[Connection, _Worker]) -> None:
        """Replies that came from `busy` workers within a second, into `_results`."""
        for conn in wait(list(busy), timeout=1.0):
            worker = busy[conn]
            try:
                task_id, records, counts = conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                with self._lock:
                    self._lost(worker)
                continue
            with self._lock:
                worker.pending.pop(task_id, None)
                self._results[task_id] = records
                worker.object_reads = HedgeStats(*counts)
        with self._lock:
            for worker in busy.values():
                if worker.alive and worker.proc.poll() is not None:
                    self._lost(worker)

    def object_read_stats(self) -> HedgeStats:
        """The reader processes' object-store reads and second requests so far (those read here are this process's
        `object_read_stats`)."""
        with self._lock:
            return sum((w.object_reads for w in self._workers), HedgeStats())

    def close(self, wait: bool = False) -> None:
        """Stop the reader processes (a second at most) and wake a `read` waiting for slots. A run's end waits for
        this: `close_s` and `page_unlock_s` say how long it took (the first close's). The processes are reaped in a
        thread of their own (`_reap_elsewhere`), or here with `wait`: at interpreter exit, where Python has joined
        its threads before it runs `atexit` hooks."""
        started = time.monotonic()
        first = not self._closed.is_set()
        self._closed.set()
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.tasks.send(None)
        if self._workers:  # told to stop: nothing here waits for them to exit, unless asked to
            (_reap if wait else _reap_elsewhere)(self._workers)
        self._workers = []
        if self._locking is not None:  # stopped after the piece under way; unlocked before the ring can be unmapped
            self._locking.join()
            unlocking = time.monotonic()
            if self._unlocks:
                self._unlock_ring()
                self.page_unlock_s = time.monotonic() - unlocking
        if self._fd >= 0:
            os.close(self._fd)  # the mapping stays valid while batches still point into it
            self._fd = -1
        if first:
            self.close_s = time.monotonic() - started

    def __enter__(self) -> ProcessReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reap(workers: list[_Worker]) -> None:
    """Wait for reader processes told to stop (a second each at most, then killed) and close their pipes."""
    for worker in workers:
        try:
            worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        worker.tasks.close()
        worker.replies.close()
        if worker.ready_fd >= 0:
            os.close(worker.ready_fd)
            worker.ready_fd = -1


def _reap_elsewhere(workers: list[_Worker]) -> None:
    """`_reap` in a thread of its own: eight interpreters tearing down took ~70 ms on this project's 2-core CPU, at
    the end of every run. Not a daemon thread: the interpreter's exit waits for it, and no process is left behind."""
    try:
        threading.Thread(target=_reap, args=(workers,), name="reader-reap").start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        _reap(workers)


def _release_elsewhere(held: list) -> None:
    """Drop `held`, the last references to a reader's ring, in a thread of its own. Unmapping a resident ring frees
    every page of it (0.07-0.18 s for 640-896 MiB on this project's CPU; a GPU worker's ring is resident whole):
    that would hold up whatever let the reader go, the end of a run. A finalizer runs before the reader's own
    references go, so the thread lets the dying reader finish first. Arrays still over the ring keep it mapped
    until they go, wherever that is."""

    def release() -> None:
        time.sleep(0.05)
        held.clear()

    try:
        threading.Thread(target=release, name="ring-release", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        held.clear()


class _Sends:
    """One read's chunks, in order: those sent to the reader processes (task id, batch index, slot, start, stop) and
    those still to send."""

    def __init__(self, reader: ProcessReader, paths: Sequence[str], batch_size: int) -> None:
        if -(-batch_size // reader.chunk) > reader.slots:
            raise ValueError(f"a batch of {batch_size} needs {-(-batch_size // reader.chunk)} slots; the ring has "
                             f"{reader.slots}")  # fmt: skip
        self.reader, self.paths = reader, paths
        self.submitted: collections.deque[tuple] = collections.deque()
        self._tasks = _chunks(len(paths), batch_size, reader.chunk)
        self._waiting = next(self._tasks, None)  # the next chunk to send; None: all sent
        self._patient = True  # until a chunk of the batch next due has waited `SLOT_WAIT_S` for a slot

    def send(self, ahead: bool = False) -> None:
        """Send while slots are free. A chunk of the batch next due (or any, with nothing in flight) waits a little
        for a slot and then travels without one: its bytes come back in the reply (one copy more). Slots held by
        batches that only this read's caller would let go, or by other threads' reads, must not stop it for good.
        `ahead`: no chunk is due yet; send only what free slots take now."""
        while self._waiting is not None:
            index, start, stop = self._waiting
            due = not ahead and (not self.submitted or index == self.submitted[0][1])
            slot = self.reader._take_slot(SLOT_WAIT_S if due and self._patient else 0.0)
            if slot is None and not due:
                break
            self._patient = self._patient and slot is not None
            self.submitted.append((self.reader._send(slot, self.paths[start:stop], due), index, slot, start, stop))
            self._waiting = next(self._tasks, None)

    def take(self, keys: Sequence[Hashable]) -> ReadBatch:
        """The first batch sent, once all its chunks have landed."""
        head = [task for task in self.submitted if task[1] == self.submitted[0][1]]
        results = self.reader._collect({task[0] for task in head})
        for _ in head:
            self.submitted.popleft()
        return self.reader._batch(head, results, keys)

    def abandon(self) -> None:
        """Let the chunks in flight land, then free their slots for other reads."""
        if self.submitted and not self.reader._closed.is_set():
            self.reader._collect({task[0] for task in self.submitted})
            for task in self.submitted:
                if task[2] is not None:
                    self.reader._free.put(task[2])
        self.submitted.clear()


class PendingRead:
    """A batch of files under way in the reader processes (`ProcessReader.start`)."""

    def __init__(self, sends: _Sends, keys: Sequence[Hashable]) -> None:
        self._sends, self._keys = sends, keys

    def result(self) -> ReadBatch:
        """The batch, once every file is read (sending first what `start` found no slot for); once only."""
        sends, self._sends = self._sends, None
        if sends is None:
            raise RuntimeError("this read's result was taken or cancelled")
        sends.send()
        return sends.take(self._keys) if sends.submitted else ReadBatch()

    def cancel(self) -> None:
        """Drop the read (a failed bundle's): its chunks land and their slots are freed."""
        sends, self._sends = self._sends, None
        if sends is not None:
            sends.abandon()


@dataclass
class _Worker:
    name: str
    proc: subprocess.Popen
    tasks: Connection
    replies: Connection
    pending: dict[int, tuple[int | None, Sequence[str]]] = field(default_factory=dict)  # task id → (slot, paths)
    alive: bool = True
    object_reads: HedgeStats = field(default_factory=HedgeStats)  # its object-store counts, as of its last reply
    ready_fd: int = -1  # where it says it has started (`_serve`), not blocking; closed with its pipes


def _main(argv: list[str]) -> None:
    """A reader process started by `ProcessReader._start`."""
    fields = dataclasses.fields(ReadLimits)
    numbers, given = argv[: -len(fields)], argv[-len(fields) :]
    parsed = (value == "True" if f.type == "bool" else int(value) for f, value in zip(fields, given, strict=True))
    limits = ReadLimits(*parsed)
    _serve(*map(int, numbers), limits)
