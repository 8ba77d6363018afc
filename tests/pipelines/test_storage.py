"""Reading whole objects under a size cap (`pipelines.storage.read_bytes`)."""

from __future__ import annotations

import io
import os

import pytest

from pipelines.storage import NotFound, _read_capped, read_bytes


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


@pytest.mark.parametrize("size", [0, 70_000, (5 << 19) + 3])
def test_streams_without_a_file_size_are_read_in_pieces_under_the_same_cap(size):
    data = os.urandom(size)
    assert _read_capped(io.BytesIO(data), size) == data  # no file descriptor: 1 MiB pieces
    assert len(_read_capped(io.BytesIO(data + b"xy"), size)) == size + 1  # over the cap: the caller refuses it


def test_a_file_that_grew_since_its_stat_is_read_on(tmp_path, monkeypatch):
    import pipelines.storage as storage

    path = tmp_path / "growing"
    data = os.urandom(300_000)
    path.write_bytes(data)
    monkeypatch.setattr(storage, "_regular_size", lambda f: 1000)  # what a stat taken before the writes saw
    assert read_bytes(str(path), max_bytes=1 << 20) == data
    with pytest.raises(ValueError, match="max_bytes=200000"):
        read_bytes(str(path), max_bytes=200_000)
