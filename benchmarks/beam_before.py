"""The Beam embed pipeline's tables of vectors as they went before two changes, for benchmarks to run beside the
product: each shard's tables encoded in the runner's thread (before `pipelines.write_behind`), and pickled whole
by Beam's size sampling (before `ArrowTableCoder`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa

import pipelines.embed as embed
from pipelines.embed_dofns import ArrowTableCoder


class InlineShards(embed.ParquetShards):
    """The shard sink encoding each table in the runner's thread."""

    def write_record(self, opened, table: pa.Table) -> None:
        opened[1].write_table(table)


@contextlib.contextmanager
def tables_as_before() -> Iterator[None]:
    """Pipelines built inside it write and code their tables as before; the product's ways are back on exit."""
    sink = embed.ParquetShards
    embed.ParquetShards = InlineShards
    beam.coders.registry.register_coder(pa.Table, beam.coders.PickleCoder)
    try:
        yield
    finally:
        embed.ParquetShards = sink
        beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)
