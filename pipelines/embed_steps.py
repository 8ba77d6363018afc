"""The per-item and per-batch work of the embed pipeline, free of Beam so it is testable alone.

Each step returns either its result or a `Failure` record; nothing here raises
for a bad item.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import numpy as np

from encoder import DecodeLimits, ImageDecodeError, ImageEncoder, PreprocessConfig, decode_image
from pipelines import storage
from pipelines.catalog import CatalogItem
from pipelines.records import EmbeddingRow, Failure, PreparedImage, ReuseRequest

__all__ = ["KnownDigests", "PreviousVectors", "ProgressLog", "embed_batch", "join_reused", "prepare_item"]

log = logging.getLogger(__name__)


class KnownDigests:
    """A compact set of image sha256 digests that already have vectors (32 bytes each)."""

    def __init__(self, hex_digests: Iterable[str]) -> None:
        raw = np.array(sorted({bytes.fromhex(h) for h in hex_digests}), dtype="S32")
        self._sorted = raw if raw.size else np.zeros(0, dtype="S32")

    def __len__(self) -> int:
        return int(self._sorted.size)

    def __contains__(self, hex_digest: str) -> bool:
        key = np.array(bytes.fromhex(hex_digest), dtype="S32")
        i = int(np.searchsorted(self._sorted, key))
        return i < self._sorted.size and self._sorted[i] == key


class PreviousVectors:
    """An earlier run's vectors by image digest, in memory: reuse joined inside the fetch step, no shuffle.

    Holds (n, dim) float32 plus 32 bytes and a timestamp per row; `embed` uses it when that
    fits its `reuse_memory_mb`, and a CoGroupByKey join otherwise.
    """

    def __init__(self, digests: np.ndarray, vectors: np.ndarray, embedded_at: list, model_version: str) -> None:
        order = np.argsort(digests)
        self._sorted, self._vectors = digests[order], vectors[order]
        self._embedded_at = [embedded_at[i] for i in order]
        self.model_version = model_version

    @classmethod
    def load(cls, rows: Iterable[EmbeddingRow], model_version: str) -> PreviousVectors:
        rows = [r for r in rows if r.model_version == model_version]
        digests = np.array([bytes.fromhex(r.image_sha256) for r in rows], dtype="S32")
        dim = len(rows[0].embedding) if rows else 0
        vectors = np.stack([r.embedding for r in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        return cls(digests, vectors, [r.embedded_at for r in rows], model_version)

    def __len__(self) -> int:
        return int(self._sorted.size)

    def _find(self, hex_digest: str) -> int | None:
        key = np.array(bytes.fromhex(hex_digest), dtype="S32")
        i = int(np.searchsorted(self._sorted, key))
        return i if i < self._sorted.size and self._sorted[i] == key else None

    def __contains__(self, hex_digest: str) -> bool:
        return self._find(hex_digest) is not None

    def row(self, request: ReuseRequest) -> EmbeddingRow:
        """The earlier vector of the request's image bytes, under the request's item id."""
        i = self._find(request.image_sha256)
        if i is None:
            raise KeyError(f"no earlier vector for {request.image_sha256}")
        return EmbeddingRow(request.item_id, self._vectors[i], request.image_sha256, self.model_version,
                            self._embedded_at[i])  # fmt: skip


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def prepare_item(
    item: CatalogItem,
    preprocess: PreprocessConfig,
    limits: DecodeLimits,
    known: KnownDigests | PreviousVectors | None = None,
) -> PreparedImage | ReuseRequest | Failure:
    """Fetch an item's image, hash it, and decode it unless its vector can be reused."""
    if not item.image_uri:
        return Failure(item.item_id, item.image_uri, "fetch", "empty image_uri")
    try:
        data = storage.read_bytes(item.image_uri, max_bytes=limits.max_bytes)
    except storage.NotFound:
        return Failure(item.item_id, item.image_uri, "fetch", "not found")
    except Exception as err:  # noqa: BLE001 - recorded as the item's dead letter
        return Failure(item.item_id, item.image_uri, "fetch", _describe(err))
    sha256 = hashlib.sha256(data).hexdigest()
    if known is not None and sha256 in known:
        return ReuseRequest(item.item_id, item.image_uri, sha256)
    try:
        pixels = decode_image(data, preprocess, limits)
    except ImageDecodeError as err:
        return Failure(item.item_id, item.image_uri, "decode", str(err))
    except Exception as err:  # noqa: BLE001 - a decoder bug on one image must not stop the run
        return Failure(item.item_id, item.image_uri, "decode", f"unexpected {_describe(err)}")
    return PreparedImage(item.item_id, item.image_uri, sha256, pixels)


def embed_batch(encoder: ImageEncoder, batch: Sequence[PreparedImage]) -> tuple[list[EmbeddingRow], list[Failure]]:
    """Embed a batch; if the batch fails, embed items one by one so only the culprits fail."""
    now = datetime.now(UTC)
    try:
        vectors: list[np.ndarray | BaseException] = list(encoder.embed_prepared(np.stack([b.pixels for b in batch])))
    except Exception as batch_err:  # noqa: BLE001 - isolate the item(s) that break the batch
        log.warning("batch of %d failed to embed (%s); retrying items one by one", len(batch), _describe(batch_err))
        vectors = [_embed_one(encoder, b) for b in batch]
    rows, failures = [], []
    for item, vector in zip(batch, vectors, strict=True):
        if isinstance(vector, BaseException):
            failures.append(Failure(item.item_id, item.image_uri, "encode", _describe(vector)))
        elif not np.all(np.isfinite(vector)):
            failures.append(Failure(item.item_id, item.image_uri, "encode", "non-finite embedding"))
        else:
            rows.append(EmbeddingRow(item.item_id, vector, item.image_sha256, encoder.model_version, now))
    return rows, failures


def _embed_one(encoder: ImageEncoder, item: PreparedImage) -> np.ndarray | BaseException:
    try:
        return encoder.embed_prepared(item.pixels[None])[0]
    except Exception as err:  # noqa: BLE001 - returned, then recorded as a dead letter
        return err


def join_reused(
    image_sha256: str, requests: Iterable[ReuseRequest], previous: Iterable[EmbeddingRow]
) -> Iterable[EmbeddingRow | Failure]:
    """Give each reuse request the earlier vector of the same image bytes."""
    earlier = next(iter(previous), None)
    for request in requests:
        if earlier is None:  # cannot happen when both sides come from the same previous run
            yield Failure(request.item_id, request.image_uri, "reuse", f"no earlier vector for {image_sha256}")
        else:
            yield earlier._replace(item_id=request.item_id)


class ProgressLog:
    """Thread-safe counters that log a progress line at most every `every_s` seconds."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0) -> None:
        self._what, self._total, self._every_s = what, total, every_s
        self._lock = threading.Lock()
        self._count = 0
        self._start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n
            now = time.monotonic()
            if now - self._last < self._every_s:
                return
            self._last = now
            count, elapsed = self._count, now - self._start
        share = f"/{self._total} ({100 * count / self._total:.0f}%)" if self._total else ""
        log.info("%s: %d%s, %.0f/s in this worker", self._what, count, share, count / max(elapsed, 1e-9))
