"""Object-store helpers that are not about a particular store."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

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
