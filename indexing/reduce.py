"""Dimensionality reduction for serving: PCA, or a Matryoshka-style prefix, then re-normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Reducer", "fit_reducer", "load_reducer"]

FILE_NAME = "reduce.npz"


@dataclass(frozen=True)
class Reducer:
    """Maps (n, dim_in) L2-normalised vectors to (n, dim_out) L2-normalised vectors."""

    method: str  # pca | prefix
    dim_in: int
    dim_out: int
    mean: np.ndarray | None = None  # (dim_in,) for pca
    components: np.ndarray | None = None  # (dim_out, dim_in) for pca
    explained_variance: float | None = None

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[-1] != self.dim_in:
            raise ValueError(f"expected vectors of dimension {self.dim_in}, got {vectors.shape[-1]}")
        if self.method == "prefix":
            reduced = vectors[..., : self.dim_out]
        else:
            reduced = (vectors - self.mean) @ self.components.T
        norms = np.linalg.norm(reduced, axis=-1, keepdims=True)
        return np.ascontiguousarray(reduced / np.maximum(norms, 1e-12), dtype=np.float32)

    def save(self, directory: Path) -> str:
        arrays = {"method": np.array(self.method), "dims": np.array([self.dim_in, self.dim_out])}
        if self.method == "pca":
            arrays |= {"mean": self.mean, "components": self.components,
                       "explained_variance": np.array(self.explained_variance)}  # fmt: skip
        np.savez(directory / FILE_NAME, **arrays)
        return FILE_NAME

    def describe(self) -> dict:
        return {"method": self.method, "dim_in": self.dim_in, "dim_out": self.dim_out,
                "explained_variance": None if self.explained_variance is None else round(self.explained_variance, 6)}  # fmt: skip


def fit_reducer(spec: str, sample: np.ndarray) -> Reducer:
    """Fit `pca:D` on a sample of vectors, or set up `prefix:D`.

    Raises:
        ValueError: D not smaller than the input dimension, or too few samples for PCA.
    """
    method, _, dim_text = spec.partition(":")
    dim_out, dim_in = int(dim_text), sample.shape[1]
    if not 0 < dim_out < dim_in:
        raise ValueError(f"--reduce {spec}: target dimension must be below the embedding dimension {dim_in}")
    if method == "prefix":
        return Reducer("prefix", dim_in, dim_out)
    if len(sample) < dim_out:
        raise ValueError(f"--reduce {spec}: PCA needs at least {dim_out} vectors, got {len(sample)}")
    x = sample.astype(np.float64)
    mean = x.mean(axis=0)
    covariance = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(values)[::-1][:dim_out]
    explained = float(values[order].sum() / max(values.sum(), 1e-12))
    return Reducer("pca", dim_in, dim_out, mean.astype(np.float32), vectors[:, order].T.astype(np.float32), explained)


def load_reducer(directory: Path) -> Reducer | None:
    path = directory / FILE_NAME
    if not path.exists():
        return None
    with np.load(path) as data:
        dim_in, dim_out = (int(v) for v in data["dims"])
        method = str(data["method"])
        if method == "prefix":
            return Reducer("prefix", dim_in, dim_out)
        return Reducer("pca", dim_in, dim_out, data["mean"], data["components"], float(data["explained_variance"]))
