"""The Beam embed pipeline as it ran before changes to its runner's thread, for benchmarks to run beside the
product: each shard's tables encoded in the runner's thread (before `pipelines.write_behind`) and pickled whole by
Beam's size sampling (before `ArrowTableCoder`): `tables_as_before`; each chunk that the reader processes take
read while the runner's thread waited (local files) or a thread of the fetch step did (gs:// objects), before
`ProcessReader.start`: `reads_as_before`; the shards written through Beam's `iobase.Write`, four stages per sink,
before `pipelines.shard_sink`: `sinks_as_before`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes

import pipelines.embed as embed
import pipelines.embed_steps as embed_steps
from pipelines import storage
from pipelines.embed_dofns import ArrowTableCoder
from pipelines.records import shard_writer_options
from pipelines.shard_files import ShardFiles
from pipelines.write_behind import WriteBehind


def _write_inline(self, table: pa.Table) -> None:
    """`ShardFiles.write` encoding each table in the caller's thread (the runner's)."""
    self._write(table)


@contextlib.contextmanager
def tables_as_before() -> Iterator[None]:
    """Pipelines built inside it write and code their tables as before; the product's ways are back on exit."""
    write = ShardFiles.write
    ShardFiles.write = _write_inline
    beam.coders.registry.register_coder(pa.Table, beam.coders.PickleCoder)
    try:
        yield
    finally:
        ShardFiles.write = write
        beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


class ParquetShards(FileBasedSink):
    """The shard sink before `pipelines.shard_sink`, for Beam's `iobase.Write`: `PREFIX-SSSSS-of-NNNNN.parquet`,
    each shard's tables encoded behind the runner's thread as now."""

    def __init__(self, prefix: str, schema: pa.Schema) -> None:
        super().__init__(prefix, coder=None, file_name_suffix=".parquet", mime_type="application/x-parquet",
                         compression_type=CompressionTypes.UNCOMPRESSED)  # fmt: skip
        self._schema = schema

    def open(self, temp_path: str):
        handle = super().open(temp_path)
        writer = pq.ParquetWriter(handle, self._schema, **shard_writer_options(self._schema))
        return handle, writer, WriteBehind(pending=2, name="shard-write")

    def write_record(self, opened, table: pa.Table) -> None:
        _, writer, behind = opened
        behind.submit(writer.write_table, table)

    def close(self, opened) -> None:
        handle, writer, behind = opened

        def close_file() -> None:
            try:
                writer.close()
            finally:
                handle.close()

        behind.close(then=close_file)


class _BeamWrite(beam.PTransform):
    """In `WriteShards`' place: Beam's `Write` of the sink above (one file per bundle: it has no cap on a file's
    rows); nothing is left for `PlaceShards`."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_shard: int | None = None) -> None:
        super().__init__()
        self._directory, self._schema = directory, schema

    def expand(self, tables):
        written = tables | beam.io.Write(ParquetShards(storage.join(self._directory, "part"), self._schema))
        return written | beam.FlatMap(lambda _: ()).with_output_types(tuple[str, str])


class _NothingToPlace(beam.PTransform):
    def expand(self, written):
        return beam.pvalue.PDone(written[0].pipeline)


@contextlib.contextmanager
def sinks_as_before() -> Iterator[None]:
    """Pipelines built inside it write their shards through Beam's `Write`, four stages per sink."""
    write, place = embed.WriteShards, embed.PlaceShards
    embed.WriteShards, embed.PlaceShards = _BeamWrite, _NothingToPlace
    try:
        yield
    finally:
        embed.WriteShards, embed.PlaceShards = write, place


def _submit_as_before(self, items, *args, **kwargs):
    """`PrepareAhead.submit` before reads went to the reader processes ahead: a chunk of local files prepared in
    the caller's thread as it comes, its reads waited for there; one of object-store images on a thread."""
    if not any("://" in item.image_uri for item in items):
        return [*self.drain(), embed_steps.prepare_items(items, *args, **kwargs)]
    self._pending.append(self._pool.submit(embed_steps.prepare_items, items, *args, **kwargs))
    return [self._pending.popleft().result() for _ in range(len(self._pending) - self.depth)]


@contextlib.contextmanager
def reads_as_before() -> Iterator[None]:
    """Runs inside it read each chunk as before; the product's way is back on exit."""
    submit = embed_steps.PrepareAhead.submit
    embed_steps.PrepareAhead.submit = _submit_as_before
    try:
        yield
    finally:
        embed_steps.PrepareAhead.submit = submit
