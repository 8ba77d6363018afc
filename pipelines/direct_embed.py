"""Image files → Parquet embedding shards on one GPU worker, without Beam.

The GPU worker's inner loop alone: threads read and hash files in input order, a
chunk of files per task (one task per file costs more in thread hand-offs than the
read), `encoder.gpu_stream` decodes batch i+1 on the GPU while the model encodes
batch i, and rows go to shards of the embed contract (`pipelines.records`) with dead
letters beside them. `benchmarks/gpu_embed.py` measures it against the Beam pipeline.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from encoder.gpu_images import GpuImages
from encoder.gpu_stream import embed_stream
from encoder.model import ImageEncoder
from pipelines.records import FAILURE_SCHEMA, embedding_schema, fresh_embedding_table

__all__ = ["DirectResult", "embed_files"]


@dataclass
class DirectResult:
    embedded: int = 0
    dead_lettered: int = 0
    on_gpu: int = 0
    shards: list[str] = field(default_factory=list)


def _read(path: str) -> tuple[bytes, str] | str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return data, hashlib.sha256(data).hexdigest()  # hashlib releases the GIL on large buffers


def _read_chunk(paths: Sequence[str]) -> list[tuple[bytes, str] | str]:
    return [_read(p) for p in paths]


def _ordered(pool: ThreadPoolExecutor, fn: Callable, inputs: Iterable, ahead: int) -> Iterator:
    """`pool.map(fn, inputs)` with at most `ahead` calls in flight (`Executor.map` submits them all at once)."""
    pending: collections.deque = collections.deque()
    for x in inputs:
        pending.append(pool.submit(fn, x))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def embed_files(paths: Sequence[str], encoder: ImageEncoder, images: GpuImages, out_dir: str | Path, *,
                batch_size: int = 256, read_threads: int = 8, rows_per_shard: int = 100_000,
                prefetch: int = 2, read_chunk: int = 16) -> DirectResult:  # fmt: skip
    """Embed `paths` (their paths are the item ids) into `out_dir/part-NNNNN.parquet` + `failures.parquet`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, failures = DirectResult(), []
    schema = embedding_schema(encoder.dim)
    pool = ThreadPoolExecutor(read_threads, thread_name_prefix="read")
    ahead = max(2 * read_threads, 2 * batch_size // read_chunk)  # chunks in flight: memory stays bounded

    def batches() -> Iterator[tuple[list[tuple[str, str]], list[bytes]]]:
        chunks = (paths[i : i + read_chunk] for i in range(0, len(paths), read_chunk))
        reads = zip(paths, itertools.chain.from_iterable(_ordered(pool, _read_chunk, chunks, ahead)), strict=True)
        for chunk in iter(lambda: list(itertools.islice(reads, batch_size)), []):
            keys, datas = [], []
            for path, read in chunk:
                if isinstance(read, str):
                    failures.append((path, path, "fetch", read))
                else:
                    keys.append((path, read[1]))  # the key carries the digest to the shard row
                    datas.append(read[0])
            yield keys, datas

    writer, rows_in_shard = None, 0
    try:
        for batch in embed_stream(encoder, images, batches(), prefetch=prefetch):
            failures.extend((path, path, stage, reason) for (path, _), stage, reason in batch.failed)
            result.on_gpu += batch.on_gpu
            if not batch.keys:
                continue
            if writer is None or rows_in_shard >= rows_per_shard:
                if writer is not None:
                    writer.close()
                result.shards.append(str(out / f"part-{len(result.shards):05d}.parquet"))
                writer, rows_in_shard = pq.ParquetWriter(result.shards[-1], schema), 0
            ids, digests = zip(*batch.keys, strict=True)
            writer.write_table(fresh_embedding_table(ids, batch.vectors, digests, encoder.model_version))
            rows_in_shard += len(ids)
            result.embedded += len(ids)
    finally:
        if writer is not None:
            writer.close()
        pool.shutdown(wait=False, cancel_futures=True)
    names = ("item_id", "image_uri", "stage", "error")
    pq.write_table(pa.Table.from_pylist([dict(zip(names, f, strict=True)) for f in failures], schema=FAILURE_SCHEMA),
                   out / "failures.parquet")  # fmt: skip
    result.dead_lettered = len(failures)
    return result
