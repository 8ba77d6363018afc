"""Embedding shards of complete embed runs, read as a stream of (item_ids, vectors) batches.

Only runs with a `_manifest.json` are read, and only the shards it lists. Each
pass re-reads the shards batch by batch, so memory stays at one batch plus
whatever the caller keeps (the index), never a full copy of the data.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoder import storage

__all__ = ["EmbeddingSet", "EmbeddingsError", "latest_run", "open_embeddings"]

# ~4 MiB of vectors per batch, streamed without pre-buffering the column chunk: the
# Parquet reader's peak grows faster than the batch (128 MB chunk: 30 MiB at 4 MiB, 271 at 64).
_BATCH_BYTES = 4 << 20
_READ_BUFFER = 8 << 20
MANIFEST_NAME = "_manifest.json"


class EmbeddingsError(ValueError):
    """The embeddings cannot be indexed; the message names the run, shard or item."""


@dataclass(frozen=True)
class EmbeddingRun:
    run_dir: str
    run_id: str
    rows: int
    shards: tuple[str, ...]


@dataclass(frozen=True)
class EmbeddingSet:
    """One or more complete embed runs of the same model version and dimension."""

    runs: tuple[EmbeddingRun, ...]
    model_version: str
    dim: int

    @property
    def count(self) -> int:
        return sum(r.rows for r in self.runs)

    @property
    def nbytes(self) -> int:
        """Bytes of all vectors as float32."""
        return self.count * self.dim * 4

    def batches(self, columns_checked: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every (item_ids, (n, dim) float32 vectors) batch, in a fixed order.

        Raises:
            EmbeddingsError: a shard with another dimension or model version, or a non-finite vector.
        """
        for run in self.runs:
            for shard in run.shards:
                yield from self._shard_batches(shard, columns_checked)

    def _shard_batches(self, shard: str, check: bool) -> Iterator[tuple[list[str], np.ndarray]]:
        with _local_copy(shard) as path:
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER)
            embedding_type = parquet.schema_arrow.field("embedding").type
            if not pa.types.is_fixed_size_list(embedding_type) or embedding_type.list_size != self.dim:
                raise EmbeddingsError(
                    f"shard {shard} has embeddings of type {embedding_type}, expected dimension {self.dim}"
                )
            for batch in parquet.iter_batches(
                batch_size=max(64, _BATCH_BYTES // (4 * self.dim)),
                columns=["item_id", "embedding"] + (["model_version"] if check else []),
            ):
                ids = batch.column("item_id").to_pylist()
                column = batch.column("embedding")
                vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), self.dim)
                if check:
                    versions = set(batch.column("model_version").to_pylist())
                    if versions != {self.model_version}:
                        raise EmbeddingsError(
                            f"shard {shard} mixes model versions {sorted(versions)}; expected only {self.model_version}"
                        )
                    bad = ~np.isfinite(vectors).all(axis=1)
                    if bad.any():
                        raise EmbeddingsError(f"shard {shard}: non-finite vector for item {ids[int(np.argmax(bad))]!r}")
                yield ids, np.ascontiguousarray(vectors, dtype=np.float32)
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise

    def sample(self, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """A uniform sample of `n` rows (all rows when fewer), read in one pass."""
        n = min(n, self.count)
        wanted = np.sort(np.random.default_rng(seed).choice(self.count, size=n, replace=False))
        ids, out, offset, filled = [], np.empty((n, self.dim), dtype=np.float32), 0, 0
        for batch_ids, vectors in self.batches(columns_checked=False):
            lo, hi = np.searchsorted(wanted, [offset, offset + len(batch_ids)])
            local = wanted[lo:hi] - offset
            out[filled : filled + len(local)] = vectors[local]
            ids.extend(batch_ids[i] for i in local)
            filled += len(local)
            offset += len(batch_ids)
        return ids, out[:filled]


class _local_copy:
    """A local path for a shard: itself, or a temporary download of a gs:// object."""

    def __init__(self, uri: str) -> None:
        self._uri, self._tmp = uri, None

    def __enter__(self) -> str:
        if not storage.is_gcs(self._uri):
            return self._uri
        self._tmp = tempfile.NamedTemporaryFile(suffix=".parquet")
        self._tmp.write(storage.read_bytes(self._uri))
        self._tmp.flush()
        return self._tmp.name

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.close()


def latest_run(out: str) -> str:
    """The most recently finished complete run under an embed output root (`OUT/embeddings/*`).

    Raises:
        EmbeddingsError: no complete run there.
    """
    runs = []
    base = storage.join(out, "embeddings")
    for name in storage.list_children(base):
        try:
            manifest = json.loads(storage.read_bytes(storage.join(base, name, MANIFEST_NAME)))
        except FileNotFoundError:
            continue  # still running, or failed: not a run to index
        runs.append((manifest.get("finished_at", ""), storage.join(base, name)))
    if not runs:
        raise EmbeddingsError(f"{out} holds no complete embed run (no embeddings/*/{MANIFEST_NAME})")
    return max(runs)[1]


def _read_run(run_dir: str) -> tuple[EmbeddingRun, dict]:
    run_dir = run_dir.rstrip("/").removesuffix("/" + MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(storage.join(run_dir, MANIFEST_NAME)))
    except FileNotFoundError as err:
        raise EmbeddingsError(f"{run_dir} is not a complete embed run (no {MANIFEST_NAME})") from err
    try:
        shards = tuple(storage.join(run_dir, storage.contained(s["path"])) for s in manifest["shards"])
        rows = sum(int(s["rows"]) for s in manifest["shards"])
        return EmbeddingRun(run_dir, str(manifest["run_id"]), rows, shards), manifest
    except (KeyError, TypeError, ValueError) as err:
        raise EmbeddingsError(f"{run_dir}/{MANIFEST_NAME} is malformed: {type(err).__name__}: {err}") from err


def open_embeddings(run_dirs: list[str] | str) -> EmbeddingSet:
    """Open one or more embed runs (`OUT/embeddings/<run_id>`, or `OUT` for its latest run) as one set.

    Raises:
        EmbeddingsError: no runs, an incomplete run, runs of different model versions
            or dimensions, or no vectors at all.
    """
    run_dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    if not run_dirs:
        raise EmbeddingsError("no embedding runs given")
    runs, versions, dims = [], set(), set()
    for run_dir in run_dirs:
        if not storage.exists(storage.join(run_dir, MANIFEST_NAME)) and storage.list_children(
            storage.join(run_dir, "embeddings")
        ):
            run_dir = latest_run(run_dir)  # an embed --out root: take its latest complete run
        run, manifest = _read_run(run_dir)
        runs.append(run)
        versions.add(manifest["model_version"])
        dims.add(int(manifest["dim"]))
    if len(versions) > 1:
        raise EmbeddingsError(f"runs have different model versions {sorted(versions)}; index one model at a time")
    if len(dims) > 1:
        raise EmbeddingsError(f"runs have different dimensions {sorted(dims)}")
    result = EmbeddingSet(tuple(runs), versions.pop(), dims.pop())
    if result.count == 0:
        raise EmbeddingsError(f"no embeddings in {run_dirs}")
    return result
