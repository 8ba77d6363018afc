"""Image files → Parquet embedding shards on one GPU worker, without Beam.

The GPU worker's inner loop alone: reader processes read, hash and route files in
input order into shared memory (`pipelines.file_reader`), `encoder.gpu_stream` decodes
and resizes ahead of the model, and a writer thread puts the rows in shards of the
embed contract (`pipelines.records`), dead letters beside them. `benchmarks/gpu_embed.py` measures it against the Beam pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from encoder.decode_journal import DecodeJournal, journal_dir
from encoder.gpu_images import GpuImages
from encoder.gpu_stream import embed_stream
from encoder.model import ImageEncoder
from encoder.page_lock import page_locker
from pipelines.file_reader import ProcessReader, ReadLimits, ThreadReader
from pipelines.heap import frozen_heap
from pipelines.records import FAILURE_SCHEMA, embedding_schema, fresh_embedding_table
from pipelines.shard_files import ROWS_PER_SHARD, ShardFiles

__all__ = ["READERS", "DirectResult", "embed_files"]

FileReader = ProcessReader | ThreadReader
READERS: dict[str, type[FileReader]] = {"processes": ProcessReader, "threads": ThreadReader}


@dataclass
class DirectResult:
    embedded: int = 0
    dead_lettered: int = 0
    on_gpu: int = 0  # images the GPU decoder took (the rest, CPU threads)
    batches_retried: int = 0  # batches that failed whole in the GPU decoder, resize or model: retried in halves
    batches_in_pieces: int = (
        0  # batches the model, GPU decoder or resize took in pieces: an earlier one ran out of memory
    )
    shards: list[str] = field(default_factory=list)
    ring_page_locked: bool = False  # the reader processes' ring was page-locked whole for the GPU decoder by the end
    ring_page_lock_s: float | None = None  # how long that took, or ran till the end (it runs beside the reads)
    ring_page_lock_longest_s: float | None = None  # its longest call into the driver (the driver's lock held)
    # What the run's end waited for, seconds: the reader processes' close (of it, the ring's unlock) and the shards'
    # (the last tables written behind the loop, the files closed); None where there was none.
    reader_close_s: float | None = None
    ring_page_unlock_s: float | None = None
    shards_close_s: float | None = None


def embed_files(paths: Sequence[str], encoder: ImageEncoder, images: GpuImages, out_dir: str | Path, *,
                batch_size: int = 256, readers: int = 8, reader: str = "processes", rows_per_shard: int = ROWS_PER_SHARD,
                prefetch: int = 2, in_flight: int = 2, journal: str | Path | None = None,
                page_lock: bool = True) -> DirectResult:  # fmt: skip
    """Embed `paths` (their paths are the item ids) into `out_dir/part-NNNNN.parquet` + `failures.parquet`.

    `reader`: "processes" reads, hashes and routes the files in `readers` processes of their own
    (`pipelines.file_reader.ProcessReader`), "threads" in threads of this process. `prefetch` and
    `in_flight`: as `embed_stream`'s. `journal`: the directory of the GPU decoder's journals
    (`encoder.decode_journal`; default: the one for `out_dir`), where images decode on a GPU. `page_lock`: the
    reader processes' ring page-locked for the GPU decoder, where there is one (`encoder.page_lock`).
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {sorted(READERS)}, not {reader!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, failures = DirectResult(), []
    limits = ReadLimits.of(images.limits, route=images.decodes_on_gpu, progressive=images.progressive_on_gpu)

    def batches(files: FileReader) -> Iterator[tuple[list[tuple[str, str]], list, list]]:
        for read in files.read(paths, batch_size):
            failures.extend((path, path, stage, reason) for path, stage, reason in read.failed)
            yield read.keys, read.datas, read.reasons  # the key carries the digest to the shard row
            del read  # not held while the reader waits for ring slots for the next batch

    shards = ShardFiles(lambda i: str(out / f"part-{i:05d}.parquet"), embedding_schema(encoder.dim),
                        rows_per_shard=rows_per_shard, pending=4)  # fmt: skip
    journaled = (DecodeJournal(journal or journal_dir(str(out.resolve())), digest_of=lambda key: key[1])
                 if images.decodes_on_gpu else None)  # fmt: skip
    try:
        with frozen_heap(), _reader(reader, limits, readers, images if page_lock else None) as files:
            for batch in embed_stream(encoder, images, batches(files), prefetch=prefetch, in_flight=in_flight,
                                      journal=journaled):  # fmt: skip
                failures.extend((path, path, stage, reason) for (path, _), stage, reason in batch.failed)
                result.on_gpu += batch.on_gpu
                result.batches_retried += batch.retried
                result.batches_in_pieces += batch.in_pieces
                if not batch.keys:
                    continue
                ids, digests = zip(*batch.keys, strict=True)
                shards.write(fresh_embedding_table(ids, batch.vectors, digests, encoder.model_version))
                result.embedded += len(ids)
        # Read once the reader is closed, which stops the lock after its piece under way: a run shorter than the
        # lock does not wait for it.
        result.ring_page_locked = getattr(files, "page_lock_completed", False)
        result.ring_page_lock_s = getattr(files, "page_lock_s", None)
        result.ring_page_lock_longest_s = getattr(files, "page_lock_longest_s", None)
        result.reader_close_s = getattr(files, "close_s", None)
        result.ring_page_unlock_s = getattr(files, "page_unlock_s", None)
    finally:
        closing = time.monotonic()
        result.shards = shards.close()
        result.shards_close_s = time.monotonic() - closing
        if journaled is not None:
            journaled.close()
    names = ("item_id", "image_uri", "stage", "error")
    pq.write_table(pa.Table.from_pylist([dict(zip(names, f, strict=True)) for f in failures], schema=FAILURE_SCHEMA),
                   out / "failures.parquet")  # fmt: skip
    result.dead_lettered = len(failures)
    return result


def _reader(kind: str, limits: ReadLimits, readers: int, images: GpuImages | None) -> FileReader:
    """The files' reader; reader processes' ring page-locked where the GPU decoder of `images` copies from it (None:
    left pageable)."""
    if kind == "processes":
        locked = images is not None and images.decodes_on_gpu
        return ProcessReader(limits, readers, page_lock=page_locker(images.device) if locked else None)
    return READERS[kind](limits, readers)
