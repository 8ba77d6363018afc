"""Storage faults: the whole nightly chain and a serving client through a proxy that fails 10% of requests.

The proxy (tests/support/fault_proxy.py) sits between lookalike and the GCS emulator and answers
429/500/503, cuts connections, delays answers and truncates downloads. The same night run with and
without it must give the same rows, the same vectors, the same evaluation and a published snapshot;
permanent errors (403, 404) must fail fast instead of being retried.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest

from encoder import storage
from indexing import IndexConfig, SnapshotClient, build_snapshot, publish
from indexing.publish import read_latest
from pipelines.nightly import run_nightly
from pipelines.nightly_config import EvaluateSettings, NightlyConfig
from tests.conftest import upload_dir
from tests.support.fault_proxy import FaultProxy, through

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


def _rows(out: str, run_id: str) -> dict[str, np.ndarray]:
    run = f"{out}/embeddings/{run_id}"
    manifest = json.loads(storage.read_bytes(f"{run}/_manifest.json"))
    rows: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(storage.arrow_input(storage.read_bytes(f"{run}/{shard['path']}")))
        for item_id, vector in zip(table.column("item_id").to_pylist(), table.column("embedding").to_pylist(),
                                   strict=True):  # fmt: skip
            assert item_id not in rows, f"duplicate row for {item_id}"
            rows[item_id] = np.asarray(vector, np.float32)
    return rows


def _night(catalog: str, model: str, out: str) -> dict:
    cfg = NightlyConfig(catalog=f"{catalog}/manifest.parquet", model=model, out=out,
                        interactions=f"{catalog}/interactions.parquet",
                        evaluate=EvaluateSettings(gates=("ndcg@5>=baseline-1",), since_days=None, bootstrap=50,
                                                                 min_queries=10))  # fmt: skip
    result = run_nightly(cfg, "night-1")
    metrics = json.loads(storage.read_bytes(f"{out}/runs/night-1/evaluation/metrics.json"))
    return {"published": result.published, "rows": _rows(out, "night-1"), "metrics": metrics["candidate"]}


def test_a_night_through_10_percent_faults_equals_a_clean_one(gcs_emulator, gcs_bucket, demo_catalog, tiny_model):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    clean = _night(catalog, model, f"gs://{gcs_bucket}/clean")

    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.1, seed=3) as proxy, through(proxy):
        start = time.monotonic()
        faulty = _night(catalog, model, f"gs://{gcs_bucket}/faulty")
        seconds = time.monotonic() - start
        # Read back through the proxy too: the emulator records download links with the host that
        # uploaded (here the proxy), so objects written through it are read through it.
        latest = read_latest(f"gs://{gcs_bucket}/faulty/snapshots")
        root = f"gs://{gcs_bucket}/faulty/snapshots"
        client = SnapshotClient(root)
        neighbours = client.search(item_ids=[next(iter(faulty["rows"]))], k=3)
        second = build_snapshot(f"gs://{gcs_bucket}/faulty/embeddings/night-1", root, IndexConfig(index="flat"))
        publish(root, second["snapshot_id"])
        swapped = client.refresh()
        served = client.snapshot_id
        client.close()
    assert proxy.injected >= 10, f"too few faults to prove anything: {dict(proxy.counts)}"
    shard_uploads = [p for m, p in proxy.seen if m in ("POST", "PUT") and "embeddings" in p and ".parquet" in p]
    assert shard_uploads, "the Beam workers' shard writes went around the proxy"
    print(f"faults injected: {dict(proxy.counts)}; faulty night took {seconds:.1f} s")

    assert faulty["published"] == clean["published"] == "night-1" == latest.snapshot_id
    assert faulty["rows"].keys() == clean["rows"].keys()
    for item_id, vector in clean["rows"].items():
        np.testing.assert_allclose(faulty["rows"][item_id], vector, atol=1e-6)
    assert faulty["metrics"] == clean["metrics"]
    assert len(neighbours[0]) == 3
    assert swapped and served == second["snapshot_id"]  # the client's refresh got through the faults too


def test_objects_uploaded_around_the_proxy_are_read_through_it_with_faults(gcs_emulator, gcs_bucket):
    """Beam's reader follows the download link in an object's metadata, which names the host that uploaded it:
    the proxy points those links at itself, so a catalog uploaded directly is still read through the faults."""
    from pipelines import storage as beam_storage

    data = bytes(range(256)) * 4096
    storage.write_bytes(f"gs://{gcs_bucket}/image.jpg", data)  # around the proxy
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.5, kinds=("500", "reset", "truncated"), seed=2) as proxy, through(proxy):
        for _ in range(4):
            with beam_storage.open_seekable(f"gs://{gcs_bucket}/image.jpg") as f:  # Beam's reader (Parquet's reads)
                assert f.read() == data
    downloads = [p for m, p in proxy.seen if m == "GET" and p.startswith("/download/")]
    assert len(downloads) >= 4 and proxy.injected > 0, proxy.counts


@pytest.mark.parametrize("status", ["403", "404"])
def test_permanent_errors_fail_fast_without_retrying(gcs_emulator, gcs_bucket, status):
    storage.write_bytes(f"gs://{gcs_bucket}/x", b"data")
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    calls = {
        "read": lambda: storage.read_bytes(f"gs://{gcs_bucket}/x"),
        "write": lambda: storage.write_bytes(f"gs://{gcs_bucket}/y", b"data"),
        "list": lambda: storage.list_children(f"gs://{gcs_bucket}"),
        "versioned read": lambda: storage.read_versioned(f"gs://{gcs_bucket}/x"),
        "conditional write": lambda: storage.write_if_version(f"gs://{gcs_bucket}/x", b"new", 1),
    }
    for what, call in calls.items():
        with FaultProxy(upstream, rate=1.0, kinds=(status,)) as proxy, through(proxy):
            start = time.monotonic()
            try:
                result = call()
            except Exception as err:  # noqa: BLE001 - which exception is the point of the test
                result = err
            seconds = time.monotonic() - start
        assert len(set(proxy.seen)) == len(proxy.seen) <= 2, f"{what}: {status} was retried: {proxy.seen}"
        assert seconds < 2, f"{what}: {seconds:.1f} s"
        if status == "404" and what in ("read", "versioned read"):
            assert isinstance(result, FileNotFoundError) or result == (None, 0), (what, result)
        elif status == "404" and what == "list":
            assert isinstance(result, Exception) or result == [], (what, result)
        else:
            assert isinstance(result, Exception) and status in str(result), (what, result)


def test_a_read_is_one_request_with_no_bucket_lookup_behind_it(gcs_emulator, gcs_bucket, monkeypatch):
    """google-cloud-storage fetches each new bucket's metadata on a thread of its own (for tracing spans); lookalike
    turns that off, or every client spends a request per bucket that a reader's role may not allow, and the
    fetch lands in the middle of whatever the process does next (here it made a 404 read look retried)."""
    import threading

    from pipelines.storage import configure_storage

    env = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
    storage.write_bytes(f"gs://{gcs_bucket}/x", b"data")
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    monkeypatch.delenv(env, raising=False)
    with FaultProxy(upstream, rate=0.0) as proxy, through(proxy):
        assert storage.read_bytes(f"gs://{gcs_bucket}/x") == b"data"  # a new client: the proxy is a new host
        for thread in threading.enumerate():  # the library's fetch, if it started one
            if "_fetch_background" in thread.name:
                thread.join(timeout=10)
    assert [m for m, _ in proxy.seen] == ["GET"] and proxy.seen[0][1].startswith("/download/"), proxy.seen

    monkeypatch.setenv(env, "false")  # the user's choice stands
    configure_storage()
    assert os.environ[env] == "false"
    monkeypatch.delenv(env)
    configure_storage()  # Beam's clients are off too
    assert os.environ[env] == "true"


def test_an_image_read_is_one_request_and_a_large_one_is_refused_at_its_headers(gcs_emulator, gcs_bucket):
    """Images are read through lookalike's client: one request each, where Beam's reader made a client and asked
    for the object's metadata before its bytes. A read past the cap is refused on the object's Content-Length."""
    from pipelines.storage import read_image

    photo, large = os.urandom(70_000), os.urandom(300_000)
    storage.write_bytes(f"gs://{gcs_bucket}/photo.jpg", photo)
    storage.write_bytes(f"gs://{gcs_bucket}/large.jpg", large)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.0) as proxy, through(proxy):
        assert read_image(f"gs://{gcs_bucket}/photo.jpg", 100_000) == photo
        refused = read_image(f"gs://{gcs_bucket}/large.jpg", 100_000)
        missing = read_image(f"gs://{gcs_bucket}/missing.jpg", 100_000)
    assert refused == "ValueError: object is larger than max_bytes=100000" and missing == "not found"
    assert [m for m, _ in proxy.seen] == ["GET"] * 3, proxy.seen
    assert all(path.startswith("/download/") for _, path in proxy.seen), proxy.seen


def test_an_image_damaged_on_its_way_is_read_again_and_never_handed_on(gcs_emulator, gcs_bucket, monkeypatch):
    """A byte changed in the body, its length as it was: only the object's crc32c (which GCS, and the emulator,
    send with a whole object) can tell; the read is retried, and where every attempt comes back damaged the image
    is a dead letter that says so."""
    from pipelines.storage import read_image

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the backoff's waits
    photos = {f"p{n}.jpg": os.urandom(20_000) for n in range(20)}
    for name, data in photos.items():
        storage.write_bytes(f"gs://{gcs_bucket}/{name}", data)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.3, kinds=("damaged",), seed=3) as proxy, through(proxy):
        read = {name: read_image(f"gs://{gcs_bucket}/{name}", 100_000) for name in photos}
    assert read == photos and proxy.counts["damaged"] >= 3, proxy.counts
    assert proxy.counts["requests"] == len(photos) + proxy.counts["damaged"]  # each damaged answer read once more
    with FaultProxy(upstream, rate=1.0, kinds=("damaged",)) as proxy, through(proxy):
        reason = read_image(f"gs://{gcs_bucket}/p0.jpg", 100_000)
    assert reason.startswith("ChecksumMismatch: GET ") and "crc32c of the 20000 bytes read is" in reason, reason


def test_writes_whose_answer_is_lost_still_count_once(gcs_emulator, gcs_bucket, run_dir_for_faults):
    """The write lands, the answer never comes: the retry must see its own write, not a conflict."""
    from encoder.run_lock import run_lock

    root = f"gs://{gcs_bucket}/snapshots"
    ids = [build_snapshot(run_dir_for_faults, root, IndexConfig(index="flat"))["snapshot_id"] for _ in range(2)]
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.5, kinds=("lost-reply",), seed=5) as proxy, through(proxy):
        for i in range(10):
            assert publish(root, ids[i % 2]).snapshot_id == ids[i % 2]
            with run_lock(f"gs://{gcs_bucket}/out", f"job-{i}", ttl_h=1):
                pass
        latest = read_latest(root)
    assert proxy.counts["lost-reply"] >= 5, dict(proxy.counts)
    assert latest.snapshot_id == ids[1] and latest.sequence == 10  # each publish counted once
    assert not storage.exists(f"gs://{gcs_bucket}/out/runs/LOCK")  # every lock released


@pytest.fixture
def run_dir_for_faults(tmp_path):
    from tests.indexing.conftest import clustered, write_run

    return write_run(tmp_path / "20260101T000000Z-eeeeee", clustered(300, 8))


@pytest.fixture
def sliced(monkeypatch):
    """Objects past 96 KiB read in ranges of 64 KiB (`storage._download_sliced`), the backoff's waits skipped."""
    monkeypatch.setattr(storage, "SLICE_BYTES", 64 << 10)
    monkeypatch.setattr(storage, "SLICED_FROM", 96 << 10)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


def _upload_snapshot_like(bucket: str) -> dict[str, bytes]:
    files = {"vectors.npy": os.urandom((1 << 20) + 123), "index.faiss": os.urandom(200_000),
             "ids.parquet": os.urandom(5_000), "manifest.json": b"{}"}  # fmt: skip
    for name, data in files.items():
        storage.write_bytes(f"gs://{bucket}/snap/{name}", data)
    return files


def test_a_large_object_is_read_in_ranges_at_once_through_faults(gcs_emulator, gcs_bucket, tmp_path, sliced):
    """A snapshot's tens of GB at the speed of one connection per object before. The ranges of the object's
    generation, each retried on its own through 500s, resets and bodies cut short; the small objects whole."""
    files = _upload_snapshot_like(gcs_bucket)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=0.3, kinds=("500", "reset", "truncated"), seed=4) as proxy, through(proxy):
        copy = storage.download_gcs_dir(f"gs://{gcs_bucket}/snap", tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == files
    assert proxy.injected >= 5, proxy.counts
    generation = storage.gcs_client().bucket(gcs_bucket).get_blob("snap/vectors.npy").generation
    ranged = {path for method, path in proxy.seen if "vectors.npy" in path}
    assert all(f"generation={generation}" in path for path in ranged) and ranged  # never a newer object's bytes
    assert not list((tmp_path / "cache").glob(".download-*"))


def test_ranges_that_do_not_make_the_object_are_read_again_then_refused(gcs_emulator, gcs_bucket, tmp_path, sliced):
    """A ranged read comes without the object's crc32c: the file is checked whole against it, read again when it
    does not match, and refused when it never does, nothing left in the cache."""
    _upload_snapshot_like(gcs_bucket)
    upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
    with FaultProxy(upstream, rate=1.0, kinds=("damaged",)) as proxy, through(proxy):
        with pytest.raises(ConnectionError, match=r"index.faiss: the crc32c of the 200000 bytes read is not the obj"):
            storage.download_gcs_dir(f"gs://{gcs_bucket}/snap", tmp_path / "cache")
    ranges = [path for method, path in proxy.seen if "index.faiss" in path]
    assert len(ranges) == 5 * 4  # each of the 5 attempts read its 4 ranges (the objects in name order)
    assert not any((tmp_path / "cache").iterdir())


def test_a_full_disk_under_a_ranged_read_says_so(gcs_emulator, gcs_bucket, tmp_path, sliced, monkeypatch):
    import errno

    _upload_snapshot_like(gcs_bucket)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left on device"):
        storage.download_gcs_dir(f"gs://{gcs_bucket}/snap", tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
