"""Names read from manifests and pointers never reach outside their root: ids, file names, symlinks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from encoder import storage
from indexing import IndexConfig, SnapshotClient, SnapshotError, build_snapshot, publish, retain
from indexing.embeddings import EmbeddingsError, open_embeddings
from indexing.snapshot import read_manifest

CFG = IndexConfig(queries=50)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/../../x", "/etc/passwd", "a\\..\\x", "a\0b", "gs://b/x", "a//b"]
)
def test_contained_refuses_names_that_leave_their_directory(name):
    with pytest.raises(ValueError):
        storage.contained(name, nested=True)


def test_contained_allows_plain_and_nested_names():
    assert storage.contained("part-00000-of-00001.parquet") == "part-00000-of-00001.parquet"
    assert storage.contained("scann/dataset.npy", nested=True) == "scann/dataset.npy"
    with pytest.raises(ValueError, match="plain name"):
        storage.contained("scann/dataset.npy")


@pytest.fixture
def published(tmp_path, run) -> tuple[Path, str]:
    root = tmp_path / "snapshots"
    snapshot_id = build_snapshot(run, str(root), CFG)["snapshot_id"]
    publish(str(root), snapshot_id)
    return root, snapshot_id


def _point_latest_at(root: Path, snapshot_id: str) -> None:
    latest = json.loads((root / "LATEST").read_text())
    latest["snapshot_id"] = snapshot_id
    (root / "LATEST").write_text(json.dumps(latest))


def test_a_latest_that_names_a_path_outside_the_root_is_refused(published, tmp_path):
    root, good = published
    outside = tmp_path / "outside"
    shutil.copytree(root / good, outside)  # a complete, valid snapshot — but not under the root
    client = SnapshotClient(str(root))
    _point_latest_at(root, "../outside")
    assert client.refresh() is False and client.snapshot_id == good  # keeps serving what it had
    with pytest.raises(SnapshotError, match="escapes the root"):
        SnapshotClient(str(root))
    client.close()


def test_a_symlinked_snapshot_directory_is_refused(published, tmp_path):
    root, good = published
    outside = tmp_path / "outside"
    shutil.copytree(root / good, outside)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SnapshotError, match="symlink"):
        read_manifest(str(root), "linked")


def test_a_snapshot_file_behind_a_symlinked_directory_is_refused(published, tmp_path):
    root, good = published
    manifest = json.loads((root / good / "manifest.json").read_text())
    name = next(iter(manifest["files"]))
    (tmp_path / "elsewhere").mkdir()
    shutil.move(root / good / name, tmp_path / "elsewhere" / name)
    (root / good / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    manifest["files"][f"sub/{name}"] = manifest["files"].pop(name)
    (root / good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="outside the snapshot directory"):
        publish(str(root), good)


def test_retention_never_acts_on_an_id_a_manifest_claims(tmp_path, run):
    root = tmp_path / "snapshots"
    ids = [build_snapshot(run, str(root), CFG)["snapshot_id"] for _ in range(3)]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    forged = json.loads((root / ids[0] / "manifest.json").read_text())
    forged["snapshot_id"] = "../victim"
    (root / ids[0] / "manifest.json").write_text(json.dumps(forged))
    publish(str(root), ids[2])
    deleted = retain(str(root), keep=1)
    assert "../victim" not in deleted and (victim / "keep.txt").read_text() == "precious"
    assert (root / ids[0]).is_dir()  # the forged one is not a snapshot to act on at all


def test_an_embed_run_whose_manifest_points_outside_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["shards"][0]["path"] = "../../etc/passwd"
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingsError, match="malformed"):
        open_embeddings(str(copy))


def test_a_gcs_object_name_cannot_escape_the_download_directory(monkeypatch, tmp_path):
    # The emulator refuses such names, real GCS does not: a listing is faked instead.
    class Blob:
        def __init__(self, name: str) -> None:
            self.name, self.generation = name, 1

        def download_to_filename(self, path: str, retry=None) -> None:
            Path(path).write_bytes(b"x")

    class Client:
        def list_blobs(self, bucket, prefix, retry=None):
            return [Blob(f"{prefix}ok.txt"), Blob(f"{prefix}../../escaped.txt")]

    monkeypatch.setattr(storage, "gcs_client", Client)
    with pytest.raises(ValueError, match="escapes its directory"):
        storage.download_gcs_dir("gs://bucket/snap", tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))
