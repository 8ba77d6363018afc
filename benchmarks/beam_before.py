"""The Beam embed pipeline as it ran before changes to its runner's thread, for benchmarks to run beside the
product: each shard's tables encoded in the runner's thread (before `pipelines.write_behind`) and pickled whole by
Beam's size sampling (before `ArrowTableCoder`): `tables_as_before`; each chunk that the reader processes take
read while the runner's thread waited (local files) or a thread of the fetch step did (gs:// objects), before
`ProcessReader.start`: `reads_as_before`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa

import pipelines.embed as embed
import pipelines.embed_steps as embed_steps
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
