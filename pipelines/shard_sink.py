"""Arrow tables → Parquet shards `<directory>/part-SSSSS-of-NNNNN.parquet`: each bundle writes a file of its own
under the directory's `.writing/`, and one step after a shuffle renames them all into place.

Beam's `iobase.Write` does the same in four stages of its own per sink (a temp directory made once, its write
results grouped, a pre-finalize and a finalize, each reading the others as side inputs); the embed pipeline's two
sinks made eight of its eleven stages, ~0.15 s of a local run's fixed cost (BENCHMARKS.md). Here both sinks share
one stage after the main one: the files' names, keyed by their directory, through one `GroupByKey`.

What a runner's retries leave: a bundle that fails after opening its file leaves it under `.writing/`; only the
files of bundles that finished reach the rename, which removes `.writing/` with what is left in it. The names are
sorted before they are numbered, so a rename that is itself retried gives each file the name it had the first time
(a file already moved is found at its name). A directory with no rows gets one empty shard (`write_empty_shard`),
as Beam's sink gave it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from encoder import storage as object_store
from pipelines import storage
from pipelines.records import shard_writer_options
from pipelines.write_behind import WriteBehind

WRITING = ".writing"  # each directory's files being written: no reader's `*.parquet` lists them
MIME = "application/x-parquet"


def shard_name(directory: str, index: int, count: int) -> str:
    return storage.join(directory, f"part-{index:05d}-of-{count:05d}.parquet")


class _OpenShard:
    """One bundle's Parquet file, its tables encoded behind the runner's thread (`WriteBehind`, two pending at most):
    on a GPU worker that thread also feeds the GPU, which went without reads and batches while it encoded
    (100-200 ms per 16,384 vectors)."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path = path
        self._handle = FileSystems.create(path, mime_type=MIME)
        try:
            self._writer = pq.ParquetWriter(self._handle, schema, **shard_writer_options(schema))
        except BaseException:
            self._handle.close()
            raise
        self._behind = WriteBehind(pending=2, name="shard-write")

    def write(self, table: pa.Table) -> None:
        self._behind.submit(self._writer.write_table, table)

    def close(self) -> None:
        """Every table written and the file closed; a failed write is raised (and the file still closed)."""

        def close_file() -> None:
            try:
                self._writer.close()
            finally:
                self._handle.close()

        self._behind.close(then=close_file)


class WriteShardFiles(beam.DoFn):
    """Each bundle's tables into one file under `directory/.writing/`; at the bundle's end, `(directory, path)`.
    A failed write fails the bundle at its next table or at its end, and the runner retries the bundle."""

    def __init__(self, directory: str, schema: pa.Schema) -> None:
        self._directory, self._schema = directory, schema
        self._open: _OpenShard | None = None

    def start_bundle(self) -> None:
        self._abandon()  # a file an earlier bundle of this instance left open when it failed

    def process(self, table: pa.Table) -> None:
        if self._open is None:
            self._open = _OpenShard(storage.join(self._directory, WRITING, f"{uuid.uuid4().hex}.parquet"), self._schema)
        self._open.write(table)

    def finish_bundle(self) -> Iterator:
        opened, self._open = self._open, None
        if opened is not None:
            opened.close()
            yield GlobalWindows.windowed_value((self._directory, opened.path))

    def teardown(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        """A failed bundle's file: closed, left under `.writing/` for the rename to remove."""
        opened, self._open = self._open, None
        if opened is not None:
            try:
                opened.close()
            except Exception:  # the bundle already failed with its own error
                pass


def place_shards(directory: str, written: Iterable[str]) -> list[str]:
    """Rename the bundles' files to `part-SSSSS-of-NNNNN.parquet` in the order of their names, then remove
    `directory/.writing/`. Idempotent: a file already at its name (a retried rename) is left there."""
    sources = sorted(set(written))
    targets = [shard_name(directory, i, len(sources)) for i in range(len(sources))]
    # Two listings, not a stat per file: a Dataflow job's bundles can leave hundreds of files.
    writing = {_name(p) for p in storage.match(storage.join(directory, WRITING, "*.parquet"))}
    moving = [(s, t) for s, t in zip(sources, targets, strict=True) if _name(s) in writing]
    placed = set()
    if len(moving) < len(sources):  # a retried rename: some are in place already
        placed = {_name(p) for p in storage.match(storage.join(directory, "part-*.parquet"))}
    missing = [t for s, t in zip(sources, targets, strict=True) if _name(s) not in writing and _name(t) not in placed]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) are neither written nor in place, e.g. {missing[0]}")
    if moving:
        FileSystems.rename([s for s, _ in moving], [t for _, t in moving])
    object_store.delete_tree(storage.join(directory, WRITING))
    return targets


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def write_empty_shard(directory: str, schema: pa.Schema) -> str | None:
    """One shard with no rows where a run wrote none, so every run's directory has its schema; None if it has some."""
    if storage.match(storage.join(directory, "*.parquet")):
        return None
    path = shard_name(directory, 0, 1)
    storage.write_table_atomic(path, schema.empty_table(), **shard_writer_options(schema))
    return path


class WriteShards(beam.PTransform):
    """Tables → `(directory, path)` of each bundle's file, for `PlaceShards` to rename into place."""

    def __init__(self, directory: str, schema: pa.Schema) -> None:
        super().__init__()
        self._directory, self._schema = directory, schema

    def expand(self, tables):
        return tables | beam.ParDo(WriteShardFiles(self._directory, self._schema)).with_output_types(tuple[str, str])


class PlaceShards(beam.PTransform):
    """`(directory, path)` of every sink's files (a PCollection from each `WriteShards`) → each directory's shards in
    place: one stage for all of them."""

    def expand(self, written):
        return (
            written
            | "All files" >> beam.Flatten()
            | "By directory" >> beam.GroupByKey()
            | "Rename into place" >> beam.MapTuple(place_shards)
        )
