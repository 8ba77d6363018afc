"""The LATEST pointer: publish, rollback, listing and retention of snapshots under a root.

`ROOT/LATEST` is a small JSON object: the published `snapshot_id`, when, and the
ids published before it (most recent first). It is replaced by compare-and-swap
(gs://: generation-match precondition; local: lock file + atomic rename), so two
publishers racing can never interleave or lose an update: the loser re-reads and
retries on top of the winner. A snapshot is verified, file by file, before
LATEST ever names it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from encoder import storage
from encoder.storage import LATEST_NAME
from indexing.snapshot import MANIFEST_NAME, SnapshotError, local_copy, read_manifest, snapshot_dir, verify_snapshot

__all__ = ["Latest", "list_snapshots", "publish", "read_latest", "retain", "rollback"]

log = logging.getLogger(__name__)

EVALUATIONS = "_evaluations"  # ROOT/_evaluations/<snapshot_id>.json (and .rankings.npz): a gated `evaluate`
_HISTORY = 50
_ATTEMPTS = 50


@dataclass(frozen=True)
class Latest:
    snapshot_id: str
    published_at: str
    history: tuple[str, ...]  # published before, most recent first
    sequence: int = 0  # number of updates of LATEST so far; a lost update would show as a gap


def read_latest(root: str) -> Latest | None:
    """What LATEST names now, or None before the first publish."""
    data, _ = storage.read_versioned(storage.join(root, LATEST_NAME))
    return None if data is None else _parse(data, root)


def _parse(data: bytes, root: str) -> Latest:
    try:
        doc = json.loads(data)
        return Latest(
            doc["snapshot_id"], doc["published_at"], tuple(doc.get("history", ())), int(doc.get("sequence", 0))
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SnapshotError(f"{storage.join(root, LATEST_NAME)} is unreadable: {err}") from err


def _swap(root: str, change) -> Latest:
    """Compare-and-swap LATEST with `change(current: Latest | None) -> Latest`, retrying on races."""
    uri = storage.join(root, LATEST_NAME)
    for attempt in range(_ATTEMPTS):
        with _local_guard(root):
            data, version = storage.read_versioned(uri)
            current = None if data is None else _parse(data, root)
            new = change(current)
            sequence = (current.sequence if current else 0) + 1
            doc = {"snapshot_id": new.snapshot_id, "published_at": new.published_at, "history": list(new.history),
                   "sequence": sequence}  # fmt: skip
            try:
                storage.write_if_version(uri, json.dumps(doc, indent=2).encode(), version)
                return Latest(new.snapshot_id, new.published_at, new.history, sequence)
            except storage.ConcurrentUpdate:
                log.info("LATEST changed under us (attempt %d); re-reading", attempt + 1)
        time.sleep(random.uniform(0, 0.05 * (attempt + 1)))
    raise SnapshotError(f"could not update {uri}: {_ATTEMPTS} concurrent updates in a row")


def _local_guard(root: str):
    if storage.is_gcs(root):
        return contextlib.nullcontext()  # the generation-match precondition is the guard
    return storage.local_lock(os.path.join(root, ".LATEST.lock"))


def _verified(root: str, snapshot_id: str) -> dict:
    manifest = read_manifest(root, snapshot_id)
    cache = storage.cache_dir("snapshots")
    verify_snapshot(local_copy(root, snapshot_id, cache), manifest, cache)
    return manifest


def complete_snapshots(root: str) -> list[dict]:
    """Manifests of every complete snapshot under `root`, oldest first."""
    manifests = []
    for name in storage.list_children(root):
        if name.startswith((".", "_")) or name == LATEST_NAME:
            continue
        try:
            manifest = read_manifest(root, name)
        except SnapshotError:
            continue  # being built, or abandoned: not a snapshot yet
        if manifest.get("snapshot_id") != name:  # a copied or forged manifest: never act on its id
            log.warning("snapshot directory %s holds a manifest for %r; ignored", name, manifest.get("snapshot_id"))
            continue
        manifests.append(manifest)
    return sorted(manifests, key=lambda m: m["created_at"])


def record_uri(root: str, snapshot_id: str) -> str:
    """Where a snapshot's evaluation record lies: `ROOT/_evaluations/<snapshot_id>.json`."""
    return storage.join(root, EVALUATIONS, f"{snapshot_id}.json")


def rankings_uri(root: str, snapshot_id: str) -> str:
    """Where a gated evaluation keeps the snapshot's top k of the queries it judged (`evaluation.rankings`)."""
    return storage.join(root, EVALUATIONS, f"{snapshot_id}.rankings.npz")


def evaluation_record(root: str, snapshot_id: str) -> dict | None:
    """The record `lookalike evaluate --gate` (and the nightly's gate) left for a snapshot, passed or not; None."""
    try:
        record = json.loads(storage.read_bytes(record_uri(root, snapshot_id)))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _gate(root: str, snapshot_id: str) -> str | None:
    """ "passed" or "failed" by its evaluation record; None where it has none."""
    record = evaluation_record(root, snapshot_id)
    return None if record is None else "passed" if record.get("passed") else "failed"


def _require_passing_evaluation(root: str, snapshot_id: str) -> None:
    record = evaluation_record(root, snapshot_id)
    if record is None:
        raise SnapshotError(
            f"snapshot {snapshot_id} has no evaluation record; run `lookalike evaluate --snapshot "
            f"{storage.join(root, snapshot_id)} ... --gate ...` first"
        )
    if not record.get("passed"):
        failed = [g["gate"] for g in record.get("gates", []) if not g.get("passed")]
        raise SnapshotError(f"snapshot {snapshot_id} failed its evaluation gate(s) {failed}; not publishing")


def publish(root: str, snapshot_id: str | None = None, require_evaluation: bool = False) -> Latest:
    """Verify a snapshot (default: the newest complete one), then point LATEST at it.

    With `require_evaluation`, the snapshot must also have a passing evaluation record.

    Raises:
        SnapshotError: nothing to publish, no passing evaluation when required, or failed verification.
    """
    if snapshot_id is None:
        snapshots = complete_snapshots(root)
        if not snapshots:
            raise SnapshotError(f"no complete snapshot under {root} to publish")
        snapshot_id = snapshots[-1]["snapshot_id"]
        record = evaluation_record(root, snapshot_id)
        if record is not None and not record.get("passed"):  # a night's loser is the newest until the next night
            raise SnapshotError(f"the newest snapshot, {snapshot_id}, failed its evaluation gate(s); name it to "
                                f"publish it all the same, or name another")  # fmt: skip
    if require_evaluation:
        _require_passing_evaluation(root, snapshot_id)
    _verified(root, snapshot_id)

    def change(current: Latest | None) -> Latest:
        history = () if current is None else (current.snapshot_id, *current.history)
        history = tuple(h for h in history if h != snapshot_id)[:_HISTORY]
        return Latest(snapshot_id, datetime.now(UTC).isoformat(), history)

    latest = _swap(root, change)
    log.info("published %s at %s", snapshot_id, storage.join(root, LATEST_NAME))
    return latest


def rollback(root: str, to: str | None = None) -> Latest:
    """Point LATEST back at the snapshot published before it (or at `to`), after verifying it.

    Raises:
        SnapshotError: nothing published, no earlier snapshot, or the target fails verification.
    """
    current = read_latest(root)
    if current is None:
        raise SnapshotError(f"nothing is published under {root}; nothing to roll back")
    target = to or next(iter(current.history), None)
    if target is None:
        raise SnapshotError(f"{current.snapshot_id} is the only snapshot ever published; nothing to roll back to")
    _verified(root, target)

    def change(now: Latest | None) -> Latest:
        if now is None:
            raise SnapshotError(f"LATEST under {root} disappeared")
        history = tuple(h for h in now.history if h != target)
        if to is None and now.history and now.history[0] == target:
            history = now.history[1:]  # a plain rollback steps back through history
        else:
            history = (now.snapshot_id, *history)[:_HISTORY]
        return Latest(target, datetime.now(UTC).isoformat(), history)

    latest = _swap(root, change)
    log.info("rolled back %s to %s", current.snapshot_id, target)
    return latest


def list_snapshots(root: str) -> list[dict]:
    """One row per complete snapshot, oldest first: id, created, model_version, count, recall, LATEST or not."""
    latest = read_latest(root)
    rows = []
    for m in complete_snapshots(root):
        rows.append({
            "snapshot_id": m["snapshot_id"],
            "created_at": m["created_at"],
            "model_version": m["model_version"],
            "count": m["count"],
            "index": m["index"]["kind"],
            "recall_at_10": m["quality"]["recall_at_10"],
            "gate": _gate(root, m["snapshot_id"]),
            "latest": latest is not None and m["snapshot_id"] == latest.snapshot_id,
        })  # fmt: skip
    return rows


def retain(root: str, keep: int) -> list[str]:
    """Delete the oldest complete snapshots beyond the newest `keep`, never LATEST or the one before it.

    Returns:
        The deleted snapshot ids.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    latest = read_latest(root)
    protected = set() if latest is None else {latest.snapshot_id, *latest.history[:1]}
    snapshots = [m["snapshot_id"] for m in complete_snapshots(root)]
    doomed = [s for s in snapshots[: max(0, len(snapshots) - keep)] if s not in protected]
    for snapshot_id in doomed:
        # The manifest goes first, so a half-deleted snapshot is never taken for a complete one.
        directory = snapshot_dir(root, snapshot_id)
        storage.delete(storage.join(directory, MANIFEST_NAME))
        storage.delete_tree(directory)
        storage.delete(record_uri(root, snapshot_id))  # its evaluation record goes with it, and its rankings
        storage.delete(rankings_uri(root, snapshot_id))
        log.info("retention: deleted snapshot %s", snapshot_id)
    return doomed
