"""ANN backends behind one small interface: FAISS (in memory or IVF on disk) and ScaNN.

Every index searches by inner product over L2-normalised vectors and answers
`search(queries, k) -> (scores, rows)`, rows being positions in `ids.parquet`.
Search parameters (nprobe, efSearch, leaves to search) are tuned after the build
and stored with the snapshot, so a loaded index searches exactly as measured.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from indexing.memory import release_freed_memory
from indexing.spec import IndexPlan

__all__ = ["AnnIndex", "FaissIndex", "ScannIndex", "build_scann", "fill_faiss", "load_index", "train_faiss"]


class AnnIndex(Protocol):
    backend: str
    kind: str
    search_params: dict

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 queries → ((n, k) float32 scores, (n, k) int64 rows, -1 where none)."""
        ...

    def set_search_params(self, params: dict) -> None: ...

    def tuning_grid(self) -> list[dict]:
        """Search settings from cheapest to most exhaustive; the first reaching the recall target wins."""
        ...

    def save(self, directory: Path) -> list[str]:
        """Write the index files into `directory`; returns their names relative to it."""
        ...


def _doubling(limit: int, start: int = 1) -> list[int]:
    values, v = [], start
    while v < limit:
        values.append(v)
        v *= 2
    return values + [limit]


class FaissIndex:
    backend = "faiss"

    def __init__(self, index, kind: str, factory: str, search_params: dict | None = None) -> None:
        import faiss

        self.index, self.kind, self.factory = index, kind, factory
        self._space = faiss.ParameterSpace()
        self.search_params: dict = {}
        self.set_search_params(search_params or {})

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_search_params(self, params: dict) -> None:
        for name, value in params.items():
            self._space.set_index_parameter(self.index, name, value)
        self.search_params = dict(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows.astype(np.int64, copy=False)

    def tuning_grid(self) -> list[dict]:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and isinstance(self.index, faiss.IndexRefine):
            # Compressed codes shortlist k·k_factor candidates, then exact-ish re-scoring picks k: tune both.
            grid = [{"nprobe": p, "k_factor_rf": f} for p in _doubling(int(ivf.nlist)) for f in (2, 4, 8, 16, 32)]
            return sorted(grid, key=lambda g: (g["nprobe"] * g["k_factor_rf"], g["nprobe"]))
        if ivf is not None:
            return [{"nprobe": p} for p in _doubling(int(ivf.nlist))]
        if "HNSW" in self.factory:
            return [{"efSearch": e} for e in _doubling(1024, start=16)]
        return [{}]

    def save(self, directory: Path) -> list[str]:
        import faiss

        faiss.write_index(self.index, str(directory / "index.faiss"))
        names = ["index.faiss"]
        if (directory / "index.ivfdata").exists():
            names.append("index.ivfdata")
        return names

    @classmethod
    def load(cls, directory: Path, section: dict) -> FaissIndex:
        import faiss

        path = str(directory / "index.faiss")
        # IVF lists on disk are memory-mapped from beside the index file, wherever the snapshot now lives. Any
        # other index's vectors and codes are mapped from the file too, not copied into the process: a 1M × 768
        # flat or IVF index loaded in 1.8-1.9 s and took 3 GB of the process's own memory, mapped it loads in
        # 0.03 s, searches as fast, and its pages are the page cache's (shared by every process serving it; a
        # refresh's next snapshot is not a second copy beside the first). A snapshot's files are never rewritten
        # in place; one removed while mapped stays readable until unmapped.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if section.get("on_disk") else faiss.IO_FLAG_MMAP_IFC
        return cls(faiss.read_index(path, flags), section["kind"], section["factory"], section.get("search_params"))


def train_faiss(plan: IndexPlan, dim: int, train: np.ndarray):
    """An empty faiss index of `plan`, trained on `train` when it needs training."""
    import faiss

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def fill_faiss(index, plan: IndexPlan, batches: Iterable[np.ndarray], workdir: Path,
               part_rows: int | None = None) -> FaissIndex:  # fmt: skip
    """Add `batches` in order to a trained index.

    With `plan.on_disk`, vectors go into parts of at most `part_rows` rows, each
    written to disk and freed, then merged into memory-mapped inverted lists
    (`index.ivfdata`), so memory holds one part at a time.
    """
    if not plan.on_disk:
        for vectors in batches:
            index.add(vectors)
        return FaissIndex(index, plan.kind, plan.factory)
    parts = _write_parts(index, batches, part_rows or 1 << 20, workdir / "parts")
    from faiss.contrib.ondisk import merge_ondisk

    # Parts carry global row ids already: faiss's own shift_ids miscounts when the last part is shorter.
    merge_ondisk(index, [str(p) for p in parts], str(workdir / "index.ivfdata"), shift_ids=False)
    for part in parts:
        part.unlink()
    (workdir / "parts").rmdir()
    found = FaissIndex(index, plan.kind, plan.factory)
    found.parts = len(parts)
    return found


def _write_parts(trained, batches: Iterable[np.ndarray], part_rows: int, folder: Path) -> list[Path]:
    """Batches added straight into part indexes (no concatenated copy), each written and freed when full."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    paths, part, offset = [], None, 0

    def flush() -> None:
        path = folder / f"part-{len(paths):05d}.index"
        faiss.write_index(part, str(path))
        paths.append(path)

    for vectors in _split(batches, part_rows):
        if part is None:
            part = faiss.clone_index(trained)
        part.add_with_ids(vectors, np.arange(offset, offset + len(vectors), dtype=np.int64))
        offset += len(vectors)
        if part.ntotal == part_rows:
            flush()
            part = None
            release_freed_memory()
    if part is not None:
        flush()
    return paths


def _split(batches: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The same rows in the same order, cut so no piece crosses a multiple of `rows`."""
    seen = 0
    for batch in batches:
        while len(batch):
            take = batch[: rows - seen % rows]
            seen += len(take)
            batch = batch[len(take) :]
            yield take


class ScannIndex:
    backend = "scann"

    def __init__(self, searcher, kind: str, build_params: dict, search_params: dict | None = None) -> None:
        self.searcher, self.kind, self.build_params = searcher, kind, build_params
        self.search_params: dict = dict(search_params or {})

    def set_search_params(self, params: dict) -> None:
        self.search_params = dict(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kwargs = {"final_num_neighbors": k}
        if self.kind == "scann-tree":
            kwargs["leaves_to_search"] = int(self.search_params.get("leaves_to_search", 1))
            kwargs["pre_reorder_num_neighbors"] = max(k, int(self.build_params.get("reorder", 100)))
        rows, scores = self.searcher.search_batched(queries, **kwargs)
        rows = rows.astype(np.int64)
        if rows.shape[1] < k:  # fewer vectors than k
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores.astype(np.float32), rows

    def tuning_grid(self) -> list[dict]:
        if self.kind != "scann-tree":
            return [{}]
        return [{"leaves_to_search": v} for v in _doubling(int(self.build_params["num_leaves"]))]

    def save(self, directory: Path) -> list[str]:
        folder = directory / "scann"
        folder.mkdir(exist_ok=True)
        self.searcher.serialize(str(folder), relative_path=True)  # relative paths: the snapshot can move
        return sorted(f"scann/{name}" for name in os.listdir(folder))

    @classmethod
    def load(cls, directory: Path, section: dict) -> ScannIndex:
        from scann.scann_ops.py import scann_ops_pybind

        searcher = scann_ops_pybind.load_searcher(str(directory / "scann"))
        return cls(searcher, section["kind"], section.get("build_params", {}), section.get("search_params"))


def build_scann(plan: IndexPlan, matrix: np.ndarray) -> ScannIndex:
    """A ScaNN searcher over the whole (n, dim) matrix: brute force, or tree + AH + exact reorder."""
    from scann.scann_ops.py import scann_ops_pybind

    builder = scann_ops_pybind.builder(np.ascontiguousarray(matrix, dtype=np.float32), 10, "dot_product")
    if plan.kind == "scann-brute":
        return ScannIndex(builder.score_brute_force().build(), plan.kind, plan.build_params)
    p = plan.build_params
    searcher = (
        # spherical=True: the default k-means routes badly on normalised data (DESIGN.md anchors)
        builder.tree(
            num_leaves=p["num_leaves"],
            num_leaves_to_search=1,
            training_sample_size=p["training_sample_size"],
            spherical=True,
        )  # fmt: skip
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(p["reorder"])
        .build()
    )
    return ScannIndex(searcher, plan.kind, plan.build_params)


_LOADERS = {"faiss": FaissIndex.load, "scann": ScannIndex.load}


def load_index(directory: Path, section: dict) -> AnnIndex:
    """Load a snapshot's index as its manifest section describes it.

    Raises:
        ValueError: an unknown backend.
    """
    loader = _LOADERS.get(section.get("backend"))
    if loader is None:
        raise ValueError(f"unknown index backend {section.get('backend')!r}; known: {sorted(_LOADERS)}")
    return loader(directory, section)
