"""The embed pipeline's per-chunk work without Beam: fetch, reuse lookup, decode, dead letters."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from encoder import DecodeLimits, PreprocessConfig
from indexing.item_ids import ItemIds
from pipelines.catalog import CatalogItem
from pipelines.embed_steps import KnownDigests, PreviousVectors, prepare_items
from pipelines.file_reader import object_reads
from pipelines.records import EmbeddingRow, ReuseRequest, embedding_matrix, embedding_schema, rows_to_table

PREPROCESS = PreprocessConfig(height=8, width=8)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jpeg(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


class _RecordingPool(ThreadPoolExecutor):
    """A thread pool that remembers what it was handed."""

    def __init__(self) -> None:
        super().__init__(4)
        self.handed: list = []

    def submit(self, fn, /, *args, **kwargs):  # map() submits through here too
        self.handed.append(args[0])
        return super().submit(fn, *args, **kwargs)


def test_known_digests_positions_mark_present_and_absent():
    a, b, c = (_sha(bytes([n])) for n in range(3))
    known = KnownDigests([b, a, a])
    assert len(known) == 2
    found = known.positions([a, c, b])
    assert (found[[0, 2]] >= 0).all() and found[1] == -1
    assert a in known and c not in known
    assert (KnownDigests([]).positions([a, b]) == -1).all()


def test_previous_vectors_give_rows_under_the_new_item_ids():
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    vectors = np.eye(3, dtype=np.float32)
    rows = [EmbeddingRow(f"old-{i}", vectors[i], _sha(bytes([i])), "v1", at) for i in range(3)]
    stale = EmbeddingRow("old-x", np.ones(3, np.float32), _sha(b"x"), "v0", at)
    previous = PreviousVectors.load([rows_to_table(rows[:2], 3), rows_to_table([rows[2], stale], 3)], "v1")
    assert len(previous) == 3 and previous.dim == 3 and _sha(b"x") not in previous

    table = previous.table(
        [ReuseRequest("new-a", "a.jpg", _sha(bytes([2]))), ReuseRequest("new-b", "b.jpg", _sha(bytes([0])))]
    )
    assert table.column("item_id").to_pylist() == ["new-a", "new-b"]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), vectors[[2, 0]])
    assert table.column("model_version").to_pylist() == ["v1", "v1"]
    assert table.column("embedded_at").to_pylist() == [at, at]
    with pytest.raises(KeyError, match=_sha(b"x")):
        previous.table([ReuseRequest("new-c", "c.jpg", _sha(b"x"))])


def test_prepare_items_accounts_for_every_item_once_and_decodes_only_what_changed(tmp_path):
    same, changed, forced, broken = (tmp_path / f"{name}.jpg" for name in ("same", "changed", "forced", "broken"))
    for path, seed in ((same, 1), (changed, 2), (forced, 3)):
        path.write_bytes(_jpeg(seed))
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    known = KnownDigests([_sha(same.read_bytes()), _sha(forced.read_bytes()), _sha(_jpeg(99))])
    items = [
        CatalogItem("same", str(same)),
        CatalogItem("changed", str(changed)),
        CatalogItem("forced", str(forced)),  # reusable bytes, but asked to be re-embedded
        CatalogItem("broken", str(broken)),
        CatalogItem("missing", str(tmp_path / "missing.jpg")),
        CatalogItem("no-uri", ""),
        CatalogItem("remote", "nosuchscheme://bucket/x.jpg"),
    ]
    remote_reads = object_reads().stats.reads
    with _RecordingPool() as pool:
        prepared = prepare_items(items, pool, PREPROCESS, DecodeLimits(), known, reembed=ItemIds(["forced"]))
    assert [r.item_id for r in prepared.reuse] == ["same"]
    assert prepared.reuse[0].image_sha256 == _sha(same.read_bytes())
    assert sorted(d.item_id for d in prepared.decoded) == ["changed", "forced"]
    assert all(d.pixels.shape == (8, 8, 3) for d in prepared.decoded)
    reasons = {f.item_id: (f.stage, f.error) for f in prepared.failed}
    assert reasons.keys() == {"broken", "missing", "no-uri", "remote"}
    assert reasons["missing"] == ("fetch", "not found") and reasons["broken"][0] == "decode"
    assert reasons["remote"] == ("fetch", "no filesystem reads nosuchscheme:// here: local paths, gs://, http(s):// "
                                 "and Beam's installed ones")  # fmt: skip
    # Local files are read inline, the remote read on the process's object-store threads, the decodes on the pool.
    assert [h.item_id for h in pool.handed if isinstance(h, CatalogItem)] == []
    assert object_reads().stats.reads == remote_reads + 1
    assert sorted(h for h in pool.handed if isinstance(h, bytes)) == sorted(
        p.read_bytes() for p in (changed, forced, broken)
    )


def test_prepare_items_without_earlier_vectors_decodes_everything(tmp_path):
    paths = [tmp_path / f"{n}.jpg" for n in range(5)]
    for n, path in enumerate(paths):
        path.write_bytes(_jpeg(n))
    with ThreadPoolExecutor(2) as pool:
        prepared = prepare_items([CatalogItem(p.stem, str(p)) for p in paths], pool, PREPROCESS, DecodeLimits())
    assert sorted(d.item_id for d in prepared.decoded) == ["0", "1", "2", "3", "4"]
    assert not prepared.reuse and not prepared.failed


def test_an_image_that_will_not_finish_decoding_is_dead_lettered_and_the_rest_go_on(tmp_path, stuck_decode):
    import time

    import pipelines.embed_steps as steps

    paths = [tmp_path / f"{n}.jpg" for n in range(6)]
    for n, path in enumerate(paths):
        path.write_bytes(_jpeg(n))
    stuck_decode(steps, _jpeg(3))
    pool = ThreadPoolExecutor(4)
    start = time.monotonic()
    prepared = prepare_items([CatalogItem(p.stem, str(p)) for p in paths], pool, PREPROCESS, DecodeLimits(),
                             threads=4, max_decode_s=0.5)  # fmt: skip
    assert time.monotonic() - start < 5
    pool.shutdown(wait=False)
    assert sorted(d.item_id for d in prepared.decoded) == ["0", "1", "2", "4", "5"]
    assert [(f.item_id, f.stage, f.error) for f in prepared.failed] == [("3", "decode", "not decoded within 0.5 s")]


def test_deferred_decoding_passes_every_image_undecoded_and_still_fails_fetches(tmp_path):
    datas = {"a": _jpeg(1), "b": _jpeg(2, "PNG"), "c": b"junk"}
    items = [CatalogItem("missing", str(tmp_path / "missing.jpg"))]
    for name, data in datas.items():
        (tmp_path / name).write_bytes(data)
        items.append(CatalogItem(name, str(tmp_path / name)))
    out = prepare_items(items, ThreadPoolExecutor(2), PREPROCESS, DecodeLimits(), defer_decode=True)
    assert {p.item_id: (p.pixels, p.data) for p in out.decoded} == {k: (None, v) for k, v in datas.items()}
    assert [(f.item_id, f.stage) for f in out.failed] == [("missing", "fetch")]


def test_deferred_decoding_through_reader_processes_gives_the_same_items_routed(tmp_path):
    from encoder.jpeg import cpu_reason
    from pipelines.embed_dofns import file_reader_for

    datas = {"a": _jpeg(1), "b": _jpeg(2, "PNG"), "c": b"junk", "d": _jpeg(1)}  # d: the same bytes as a
    items = [CatalogItem("missing", str(tmp_path / "missing.jpg")), CatalogItem("empty", "")]
    for name, data in datas.items():
        (tmp_path / name).write_bytes(data)
        items.append(CatalogItem(name, str(tmp_path / name)))
    known = KnownDigests([hashlib.sha256(datas["d"]).hexdigest()])
    limits = DecodeLimits()
    plain = prepare_items(items, ThreadPoolExecutor(2), PREPROCESS, limits, known, ItemIds(["a"]), defer_decode=True)
    read = prepare_items(items, ThreadPoolExecutor(2), PREPROCESS, limits, known, ItemIds(["a"]), defer_decode=True,
                         reader=file_reader_for(limits))  # fmt: skip
    assert {p.item_id: bytes(p.data) for p in read.decoded} == {p.item_id: p.data for p in plain.decoded}
    assert {p.item_id: p.route for p in read.decoded} == {
        k: cpu_reason(datas[k], limits.max_bytes, limits.max_pixels) or "" for k in "abc"
    }  # "a" is re-embedded on request, "d" reused
    assert all(p.route is None for p in plain.decoded)  # routed later, by the embed step
    assert read.reuse == plain.reuse and sorted(read.failed) == sorted(plain.failed)


def test_stream_outputs_give_a_table_of_the_embedded_and_failures_with_their_stage():
    from encoder.gpu_stream import StreamBatch
    from pipelines.embed_steps import stream_outputs
    from pipelines.records import PreparedImage

    items = [PreparedImage(f"id{n}", f"u{n}", f"s{n}", None, b"") for n in range(3)]
    done = StreamBatch([items[0], items[2]], np.eye(2, dtype=np.float32), [(items[1], "encode", "boom")], on_gpu=3)
    before = datetime.now(UTC).replace(microsecond=0)
    table, failures = stream_outputs(done, "v1")
    assert table.schema == embedding_schema(2)
    stamps = table.column("embedded_at").to_pylist()
    assert stamps[0] == stamps[1] and before <= stamps[0] <= datetime.now(UTC)  # one moment for the batch
    rows = table.select(["item_id", "image_sha256", "model_version"]).to_pylist()
    assert [tuple(r.values()) for r in rows] == [("id0", "s0", "v1"), ("id2", "s2", "v1")]
    np.testing.assert_array_equal(embedding_matrix(table), np.eye(2))
    assert [(f.item_id, f.image_uri, f.stage, f.error) for f in failures] == [("id1", "u1", "encode", "boom")]


@pytest.mark.gcs
def test_a_gpu_worker_reads_gs_images_in_its_reader_processes_and_other_schemes_itself(gcs_emulator, gcs_bucket):
    from encoder import storage
    from encoder.jpeg import cpu_reason
    from pipelines.file_reader import ProcessReader, ReadLimits

    datas = {"a": _jpeg(1), "b": _jpeg(2, "PNG"), "c": b"junk"}
    for name, data in datas.items():
        storage.write_bytes(f"gs://{gcs_bucket}/{name}.jpg", data)
    items = [CatalogItem(name, f"gs://{gcs_bucket}/{name}.jpg") for name in [*datas, "missing"]]
    items.append(CatalogItem("elsewhere", "nosuchscheme://bucket/x.jpg"))
    given: list[str] = []

    class Recording(ProcessReader):
        def read(self, paths, batch_size, keys=None):
            given.extend(paths)
            return super().read(paths, batch_size, keys)

    limits = DecodeLimits()
    with Recording(ReadLimits.of(limits), 2, chunk=2) as reader:
        out = prepare_items(items, ThreadPoolExecutor(2), PREPROCESS, limits, defer_decode=True, reader=reader)
        decoded = {p.item_id: (bytes(p.data), p.route) for p in out.decoded}
    assert given == [item.image_uri for item in items[:4]]  # gs:// to the readers; Beam's schemes read here
    assert decoded == {k: (v, cpu_reason(v, limits.max_bytes, limits.max_pixels) or "") for k, v in datas.items()}
    assert sorted((f.item_id, f.stage, f.error[:10]) for f in out.failed) == [("elsewhere", "fetch", "no filesys"),
                                                                          ("missing", "fetch", "not found")]  # fmt: skip


@pytest.mark.parametrize("depth", [1, 2])
def test_prepare_ahead_has_the_next_remote_chunks_under_way_and_hands_results_on_in_order(monkeypatch, depth):
    """Chunks of object-store images are prepared while the one before them is handed on: `depth` + 1 are under
    way together, never more, and results come back in the order the chunks went in; a chunk of local files is
    prepared in the caller's thread once those before it are done; a chunk's error is raised when its result
    is due."""
    import threading
    import time

    import pipelines.embed_steps as embed_steps
    from pipelines.embed_steps import PrepareAhead

    lock, running, most, threads = threading.Lock(), [0], [0], {}
    together = "abc"[: depth + 1]
    barrier = threading.Barrier(depth + 1, timeout=10)  # passes only with depth + 1 chunks under way at once

    def prepare(items, *args, **kwargs):
        name = items[0].item_id
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads[name] = threading.current_thread()
        try:
            if name == "bad":
                raise OSError("disk gone")
            if name in together:
                barrier.wait()
            time.sleep(0.01 * (name == "c"))  # finishes after the one behind it
            return name.upper()
        finally:
            with lock:
                running[0] -= 1

    def remote(name: str) -> list[CatalogItem]:
        return [CatalogItem(name, f"gs://b/{name}.jpg")]

    monkeypatch.setattr(embed_steps, "prepare_items", prepare)
    ahead = PrepareAhead(depth)
    try:
        for name in "abcd"[:depth]:
            assert ahead.submit(remote(name)) == []  # nothing due yet: under way
        for before, name in zip("abcd", "abcd"[depth:], strict=False):
            assert ahead.submit(remote(name)) == [before.upper()]
        assert ahead.submit([CatalogItem("local", "/photos/1.jpg")]) == [n.upper() for n in "abcd"[4 - depth :]] + [
            "LOCAL"
        ]
        assert threads["local"] is threading.current_thread() and threads["c"] is not threading.current_thread()
        assert ahead.submit(remote("e")) == []
        assert list(ahead.drain()) == ["E"]
        assert most[0] == depth + 1
        for name in ["bad", *"fg"[: depth - 1]]:
            assert ahead.submit(remote(name)) == []
        with pytest.raises(OSError, match="disk gone"):
            ahead.submit(remote("h"))
        ahead.forget()
        assert list(ahead.drain()) == []
    finally:
        ahead.close()


def test_prepare_ahead_sends_the_readers_chunks_at_once_and_finishes_them_in_order_here(tmp_path, monkeypatch):
    """A GPU worker's chunks that the reader processes take are sent to them when submitted, with no thread of
    this process waiting on them, and finished in the caller's thread when due, in order; a failed bundle's
    chunks still under way give their ring slots back."""
    import threading

    import pipelines.embed_steps as embed_steps
    from pipelines.embed_steps import PrepareAhead
    from pipelines.file_reader import ProcessReader, ReadLimits

    datas = {f"i{k}": _jpeg(k) for k in range(12)}
    for name, data in datas.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    chunks = [[CatalogItem(f"i{k}", str(tmp_path / f"i{k}.jpg")) for k in range(s, s + 4)] for s in (0, 4, 8)]
    started, finished = [], []
    start_reads, prepare_items_ = embed_steps.start_reads, embed_steps.prepare_items

    def start(items, reader):
        started.append(items[0].item_id)
        return start_reads(items, reader)

    def prepare(items, *args, **kwargs):
        finished.append((items[0].item_id, threading.current_thread(), kwargs.get("read") is not None))
        return prepare_items_(items, *args, **kwargs)

    monkeypatch.setattr(embed_steps, "start_reads", start)
    monkeypatch.setattr(embed_steps, "prepare_items", prepare)
    limits, pool, ahead = DecodeLimits(), ThreadPoolExecutor(2), PrepareAhead(2)
    try:
        with ProcessReader(ReadLimits.of(limits), 2, chunk=2, slots=16) as reader:
            args, kwargs = (pool, PREPROCESS, limits), {"defer_decode": True, "reader": reader}
            assert ahead.submit(chunks[0], *args, **kwargs) == []
            assert ahead.submit(chunks[1], *args, **kwargs) == []
            assert started == ["i0", "i4"] and finished == [] and reader._free.qsize() == 12  # sent, 2 slots each
            outs = ahead.submit(chunks[2], *args, **kwargs) + list(ahead.drain())
            assert [[p.item_id for p in out.decoded] for out in outs] == [[i.item_id for i in c] for c in chunks]
            assert all(bytes(p.data) == datas[p.item_id] for out in outs for p in out.decoded)
            assert finished == [(c[0].item_id, threading.current_thread(), True) for c in chunks]
            del outs
            assert reader._free.qsize() == 16
            for chunk in chunks[:2]:
                ahead.submit(chunk, *args, **kwargs)
            ahead.forget()
            assert reader._free.qsize() == 16 and not reader._results and list(ahead.drain()) == []
            assert len(finished) == 3  # the forgotten chunks were never finished
    finally:
        ahead.close()
        pool.shutdown()


def test_the_items_to_reencode_travel_as_a_file_not_inside_the_pipeline(tmp_path):
    """A backfill's `--since` set was a frozenset inside the fetch step, pickled into the job's graph: 2M ids are past
    Dataflow's 10 MB limit. It is now a file in the run's scratch folder, read once per worker process."""
    import pickle

    import pyarrow as pa

    from pipelines.embed_config import EmbedConfig
    from pipelines.embed_dofns import ReembedIds
    from pipelines.embed_runs import write_reembed

    cfg = EmbedConfig(catalog="c", model="m", out=str(tmp_path), run_id="backfill-1")
    ids = pa.array([f"sku-{i:07d}" for i in range(200_000)])
    reembed = ReembedIds(write_reembed(cfg, ids))
    assert len(pickle.dumps(reembed)) < 1000  # what the graph carries: the file's name
    held = pickle.loads(pickle.dumps(reembed)).acquire()
    assert len(held) == 200_000
    assert held.rows(["sku-0000007", "sku-9"]).tolist() == [7, -1]
    assert reembed.acquire() is reembed.acquire()
