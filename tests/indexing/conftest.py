"""Synthetic embed runs for index tests: clustered unit vectors written as the embed contract says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def clustered(n: int, dim: int, clusters: int = 50, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: realistic neighbourhoods, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, size=n)] + spread * rng.normal(size=(n, dim)) * np.sqrt(1.0 / dim) * 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_run(run_dir: Path, vectors: np.ndarray, ids: list[str] | None = None, model_version: str = "siglip-test",
              shards: int = 3) -> str:  # fmt: skip
    """An embed run directory with `shards` Parquet files and its _manifest.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    ids = ids or [f"item-{i:06d}" for i in range(n)]
    listed = []
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({
            "item_id": pa.array([ids[i] for i in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)), dim),
            "image_sha256": pa.array(["0" * 64] * len(rows)),
            "model_version": pa.array([model_version] * len(rows)),
            "embedded_at": pa.array([0] * len(rows), pa.timestamp("us", tz="UTC")),
        })  # fmt: skip
        name = f"part-{s:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, run_dir / name)
        listed.append({"path": name, "rows": len(rows), "bytes": (run_dir / name).stat().st_size})
    manifest = {"run_id": run_dir.name, "model_version": model_version, "dim": dim, "shards": listed,
                "counts": {"items_in": n, "embedded": n, "reused": 0, "dead_lettered": 0}}  # fmt: skip
    (run_dir / "_manifest.json").write_text(json.dumps(manifest))
    return str(run_dir)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(4000, 32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, vectors) -> str:
    return write_run(tmp_path_factory.mktemp("run") / "20260101T000000Z-aaaaaa", vectors)
