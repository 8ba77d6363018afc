"""Arrow tables → Parquet files of at most `rows_per_shard` rows each, encoded in order behind the caller.

One writer for both ways a worker writes its shards: the Beam sink (`pipelines.shard_sink`, a bundle's files)
and the loop without Beam (`pipelines.direct_embed`). Without a cap a local run, whose runner gives all its
images to one bundle, wrote one file per run: ~61 GB at 20 M items of 768 floats, which no reader can split
across threads or hosts, and which a retry would write again whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.embed_config import ROWS_PER_SHARD
from pipelines.records import shard_writer_options
from pipelines.write_behind import WriteBehind


class ShardFiles:
    """Tables written in order to files `name(0)`, `name(1)`, ...; a table that would overfill a file is split, so
    each holds exactly `rows_per_shard` rows but the last. The encoding runs behind the caller (`WriteBehind`,
    `pending` tables at most): on a GPU worker the caller's thread also feeds the GPU, which went without reads and
    batches while it encoded (100-200 ms per 16,384 vectors). A failed write is raised at the next `write` or at
    `close`, which closes the file either way.

    `open_file(path)` gives a writable binary handle (an object store's); None: pyarrow opens local paths itself.
    """

    def __init__(self, name: Callable[[int], str], schema: pa.Schema, *, rows_per_shard: int = ROWS_PER_SHARD,
                 pending: int = 2, open_file: Callable[[str], BinaryIO] | None = None) -> None:  # fmt: skip
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self._name, self._schema, self._rows_per_shard, self._open_file = name, schema, rows_per_shard, open_file
        self._paths: list[str] = []  # every file opened, in order
        self._writer: pq.ParquetWriter | None = None
        self._handle: BinaryIO | None = None
        self._room = 0  # rows the open file still takes
        self._behind = WriteBehind(pending, name="shard-write")

    def write(self, table: pa.Table) -> None:
        self._behind.submit(self._write, table)

    def close(self) -> list[str]:
        """Wait for every write and close the last file; the files' paths, in order."""
        self._behind.close(then=self._close_file)
        return self._paths

    def _write(self, table: pa.Table) -> None:
        done = 0
        while done < table.num_rows:
            if self._room == 0:
                self._close_file()
                self._open(self._name(len(self._paths)))
            rows = min(self._room, table.num_rows - done)
            self._writer.write_table(table.slice(done, rows) if rows < table.num_rows else table)
            self._room -= rows
            done += rows

    def _open(self, path: str) -> None:
        self._paths.append(path)
        self._handle = self._open_file(path) if self._open_file is not None else None
        try:
            self._writer = pq.ParquetWriter(
                path if self._handle is None else self._handle, self._schema, **shard_writer_options(self._schema)
            )
        except BaseException:
            self._close_file()
            raise
        self._room = self._rows_per_shard

    def _close_file(self) -> None:
        writer, handle, self._writer, self._handle, self._room = self._writer, self._handle, None, None, 0
        try:
            if writer is not None:
                writer.close()
        finally:
            if handle is not None:
                handle.close()
