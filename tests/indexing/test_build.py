"""Index builds: the auto choice, measured recall on clustered data, exactness, bad input, reduction, memory budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from indexing import EmbeddingsError, IndexConfig, SnapshotError, build_snapshot, choose_index, parse_size
from indexing import snapshot as snapshot_module
from indexing.backends import _split, load_index
from indexing.memory import WORKING_ALLOWANCE, BuildMemory
from tests.indexing.conftest import clustered, write_run


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def _snapshot_dir(root: Path, manifest: dict) -> Path:
    return root / manifest["snapshot_id"]


# ------------------------------------------------------------------ choosing


@pytest.mark.parametrize(
    ("n", "kwargs", "kind"),
    [
        (1_000, {}, "flat"),
        (200_000, {}, "ivf"),
        (20_000_000, {}, "ivfpq"),
        (200_000, {"memory_budget": 1024}, "ivf-ondisk"),
        (1_000, {"backend": "scann"}, "scann-brute"),
        (200_000, {"backend": "scann"}, "scann-tree"),
        (1_000, {"index": "hnsw"}, "hnsw"),
        (1_000, {"index": "IVF16,SQ8"}, "factory"),
    ],
)
def test_auto_and_explicit_choices(n, kwargs, kind):
    plan = choose_index(n, 256, IndexConfig(**kwargs))
    assert plan.kind == kind, plan
    assert plan.reason


def test_explicit_in_memory_index_over_budget_is_refused():
    with pytest.raises(ValueError, match="keeps all"):
        choose_index(200_000, 256, IndexConfig(index="hnsw", memory_budget=1024))
    with pytest.raises(ValueError, match="scann needs all"):
        choose_index(200_000, 256, IndexConfig(backend="scann", memory_budget=1024))


@pytest.mark.parametrize(("text", "value"), [("512MB", 512 << 20), ("4GiB", 4 << 30), ("1e6", 10**6), ("10k", 10240)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "annoy"}, "backend must be one of"),
        ({"min_recall": 0}, "recall targets must be in"),
        ({"reduce": "svd:3"}, "reduce must be pca:D or prefix:D"),
        ({"k": 0}, "k and queries must be >= 1"),
        ({"min_recall": 0.99, "target_recall": 0.9}, "min_recall 0.99 is above target_recall 0.9"),
        ({"hnsw_m": 1}, "hnsw_m must be >= 2"),  # faiss's HNSW crashes the process at 1
        ({"nlist": 0}, "nlist must be >= 1"),
        ({"scann_leaves": 0}, "scann_leaves must be >= 1"),
        ({"scann_reorder": 0}, "scann_reorder must be >= 1"),  # ScaNN refuses it after the build
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


def test_more_lists_than_training_vectors_is_refused_before_the_build():
    with pytest.raises(ValueError, match="--nlist 500 is more lists than the 195 vectors that would train them"):
        choose_index(195, 64, IndexConfig(index="ivf", nlist=500))


@pytest.mark.parametrize("snapshot_id", ["LATEST", "../elsewhere", ".hidden", "_scratch", "a b", "x" * 129, ""])
def test_a_snapshot_id_that_cannot_name_its_folder_is_refused_before_any_work(run, tmp_path, snapshot_id):
    with pytest.raises(ValueError, match=f"snapshot id {re.escape(repr(snapshot_id))}: use letters, digits"):
        build_snapshot(run, str(tmp_path / "root"), IndexConfig(), snapshot_id=snapshot_id)
    assert list(tmp_path.iterdir()) == []


def test_a_snapshot_id_in_use_is_refused_before_the_build(run, tmp_path, monkeypatch):
    """Snapshots are immutable: a taken id was a traceback after the whole build (local: the rename's "Directory
    not empty"), and on gs:// the build overwrote the published snapshot's files one by one."""
    root = str(tmp_path / "root")
    build_snapshot(run, root, IndexConfig(index="flat"), snapshot_id="s1")
    before = (tmp_path / "root" / "s1" / "manifest.json").read_bytes()
    with pytest.raises(SnapshotError, match="snapshot s1 already exists under .*: snapshots are immutable"):
        build_snapshot(run, root, IndexConfig(index="flat"), snapshot_id="s1")
    (tmp_path / "root" / "s2").mkdir()
    with pytest.raises(SnapshotError, match=r"root/s2 is in the way of snapshot s2 \(not a snapshot"):
        build_snapshot(run, root, IndexConfig(index="flat"), snapshot_id="s2")
    monkeypatch.setattr(snapshot_module, "_refuse_a_taken_id", lambda *_: None)  # another build took it meanwhile
    with pytest.raises(SnapshotError, match="snapshot s1 was written under .* while this one was built"):
        build_snapshot(run, root, IndexConfig(index="flat"), snapshot_id="s1")
    assert (tmp_path / "root" / "s1" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["s1", "s2"]  # no .building-* left


# ------------------------------------------------------------------ building and measuring


def test_flat_is_exact(run, vectors, tmp_path):
    manifest = build_snapshot(run, str(tmp_path), IndexConfig(index="flat", queries=300))
    assert manifest["quality"]["recall_at_10"] == 1.0
    index = load_index(_snapshot_dir(tmp_path, manifest), manifest["index"])
    queries = vectors[:50]
    _, rows = index.search(queries, 10)
    assert np.array_equal(rows, _exact(vectors, queries, 10))


@pytest.mark.parametrize(
    "cfg",
    [
        IndexConfig(index="ivf", queries=500),
        IndexConfig(index="hnsw", queries=500),
        IndexConfig(index="ivfpq", queries=500),
        IndexConfig(backend="scann", scann_leaves=60, queries=500),
        IndexConfig(backend="scann", queries=500),
    ],
    ids=["faiss-ivf", "faiss-hnsw", "faiss-ivfpq", "scann-tree", "scann-brute"],
)
def test_recall_on_clustered_vectors(run, vectors, tmp_path, cfg):
    manifest = build_snapshot(run, str(tmp_path), cfg)
    quality = manifest["quality"]
    assert quality["recall_at_10"] >= 0.95, manifest["index"]
    assert quality["queries"] == 500 and quality["latency_ms_p50"] > 0 and quality["batch_queries_per_s"] > 0
    # The stored search parameters reproduce the measured recall independently.
    index = load_index(_snapshot_dir(tmp_path, manifest), manifest["index"])
    rng = np.random.default_rng(5)
    queries = vectors[rng.choice(len(vectors), 300, replace=False)]
    _, rows = index.search(queries, 10)
    truth = _exact(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert recall >= 0.93, f"{manifest['index']['kind']} recall {recall:.3f} on fresh queries"


def test_manifest_contract(run, tmp_path):
    manifest = build_snapshot(run, str(tmp_path), IndexConfig(queries=100))
    directory = _snapshot_dir(tmp_path, manifest)
    on_disk = json.loads((directory / "manifest.json").read_text())
    assert on_disk == manifest
    for key in (
        "snapshot_id",
        "created_at",
        "model_version",
        "dim",
        "metric",
        "count",
        "index",
        "quality",
        "source_runs",
    ):
        assert key in manifest
    assert manifest["metric"] == "inner_product" and manifest["count"] == 4000 and manifest["dim"] == 32
    assert set(manifest["files"]) == {"index.faiss", "ids.parquet", "ids.lookup.arrow", "vectors.npy"}
    assert not (tmp_path / "LATEST").exists(), "building must not publish"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building")]


def test_recall_below_minimum_fails_and_writes_nothing(run, tmp_path):
    with pytest.raises(SnapshotError, match="below --min-recall"):
        build_snapshot(run, str(tmp_path), IndexConfig(index="IVF64,PQ2x4", min_recall=0.99, target_recall=0.99))
    assert [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------ bad input


def test_bad_embeddings_are_refused(tmp_path, vectors):
    a = write_run(tmp_path / "a", vectors[:100])
    other_dim = write_run(tmp_path / "b", clustered(100, 16), ids=[f"x{i}" for i in range(100)])
    other_model = write_run(tmp_path / "c", vectors[:100], ids=[f"y{i}" for i in range(100)], model_version="other")
    with pytest.raises(EmbeddingsError, match="different dimensions"):
        build_snapshot([a, other_dim], str(tmp_path / "out"))
    with pytest.raises(EmbeddingsError, match="different model versions"):
        build_snapshot([a, other_model], str(tmp_path / "out"))
    with pytest.raises(EmbeddingsError, match="appear more than once"):
        build_snapshot([a, write_run(tmp_path / "d", vectors[:100])], str(tmp_path / "out"), IndexConfig(queries=10))
    nan = vectors[:100].copy()
    nan[7, 3] = np.nan
    with pytest.raises(EmbeddingsError, match="non-finite vector for item 'item-000007'"):
        build_snapshot(write_run(tmp_path / "e", nan), str(tmp_path / "out"))
    with pytest.raises(EmbeddingsError, match="no embeddings"):
        build_snapshot(write_run(tmp_path / "f", np.zeros((0, 8), np.float32), shards=1), str(tmp_path / "out"))
    incomplete = tmp_path / "g"
    write_run(incomplete, vectors[:10])
    (incomplete / "_manifest.json").unlink()
    with pytest.raises(EmbeddingsError, match="not a complete embed run"):
        build_snapshot(str(incomplete), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not [
        p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")
    ]


def test_shard_with_another_model_version_inside_is_refused(tmp_path, vectors):
    run_dir = tmp_path / "r"
    write_run(run_dir, vectors[:90])
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    manifest["model_version"] = "claimed-other"
    (run_dir / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingsError, match="mixes model versions"):
        build_snapshot(str(run_dir), str(tmp_path / "out"))


# ------------------------------------------------------------------ reduction and memory budget


@pytest.mark.parametrize("reduce", ["pca:16", "prefix:16"])
def test_reduction_records_its_trade_off(run, tmp_path, reduce):
    manifest = build_snapshot(run, str(tmp_path), IndexConfig(reduce=reduce, min_recall=0.5, queries=300))
    assert manifest["dim"] == 16 and manifest["source_dim"] == 32
    assert manifest["reduce"]["method"] == reduce.split(":")[0]
    assert "reduce.npz" in manifest["files"]
    assert 0.5 <= manifest["quality"]["recall_at_10"] <= 1.0


def test_pca_keeps_clustered_neighbours_better_than_a_prefix(run, tmp_path):
    pca = build_snapshot(run, str(tmp_path), IndexConfig(reduce="pca:8", min_recall=0.1, queries=300))
    prefix = build_snapshot(run, str(tmp_path), IndexConfig(reduce="prefix:8", min_recall=0.1, queries=300))
    assert pca["quality"]["recall_at_10"] > prefix["quality"]["recall_at_10"]
    assert pca["reduce"]["explained_variance"] > 0.3


class _PartsOf1142(BuildMemory):
    """A budget that forces the on-disk build, with parts this test can count (3 full ones, a shorter last)."""

    part_rows = 1142

    def check(self) -> None:
        pass

    def train_rows(self, wanted: int) -> int:
        return wanted


def test_memory_budget_builds_on_disk_in_parts_with_the_same_neighbours(run, vectors, tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_module, "BuildMemory", _PartsOf1142)
    on_disk = build_snapshot(run, str(tmp_path), IndexConfig(index="ivf", nlist=32, memory_budget=1 << 10))
    in_memory = build_snapshot(run, str(tmp_path), IndexConfig(index="ivf", nlist=32))
    assert on_disk["index"]["on_disk"] and on_disk["index"]["parts"] == 4
    assert "index.ivfdata" in on_disk["files"]
    params = {"nprobe": 4}
    a = load_index(_snapshot_dir(tmp_path, on_disk), on_disk["index"] | {"search_params": params})
    b = load_index(_snapshot_dir(tmp_path, in_memory), in_memory["index"] | {"search_params": params})
    queries = vectors[::40]
    assert np.array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])
    # Every vector finds itself through the merged lists, the last (shorter) part included.
    exhaustive = load_index(_snapshot_dir(tmp_path, on_disk), on_disk["index"] | {"search_params": {"nprobe": 32}})
    assert np.array_equal(exhaustive.search(vectors, 1)[1][:, 0], np.arange(len(vectors)))


def test_an_embed_output_root_means_its_latest_complete_run(tmp_path, vectors):
    out = tmp_path / "out"
    write_run(out / "embeddings" / "20260101T000000Z-old000", vectors[:100])
    newest = write_run(out / "embeddings" / "20260102T000000Z-new000", vectors[:200])
    for run_dir, finished in (
        (out / "embeddings" / "20260101T000000Z-old000", "2026-01-01"),
        (Path(newest), "2026-01-02"),
    ):
        manifest = json.loads((run_dir / "_manifest.json").read_text())
        (run_dir / "_manifest.json").write_text(json.dumps(manifest | {"finished_at": finished}))
    (out / "embeddings" / "20260103T000000Z-running").mkdir()  # no manifest: still running, ignored
    manifest = build_snapshot(str(out), str(tmp_path / "s"), IndexConfig(queries=20))
    assert manifest["count"] == 200 and manifest["source_runs"][0]["run_id"] == "20260102T000000Z-new000"


def test_tuning_stops_where_more_search_stops_paying(run, tmp_path):
    # PCA to 4 dims cannot reach recall 0.95; searching every list would only cost time.
    manifest = build_snapshot(run, str(tmp_path), IndexConfig(index="ivf", nlist=64, reduce="pca:4", min_recall=0.01))
    assert manifest["quality"]["recall_at_10"] < 0.95
    assert manifest["index"]["search_params"]["nprobe"] < 64


@pytest.mark.parametrize("part_rows", [1, 3, 7, 100])
def test_parts_are_cut_at_exact_multiples_without_losing_or_reordering_rows(part_rows):
    batches = [np.arange(a, b)[:, None] for a, b in ((0, 5), (5, 6), (6, 6), (6, 40))]
    pieces = list(_split(iter(batches), part_rows))
    assert np.array_equal(np.concatenate(pieces)[:, 0], np.arange(40))
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - [len(p) for p in pieces]
    assert all(s // part_rows == (e - 1) // part_rows for s, e in zip(starts, ends, strict=True))


def test_the_budget_is_shared_out_after_what_the_process_holds():
    memory = BuildMemory.plan(budget=512 << 20, dim=256, held=64 << 20)
    spare = (512 << 20) - (64 << 20) - WORKING_ALLOWANCE
    assert memory.part_rows * 2 * (256 * 4 + 8) <= spare // 2
    assert memory.train_rows(100_000) * (256 * 4 + 8) <= spare // 2
    assert memory.train_rows(10) == 10
    memory.check()
    with pytest.raises(ValueError, match=r"too small: this process already holds 200 MiB .* give at least \d+ MiB"):
        BuildMemory.plan(budget=240 << 20, dim=256, held=200 << 20).check()
