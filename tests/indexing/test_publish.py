"""Publishing: verification before LATEST moves, rollback, retention, racing publishers, and gs:// roots."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from encoder import storage
from indexing import IndexConfig, SnapshotError, build_snapshot, list_snapshots, publish, read_latest, retain, rollback
from tests.indexing.conftest import clustered, write_run

CFG = IndexConfig(queries=50)


@pytest.fixture
def root_with_three(tmp_path, run) -> tuple[str, list[str]]:
    root = str(tmp_path / "snapshots")
    ids = [build_snapshot(run, root, CFG)["snapshot_id"] for _ in range(3)]
    return root, ids


def test_publish_defaults_to_the_newest_and_keeps_history(root_with_three):
    root, ids = root_with_three
    assert read_latest(root) is None
    publish(root, ids[0])
    latest = publish(root)
    assert latest.snapshot_id == ids[2] and latest.history == (ids[0],)
    rows = list_snapshots(root)
    assert [r["snapshot_id"] for r in rows] == ids
    assert [r["latest"] for r in rows] == [False, False, True]
    assert all(r["recall_at_10"] == 1.0 and r["count"] == 4000 for r in rows)


def test_the_newest_snapshot_that_lost_its_gate_is_published_only_by_name(root_with_three):
    """A night's loser stays the newest snapshot until the next night: `publish` without an id picked it. The list
    says which snapshots passed their gates."""
    from evaluation.gate import write_record

    root, ids = root_with_three
    write_record(root, ids[1], {"snapshot_id": ids[1], "passed": True, "gates": []})
    write_record(root, ids[2], {"snapshot_id": ids[2], "passed": False, "gates": [{"gate": "g", "passed": False}]})
    with pytest.raises(SnapshotError, match=f"the newest snapshot, {ids[2]}, failed its evaluation gate"):
        publish(root)
    assert read_latest(root) is None
    assert [r["gate"] for r in list_snapshots(root)] == [None, "passed", "failed"]
    assert publish(root, ids[2]).snapshot_id == ids[2]  # by name: the person's call


def test_a_stray_file_in_the_root_is_not_a_snapshot(root_with_three):
    """Someone's notes beside the snapshots: listed, published, rolled back to and retained around as nothing."""
    root, ids = root_with_three
    (Path(root) / "NOTES.txt").write_text("rebuilt by hand on Tuesday")
    assert [r["snapshot_id"] for r in list_snapshots(root)] == ids
    with pytest.raises(SnapshotError, match="missing or incomplete"):
        publish(root, "NOTES.txt")
    publish(root, ids[0])
    publish(root)
    assert retain(root, 1) == [ids[1]] and (Path(root) / "NOTES.txt").exists()


def test_tampered_snapshot_is_never_published(root_with_three):
    root, ids = root_with_three
    publish(root, ids[0])
    index_file = Path(root) / ids[1] / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[100] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="sha256"):
        publish(root, ids[1])
    (Path(root) / ids[2] / "ids.parquet").unlink()
    with pytest.raises(SnapshotError, match="missing"):
        publish(root, ids[2])
    assert read_latest(root).snapshot_id == ids[0]


def test_incomplete_snapshot_is_not_a_snapshot(root_with_three):
    root, ids = root_with_three
    (Path(root) / ids[2] / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match="incomplete"):
        publish(root, ids[2])
    assert publish(root).snapshot_id == ids[1]  # the newest *complete* one


def test_manifest_file_names_cannot_escape(root_with_three):
    root, ids = root_with_three
    path = Path(root) / ids[0] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="escapes"):
        publish(root, ids[0])


def test_rollback_steps_back_and_to_a_named_snapshot(root_with_three):
    root, ids = root_with_three
    for snapshot_id in ids:
        publish(root, snapshot_id)
    assert rollback(root).snapshot_id == ids[1]
    assert rollback(root).snapshot_id == ids[0]
    with pytest.raises(SnapshotError, match="nothing to roll back to"):
        rollback(root)
    assert rollback(root, to=ids[2]).snapshot_id == ids[2]
    assert read_latest(root).history[0] == ids[0]


def test_retention_never_deletes_latest_or_the_one_before(tmp_path, run):
    root = str(tmp_path / "r")
    ids = [build_snapshot(run, root, CFG)["snapshot_id"] for _ in range(5)]
    publish(root, ids[0])
    publish(root, ids[1])
    (Path(root) / "_evaluations").mkdir()
    for snapshot_id in ids:  # as a gated `lookalike evaluate` leaves them: the record and the rankings
        (Path(root) / "_evaluations" / f"{snapshot_id}.json").write_text("{}")
        (Path(root) / "_evaluations" / f"{snapshot_id}.rankings.npz").write_bytes(b"")
    deleted = retain(root, keep=1)
    assert deleted == ids[2:4]
    assert sorted(p.name for p in Path(root).iterdir() if not p.name.startswith((".", "_"))) == sorted(
        [ids[0], ids[1], ids[4], "LATEST"]
    )
    assert sorted(p.name.split(".")[0] for p in (Path(root) / "_evaluations").iterdir()) == sorted(
        [ids[0], ids[0], ids[1], ids[1], ids[4], ids[4]]
    )


def _publish_many(root: str, ids: list[str], rounds: int, barrier) -> None:
    barrier.wait()
    for i in range(rounds):
        publish(root, ids[i % len(ids)])


def _observe(root: str, stop, bad, seen) -> None:
    while not stop.is_set():
        latest = read_latest(root)
        if latest is None:
            continue
        seen.value += 1
        if not storage.exists(storage.join(root, latest.snapshot_id, "manifest.json")):
            bad.value += 1


def _race(root: str, ids: list[str], rounds: int, timeout_s: float) -> tuple[int, int]:
    """Two processes publish `rounds` times each in opposite orders while a third reads LATEST.

    Returns: (observations of LATEST, how many named an incomplete snapshot).
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, stop, bad, seen = ctx.Barrier(2), ctx.Event(), ctx.Value("i", 0), ctx.Value("i", 0)
    observer = ctx.Process(target=_observe, args=(root, stop, bad, seen))
    observer.start()
    writers = [ctx.Process(target=_publish_many, args=(root, order, rounds, barrier)) for order in (ids, ids[::-1])]
    start = time.monotonic()
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=timeout_s)
    stop.set()
    observer.join(timeout=30)
    assert all(w.exitcode == 0 for w in writers), f"writers failed after {time.monotonic() - start:.0f}s"
    return seen.value, bad.value


@pytest.mark.slow
def test_racing_publishers_never_lose_an_update(tmp_path, run):
    root = str(tmp_path / "race")
    ids = [build_snapshot(run, root, IndexConfig(queries=20))["snapshot_id"] for _ in range(2)]
    seen, bad = _race(root, ids, rounds=100, timeout_s=240)
    assert seen > 0 and bad == 0, f"LATEST named an incomplete snapshot {bad} times in {seen} observations"
    assert read_latest(root).sequence == 200, "every publish is counted: none lost to a race"


# ------------------------------------------------------------------ gs://


@pytest.mark.gcs
def test_gcs_root_publish_rollback_and_conditional_writes(gcs_emulator, gcs_bucket, run, tmp_path):
    root = f"gs://{gcs_bucket}/snapshots"
    first = build_snapshot(run, root, CFG)["snapshot_id"]
    second = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, first)
    assert publish(root).snapshot_id == second
    assert [r["latest"] for r in list_snapshots(root)] == [False, True]
    assert rollback(root).snapshot_id == first

    # The generation precondition refuses a stale writer.
    uri = f"{root}/LATEST"
    _, version = storage.read_versioned(uri)
    publish(root, second)
    with pytest.raises(storage.ConcurrentUpdate):
        storage.write_if_version(uri, b"{}", version)
    assert read_latest(root).snapshot_id == second

    blob = gcs_emulator.bucket(gcs_bucket).blob(f"snapshots/{first}/vectors.npy")
    blob.upload_from_string(blob.download_as_bytes()[:-4])
    with pytest.raises(SnapshotError):
        publish(root, first)
    assert read_latest(root).snapshot_id == second


@pytest.mark.gcs
@pytest.mark.slow
def test_gcs_racing_publishers(gcs_emulator, gcs_bucket, tmp_path):
    small = write_run(tmp_path / "run", clustered(300, 8))
    root = f"gs://{gcs_bucket}/race"
    ids = [build_snapshot(small, root, IndexConfig(queries=10))["snapshot_id"] for _ in range(2)]
    shutil.rmtree(storage.cache_dir("snapshots"), ignore_errors=True)  # the session's (tests/conftest.py)
    seen, bad = _race(root, ids, rounds=100, timeout_s=300)
    assert seen > 0 and bad == 0, f"LATEST named an incomplete snapshot {bad} times in {seen} observations"
    assert read_latest(root).sequence == 200
