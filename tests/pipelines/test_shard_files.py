"""Shard files: tables in order behind the caller, no file over its rows, every file closed whatever fails."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.shard_files import ShardFiles

SCHEMA = pa.schema([("item_id", pa.string()), ("n", pa.int64())])


def _table(start: int, rows: int) -> pa.Table:
    return pa.table({"item_id": [f"i{k}" for k in range(start, start + rows)], "n": range(start, start + rows)},
                    schema=SCHEMA)  # fmt: skip


class _Handles:
    """`open_file` that keeps each handle it gives, to see that every one is closed."""

    def __init__(self) -> None:
        self.opened = []

    def __call__(self, path: str):
        handle = open(path, "wb")  # noqa: SIM115 - the writer closes it
        self.opened.append(handle)
        return handle


def test_tables_are_written_in_order_behind_the_caller(tmp_path):
    handles, gate = _Handles(), threading.Event()
    files = ShardFiles(lambda i: str(tmp_path / f"{i}.parquet"), SCHEMA, open_file=handles)
    write = ShardFiles._write
    files._write = lambda table: gate.wait(5) and write(files, table)  # held until the caller is back (or 5 s)
    files.write(_table(0, 100))  # returns while the table waits to be written
    gate.set()
    for k in range(1, 10):
        files.write(_table(100 * k, 100))
    assert files.close() == [str(tmp_path / "0.parquet")]
    assert all(h.closed for h in handles.opened)
    assert pq.read_table(tmp_path / "0.parquet").column("n").to_pylist() == list(range(1000))


def test_no_file_holds_more_than_its_rows_and_tables_split_across_files_keep_their_order(tmp_path):
    handles = _Handles()
    files = ShardFiles(lambda i: str(tmp_path / f"{i}.parquet"), SCHEMA, rows_per_shard=25, open_file=handles)
    start = 0
    for rows in (10, 15, 30, 7, 1):  # the second fills the first file exactly; the third spans two
        files.write(_table(start, rows))
        start += rows
    paths = files.close()
    assert paths == [str(tmp_path / f"{i}.parquet") for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in paths] == [25, 25, 13]
    assert [n for p in paths for n in pq.read_table(p).column("n").to_pylist()] == list(range(63))
    assert len(handles.opened) == 3 and all(h.closed for h in handles.opened)


def test_local_paths_are_opened_by_the_writer(tmp_path):
    files = ShardFiles(lambda i: str(tmp_path / f"part-{i}.parquet"), SCHEMA, rows_per_shard=4)
    files.write(_table(0, 9))
    assert [pq.read_metadata(p).num_rows for p in files.close()] == [4, 4, 1]


def test_no_rows_no_file(tmp_path):
    files = ShardFiles(lambda i: str(tmp_path / f"{i}.parquet"), SCHEMA)
    files.write(_table(0, 0))
    assert files.close() == [] and list(tmp_path.iterdir()) == []


def test_a_failed_write_is_raised_and_the_file_still_closed(tmp_path):
    handles = _Handles()
    files = ShardFiles(lambda i: str(tmp_path / f"{i}.parquet"), SCHEMA, open_file=handles)
    files.write(_table(0, 10))
    files.write(pa.table({"other": [1]}))  # not the shard's schema: the write behind fails
    with pytest.raises(ValueError, match="schema"):
        files.close()
    assert len(handles.opened) == 1 and handles.opened[0].closed  # the bundle is retried; no file is left open


def test_a_file_that_cannot_be_opened_fails_the_writes(tmp_path):
    files = ShardFiles(lambda i: str(tmp_path / "missing" / f"{i}.parquet"), SCHEMA)
    files.write(_table(0, 3))
    with pytest.raises(OSError):
        files.close()


def test_rows_per_shard_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rows_per_shard must be >= 1"):
        ShardFiles(lambda i: str(tmp_path / f"{i}.parquet"), SCHEMA, rows_per_shard=0)
