"""`SnapshotClient`: what downstream Python services use to search the published snapshot.

It loads the snapshot LATEST names, verifies every file's checksum, and serves
searches by item id or by raw vector. `refresh()` picks up a newly published
snapshot and swaps it in atomically; a corrupt, incomplete or
dimension-mismatched snapshot is refused with a logged error while the current
one keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from encoder import storage
from indexing.backends import AnnIndex, load_index
from indexing.item_ids import ItemIds
from indexing.page_cache import warm
from indexing.publish import read_latest
from indexing.reduce import Reducer, load_reducer
from indexing.snapshot import ID_LOOKUP, MANIFEST_NAME, SnapshotError, local_copy, read_manifest, verify_snapshot

__all__ = ["LoadedSnapshot", "Neighbor", "SnapshotClient", "UnknownItem", "open_snapshot", "without_own"]

log = logging.getLogger(__name__)


class UnknownItem(KeyError):
    """An item id that the served snapshot does not contain."""

    def __str__(self) -> str:
        return f"item {self.args[0]!r} is not in the snapshot"


@dataclass(frozen=True)
class Neighbor:
    item_id: str
    score: float


@dataclass(frozen=True)
class LoadedSnapshot:
    """One loaded snapshot, whose rows (an item's place in it) mean the same for as long as it is held: what a
    caller searching many items in row terms keeps (`SnapshotClient.loaded`), as a refresh swaps in another."""

    manifest: dict
    index: AnnIndex
    item_ids: ItemIds
    vectors: np.ndarray  # (count, dim) float32, memory-mapped
    reducer: Reducer | None

    @property
    def snapshot_id(self) -> str:
        return self.manifest["snapshot_id"]

    def neighbour_rows(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(scores, rows), each (queries, min(k, count)): the nearest rows to each query vector, best first, the
        query's own row (`exclude`, -1 for none) left out; -1 (score NaN) where fewer were found."""
        scores, found = self.index.search(queries, min(k + 1, self.manifest["count"]))
        return without_own(scores, found, exclude, k)


def without_own(scores: np.ndarray, found: np.ndarray, own: np.ndarray | None, k: int
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """An index's answers (scores, rows) cut to k a query: each query's own row (`own`, -1 for none) and the
    index's -1s left out, the rest in their order; -1 (score NaN) where fewer are left."""
    kept = found >= 0
    if own is not None:
        kept &= found != np.asarray(own, dtype=np.int64)[:, None]
    order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # the kept ones first, in their order
    kept, found = np.take_along_axis(kept, order, 1), np.take_along_axis(found, order, 1).astype(np.int64)
    scores = np.take_along_axis(np.asarray(scores, dtype=np.float32), order, 1)
    found[~kept], scores[~kept] = -1, np.nan
    return scores, found


def _load(root: str, snapshot_id: str, cache_dir: str) -> LoadedSnapshot:
    manifest = read_manifest(root, snapshot_id)
    directory = local_copy(root, snapshot_id, cache_dir)
    verify_snapshot(directory, manifest, cache_dir)
    for name in WARMED:  # in the page cache before a search faults it in 4 KiB at a time
        if name in manifest["files"]:
            warm(Path(directory) / name)
    index = load_index(Path(directory), manifest["index"])
    if ID_LOOKUP in manifest["files"]:
        item_ids = ItemIds.open_lookup(Path(directory) / ID_LOOKUP)
    else:  # a snapshot built before the lookup was: its ids hashed and sorted here
        item_ids = ItemIds.read(Path(directory) / "ids.parquet")
    vectors = np.load(Path(directory) / "vectors.npy", mmap_mode="r")
    count, dim = manifest["count"], manifest["dim"]
    if len(item_ids) != count or vectors.shape != (count, dim) or getattr(index, "ntotal", count) != count:
        raise SnapshotError(
            f"snapshot {snapshot_id} is inconsistent: manifest says {count} × {dim}, "
            f"ids {len(item_ids)}, vectors {vectors.shape}"
        )
    return LoadedSnapshot(manifest, index, item_ids, vectors, load_reducer(directory))


WARMED = ("index.faiss", ID_LOOKUP)  # mapped files every search reads (not an on-disk IVF's lists, nor vectors.npy)


class SnapshotClient:
    """Search the snapshot published under `root` (local or gs://)."""

    def __init__(self, root: str, cache_dir: str | None = None, allow_dim_change: bool = False,
                 snapshot_id: str | None = None) -> None:  # fmt: skip
        self.root = root
        self._cache_dir = cache_dir or storage.cache_dir("snapshots")
        self._allow_dim_change = allow_dim_change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if snapshot_id is None:  # follow LATEST; a pinned snapshot (e.g. to evaluate it) need not be published
            latest = read_latest(root)
            if latest is None:
                raise SnapshotError(f"nothing is published under {root} (no LATEST)")
            snapshot_id = latest.snapshot_id
        self._current = _load(root, snapshot_id, self._cache_dir)
        self._refreshed: dict = {"checked_at": None, "error": None, "refused": None}
        log.info("serving snapshot %s (%d items)", self.snapshot_id, self._current.manifest["count"])

    @property
    def snapshot_id(self) -> str:
        return self._current.snapshot_id

    @property
    def refresh_status(self) -> dict:
        """The last refresh: when it looked at LATEST (`checked_at`, UTC), and why it kept the served snapshot
        (`error`, and the snapshot it `refused`), None after a refresh that found nothing wrong. A service that
        cannot take newer snapshots keeps answering from its own: this is where monitoring sees it."""
        return dict(self._refreshed)

    @property
    def manifest(self) -> dict:
        return self._current.manifest

    @property
    def loaded(self) -> LoadedSnapshot:
        """The snapshot served now, whole: its rows stay its own while a refresh swaps in the next."""
        return self._current

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._current.item_ids

    def __len__(self) -> int:
        return len(self._current.item_ids)

    def holds(self, item_ids: Sequence[str]) -> list[bool]:
        """Whether the served snapshot holds each item: `item_id in client` for many at once."""
        return (self._current.item_ids.rows(item_ids) >= 0).tolist()

    def refresh(self) -> bool:
        """Swap in the snapshot LATEST names now, if it changed. True when it swapped.

        A snapshot that fails to load or verify, or changes the served dimension
        (unless `allow_dim_change`), is refused with a logged error; the current
        snapshot keeps serving.
        """
        checked_at = datetime.now(UTC).isoformat()
        try:
            latest = read_latest(self.root)
        except Exception as err:  # noqa: BLE001 - a bad LATEST must not stop serving
            log.error("refresh: cannot read LATEST under %s: %s; still serving %s", self.root, err, self.snapshot_id)
            self._refreshed = {"checked_at": checked_at, "error": f"cannot read LATEST: {err}", "refused": None}
            return False
        if latest is None or latest.snapshot_id == self.snapshot_id:
            self._refreshed = {"checked_at": checked_at, "error": None, "refused": None}
            return False
        try:
            candidate = _load(self.root, latest.snapshot_id, self._cache_dir)
            if candidate.manifest["dim"] != self._current.manifest["dim"] and not self._allow_dim_change:
                raise SnapshotError(
                    f"dimension {candidate.manifest['dim']} differs from the served {self._current.manifest['dim']}"
                )
        except Exception as err:  # noqa: BLE001 - refused, logged, old snapshot keeps serving
            log.error("refresh: refusing snapshot %s: %s; still serving %s", latest.snapshot_id, err, self.snapshot_id)
            self._refreshed = {"checked_at": checked_at, "error": str(err), "refused": latest.snapshot_id}
            return False
        with self._lock:
            self._current = candidate
        self._refreshed = {"checked_at": checked_at, "error": None, "refused": None}
        log.info("refresh: now serving snapshot %s", candidate.snapshot_id)
        return True

    def start_auto_refresh(self, interval_s: float = 30.0) -> None:
        """Call `refresh()` every `interval_s` seconds (> 0) on a daemon thread."""
        if not interval_s > 0:
            raise ValueError(f"the refresh interval must be > 0 seconds, got {interval_s}")
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="snapshot-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def vector_of(self, item_id: str) -> np.ndarray:
        snapshot = self._current
        row = snapshot.item_ids.row(item_id)
        if row is None:
            raise UnknownItem(item_id)
        return np.array(snapshot.vectors[row])

    def search(self, item_ids: Sequence[str] | None = None, vectors: np.ndarray | Sequence | None = None,
               k: int = 10, *, unknown: str = "raise") -> list[list[Neighbor] | None]:  # fmt: skip
        """Nearest neighbours of items (themselves excluded) or of raw query vectors; see `search_tagged`."""
        return self.search_tagged(item_ids, vectors, k, unknown=unknown)[1]

    def search_tagged(self, item_ids: Sequence[str] | None = None, vectors: np.ndarray | Sequence | None = None,
                      k: int = 10, *, unknown: str = "raise") -> tuple[str, list[list[Neighbor] | None]]:  # fmt: skip
        """(snapshot_id, neighbours): the id of the very snapshot that answered.

        Nearest neighbours of items (themselves excluded) or of raw query vectors.

        Raw vectors have the embedding model's dimension; a snapshot with a
        reduction applies it to them first. `unknown="none"`: an item id not in the
        snapshot (delisted since the page that asks was rendered) gets None in its
        place, and the others their neighbours, rather than failing the whole batch.

        Raises:
            UnknownItem: an item id not in the snapshot (with `unknown="raise"`).
            ValueError: k < 1, both or neither of item_ids/vectors, or vectors of the wrong shape or non-finite.
        """
        if unknown not in ("raise", "none"):
            raise ValueError(f"unknown must be 'raise' or 'none', got {unknown!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if (item_ids is None) == (vectors is None):
            raise ValueError("pass exactly one of item_ids or vectors")
        snapshot = self._current  # one consistent snapshot for the whole call, even if a refresh swaps meanwhile
        if item_ids is not None:
            asked = snapshot.item_ids.rows(item_ids).tolist()  # -1: not in the snapshot
            if unknown == "raise" and -1 in asked:
                raise UnknownItem(item_ids[asked.index(-1)])
            rows = [row for row in asked if row >= 0]
            queries, exclude = np.asarray(snapshot.vectors[rows], dtype=np.float32), rows
        else:
            queries = self._prepare_vectors(snapshot, vectors)
            exclude = [None] * len(queries)
        found = self._neighbours(snapshot, queries, exclude, k) if len(queries) else []
        if item_ids is None:
            return snapshot.snapshot_id, found
        answers = iter(found)  # an unknown item's place holds None, every other its neighbours, in the order asked
        return snapshot.snapshot_id, [None if row < 0 else next(answers) for row in asked]

    @staticmethod
    def _neighbours(snapshot: LoadedSnapshot, queries: np.ndarray, exclude: list, k: int) -> list[list[Neighbor]]:
        # In Python, not `without_own`'s arrays: a request's one query took 68 µs that way against 39 (2,000 items,
        # flat), numpy's per-call costs on arrays of a few elements.
        scores, found = snapshot.index.search(queries, min(k + 1, snapshot.manifest["count"]))
        kept = [[(r, s) for r, s in zip(row_found.tolist(), row_scores.tolist(), strict=True) if r >= 0 and r != own][:k]
                for row_scores, row_found, own in zip(scores, found, exclude, strict=True)]  # fmt: skip
        names = iter(snapshot.item_ids.ids([r for hits in kept for r, _ in hits]))  # one lookup for the whole batch
        return [[Neighbor(next(names), s) for _, s in hits] for hits in kept]

    @staticmethod
    def _prepare_vectors(snapshot: LoadedSnapshot, vectors) -> np.ndarray:
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
            queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        expected = snapshot.reducer.dim_in if snapshot.reducer else snapshot.manifest["dim"]
        if queries.ndim != 2 or queries.shape[1] != expected:
            raise ValueError(f"query vectors must have dimension {expected}, got shape {tuple(queries.shape)}")
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN, infinity or values beyond float32's range")
        norms = np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)  # float32 squares can overflow
        if (norms == 0).any():
            raise ValueError("a query vector is all zeros")
        queries = (queries / norms).astype(np.float32)
        return snapshot.reducer.apply(queries) if snapshot.reducer else queries


def open_snapshot(spec: str) -> tuple[str, SnapshotClient]:
    """`ROOT/<snapshot_id>` → (root, client pinned to it); `ROOT` → (root, client on its LATEST)."""
    spec = spec.rstrip("/")
    if storage.exists(storage.join(spec, MANIFEST_NAME)):
        root, snapshot_id = spec.rsplit("/", 1) if "/" in spec else (".", spec)
        return root, SnapshotClient(root, snapshot_id=snapshot_id)
    return spec, SnapshotClient(spec)
