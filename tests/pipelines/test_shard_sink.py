"""The shard sink: each bundle's file renamed into place after one shuffle, retries and empty runs included."""

from __future__ import annotations

import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

import pipelines.shard_sink as shard_sink
from pipelines.shard_sink import WRITING, PlaceShards, WriteShardFiles, WriteShards, place_shards, write_empty_shard

SCHEMA = pa.schema([("item_id", pa.string()), ("n", pa.int64())])


def _table(start: int, rows: int) -> pa.Table:
    return pa.table({"item_id": [f"i{k}" for k in range(start, start + rows)], "n": range(start, start + rows)},
                    schema=SCHEMA)  # fmt: skip


def _bundle_files(step: WriteShardFiles, *tables: pa.Table) -> list[str]:
    """One bundle through the step as a runner drives it: the paths it hands on at the bundle's end."""
    step.start_bundle()
    for table in tables:
        step.process(table)
    return [out.value[1] for out in step.finish_bundle()]


def _bundle(step: WriteShardFiles, *tables: pa.Table) -> str:
    (path,) = _bundle_files(step, *tables)
    return path


def _rows(directory) -> list[int]:
    return sorted(n for p in sorted(os.listdir(directory)) if p.endswith(".parquet")
                  for n in pq.read_table(directory / p).column("n").to_pylist())  # fmt: skip


def test_each_bundle_writes_a_file_that_is_renamed_into_place(tmp_path):
    step = WriteShardFiles(str(tmp_path), SCHEMA)
    step.setup()
    written = [_bundle(step, _table(0, 10), _table(10, 5)), _bundle(step, _table(15, 20)), _bundle(step, _table(35, 1))]
    assert all(f"/{WRITING}/" in p for p in written)
    placed = place_shards(str(tmp_path), written)
    assert [p.rsplit("/", 1)[-1] for p in placed] == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]  # .writing is gone
    assert _rows(tmp_path) == list(range(36))


def test_a_bundle_with_no_tables_hands_on_nothing(tmp_path):
    step = WriteShardFiles(str(tmp_path), SCHEMA)
    step.start_bundle()
    assert list(step.finish_bundle()) == []
    assert not (tmp_path / WRITING).exists()


def test_a_bundle_beyond_its_rows_hands_on_files_that_are_placed_in_its_order(tmp_path):
    step = WriteShardFiles(str(tmp_path), SCHEMA, rows_per_shard=4)
    written = _bundle_files(step, *(_table(3 * k, 3) for k in range(12)))  # 36 rows: nine files of four
    assert written == sorted(written) and len(written) == 9  # numbered within the bundle: sorted, in order
    others = _bundle_files(step, _table(100, 2))
    placed = place_shards(str(tmp_path), list(reversed(written + others)))
    ours = [p for p in placed if pq.read_table(p).column("n")[0].as_py() < 100]
    assert [n for p in ours for n in pq.read_table(p).column("n").to_pylist()] == list(range(36))
    assert [pq.read_metadata(p).num_rows for p in ours] == [4] * 9


def test_a_failed_bundles_file_is_closed_and_removed_with_the_rest(tmp_path, monkeypatch):
    opened = []

    def create(path):
        opened.append(FileSystems.create(path))
        return opened[-1]

    monkeypatch.setattr(shard_sink, "_create", create)
    step = WriteShardFiles(str(tmp_path), SCHEMA)
    step.start_bundle()
    step.process(_table(0, 10))
    step.process(pa.table({"other": [1]}))  # the write behind fails: at the next table or the bundle's end
    with pytest.raises(ValueError, match="schema"):
        list(step.finish_bundle())
    step.start_bundle()  # the runner retries the bundle, maybe on a new instance; this one is torn down later
    step.process(_table(100, 3))
    step._open._behind.drain()  # its file opened
    step.teardown()  # a bundle left open: its file is closed, left for the rename to remove
    assert len(opened) == 2 and all(h.closed for h in opened)
    step.start_bundle()  # the same instance given another bundle after one failed mid-way
    step.process(_table(200, 3))
    step._open._behind.drain()
    step.start_bundle()
    assert len(opened) == 3 and opened[-1].closed and step._open is None
    assert len(os.listdir(tmp_path / WRITING)) == 3
    retried = _bundle(WriteShardFiles(str(tmp_path), SCHEMA), _table(0, 10))
    place_shards(str(tmp_path), [retried])
    assert sorted(os.listdir(tmp_path)) == ["part-00000-of-00001.parquet"]
    assert _rows(tmp_path) == list(range(10))


def test_a_retried_rename_gives_each_file_the_name_it_had(tmp_path):
    step = WriteShardFiles(str(tmp_path), SCHEMA)
    written = [_bundle(step, _table(10 * k, 10)) for k in range(4)]
    first = sorted(written)[1]
    os.rename(first, tmp_path / "part-00001-of-00004.parquet")  # the first attempt moved one file, then failed
    place_shards(str(tmp_path), list(reversed(written)))  # the retry's list, in another order
    names = sorted(os.listdir(tmp_path))
    assert names == [f"part-{i:05d}-of-00004.parquet" for i in range(4)]
    by_name = {n: pq.read_table(tmp_path / n).column("n")[0].as_py() for n in names}
    expected = {f"part-{i:05d}-of-00004.parquet": None for i in range(4)}
    for i, path in enumerate(sorted(written)):  # sorted paths, numbered in order: the same name each time
        expected[f"part-{i:05d}-of-00004.parquet"] = 10 * written.index(path)
    assert by_name == expected


def test_a_file_neither_written_nor_in_place_is_an_error(tmp_path):
    step = WriteShardFiles(str(tmp_path), SCHEMA)
    written = [_bundle(step, _table(0, 10)), str(tmp_path / WRITING / "lost.parquet")]
    with pytest.raises(FileNotFoundError, match="neither written nor in place"):
        place_shards(str(tmp_path), written)
    assert (tmp_path / WRITING).exists()  # nothing removed: what was written is still there to find


def test_an_empty_shard_only_where_a_run_wrote_no_rows(tmp_path):
    empty, full = tmp_path / "empty", tmp_path / "full"
    full.mkdir()
    pq.write_table(_table(0, 3), full / "part-00000-of-00001.parquet")
    assert write_empty_shard(str(full), SCHEMA) is None
    path = write_empty_shard(str(empty), SCHEMA)
    assert path.endswith("part-00000-of-00001.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_two_sinks_placed_in_one_step_of_a_pipeline(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with beam.Pipeline(runner="FnApiRunner") as p:
        tables_a = p | "A" >> beam.Create([_table(0, 5), _table(5, 5)]).with_output_types(pa.Table)
        tables_b = p | "B" >> beam.Create([_table(100, 2)]).with_output_types(pa.Table)
        written = (
            tables_a | "Write A" >> WriteShards(str(a), SCHEMA),
            tables_b | "Write B" >> WriteShards(str(b), SCHEMA),
        )
        written | PlaceShards()
    assert _rows(a) == list(range(10)) and _rows(b) == [100, 101]
    assert not (a / WRITING).exists() and not (b / WRITING).exists()
    assert all(n.startswith("part-") and "-of-" in n for n in os.listdir(a) + os.listdir(b))
