"""Object-store helpers that are not about a particular store."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoder import storage

# Read a table through the library's reader, then exit at once: the moment when Arrow may still be
# releasing the reader on its own threads while the interpreter shuts down.
_READ_THEN_EXIT = "import sys; from evaluation.catalog import read_table; read_table(sys.argv[1]); sys.exit(2)"


def test_arrow_input_reads_the_bytes_it_was_given():
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"item_id": ["a", "b"], "n": [1, 2]}), sink)
    table = pq.read_table(storage.arrow_input(sink.getvalue().to_pybytes()))
    assert table.to_pydict() == {"item_id": ["a", "b"], "n": [1, 2]}


def test_exiting_right_after_a_parquet_read_never_aborts(tmp_path):
    # Over io.BytesIO about 1 exit in 8 ended in SIGABRT (exit 134 / -6), so 32 clean exits in a
    # row would happen by chance with probability < 2%.
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"item_id": [f"i{n}" for n in range(2000)], "title": ["x"] * 2000}), path)

    def exit_code(_):
        return subprocess.run([sys.executable, "-c", _READ_THEN_EXIT, str(path)], capture_output=True).returncode

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(exit_code, range(32)))
    assert codes == [2] * 32


def test_a_local_read_over_its_cap_is_refused_and_one_at_the_cap_is_not(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"1234")
    assert storage.read_bytes(str(path), max_bytes=4) == b"1234"
    with pytest.raises(ValueError, match="larger than max_bytes=3"):
        storage.read_bytes(str(path), max_bytes=3)


def test_a_capped_read_of_an_empty_object_is_empty_where_the_store_refuses_its_range(monkeypatch):
    """GCS may answer a range from byte 0 of an empty object with 416: no such byte, and no error either."""
    from google.api_core.exceptions import RequestRangeNotSatisfiable

    class EmptyBlob:
        def download_as_bytes(self, **kwargs):
            assert (kwargs["start"], kwargs["end"]) == (0, 10)
            raise RequestRangeNotSatisfiable("requested range not satisfiable")

    monkeypatch.setattr(storage, "_blob", lambda uri: EmptyBlob())
    assert storage.read_bytes("gs://b/empty", max_bytes=10) == b""


def test_each_process_and_each_emulator_has_a_client_of_its_own(monkeypatch):
    """Threads share the client; a forked child must not use its parent's pooled connections."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # anonymous: nothing is asked of the network
    monkeypatch.setattr(storage, "_CLIENT", None)
    client = storage.gcs_client()
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: storage.gcs_client(), range(8))) == {client}
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as a forked child sees it
    child = storage.gcs_client()
    assert child is not client and child is storage.gcs_client()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:10")
    assert storage.gcs_client() not in (client, child)
