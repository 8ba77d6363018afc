"""A mapped file brought into the page cache before it is served (`indexing.page_cache`)."""

from __future__ import annotations

import mmap
import os

import numpy as np

from indexing import page_cache
from indexing.page_cache import resident, warm


def _file(path, size: int):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return path


def test_only_the_chunks_the_cache_lacks_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(page_cache, "CHUNK", CHUNK := 16 * mmap.PAGESIZE)
    path = _file(tmp_path / "index.faiss", 2 * CHUNK + 12345)
    cached = np.ones(-(-(2 * CHUNK + 12345) // mmap.PAGESIZE), dtype=bool)
    cached[CHUNK // mmap.PAGESIZE + 3] = False  # one page of the second chunk
    monkeypatch.setattr(page_cache, "resident", lambda p: cached)
    assert warm(path) == CHUNK
    cached[-1] = False  # and the last, short chunk
    assert warm(path) == CHUNK + 12345
    monkeypatch.setattr(page_cache, "resident", lambda p: None)  # cannot be asked: all of it
    assert warm(path) == 2 * CHUNK + 12345
    assert warm(_file(tmp_path / "empty", 0)) == 0


def test_a_file_evicted_from_the_cache_is_read_back_into_it(tmp_path):
    path = _file(tmp_path / "index.faiss", 3 * mmap.PAGESIZE * 256)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = resident(path)
    assert before is not None and len(before) == 3 * 256
    read = warm(path)
    if before.all():  # a file system whose pages cannot be evicted (tmpfs): nothing to read
        assert read == 0
    else:
        assert read == os.path.getsize(path) and resident(path).all()
    assert warm(path) == 0
