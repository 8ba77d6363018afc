"""Reading whole objects under a size cap (`pipelines.storage.read_bytes`)."""

from __future__ import annotations

import io
import os

import pytest

from pipelines.storage import NotFound, _read_capped, match, read_bytes


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


@pytest.mark.parametrize("pattern", ["*/*.jpg", "**", "a/**/*.jpg", "a/[xy]*.jpg", "?/*", "a*", "*.jpg", "none/*"])
def test_a_local_glob_lists_what_beams_match_lists(tmp_path, pattern):
    from apache_beam.io.filesystems import FileSystems

    for name in ("a/x.jpg", "a/y.jpg", "a/.hidden.jpg", "a/deep/z.jpg", "b/x.jpg", "b/x.png", "top.jpg",
                 "a/dir.jpg/inner.jpg"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    full = str(tmp_path / pattern)
    assert match(full) == sorted(m.path for m in FileSystems.match([full])[0].metadata_list)


def test_a_broken_link_in_a_glob_is_listed_for_its_read_to_dead_letter(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    assert match(str(tmp_path / "*.jpg")) == [str(tmp_path / "broken.jpg"), str(tmp_path / "ok.jpg")]


@pytest.mark.gcs
def test_odd_gs_image_uris_are_fetch_reasons_not_errors(gcs_emulator, gcs_bucket):
    from encoder import storage
    from pipelines.storage import read_image

    storage.write_bytes(f"gs://{gcs_bucket}/empty.jpg", b"")
    odd = ["gs://", f"gs://{gcs_bucket}", f"gs://{gcs_bucket}/", f"gs://{gcs_bucket}/dir/", "gs://no-such-bucket-x/a.jpg",
           "gs://Bad Bucket/a.jpg", f"gs://{gcs_bucket}/missing.jpg"]  # fmt: skip
    reasons = {uri: read_image(uri, 1000) for uri in odd}
    assert all(isinstance(r, str) and r for r in reasons.values()), reasons
    assert reasons[f"gs://{gcs_bucket}/missing.jpg"] == "not found"
    assert reasons[f"gs://{gcs_bucket}/"] == f"ValueError: gs:// URI without an object name: 'gs://{gcs_bucket}/'"
    assert read_image(f"gs://{gcs_bucket}/empty.jpg", 1000) == b""  # the decoder gives its reason
