"""Records that flow between embed steps, and the Parquet schemas they are written with."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import pyarrow as pa

__all__ = [
    "EmbeddingRow",
    "Failure",
    "FAILURE_SCHEMA",
    "PreparedImage",
    "ReuseRequest",
    "embedding_matrix",
    "embedding_schema",
    "embedding_table",
    "failures_to_table",
    "rows_to_table",
    "shard_writer_options",
]


class PreparedImage(NamedTuple):
    """An image at model size, ready for the encoder, or its JPEG bytes for the GPU decoder."""

    item_id: str
    image_uri: str
    image_sha256: str
    pixels: np.ndarray | None  # (height, width, 3) uint8; None while `data` waits for the GPU decoder
    data: bytes | np.ndarray | None = None  # encoded bytes (or a 1-D uint8 array of them) for the GPU worker
    route: str | None = None  # `encoder.jpeg.cpu_reason` when known: "" the GPU decoder takes it; None: unknown


class ReuseRequest(NamedTuple):
    """An item whose image bytes already have a vector from an earlier run."""

    item_id: str
    image_uri: str
    image_sha256: str


class EmbeddingRow(NamedTuple):
    """One output row (the embedding shard contract)."""

    item_id: str
    embedding: np.ndarray  # (dim,) float32, L2-normalised
    image_sha256: str
    model_version: str
    embedded_at: datetime  # when the vector was computed; reused rows keep the original time


class Failure(NamedTuple):
    """A dead letter: the item that could not be embedded, where, and why."""

    item_id: str
    image_uri: str
    stage: str  # fetch | decode | encode | reuse
    error: str


FAILURE_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("image_uri", pa.string()), ("stage", pa.string()), ("error", pa.string())]
)


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("item_id", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("image_sha256", pa.string()),
            ("model_version", pa.string()),
            ("embedded_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def shard_writer_options(schema: pa.Schema) -> dict:
    """`pyarrow.parquet.ParquetWriter` options for our shards: dictionary pages for the string columns only.

    Parquet dictionary-encodes every column by default; on float vectors, where no two values repeat, the
    attempt (until the dictionary page overflows) made writing a 768-d shard 4× slower (24 vs 6 µs per row),
    enough to cap a GPU worker's writer thread.
    """
    return {"use_dictionary": [field.name for field in schema if pa.types.is_string(field.type)]}


def rows_to_table(rows: Sequence[EmbeddingRow], dim: int) -> pa.Table:
    """Rows → one table; vectors go in as one contiguous float32 buffer, not Python lists."""
    schema = embedding_schema(dim)
    if not rows:
        return schema.empty_table()
    vectors = np.stack([r.embedding for r in rows]).astype(np.float32, copy=False)
    if vectors.shape != (len(rows), dim):
        raise ValueError(f"embeddings have shape {vectors.shape}, expected ({len(rows)}, {dim})")
    embedded_at = pa.array([r.embedded_at for r in rows], pa.timestamp("us", tz="UTC"))
    return embedding_table([r.item_id for r in rows], vectors, [r.image_sha256 for r in rows],
                           [r.model_version for r in rows], embedded_at)  # fmt: skip


def embedding_table(item_ids: Sequence[str], vectors: np.ndarray, image_sha256: Sequence[str],
                    model_versions: Sequence[str] | pa.Array, embedded_at: pa.Array) -> pa.Table:  # fmt: skip
    """Columns → a table of the embedding shard schema; `vectors` (n, dim) float32 as one buffer."""
    dim = vectors.shape[1]
    return pa.Table.from_arrays(
        [
            pa.array(item_ids, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            pa.array(image_sha256, pa.string()),
            pa.array(model_versions, pa.string()),
            embedded_at.cast(pa.timestamp("us", tz="UTC")),
        ],
        schema=embedding_schema(dim),
    )


def fresh_embedding_table(item_ids: Sequence[str], vectors: np.ndarray, image_sha256: Sequence[str],
                          model_version: str) -> pa.Table:  # fmt: skip
    """Vectors one model made just now, as a table of the embedding shard schema."""
    n = len(item_ids)  # one value repeated: Arrow builds it without n Python objects (0.26 µs per row before)
    now = pa.repeat(pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC")), n)
    return embedding_table(item_ids, vectors, image_sha256, pa.repeat(pa.scalar(model_version, pa.string()), n), now)


def failures_to_table(failures: Sequence[Failure]) -> pa.Table:
    return pa.Table.from_pylist([f._asdict() for f in failures], schema=FAILURE_SCHEMA)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as one (n, dim) float32 array, without per-row Python objects."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)
