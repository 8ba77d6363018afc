"""Reading whole objects under a size cap (`pipelines.storage.read_bytes`)."""

from __future__ import annotations

import os

import pytest

from pipelines.storage import NotFound, read_bytes


@pytest.mark.parametrize("size", [0, 70_000, (1 << 20) - 1, 1 << 20, (5 << 19) + 3])
def test_a_file_at_the_cap_reads_whole_and_one_byte_over_is_refused(tmp_path, size):
    path = tmp_path / "blob"
    data = os.urandom(size)
    path.write_bytes(data)
    assert read_bytes(str(path), max_bytes=size) == data
    assert read_bytes(str(path), max_bytes=size + (1 << 20)) == data
    assert read_bytes(str(path)) == data
    if size:
        with pytest.raises(ValueError, match=f"max_bytes={size - 1}"):
            read_bytes(str(path), max_bytes=size - 1)


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        read_bytes(str(tmp_path / "nope"), max_bytes=10)
