"""Arrow tables → Parquet shards `<directory>/part-SSSSS-of-NNNNN.parquet`: each bundle writes files of its own
(`rows_per_shard` rows at most) under the directory's `.writing/`, and one step after a shuffle renames them all
into place.

Beam's `iobase.Write` does the same in four stages of its own per sink (a temp directory made once, its write
results grouped, a pre-finalize and a finalize, each reading the others as side inputs); the embed pipeline's two
sinks made eight of its eleven stages, ~0.15 s of a local run's fixed cost (BENCHMARKS.md). Here both sinks share
one stage after the main one: the files' names, keyed by their directory, through one `GroupByKey`.

What a runner's retries leave: a bundle that fails after opening its files leaves them under `.writing/`; only the
files of bundles that finished reach the rename, which removes `.writing/` with what is left in it. The names are
sorted before they are numbered, so a rename that is itself retried gives each file the name it had the first time
(a file already moved is found at its name). A directory with no rows gets one empty shard (`write_empty_shard`),
as Beam's sink gave it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from encoder import storage as object_store
from pipelines import storage
from pipelines.records import shard_writer_options
from pipelines.shard_files import ROWS_PER_SHARD, ShardFiles

WRITING = ".writing"  # each directory's files being written: no reader's `*.parquet` lists them
MIME = "application/x-parquet"


def shard_name(directory: str, index: int, count: int) -> str:
    return storage.join(directory, f"part-{index:05d}-of-{count:05d}.parquet")


class WriteShardFiles(beam.DoFn):
    """Each bundle's tables into files under `directory/.writing/`, `rows_per_shard` rows each at most (`ShardFiles`);
    at the bundle's end, `(directory, path)` of each. A failed write fails the bundle at its next table or at its
    end, and the runner retries the bundle."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_shard: int = ROWS_PER_SHARD) -> None:
        self._directory, self._schema, self._rows_per_shard = directory, schema, rows_per_shard
        self._open: ShardFiles | None = None

    def start_bundle(self) -> None:
        self._abandon()  # files an earlier bundle of this instance left open when it failed

    def process(self, table: pa.Table) -> None:
        if self._open is None:
            # One name per bundle, numbered within it: sorted, the bundle's files keep their order.
            bundle = storage.join(self._directory, WRITING, uuid.uuid4().hex)
            self._open = ShardFiles(lambda i: f"{bundle}-{i:05d}.parquet", self._schema,
                                    rows_per_shard=self._rows_per_shard, open_file=_create)  # fmt: skip
        self._open.write(table)

    def finish_bundle(self) -> Iterator:
        opened, self._open = self._open, None
        if opened is not None:
            for path in opened.close():
                yield GlobalWindows.windowed_value((self._directory, path))

    def teardown(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        """A failed bundle's files: closed, left under `.writing/` for the rename to remove."""
        opened, self._open = self._open, None
        if opened is not None:
            try:
                opened.close()
            except Exception:  # the bundle already failed with its own error
                pass


def _create(path: str) -> BinaryIO:
    return FileSystems.create(path, mime_type=MIME)


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
    """Tables → `(directory, path)` of each bundle's files, for `PlaceShards` to rename into place."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_shard: int = ROWS_PER_SHARD) -> None:
        super().__init__()
        self._directory, self._schema, self._rows_per_shard = directory, schema, rows_per_shard

    def expand(self, tables):
        files = WriteShardFiles(self._directory, self._schema, self._rows_per_shard)
        return tables | beam.ParDo(files).with_output_types(tuple[str, str])


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
