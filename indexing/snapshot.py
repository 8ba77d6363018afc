"""Snapshots: build one from embed runs, and verify one file by file.

    ROOT/<snapshot_id>/index.faiss | scann/...   the index (plus index.ivfdata when on disk)
                       ids.parquet               row → item_id
                       ids.lookup.arrow          the ids again, with their sorted hashes and rows (mapped to serve)
                       vectors.npy               (count, dim) float32 as served (after any reduction)
                       reduce.npz                the reduction, when there is one
                       manifest.json             written last: every file's size and sha256, model_version,
                                                 dim, metric, count, index parameters, measured quality, source runs

A snapshot is complete when its manifest.json exists and every file it lists has
the recorded size and sha256. Building never touches ROOT/LATEST (see publish.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoder import storage
from encoder.stamps import Remembered, file_stamps
from encoder.tables import repeated
from indexing.backends import build_scann, fill_faiss, train_faiss
from indexing.embeddings import EmbeddingsError, open_embeddings
from indexing.item_ids import ItemIds
from indexing.memory import BuildMemory, arrow_system_pool, release_freed_memory
from indexing.quality import exact_topk, measure, recall_at_k
from indexing.reduce import fit_reducer
from indexing.spec import IndexConfig, choose_index

__all__ = [
    "MANIFEST_NAME",
    "SnapshotError",
    "build_snapshot",
    "local_copy",
    "new_snapshot_id",
    "read_manifest",
    "verify_snapshot",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# The ids with their sorted hashes and rows, which a serving process maps (snapshots built before 2026-11-29: none).
ID_LOOKUP = "ids.lookup.arrow"
_TRAIN_ROWS = 100_000  # k-means and PCA learn well from this many; more only costs time


class SnapshotError(ValueError):
    """A snapshot that must not be published or loaded; the message says why."""


def new_snapshot_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _write_ids_and_vectors(source, transform, workdir: Path, dim: int):
    """One pass: ids.parquet and vectors.npy as served; yields each served batch for the index.

    vectors.npy is appended with plain writes, not through a memory map, so the pages
    written do not stay mapped into this process on top of the index.
    """
    offset = 0
    with open(workdir / "vectors.npy", "wb") as out, \
            pq.ParquetWriter(workdir / "ids.parquet", pa.schema([("item_id", pa.string())])) as writer:  # fmt: skip
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (source.count, dim)}  # fmt: skip
        np.lib.format.write_array_header_1_0(out, header)
        for ids, batch in source.batches():
            served = np.ascontiguousarray(transform(batch), dtype=np.float32)
            out.write(served.tobytes())
            writer.write_table(pa.table({"item_id": pa.array(ids, pa.string())}))
            offset += len(ids)
            yield served
    if offset != source.count:
        raise EmbeddingsError(f"runs' manifests promise {source.count} rows, shards hold {offset}")


def _write_id_lookup(workdir: Path) -> None:
    """`ID_LOOKUP` beside ids.parquet, the ids checked unique first: a serving process maps it instead of hashing
    and sorting every id at each load (`indexing.item_ids.ItemIds.open_lookup`)."""
    ids = pq.read_table(workdir / "ids.parquet").column("item_id")
    dupes = repeated(ids)
    if len(dupes):
        raise EmbeddingsError(
            f"{len(dupes)} item_id(s) appear more than once, e.g. {dupes[:5].to_pylist()}; index one run per item set"
        )
    ItemIds(ids).write_lookup(workdir / ID_LOOKUP)


def _tune(index, queries: np.ndarray, truth: np.ndarray, cfg: IndexConfig) -> dict:
    """The cheapest search setting that reaches the recall target.

    When the target is out of reach (a lossy reduction, coarse codes), the cheapest
    setting within 0.002 of the best recall seen: more search would only cost time.
    """
    tried = []
    for params in index.tuning_grid():
        index.set_search_params(params)
        recall = recall_at_k(index.search(queries, cfg.k)[1], truth)
        if recall >= cfg.target_recall:
            return params
        tried.append((params, recall))
    best = max(recall for _, recall in tried)
    chosen = next(params for params, recall in tried if recall >= best - 0.002)
    index.set_search_params(chosen)
    return chosen


def build_snapshot(embeddings: list[str] | str, root: str, cfg: IndexConfig = IndexConfig(),
                   snapshot_id: str | None = None) -> dict:  # fmt: skip
    """Build an index snapshot from embed runs and write it under `root` (not published).

    Returns:
        The snapshot's manifest.

    Raises:
        EmbeddingsError: empty, mixed or non-finite embeddings, duplicate item ids.
        SnapshotError: measured recall@10 below `cfg.min_recall` (nothing is written).
    """
    if cfg.memory_budget:
        with arrow_system_pool():
            return _build_snapshot(embeddings, root, cfg, snapshot_id)
    return _build_snapshot(embeddings, root, cfg, snapshot_id)


def _build_snapshot(embeddings: list[str] | str, root: str, cfg: IndexConfig, snapshot_id: str | None) -> dict:
    started = time.monotonic()
    snapshot_id = storage.check_id(snapshot_id, "snapshot id") if snapshot_id is not None else new_snapshot_id()
    storage.check_folder(root, "snapshot root")
    _refuse_a_taken_id(root, snapshot_id)
    source = open_embeddings(embeddings)
    memory = BuildMemory.plan(cfg.memory_budget, source.dim) if cfg.memory_budget else None
    if memory:
        memory.check()
    _, train = source.sample(memory.train_rows(_TRAIN_ROWS) if memory else _TRAIN_ROWS, seed=cfg.seed)
    _, queries_raw = source.sample(cfg.queries, seed=cfg.seed + 1)
    release_freed_memory()
    reducer = fit_reducer(cfg.reduce, train) if cfg.reduce else None
    transform = reducer.apply if reducer else (lambda v: v)
    dim = reducer.dim_out if reducer else source.dim
    plan = choose_index(source.count, dim, cfg, train_rows=len(train))
    log.info("indexing %d vectors (dim %d → %d) as %s: %s", source.count, source.dim, dim, plan.kind, plan.reason)
    if memory and plan.on_disk:
        log.info("memory budget %d MiB: %d MiB held at start, training on %d rows, parts of %d rows",
                 memory.budget >> 20, memory.held >> 20, len(train), memory.part_rows)  # fmt: skip

    local_root = None if storage.is_gcs(root) else Path(root)
    if local_root is not None:
        local_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".building-{snapshot_id}-", dir=local_root))
    try:
        served = _write_ids_and_vectors(source, transform, workdir, dim)
        build_start = time.monotonic()
        if plan.backend == "faiss":
            trained = train_faiss(plan, dim, transform(train))
            del train  # the sample's memory goes to the parts
            release_freed_memory()
            index = fill_faiss(trained, plan, served, workdir, memory.part_rows if memory else None)
        else:
            for _ in served:  # fill vectors.npy; ScaNN builds from the whole matrix
                pass
            index = build_scann(plan, np.load(workdir / "vectors.npy", mmap_mode="r"))
        build_s = time.monotonic() - build_start
        _write_id_lookup(workdir)
        release_freed_memory()

        # Ground truth is exact search in the embedding space itself, so a reduction's loss shows in the recall.
        truth = exact_topk(queries_raw, (v for _, v in source.batches(columns_checked=False)), cfg.k)
        queries = transform(queries_raw)
        search_params = _tune(index, queries, truth, cfg)
        quality = measure(index.search, queries, truth, cfg.k)
        if quality.recall_at_10 < cfg.min_recall:
            raise SnapshotError(
                f"measured recall@{cfg.k} {quality.recall_at_10:.3f} is below --min-recall {cfg.min_recall} "
                f"({plan.kind}, {search_params or 'default search'}); try another --index or lower --min-recall"
            )
        names = (
            index.save(workdir)
            + ["ids.parquet", ID_LOOKUP, "vectors.npy"]
            + ([reducer.save(workdir)] if reducer else [])
        )
        manifest = {
            "snapshot_id": snapshot_id,
            "created_at": datetime.now(UTC).isoformat(),
            "model_version": source.model_version,
            "dim": dim,
            "source_dim": source.dim,
            "metric": "inner_product",
            "count": source.count,
            "index": {
                "backend": plan.backend,
                "kind": plan.kind,
                "factory": plan.factory,
                "build_params": plan.build_params,
                "search_params": search_params,
                "on_disk": plan.on_disk,
                "parts": getattr(index, "parts", 1),
                "reason": plan.reason,
            },
            "reduce": reducer.describe() if reducer else None,
            "memory": memory.describe() if memory else None,
            "quality": quality.as_dict() | {"k": cfg.k, "build_s": round(build_s, 3)},
            "bytes": {
                "index": sum(_size(workdir / n) for n in names if n not in ("ids.parquet", ID_LOOKUP, "vectors.npy")),
                "vectors_float32_source": source.nbytes,
            },  # fmt: skip
            "source_runs": [{"run_dir": r.run_dir, "run_id": r.run_id, "rows": r.rows} for r in source.runs],
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "files": {n: {"bytes": _size(workdir / n), "sha256": storage.sha256_file(workdir / n)} for n in names},
            "wall_time_s": round(time.monotonic() - started, 3),
        }
        _install(workdir, names, manifest, root, snapshot_id)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("snapshot %s: recall@%d %.3f, p50 %.3f ms, %s", snapshot_id, cfg.k, quality.recall_at_10,
             quality.latency_ms_p50, storage.join(root, snapshot_id))  # fmt: skip
    return manifest


def _refuse_a_taken_id(root: str, snapshot_id: str) -> None:
    """Snapshots are immutable: an id in use is refused before the build. On gs://, a folder without a manifest is
    an interrupted build's (its manifest goes last), which a build under its id replaces."""
    folder = storage.join(root, snapshot_id)
    if storage.exists(storage.join(folder, MANIFEST_NAME)):
        raise SnapshotError(f"snapshot {snapshot_id} already exists under {root}: snapshots are immutable; "
                            f"build under another id")  # fmt: skip
    if not storage.is_gcs(root) and os.path.lexists(folder):
        raise SnapshotError(f"{folder} is in the way of snapshot {snapshot_id} (not a snapshot: no {MANIFEST_NAME})")


def _size(path: Path) -> int:
    return path.stat().st_size


def _install(workdir: Path, names: list[str], manifest: dict, root: str, snapshot_id: str) -> None:
    """Put the files under ROOT/<snapshot_id>/, manifest last (local: one directory rename)."""
    (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if not storage.is_gcs(root):
        for stray in set(os.listdir(workdir)) - set(names) - {MANIFEST_NAME, "scann"}:
            (workdir / stray).unlink()
        os.chmod(workdir, 0o755)  # mkdtemp made it private; services reading snapshots may run as other users
        try:
            os.rename(workdir, Path(root) / snapshot_id)  # atomic; fails if the id exists
        except OSError:
            if not (Path(root) / snapshot_id).exists():
                raise
            raise SnapshotError(f"snapshot {snapshot_id} was written under {root} while this one was built") from None
        workdir.mkdir()  # so the caller's cleanup has something to remove
        return
    for name in names:
        storage.upload_file(workdir / name, storage.join(root, snapshot_id, name))
    storage.upload_file(workdir / MANIFEST_NAME, storage.join(root, snapshot_id, MANIFEST_NAME))


def snapshot_dir(root: str, snapshot_id: str) -> str:
    """ROOT/<snapshot_id>, refusing ids (from LATEST, a flag, a listing) that would leave ROOT.

    Raises:
        SnapshotError: an id that is not a plain name, or a local snapshot directory that is a symlink.
    """
    try:
        storage.contained(snapshot_id)
    except ValueError as err:
        raise SnapshotError(f"snapshot id {snapshot_id!r} under {root} escapes the root") from err
    directory = storage.join(root, snapshot_id)
    if not storage.is_gcs(root) and Path(directory).is_symlink():
        raise SnapshotError(f"snapshot {snapshot_id} under {root} is a symlink; refused")
    return directory


def read_manifest(root: str, snapshot_id: str) -> dict:
    """The manifest of a complete snapshot.

    Raises:
        SnapshotError: no such snapshot, it is incomplete (no manifest), or its id escapes the root.
    """
    try:
        return json.loads(storage.read_bytes(storage.join(snapshot_dir(root, snapshot_id), MANIFEST_NAME)))
    except (FileNotFoundError, NotADirectoryError) as err:  # (a file of that name under a local root)
        raise SnapshotError(
            f"snapshot {snapshot_id} under {root} is missing or incomplete (no {MANIFEST_NAME})"
        ) from err
    except json.JSONDecodeError as err:
        raise SnapshotError(f"snapshot {snapshot_id}: unreadable {MANIFEST_NAME}: {err}") from err


def _safe_path(directory: Path, name: str) -> Path:
    try:
        path = directory / storage.contained(name, nested=True)
    except ValueError as err:
        raise SnapshotError(f"file name {name!r} in a snapshot manifest escapes the snapshot directory") from err
    if not path.resolve().is_relative_to(directory.resolve()):  # a symlinked directory on the way
        raise SnapshotError(f"file {name!r} in a snapshot manifest resolves outside the snapshot directory")
    return path


def verify_snapshot(directory: str | Path, manifest: dict, cache_dir: str | Path | None = None) -> None:
    """Check every file the manifest lists against its size and sha256 (a local directory).

    `cache_dir`: a snapshots cache (`storage.cache_dir("snapshots")`). A check that passed is remembered under its
    `.verified/`, keyed by the files' stamps (`encoder.stamps`), and a later check of the same files, unchanged,
    reads none of them: a service's restart, `lookalike similar`, the publish after the evaluation. Hashing reads
    every byte (sha256 at ~1.7 GB/s here: ~18 s for a 30 GB snapshot, each time); sizes are checked every time.
    A file rewritten in place, or copied, has new stamps and is read again.

    Raises:
        SnapshotError: a missing, resized, changed or escaping file.
    """
    directory, files = Path(directory), manifest.get("files") or {}
    if not files:
        raise SnapshotError(f"snapshot {manifest.get('snapshot_id')}: manifest lists no files")
    paths = {}
    for name, expected in sorted(files.items()):
        path = paths[name] = _safe_path(directory, name)
        if path.is_symlink() or not path.is_file():
            raise SnapshotError(f"snapshot {manifest.get('snapshot_id')}: file {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise SnapshotError(f"snapshot {manifest.get('snapshot_id')}: {name} has {path.stat().st_size} bytes, "
                                f"manifest says {expected['bytes']}")  # fmt: skip
    remembered = stamps = None
    if cache_dir is not None:
        stamps = file_stamps(paths.values())  # before reading: a change while hashing is not remembered as checked
        sums = [[name, files[name]["sha256"]] for name in paths]
        where = str(directory.resolve())
        remembered = Remembered(
            Path(cache_dir) / VERIFIED_DIR, json.dumps([_VERIFY_RECIPE, where, sums, stamps]), where
        )
        if remembered.get(lambda value: value is True):
            return
    for name, path in paths.items():
        if storage.sha256_file(path) != files[name]["sha256"]:
            raise SnapshotError(f"snapshot {manifest.get('snapshot_id')}: {name} fails its sha256 check")
    if remembered is not None:
        remembered.put(True, stamps, _SETTLED_S)
        _prune_records(Path(cache_dir))


def _prune_records(cache_dir: Path) -> None:
    """Remove the checks remembered over a month ago: a copy long gone, or one check again."""
    now = time.time()
    with contextlib.suppress(OSError):
        for record in (cache_dir / VERIFIED_DIR).iterdir():
            if now - record.stat().st_mtime > _STALE_RECORD_S:
                record.unlink(missing_ok=True)


VERIFIED_DIR = ".verified"  # under a snapshots cache: the checks that passed, by their files' stamps
_VERIFY_RECIPE = 1  # changing how a snapshot is checked makes every remembered check stale
_SETTLED_S = 2.0  # files changed this recently are checked and not remembered (`encoder.stamps`)


# The cache of gs:// snapshots keeps the copies used last and any used within the hour: a service took a new copy
# every night and kept them all, until its disk was full and every refresh failed.
CACHE_KEEP = 4  # the served snapshot and the one before, a candidate and its baseline being evaluated
CACHE_RECENT_S = 3600
_STALE_DOWNLOAD_S = 24 * 3600
_STALE_RECORD_S = 30 * 24 * 3600


def local_copy(root: str, snapshot_id: str, cache_dir: str | Path) -> Path:
    """A local directory holding the snapshot: itself for a local root, else a cached download (see `prune_cache`)."""
    directory = snapshot_dir(root, snapshot_id)
    if not storage.is_gcs(root):
        return Path(directory)
    copy = storage.download_gcs_dir(directory, cache_dir)
    os.utime(copy)  # used now
    prune_cache(Path(cache_dir), keep=copy)
    return copy


def prune_cache(cache_dir: Path, keep: Path | None = None) -> list[Path]:
    """Remove cached snapshot copies beyond the `CACHE_KEEP` used last, none used within `CACHE_RECENT_S`, and
    downloads abandoned for a day; returns what it removed (checks remembered a month ago go too, unreturned). A process still serving a removed copy keeps its answers:
    its index and vectors are in memory or mapped, and Linux frees a mapped file's pages only when it is unmapped."""
    now = time.time()
    try:
        entries = [(entry.stat().st_mtime, entry) for entry in cache_dir.iterdir() if entry.is_dir()]
    except OSError:
        return []
    copies = sorted(((t, e) for t, e in entries if not e.name.startswith(".")), reverse=True)
    removed = [e for t, e in copies[CACHE_KEEP:] if e != keep and now - t > CACHE_RECENT_S]
    removed += [e for t, e in entries if e.name.startswith(".download-") and now - t > _STALE_DOWNLOAD_S]
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    _prune_records(cache_dir)
    if removed:
        log.info("removed %d cached snapshot cop%s from %s", len(removed), "y" if len(removed) == 1 else "ies",
                 cache_dir)  # fmt: skip
    return removed
