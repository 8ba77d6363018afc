"""The per-item and per-batch work of the embed pipeline, free of Beam so it is testable alone.

Each step returns either its result or a `Failure` record; nothing here raises
for a bad item.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder import DecodeLimits, PreprocessConfig
from encoder.gpu_images import collect_decodes, decode_on_cpu
from indexing.item_ids import ItemIds, sorted_positions
from pipelines import storage
from pipelines.catalog import CatalogItem
from pipelines.file_reader import object_reads, reads_in_readers
from pipelines.records import (
    EmbeddingRow,
    Failure,
    PreparedImage,
    ReuseRequest,
    embedding_matrix,
    embedding_table,
    fresh_embedding_table,
)

if TYPE_CHECKING:
    from encoder.gpu_stream import StreamBatch
    from pipelines.file_reader import PendingRead, ProcessReader

__all__ = [
    "Fetched",
    "KnownDigests",
    "Prepared",
    "PrepareAhead",
    "READ_AHEAD",
    "PreviousVectors",
    "fetch_item",
    "join_reused",
    "prepare_items",
    "stream_outputs",
]

log = logging.getLogger(__name__)


def _raw(hex_digests: Sequence[str]) -> np.ndarray:
    return np.array([bytes.fromhex(h) for h in hex_digests], dtype="S32").reshape(-1)


class KnownDigests:
    """A compact set of image sha256 digests that already have vectors (32 bytes each)."""

    def __init__(self, hex_digests: Iterable[str]) -> None:
        self._sorted = np.unique(_raw(list(hex_digests)))

    def __len__(self) -> int:
        return int(self._sorted.size)

    def positions(self, hex_digests: Sequence[str]) -> np.ndarray:
        """Each digest's index in the sorted set, or -1 where it is absent; one vectorised search."""
        return sorted_positions(self._sorted, _raw(hex_digests))

    def __contains__(self, hex_digest: str) -> bool:
        return bool(self.positions([hex_digest])[0] >= 0)


class PreviousVectors(KnownDigests):
    """An earlier run's vectors by image digest, in memory: reuse joined inside the fetch step, no shuffle.

    Holds (n, dim) float32 plus 32 bytes and a timestamp per row; `embed` uses it when that
    fits its `reuse_memory_mb`, and a CoGroupByKey join otherwise.
    """

    def __init__(self, digests: np.ndarray, vectors: np.ndarray, embedded_at: np.ndarray, model_version: str) -> None:
        order = np.argsort(digests, kind="stable")
        self._sorted, self._vectors, self._embedded_at = digests[order], vectors[order], embedded_at[order]
        self.model_version = model_version

    @classmethod
    def load(cls, tables: Iterable[pa.Table], model_version: str) -> PreviousVectors:
        """From embedding-shard tables; rows of other model versions are left out."""
        parts = [t.filter(pc.equal(t.column("model_version"), model_version)) for t in tables]
        table = pa.concat_tables(parts) if parts else None
        if table is None or table.num_rows == 0:
            return cls(np.zeros(0, "S32"), np.zeros((0, 0), np.float32), np.zeros(0, "datetime64[us]"), model_version)
        at = table.column("embedded_at").cast(pa.timestamp("us")).to_numpy()
        return cls(_raw(table.column("image_sha256").to_pylist()), embedding_matrix(table), at, model_version)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def table(self, requests: Sequence[ReuseRequest]) -> pa.Table:
        """The earlier vectors of the requests' image bytes as embedding rows under the requests' item ids.

        Raises:
            KeyError: a request whose digest has no earlier vector.
        """
        where = self.positions([r.image_sha256 for r in requests])
        if (where < 0).any():
            raise KeyError(f"no earlier vector for {requests[int(np.argmin(where))].image_sha256}")
        return embedding_table([r.item_id for r in requests], self._vectors[where],
                               [r.image_sha256 for r in requests], [self.model_version] * len(requests),
                               pa.array(self._embedded_at[where], pa.timestamp("us")))  # fmt: skip


class Fetched(NamedTuple):
    """An item's image bytes and their sha256, before the reuse check and decode."""

    item: CatalogItem
    data: bytes | np.ndarray  # or a 1-D uint8 array over a file reader's ring
    image_sha256: str


def fetch_item(item: CatalogItem, limits: DecodeLimits) -> Fetched | Failure:
    """Read an item's image bytes and hash them."""
    return _fetched(item, storage.read_image(item.image_uri, limits.max_bytes))


def _fetched(item: CatalogItem, data: bytes | str) -> Fetched | Failure:
    """An item's bytes hashed, or (`data` a reason) its dead letter."""
    if isinstance(data, str):
        return Failure(item.item_id, item.image_uri, "fetch", data)
    return Fetched(item, data, hashlib.sha256(data).hexdigest())


class Prepared(NamedTuple):
    """A chunk of items after fetch: decoded images, reuse requests and dead letters."""

    decoded: list[PreparedImage]
    reuse: list[ReuseRequest]
    failed: list[Failure]


def prepare_items(items: Sequence[CatalogItem], pool: Executor, preprocess: PreprocessConfig, limits: DecodeLimits,
                  known: KnownDigests | None = None, reembed: ItemIds | None = None, *, threads: int = 16,
                  max_decode_s: float = 30.0, defer_decode: bool = False,
                  reader: ProcessReader | None = None, hedge: bool = True,
                  read: PendingRead | None = None) -> Prepared:  # fmt: skip
    """Fetch and hash every item; decode only those whose bytes have no vector in `known`.

    With `defer_decode` (a GPU worker), nothing is decoded here: the bytes go on
    (`PreparedImage.data`) and the embed step routes and decodes them in batches. With a
    `reader` too, local files and gs:// objects are read, hashed and routed in its processes
    (`pipelines.file_reader`): the bytes go on as arrays over its shared ring, routed.

    Local files are read and hashed on `pool`, a share of the chunk per core: one task per
    file costs more in thread hand-offs than the read (2 cores, 70 KB photos: 72 µs per
    file inline, 47 µs in two tasks, 88 µs in eight). Object-store reads wait on the
    network and go to this process's threads for them, stragglers hedged with `hedge`
    (`file_reader.object_reads`; on a GPU worker, gs:// reads go to the reader's processes:
    the Python of each read would hold this process's interpreter lock from the GPU
    threads). `read`: the reader's reads of these items, started earlier (`start_reads`).
    Decodes go to `pool` (Pillow releases the GIL while
    decoding); an image not decoded within `max_decode_s` (per image, `threads` at a time)
    is dead-lettered and its thread left to finish on its own
    (`encoder.gpu_images.collect_decodes`).
    """
    by_reader = _by_reader(items) if defer_decode and reader is not None else []
    rest = [i for i in items if not reads_in_readers(i.image_uri)] if by_reader else items
    local = [i for i in rest if "://" not in i.image_uri]
    remote = [i for i in rest if "://" in i.image_uri]  # network-bound: read together, stragglers hedged
    routes: list[str | None] = []
    fetched: list = []
    if by_reader:
        batches = [read.result()] if read is not None else reader.read([i.image_uri for i in by_reader],
                                                                         len(by_reader), keys=by_reader)  # fmt: skip
        for batch in batches:
            fetched += [Failure(i.item_id, i.image_uri, stage, reason) for i, stage, reason in batch.failed]
            fetched += [Fetched(i, data, digest) for (i, digest), data in zip(batch.keys, batch.datas, strict=True)]
            routes += [reason or "" for reason in batch.reasons]
    if local:
        size = max(8, math.ceil(len(local) / min(threads, os.cpu_count() or 1)))  # one task per core, not per file
        parts = [local[i : i + size] for i in range(0, len(local), size)]
        fetched += [f for part in pool.map(lambda part: [fetch_item(i, limits) for i in part], parts) for f in part]
    if remote:
        datas = object_reads().map([i.image_uri for i in remote], limits.max_bytes, hedge=hedge)
        fetched += [_fetched(i, data) for i, data in zip(remote, datas, strict=True)]
    failed = [f for f in fetched if isinstance(f, Failure)]
    ok = [f for f in fetched if isinstance(f, Fetched)]
    routes += [None] * (len(ok) - len(routes))  # the rest (remote, or read here) are routed by the embed step
    reusable = np.zeros(len(ok), dtype=bool)
    if known is not None and len(known) and ok:
        reusable = known.positions([f.image_sha256 for f in ok]) >= 0
        if reembed is not None:  # items updated since `--since`: encoded again whatever their bytes
            reusable &= reembed.rows([f.item.item_id for f in ok]) < 0
    reuse = [
        ReuseRequest(f.item.item_id, f.item.image_uri, f.image_sha256) for f, r in zip(ok, reusable, strict=True) if r
    ]
    to_decode = [f for f, r in zip(ok, reusable, strict=True) if not r]
    if defer_decode:
        decoded = [PreparedImage(f.item.item_id, f.item.image_uri, f.image_sha256, None, f.data, route)
                   for f, route, r in zip(ok, routes, reusable, strict=True) if not r]  # fmt: skip
        return Prepared(decoded, reuse, failed)
    decoded = []
    futures = [pool.submit(decode_on_cpu, f.data, preprocess, limits) for f in to_decode]
    for f, result in zip(to_decode, collect_decodes(futures, max_decode_s, threads), strict=True):
        if isinstance(result, str):
            failed.append(Failure(f.item.item_id, f.item.image_uri, "decode", result))
        else:
            decoded.append(PreparedImage(f.item.item_id, f.item.image_uri, f.image_sha256, result))
    return Prepared(decoded, reuse, failed)


def _by_reader(items: Sequence[CatalogItem]) -> list[CatalogItem]:
    return [i for i in items if reads_in_readers(i.image_uri)]


def start_reads(items: Sequence[CatalogItem], reader: ProcessReader) -> PendingRead:
    """The reads `prepare_items(items, ..., defer_decode=True, reader=reader)` would make, started now in the
    reader's processes; hand them to it as `read`."""
    by_reader = _by_reader(items)
    return reader.start([i.image_uri for i in by_reader], keys=by_reader)


READ_AHEAD = 2  # chunks of reads under way past the one whose result is taken


class PrepareAhead:
    """`prepare_items` for chunks read ahead, up to `depth` chunks past the one whose result is taken: chunks the
    reader processes take (a GPU worker's local files and gs:// objects) have their reads sent to them at once
    and are finished in the caller's thread when due; other chunks that wait on the network are prepared on
    threads of their own; other chunks of local files in the caller's thread, as they come.

    The embed step reads a chunk whole before it hands it on, so each chunk waited for the slowest read of the
    one before to land: for a chunk of 256 from `gs://`, one long tail per chunk and nothing out meanwhile
    (BENCHMARKS.md, "Reads out to gs:// at once": one chunk ahead 1.4-1.6x; two, 1.2-1.6x more); for local
    files, the runner's thread waited on every chunk's reads while it could have been handing the one before
    on. Reading local files ahead on a thread lost on a 16-core GPU host (0.76-0.84x: the threads contend for
    the interpreter lock); reads sent to the reader processes need no thread here. `submit` returns what is done
    and due, in order; `drain` the rest.
    """

    def __init__(self, depth: int = READ_AHEAD) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(depth + 1, thread_name_prefix="prepare")
        self._pending: collections.deque[Future | _Started] = collections.deque()

    def submit(self, items: Sequence[CatalogItem], *args, **kwargs) -> list[Prepared]:
        """`prepare_items(items, *args, **kwargs)`, now or started in the background; the results now due, in
        order (a chunk's error, raised here, if one failed)."""
        reader = kwargs.get("reader") if kwargs.get("defer_decode") else None  # as `prepare_items` reads
        if reader is not None and items and all(reads_in_readers(item.image_uri) for item in items):
            read = start_reads(items, reader)
            self._pending.append(_Started(functools.partial(prepare_items, items, *args, read=read, **kwargs), read))
        elif not any("://" in item.image_uri for item in items):
            due = list(self.drain())
            return [*due, prepare_items(items, *args, **kwargs)]
        else:
            self._pending.append(self._pool.submit(prepare_items, items, *args, **kwargs))
        return [self._pending.popleft().result() for _ in range(len(self._pending) - self.depth)]

    def drain(self) -> Iterator[Prepared]:
        """Every result not yet taken, in order."""
        while self._pending:
            yield self._pending.popleft().result()

    def forget(self) -> None:
        """Drop what is under way (a failed bundle's chunks, which the runner sends again): reads sent to the
        reader processes land and their ring slots are freed."""
        while self._pending:
            self._pending.popleft().cancel()

    def close(self) -> None:
        self.forget()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Started(NamedTuple):
    """A chunk whose reads are under way in the reader processes: `result()` finishes it in the caller's thread."""

    prepare: Callable[[], Prepared]
    read: PendingRead

    def result(self) -> Prepared:
        return self.prepare()

    def cancel(self) -> None:
        self.read.cancel()


def stream_outputs(done: StreamBatch, model_version: str) -> tuple[pa.Table, list[Failure]]:
    """One embedding table for what a finished batch embedded (its keys are `PreparedImage`s), failures for the
    rest: a table per batch, not a row per item, keeps the runner's per-element work off the fast path."""
    table = fresh_embedding_table([item.item_id for item in done.keys], done.vectors,
                                  [item.image_sha256 for item in done.keys], model_version)  # fmt: skip
    return table, [Failure(item.item_id, item.image_uri, stage, reason) for item, stage, reason in done.failed]


def join_reused(
    image_sha256: str, requests: Iterable[ReuseRequest], previous: Iterable[EmbeddingRow]
) -> Iterable[EmbeddingRow | Failure]:
    """Give each reuse request the earlier vector of the same image bytes."""
    earlier = next(iter(previous), None)
    for request in requests:
        if earlier is None:  # cannot happen when both sides come from the same previous run
            yield Failure(request.item_id, request.image_uri, "reuse", f"no earlier vector for {image_sha256}")
        else:
            yield earlier._replace(item_id=request.item_id)
