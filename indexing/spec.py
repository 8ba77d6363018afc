"""What index to build: the typed config, and the `auto` choice by size, dimension and memory.

Anchors (DESIGN.md; 100k × 256 clustered vectors, inner product, 2 threads, recall@10
≥ 0.95): faiss IVF1265,Flat at nprobe 2 — 117k queries/s, built in 2.9 s; HNSW32 —
35k queries/s, 5.0 s; ScaNN tree(316 leaves) + AH + reorder — 80k queries/s, 8.5 s
(with spherical=True); exact search — 5k queries/s. Hence: exact while it is cheap,
IVF-Flat for the middle, IVF-PQ with a refine step for the largest, and IVF on disk
when the vectors do not fit the memory budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["IndexConfig", "IndexPlan", "choose_index", "parse_size"]

EXACT_MAX_ROWS = 50_000  # exact search still answers a query in ~1 ms at this size on 2 cores
IVF_FLAT_MAX_ROWS = 5_000_000  # past this, 4 bytes per dimension per vector is the cost that matters
_BACKENDS = ("faiss", "scann")


def parse_size(text: str | int | None) -> int | None:
    """`512MB`, `4GiB`, `1e9`, 123 → bytes."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 512MB or 4GiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit)) if unit else int(number)


@dataclass(frozen=True)
class IndexConfig:
    """How embeddings become an ANN index."""

    backend: str = "faiss"  # faiss | scann
    index: str = "auto"  # auto | flat | hnsw | ivf | ivfpq | a faiss factory string (backend faiss)
    target_recall: float = 0.95  # search parameters are tuned up to this recall@10
    min_recall: float = 0.9  # below this measured recall@10 the build fails
    k: int = 10
    queries: int = 1000  # sampled queries for recall and latency
    hnsw_m: int = 32
    nlist: int | None = None  # IVF lists; default ~4·sqrt(N)
    scann_leaves: int | None = None  # default ~sqrt(N); setting it forces the tree even where exact is cheap
    scann_reorder: int = 100
    memory_budget: int | None = None  # bytes of anonymous memory for the whole build (indexing/memory.py)
    reduce: str | None = None  # pca:D | prefix:D
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.backend == "scann" and self.index not in ("auto", "flat"):
            raise ValueError(
                f"backend scann takes --index auto or flat, got {self.index!r}; tune it with --scann-leaves"
            )
        if not 0 < self.min_recall <= 1 or not 0 < self.target_recall <= 1:
            raise ValueError(f"recall targets must be in (0, 1], got {self.min_recall}, {self.target_recall}")
        if self.k < 1 or self.queries < 1:
            raise ValueError(f"k and queries must be >= 1, got {self.k}, {self.queries}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if self.reduce is not None and not re.fullmatch(r"(pca|prefix):[1-9][0-9]*", self.reduce):
            raise ValueError(f"reduce must be pca:D or prefix:D, got {self.reduce!r}")
        if self.min_recall > self.target_recall:  # tuned to stop short of what the build then demands
            raise ValueError(f"min_recall {self.min_recall} is above target_recall {self.target_recall}: the search is "
                             f"tuned up to the target, so the build would fail; raise target_recall to at least "
                             f"{self.min_recall}")  # fmt: skip
        if self.hnsw_m < 2:  # faiss's HNSW crashes the process at 1
            raise ValueError(f"hnsw_m must be >= 2, got {self.hnsw_m}")
        for name in ("nlist", "scann_leaves"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scann_reorder < 1:
            raise ValueError(f"scann_reorder must be >= 1, got {self.scann_reorder}")


@dataclass(frozen=True)
class IndexPlan:
    """The chosen index: backend, kind, faiss factory string or ScaNN settings, and why."""

    backend: str
    kind: str  # flat | hnsw | ivf | ivfpq | factory | scann-tree | scann-brute | ivf-ondisk
    factory: str | None
    build_params: dict
    reason: str
    on_disk: bool = False


def _nlist(n: int, cfg: IndexConfig, train_rows: int | None) -> int:
    # faiss asks for >= 39 training points per list; k-means still places lists well at 16 from a
    # sample (the default 100k sample trains 1M vectors' 4,000 lists), not below.
    trainable = min(n // 39, (train_rows or n) // 16)
    if cfg.nlist and cfg.nlist > (train_rows or n):  # k-means cannot place more centres than it has points
        raise ValueError(f"--nlist {cfg.nlist} is more lists than the {train_rows or n} vectors that would train them")
    return cfg.nlist or max(1, min(int(4 * math.sqrt(n)), trainable))


def _pq_m(dim: int) -> int:
    for m in (dim // 4, dim // 2, dim):  # 4 dims per byte-sized sub-quantizer when it divides
        if m >= 1 and dim % m == 0:
            return m
    return dim


def choose_index(n: int, dim: int, cfg: IndexConfig, train_rows: int | None = None) -> IndexPlan:
    """The index to build for `n` vectors of `dim` dimensions under `cfg`, trained on `train_rows` of them.

    Raises:
        ValueError: an explicit choice that cannot fit the memory budget.
    """
    vector_bytes = n * dim * 4
    # An in-memory index holds every vector, and its arrays grow by doubling: allow twice the vectors.
    over_budget = cfg.memory_budget is not None and 2 * vector_bytes > cfg.memory_budget
    if cfg.backend == "scann":
        if over_budget:
            raise ValueError(
                f"scann needs all {n} vectors in memory (twice their {vector_bytes} bytes > budget "
                f"{cfg.memory_budget}); "
                "use --backend faiss"
            )
        if cfg.index == "flat" or (cfg.index == "auto" and n <= EXACT_MAX_ROWS and cfg.scann_leaves is None):
            return IndexPlan("scann", "scann-brute", None, {}, f"exact: n={n} <= {EXACT_MAX_ROWS}")
        leaves = cfg.scann_leaves or max(2, int(math.sqrt(n)))
        params = {"num_leaves": leaves, "reorder": cfg.scann_reorder, "training_sample_size": min(n, 250_000)}
        return IndexPlan("scann", "scann-tree", None, params, "tree + asymmetric hashing + exact reorder")

    nlist = _nlist(n, cfg, train_rows)
    if cfg.index == "auto":
        if over_budget:
            return IndexPlan("faiss", "ivf-ondisk", f"IVF{nlist},Flat", {"nlist": nlist},
                             f"2 × {vector_bytes} bytes of vectors > memory budget {cfg.memory_budget}: IVF on disk",
                             on_disk=True)  # fmt: skip
        if n <= EXACT_MAX_ROWS:
            return IndexPlan("faiss", "flat", "Flat", {}, f"exact: n={n} <= {EXACT_MAX_ROWS}")
        if n <= IVF_FLAT_MAX_ROWS:
            return IndexPlan("faiss", "ivf", f"IVF{nlist},Flat", {"nlist": nlist}, f"IVF-Flat for n={n}")
        m = _pq_m(dim)
        return IndexPlan("faiss", "ivfpq", f"IVF{nlist},PQ{m}x8,Refine(SQfp16)", {"nlist": nlist, "pq_m": m},
                         f"IVF-PQ with fp16 refine for n={n}")  # fmt: skip

    named = {
        "flat": ("flat", "Flat", {}),
        "hnsw": ("hnsw", f"HNSW{cfg.hnsw_m},Flat", {"hnsw_m": cfg.hnsw_m}),
        "ivf": ("ivf", f"IVF{nlist},Flat", {"nlist": nlist}),
        "ivfpq": ("ivfpq", f"IVF{nlist},PQ{_pq_m(dim)}x8,Refine(SQfp16)", {"nlist": nlist, "pq_m": _pq_m(dim)}),
    }
    kind, factory, params = named.get(cfg.index, ("factory", cfg.index, {}))
    if over_budget:
        if kind != "ivf":
            raise ValueError(
                f"--index {cfg.index} keeps all {n} vectors in memory (twice their {vector_bytes} bytes > budget "
                f"{cfg.memory_budget}); use --index auto or ivf, which build on disk in parts"
            )
        return IndexPlan("faiss", "ivf-ondisk", factory, params, "explicit ivf over the memory budget: on disk", True)
    return IndexPlan("faiss", kind, factory, params, f"explicit --index {cfg.index}")
