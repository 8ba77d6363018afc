"""A snapshot's top k of the queries a gated evaluation judged it on, kept beside its evaluation record, so that a
later evaluation against it need not search again: the next night's baseline is tonight's published candidate,
asked of nearly the same queries (a window of days moved on by one). A snapshot never changes, so neither do its
answers; the file names the snapshot's files' checksums, so a snapshot rebuilt under a deleted one's id is never
answered from the other's."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from encoder import storage
from indexing.client import LoadedSnapshot
from indexing.item_ids import sorted_positions
from indexing.publish import rankings_uri

__all__ = ["Rankings", "load_rankings", "save_rankings"]

log = logging.getLogger(__name__)


def _files_key(snapshot: LoadedSnapshot) -> str:
    return hashlib.sha256(json.dumps(snapshot.manifest["files"], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Rankings:
    """Each query row's top k rows (-1 where fewer), the query rows ascending."""

    k: int
    queries: np.ndarray  # (n,) int64
    neighbours: np.ndarray  # (n, width) int64

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of `rows` are held, the held ones' neighbours)."""
        at = sorted_positions(self.queries, rows)
        return at >= 0, self.neighbours[at[at >= 0]]


def save_rankings(root: str, snapshot: LoadedSnapshot, queries: np.ndarray, neighbours: np.ndarray, k: int) -> None:
    """Keep the snapshot's top k of these query rows beside its evaluation record. Best effort: a failure is
    logged, and the next evaluation searches as it would have."""
    order = np.argsort(queries, kind="stable")
    rows = np.int32 if len(snapshot.item_ids) < 2**31 else np.int64  # 24 bytes a query at k = 5, not 48
    buffer = io.BytesIO()
    np.savez(buffer, k=np.int64(k), files=np.str_(_files_key(snapshot)), queries=queries[order].astype(rows),
             neighbours=neighbours[order].astype(rows))  # fmt: skip
    uri = rankings_uri(root, snapshot.snapshot_id)
    try:
        storage.write_bytes(uri, buffer.getvalue())
    except Exception as err:  # noqa: BLE001 - a cache: the evaluation's result stands without it
        log.warning("could not keep the rankings of %s at %s: %s", snapshot.snapshot_id, uri, err)


def load_rankings(root: str, snapshot: LoadedSnapshot, k: int) -> Rankings | None:
    """The rankings an earlier gated evaluation kept of this very snapshot at this k; None where there are none
    (or they are unreadable, or of other files or another k: logged, and searched again)."""
    uri = rankings_uri(root, snapshot.snapshot_id)
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as kept:
            saved_k, files = int(kept["k"]), str(kept["files"])
            queries, neighbours = kept["queries"], kept["neighbours"]
        count, width = len(snapshot.item_ids), min(k, len(snapshot.item_ids))
        if files != _files_key(snapshot) or saved_k != k:
            log.info("rankings at %s are of other files or another k (%d); searching again", uri, saved_k)
            return None
        if (queries.ndim != 1 or neighbours.shape != (len(queries), width) or (np.diff(queries) <= 0).any()
                or len(queries) and (queries[0] < 0 or queries[-1] >= count)
                or ((neighbours < -1) | (neighbours >= count)).any()):  # fmt: skip
            raise ValueError(f"inconsistent arrays {queries.shape}, {neighbours.shape} for {count} items")
    except Exception as err:  # noqa: BLE001 - a cache: unreadable means searched again, never a failed evaluation
        log.warning("ignoring the rankings at %s: %s", uri, err)
        return None
    return Rankings(k, queries.astype(np.int64), neighbours.astype(np.int64))
