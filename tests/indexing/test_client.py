"""SnapshotClient: searches, hot reload, and refusing bad snapshots while the old one keeps serving."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from indexing import IndexConfig, SnapshotClient, SnapshotError, UnknownItem, build_snapshot, publish, read_latest
from tests.indexing.conftest import clustered, write_run

CFG = IndexConfig(queries=50)


@pytest.fixture
def served(tmp_path, run):
    root = str(tmp_path / "snapshots")
    first = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, first)
    return root, SnapshotClient(root, cache_dir=str(tmp_path / "cache"))


def _exact_ids(vectors: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return [f"item-{i:06d}" for i in order]


def test_search_by_item_excludes_the_item(served, vectors):
    _, client = served
    found = client.search(item_ids=["item-000010"], k=5)[0]
    assert len(found) == 5 and all(n.item_id != "item-000010" for n in found)
    assert [n.item_id for n in found] == _exact_ids(vectors, vectors[10], 6)[1:]
    assert found[0].score >= found[-1].score


def test_the_loaded_snapshot_answers_in_rows_and_leaves_out_each_querys_own():
    from indexing.client import without_own

    found = np.array([[4, 7, 2, 9], [3, -1, 5, -1], [8, 8, 6, 1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.0, 0.5, 0.0], [0.9, 0.8, 0.7, 0.6]], np.float32)
    kept_scores, kept = without_own(scores, found, np.array([7, 3, -1]), k=3)
    assert kept.tolist() == [[4, 2, 9], [5, -1, -1], [8, 8, 6]]  # its own row out, faiss's -1s out, in their order
    assert kept_scores[0].tolist() == pytest.approx([0.9, 0.7, 0.6]) and np.isnan(kept_scores[1, 1:]).all()
    assert without_own(scores, found, None, k=2)[1].tolist() == [[4, 7], [3, 5], [8, 8]]


def test_a_batch_in_rows_answers_as_the_search_by_ids_does(served, vectors):
    _, client = served
    snapshot = client.loaded
    rows = snapshot.item_ids.rows(["item-000010", "item-000003"])
    scores, found = snapshot.neighbour_rows(np.asarray(snapshot.vectors[rows]), 5, exclude=rows)
    by_ids = client.search(item_ids=["item-000010", "item-000003"], k=5)
    assert [snapshot.item_ids.ids(r) for r in found] == [[n.item_id for n in hits] for hits in by_ids]
    assert scores.tolist() == [[n.score for n in hits] for hits in by_ids]


def test_search_by_raw_vector(served, vectors):
    _, client = served
    query = vectors[10] * 3.0  # not normalised: the client normalises
    found = client.search(vectors=query, k=3)[0]
    assert [n.item_id for n in found] == _exact_ids(vectors, vectors[10], 3)
    assert found[0].score == pytest.approx(1.0, abs=1e-5)


def test_a_batch_with_an_item_not_in_the_snapshot(served):
    """By default an unknown item fails the call (naming it); `unknown="none"` answers the others, in order, with
    None in its place: a page of carousels is not lost to one listing delisted since it was rendered."""
    _, client = served
    with pytest.raises(UnknownItem, match="gone"):
        client.search(item_ids=["item-000001", "gone", "item-000002"], k=3)
    alone = client.search(item_ids=["item-000001", "item-000002"], k=3)
    assert client.search(item_ids=["item-000001", "gone", "item-000002", "gone-too"], k=3, unknown="none") == [
        alone[0], None, alone[1], None]  # fmt: skip
    assert client.search(item_ids=["gone"], k=3, unknown="none") == [None]
    with pytest.raises(ValueError, match="unknown must be 'raise' or 'none'"):
        client.search(item_ids=["gone"], unknown="skip")
    asked = ["item-000001", "gone", 7, "item-000002"] * 5  # past 16: hashed at once
    assert client.holds(asked) == [item in client for item in asked] == [True, False, False, True] * 5


def test_bad_queries(served):
    _, client = served
    with pytest.raises(UnknownItem):
        client.search(item_ids=["nope"], k=3)
    for bad in ([0.1] * 5, [float("nan")] * 32, [0.0] * 32):
        with pytest.raises(ValueError):
            client.search(vectors=bad, k=3)
    with pytest.raises(ValueError, match="k must be"):
        client.search(item_ids=["item-000001"], k=0)
    with pytest.raises(ValueError, match="exactly one"):
        client.search(k=3)


def test_auto_refresh_needs_a_pause_between_reads(served):
    _, client = served
    for interval in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="the refresh interval must be > 0 seconds"):
            client.start_auto_refresh(interval)


def test_refresh_swaps_in_a_new_snapshot(served, tmp_path):
    root, client = served
    old = client.snapshot_id
    assert client.refresh() is False  # nothing new
    extra = write_run(tmp_path / "run2", clustered(500, 32, seed=3), ids=[f"new-{i}" for i in range(500)])
    new = build_snapshot(extra, root, CFG)["snapshot_id"]
    publish(root, new)
    assert client.refresh() is True
    assert client.snapshot_id == new != old
    assert client.search(item_ids=["new-1"], k=2)[0]


def _publish_then_break(root: str, run: str, breaker) -> str:
    snapshot_id = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, snapshot_id)
    breaker(Path(root) / snapshot_id)
    return snapshot_id


def _flip_byte(directory: Path) -> None:
    path = directory / "vectors.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "breaker",
    [_flip_byte, lambda d: (d / "ids.parquet").unlink(), lambda d: (d / "manifest.json").unlink()],
    ids=["corrupt", "file-missing", "incomplete"],
)
def test_bad_new_snapshot_is_refused_and_old_keeps_serving(served, run, caplog, breaker):
    root, client = served
    old = client.snapshot_id
    bad = _publish_then_break(root, run, breaker)
    with caplog.at_level(logging.ERROR, logger="indexing.client"):
        assert client.refresh() is False
    assert client.snapshot_id == old
    assert any(bad in r.getMessage() and "refusing" in r.getMessage() for r in caplog.records)
    assert client.search(item_ids=["item-000001"], k=2)[0]


def test_dimension_change_is_refused_unless_allowed(served, tmp_path, caplog):
    root, client = served
    other = write_run(tmp_path / "wide", clustered(300, 48), ids=[f"w{i}" for i in range(300)])
    publish(root, build_snapshot(other, root, CFG)["snapshot_id"])
    assert client.refresh_status == {"checked_at": None, "error": None, "refused": None}  # none yet
    with caplog.at_level(logging.ERROR, logger="indexing.client"):
        assert client.refresh() is False
    assert "dimension 48 differs from the served 32" in caplog.text
    status = client.refresh_status  # what monitoring reads (the service's /snapshot): why newer ones are refused
    assert (
        status["error"] == "dimension 48 differs from the served 32"
        and status["refused"] == read_latest(root).snapshot_id
    )
    assert status["checked_at"] and client.refresh() is False and client.refresh_status["error"]  # still refused
    assert SnapshotClient(root, allow_dim_change=True).manifest["dim"] == 48


def test_tampered_manifest_values_are_caught(served, run):
    root, _ = served
    snapshot_id = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, snapshot_id)
    path = Path(root) / snapshot_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["count"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="inconsistent"):
        SnapshotClient(root)


def test_nothing_published(tmp_path):
    with pytest.raises(SnapshotError, match="nothing is published"):
        SnapshotClient(str(tmp_path))


def test_searches_during_refreshes_always_answer(served, tmp_path):
    root, client = served
    extra = write_run(tmp_path / "run3", clustered(400, 32, seed=9), ids=[f"z{i}" for i in range(400)])
    ids = [build_snapshot(extra, root, CFG)["snapshot_id"] for _ in range(2)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        query = np.ones(32, dtype=np.float32)
        while not stop.is_set():
            try:
                snapshot_id, found = client.search_tagged(vectors=query, k=5)
                assert len(found[0]) == 5 and snapshot_id
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

    thread = threading.Thread(target=searcher)
    thread.start()
    for i in range(6):
        publish(root, ids[i % 2])
        client.refresh()
    stop.set()
    thread.join()
    assert not errors


def test_reduced_snapshot_takes_full_dimension_queries(tmp_path, run, vectors):
    root = str(tmp_path / "reduced")
    publish(root, build_snapshot(run, root, IndexConfig(reduce="pca:16", min_recall=0.5, queries=100))["snapshot_id"])
    client = SnapshotClient(root)
    found = client.search(vectors=vectors[3], k=1)[0]
    assert found[0].item_id == "item-000003"
    with pytest.raises(ValueError, match="dimension 32"):
        client.search(vectors=vectors[3][:16], k=1)


@pytest.mark.gcs
def test_client_on_a_gcs_root(gcs_emulator, gcs_bucket, run, tmp_path):
    root = f"gs://{gcs_bucket}/snapshots"
    publish(root, build_snapshot(run, root, CFG)["snapshot_id"])
    client = SnapshotClient(root, cache_dir=str(tmp_path / "cache"))
    assert client.search(item_ids=["item-000002"], k=3)[0]
    newer = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, newer)
    assert client.refresh() and client.snapshot_id == newer


@pytest.mark.gcs
def test_a_published_snapshot_on_gcs_is_never_overwritten_and_an_interrupted_one_is(gcs_emulator, gcs_bucket, run):
    """Each file is an upload of its own on gs://: a build under a taken id overwrote the snapshot's files in place.
    A folder without a manifest (written last) is an interrupted build's, which a build under its id replaces."""
    from encoder import storage

    root = f"gs://{gcs_bucket}/immutable"
    build_snapshot(run, root, CFG, snapshot_id="s1")
    before = storage.read_bytes(f"{root}/s1/manifest.json")
    with pytest.raises(SnapshotError, match="snapshot s1 already exists under"):
        build_snapshot(run, root, CFG, snapshot_id="s1")
    assert storage.read_bytes(f"{root}/s1/manifest.json") == before
    storage.write_bytes(f"{root}/s2/ids.parquet", b"half of an interrupted build")
    assert build_snapshot(run, root, CFG, snapshot_id="s2")["snapshot_id"] == "s2"
    publish(root, "s2")  # every checksum verified


@pytest.mark.gcs
def test_the_gs_snapshot_cache_keeps_the_copies_used_last(gcs_emulator, gcs_bucket, run, tmp_path, monkeypatch):
    """A service took a new copy of every night's snapshot and kept them all (its disk filled, then every refresh
    failed): the cache keeps the copies used last, and a process still serving a removed copy keeps answering."""
    import indexing.snapshot as snapshot_module

    monkeypatch.setattr(snapshot_module, "CACHE_KEEP", 2)
    monkeypatch.setattr(snapshot_module, "CACHE_RECENT_S", 0)  # (an hour: none of a test's copies would go)
    root, cache = f"gs://{gcs_bucket}/nightly", tmp_path / "cache"
    ids = [build_snapshot(run, root, CFG)["snapshot_id"] for _ in range(4)]
    publish(root, ids[0])
    oldest = SnapshotClient(root, cache_dir=str(cache))  # a process that never refreshes
    before, (first_copy,) = oldest.search(item_ids=["item-000002"], k=3), list(cache.iterdir())
    client = SnapshotClient(root, cache_dir=str(cache))
    for snapshot_id in ids[1:]:
        publish(root, snapshot_id)
        assert client.refresh()
        assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) <= 2
    assert client.search(item_ids=["item-000002"], k=3) and client.snapshot_id == ids[-1]
    assert not first_copy.exists() and oldest.search(item_ids=["item-000002"], k=3) == before  # its answers stay


def test_the_cache_prune_spares_the_copies_used_last_or_lately_and_downloads_under_way(tmp_path):
    import os
    import time

    from indexing.snapshot import CACHE_KEEP, VERIFIED_DIR, prune_cache

    now = time.time()
    ages_h = {"a": 1.5, "b": 3, "c": 5, "d": 7, "e": 9, "f": 0.5, ".download-old": 30, ".download-new": 1}
    for name, hours in ages_h.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - hours * 3600,) * 2)
    records = tmp_path / VERIFIED_DIR
    records.mkdir()
    for name, days in {"old.json": 31, "new.json": 29}.items():
        (records / name).write_text("{}")
        os.utime(records / name, (now - days * 86400,) * 2)
    removed = {p.name for p in prune_cache(tmp_path, keep=tmp_path / "e")}
    assert CACHE_KEEP == 4 and removed == {"d", ".download-old"}  # e: the copy just taken; f..c: the 4 used last
    assert [p.name for p in records.iterdir()] == ["new.json"]  # checks remembered a month ago: gone


def test_a_check_that_passed_is_remembered_by_the_files_stamps(served, run, tmp_path, monkeypatch):
    """A later load of the same files, unchanged, reads none of them to check their sha256 (a service's restart;
    `lookalike similar`; the publish after the evaluation, then the services on that machine). A file changed in
    place with its modification time put back is still read again: its change time moved."""
    import indexing.snapshot as snapshot_module
    from encoder import storage

    root, client = served
    monkeypatch.setattr(snapshot_module, "_SETTLED_S", 0.0)
    hashed: list[str] = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    cache = tmp_path / "cache2"

    def load() -> int:
        before = len(hashed)
        assert SnapshotClient(root, cache_dir=str(cache)).snapshot_id == client.snapshot_id
        return len(hashed) - before

    old = cache / snapshot_module.VERIFIED_DIR / "old.json"  # a check remembered a month ago, of a copy since gone
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    os.utime(old, (old.stat().st_mtime - 31 * 86400,) * 2)
    assert load() >= 3 and load() == 0 and not old.exists()
    path = Path(root) / client.snapshot_id / "vectors.npy"
    st = path.stat()

    def flip_in_place() -> None:
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the size and modification time as they were

    flip_in_place()
    with pytest.raises(SnapshotError, match="vectors.npy fails its sha256 check"):
        load()
    flip_in_place()
    assert load() >= 3 and load() == 0

    [record] = (cache / snapshot_module.VERIFIED_DIR).iterdir()
    record.write_text("{not json")  # damaged: checked again, never taken as passed
    assert load() >= 3 and load() == 0
    stored = json.loads(record.read_text())
    record.write_text(json.dumps({**stored, "value": "yes"}))
    assert load() >= 3

    monkeypatch.setattr(snapshot_module, "_SETTLED_S", 3600.0)  # files changed lately: checked, not remembered
    record.unlink()
    assert load() >= 3 and load() >= 3 and not record.exists()

    monkeypatch.setattr(snapshot_module, "_SETTLED_S", 0.0)
    fresh = build_snapshot(run, root, CFG)["snapshot_id"]
    publish(root, fresh)  # checked, and remembered in this machine's cache, where a default client looks
    before = len(hashed)
    assert SnapshotClient(root).snapshot_id == fresh and len(hashed) == before


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_faiss_index_is_mapped_from_its_file_and_answers_as_one_read_whole(run, vectors, tmp_path, kind):
    """Not copied into the process: its pages are the page cache's, shared by every process serving the snapshot,
    and a refresh's next snapshot is not a second copy in memory beside the first."""
    import faiss

    root = str(tmp_path / "snapshots")
    snapshot_id = build_snapshot(run, root, IndexConfig(index=kind, queries=50))["snapshot_id"]
    publish(root, snapshot_id)
    client = SnapshotClient(root, cache_dir=str(tmp_path / "cache"))
    path = str((Path(root) / snapshot_id / "index.faiss").resolve())
    assert any(line.rstrip().endswith(path) for line in Path("/proc/self/maps").read_text().splitlines())
    whole = faiss.read_index(path)
    for name, value in client.manifest["index"].get("search_params", {}).items():
        faiss.ParameterSpace().set_index_parameter(whole, name, value)
    scores, rows = client._current.index.search(vectors[:20], 10)
    expected_scores, expected_rows = whole.search(vectors[:20], 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def test_the_ids_lookup_is_mapped_and_a_snapshot_built_before_it_still_loads(run, vectors, tmp_path):
    """A snapshot's build saves its ids' sorted hashes and rows (`ids.lookup.arrow`, checked like every file); a
    client maps them. One built before the lookup was has none: its ids are hashed and sorted at load, as then."""
    from indexing.snapshot import ID_LOOKUP

    root = tmp_path / "snapshots"
    snapshot_id = build_snapshot(run, str(root), CFG)["snapshot_id"]
    publish(str(root), snapshot_id)
    manifest = json.loads((root / snapshot_id / "manifest.json").read_text())
    files = manifest["files"]
    assert ID_LOOKUP in files and manifest["bytes"]["index"] == sum(f["bytes"] for n, f in files.items()
                                                                    if n.startswith("index"))  # fmt: skip
    client = SnapshotClient(str(root), cache_dir=str(tmp_path / "cache"))
    path = str((root / snapshot_id / ID_LOOKUP).resolve())
    assert any(line.rstrip().endswith(path) for line in Path("/proc/self/maps").read_text().splitlines())
    expected = client.search(item_ids=["item-000001", "item-003999"], k=5)

    older = tmp_path / "older"
    shutil.copytree(root, older)
    (older / snapshot_id / ID_LOOKUP).unlink()
    del manifest["files"][ID_LOOKUP]
    (older / snapshot_id / "manifest.json").write_text(json.dumps(manifest))
    before = SnapshotClient(str(older), cache_dir=str(tmp_path / "cache"))
    assert len(before) == 4000 and before.search(item_ids=["item-000001", "item-003999"], k=5) == expected
    assert before.holds(["item-000002", "nope"]) == [True, False] == client.holds(["item-000002", "nope"])


def test_a_load_brings_the_mapped_files_into_the_page_cache_first(served, tmp_path, monkeypatch):
    """A mapped index read by searches' page faults came in 4 KiB at a time from a cold cache (a 1M × 768 IVF's
    first 400 queries: 40 s); the load reads what the cache lacks first, as reading the index whole did."""
    import indexing.client as client_module

    root, client = served
    warmed = []
    monkeypatch.setattr(client_module, "warm", lambda path: warmed.append(Path(path).name))
    SnapshotClient(root, cache_dir=str(tmp_path / "cache"))
    assert warmed == ["index.faiss", "ids.lookup.arrow"]
