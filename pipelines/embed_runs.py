"""An embed run's place in storage: its manifest, the earlier run it reuses, its shards' sizes, its scratch.

out/embeddings/<run_id>/part-*.parquet + _manifest.json   (the manifest last: the run is complete)
out/failures/<run_id>/part-*.parquet
out/tmp/<run_id>/                                        (while the run runs)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from encoder import storage as object_store
from encoder.storage import arrow_input, contained
from pipelines import storage

if TYPE_CHECKING:
    from pipelines.embed import EmbedConfig

__all__ = [
    "MANIFEST_NAME",
    "clear_crashed_attempt",
    "find_previous_run",
    "previous_run_shards",
    "read_shard",
    "refuse_a_used_run_id",
    "remove_scratch",
    "retain_runs",
    "scratch_dir",
    "shard_stats",
    "write_listing",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"


def read_shard(path: str) -> pa.Table:
    return pq.read_table(arrow_input(storage.read_bytes(path)))


def _load_run_manifest(run_dir: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, MANIFEST_NAME)))
    except storage.NotFound:
        return None


def find_previous_run(out: str, model_version: str, exclude: str | None = None) -> dict | None:
    """The latest complete run under `out` made by `model_version`, or None."""
    runs = []
    for path in storage.match(storage.join(out, "embeddings", "*", MANIFEST_NAME)):
        manifest = json.loads(storage.read_bytes(path))
        if manifest.get("model_version") == model_version and manifest.get("run_id") != exclude:
            runs.append(dict(manifest, run_dir=path.rsplit("/", 1)[0]))
    # Completion time, not the id: ids given with --run-id need not sort by time.
    return max(runs, key=lambda m: m["finished_at"], default=None)


def previous_run_shards(cfg: EmbedConfig, model_version: str) -> tuple[str | None, list[str], int]:
    """The earlier run to reuse from: its id, shard paths and row count (None, [], 0 when none)."""
    if not cfg.incremental:
        return None, [], 0
    if cfg.previous:
        run_dir = cfg.previous.removesuffix("/" + MANIFEST_NAME).rstrip("/")
        manifest = _load_run_manifest(run_dir)
        if manifest is None:
            raise FileNotFoundError(f"--previous {cfg.previous}: no {MANIFEST_NAME} there (not a complete run)")
        if manifest.get("model_version") != model_version:  # asked for by name: a warning, and no run recorded
            log.warning("--previous %s has model_version %s, not this model's %s: nothing can be reused; every "
                        "image is embedded", run_dir, manifest.get("model_version"), model_version)  # fmt: skip
            return None, [], 0
        manifest = dict(manifest, run_dir=run_dir)
    else:
        manifest = find_previous_run(cfg.out, model_version, exclude=cfg.run_id)
        if manifest is None:
            return None, [], 0
    shards = [storage.join(manifest["run_dir"], contained(s["path"])) for s in manifest["shards"]]
    rows = manifest["counts"]["embedded"] + manifest["counts"]["reused"]
    log.info("reusing vectors of run %s (%d rows)", manifest["run_id"], rows)
    return manifest["run_id"], shards, rows


def shard_stats(directory: str) -> list[dict]:
    """Each shard's name, rows and bytes, from its listing and Parquet footer: the vectors stay where they are
    (reading the shards whole to count their rows downloaded a night's every vector back into the launcher)."""
    stats = []
    for path, size in storage.match_sized(storage.join(directory, "*.parquet")):
        rows = storage.with_retries(lambda path=path: _parquet_rows(path), f"read the footer of {path}")
        stats.append({"path": path.rsplit("/", 1)[-1], "rows": rows, "bytes": size})
    return stats


def _parquet_rows(uri: str) -> int:
    with storage.open_seekable(uri) as f:  # ranged reads: the footer only
        return pq.read_metadata(pa.PythonFile(f, mode="r")).num_rows


def scratch_dir(cfg: EmbedConfig) -> str:
    """What a run keeps only while it runs (an image glob's listing), removed at its end."""
    return storage.join(cfg.out, "tmp", cfg.run_id)


def remove_scratch(cfg: EmbedConfig) -> None:
    object_store.delete_tree(scratch_dir(cfg))
    if not object_store.is_gcs(cfg.out):
        with contextlib.suppress(OSError):  # not empty: another run's scratch is there
            os.rmdir(storage.join(cfg.out, "tmp"))


def write_listing(cfg: EmbedConfig, catalog: pa.Table) -> tuple[str, list[str]]:
    """An image glob's files as a Parquet manifest under the run's scratch directory, for the pipeline to read
    like any manifest. In the pipeline itself (`beam.Create`) every path would travel inside its graph: pickled
    and bz2-compressed at launch (~0.1 s per 12,000 paths) and, for a large catalog, past Dataflow's limit on a
    job's graph (10 MB; 20 M paths are ~1 GB)."""
    uri = storage.join(scratch_dir(cfg), "catalog.parquet")
    storage.write_table_atomic(uri, catalog.select(["item_id", "image_uri"]))
    return "manifest", [uri]


def write_reembed(cfg: EmbedConfig, item_ids: pa.Array) -> str:
    """The items `--since` re-encodes, as a Parquet file under the run's scratch directory (`ReembedIds` reads it
    in each worker process): in the pipeline itself they would travel inside its graph."""
    uri = storage.join(scratch_dir(cfg), "reembed.parquet")
    storage.write_table_atomic(uri, pa.table({"item_id": item_ids}))
    return uri


def refuse_a_used_run_id(out: str, run_id: str) -> None:
    """A complete run's id is not used again: its shards would be written beside (or over) a run others read.

    Raises:
        FileExistsError: `out` already holds a complete run under `run_id`.
    """
    if object_store.exists(object_store.join(out, "embeddings", run_id, MANIFEST_NAME)):
        raise FileExistsError(f"run {run_id} already exists under {out}")


# A run folder without a manifest whose files have not changed for this long is an abandoned attempt: removed.
ABANDONED_S = 7 * 24 * 3600


def retain_runs(out: str, used: set[str]) -> list[str]:
    """Delete the complete embed runs under `out` but the `used` ones (those kept snapshots were built from, the run
    at hand) and the newest, which the next run reuses from; with each, its dead letters. Every run holds the whole
    catalog's vectors (~30 GB a night at 10M × 768), and none was ever deleted. A run without a manifest is left to
    its next attempt, unless nothing in it has changed for `ABANDONED_S` (a killed backfill nobody reran).

    Returns:
        The deleted run ids.
    """
    root = object_store.join(out, "embeddings")
    folders = {n: _readable_manifest(object_store.join(root, n)) for n in object_store.list_children(root)}
    runs = [m for m in folders.values() if m is not None and m.get("run_id") == m["folder"]]
    newest = max(runs, key=lambda m: m.get("finished_at", ""), default={}).get("run_id")
    doomed = sorted(m["run_id"] for m in runs if m["run_id"] not in used and m["run_id"] != newest)
    doomed += sorted(
        n for n, m in folders.items() if m is None and n not in used and _abandoned(object_store.join(root, n))
    )
    for run_id in doomed:
        run_dir = object_store.join(root, contained(run_id))
        object_store.delete(object_store.join(run_dir, MANIFEST_NAME))  # first: never half a run taken for a whole one
        object_store.delete_tree(run_dir)
        object_store.delete_tree(object_store.join(out, "failures", contained(run_id)))
        log.info("retention: deleted embed run %s", run_id)
    return doomed


def _abandoned(folder: str) -> bool:
    """A folder (not a stray file) in which nothing has changed for `ABANDONED_S`."""
    if not object_store.is_gcs(folder) and not os.path.isdir(folder):
        return False
    changed = object_store.newest_change(folder)
    return changed is not None and time.time() - changed > ABANDONED_S


def _readable_manifest(run_dir: str) -> dict | None:
    """A run folder's manifest with its folder's name; None for anything else (a stray file, a run under way, a
    manifest that does not read): retention acts only on what it can tell is a whole run."""
    try:
        manifest = json.loads(object_store.read_bytes(object_store.join(run_dir, MANIFEST_NAME)))
    except (OSError, ValueError):  # missing (a FileNotFoundError), a file where a folder belongs, not JSON
        return None
    return {**manifest, "folder": run_dir.rsplit("/", 1)[-1]} if isinstance(manifest, dict) else None


def clear_crashed_attempt(cfg: EmbedConfig, run_dir: str, failures_dir: str) -> None:
    """Shards of an earlier, killed attempt at this run id would be counted twice: remove them first."""
    for directory in (run_dir, failures_dir, scratch_dir(cfg)):
        if object_store.list_children(directory):
            log.warning("removing the partial output of an interrupted attempt at this run: %s", directory)
            object_store.delete_tree(directory)
