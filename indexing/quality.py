"""Measured quality of an index: recall@k against exact search, single-query latency, batch throughput."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Quality", "exact_topk", "measure", "recall_at_k"]

_CHUNK = 1024


@dataclass(frozen=True)
class Quality:
    recall_at_10: float
    queries: int
    latency_ms_p50: float
    latency_ms_p99: float
    batch_queries_per_s: float

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def exact_topk(queries: np.ndarray, batches: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Row numbers of the exact inner-product top-k over vectors that arrive in batches.

    Memory is one (n_queries, _CHUNK + k) score block, whatever the number of vectors.

    Returns:
        (n_queries, k) int64; -1 where there are fewer than k vectors.
    """
    n = len(queries)
    best_scores = np.full((n, k), -np.inf, dtype=np.float32)
    best_rows = np.full((n, k), -1, dtype=np.int64)
    offset = 0
    for batch in batches:
        for start in range(0, len(batch), _CHUNK):  # bounded score blocks, whatever the batch size
            vectors = batch[start : start + _CHUNK]
            all_scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            keep = np.argpartition(all_scores, -k, axis=1)[:, -k:]  # columns < k are the best so far
            best_scores = np.take_along_axis(all_scores, keep, axis=1)
            kept_rows = np.take_along_axis(best_rows, np.minimum(keep, k - 1), axis=1)
            best_rows = np.where(keep < k, kept_rows, offset + keep - k)
            offset += len(vectors)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k rows that the index returned in its top-k."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def measure(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
            truth: np.ndarray, k: int = 10, single_queries: int = 200) -> Quality:  # fmt: skip
    """Recall@k on all `queries`, latency of one query at a time, and batch queries/s."""
    start = time.perf_counter()
    _, rows = search(queries, k)
    batch_s = time.perf_counter() - start
    latencies = []
    for q in queries[:single_queries]:
        start = time.perf_counter()
        search(q[None], k)
        latencies.append((time.perf_counter() - start) * 1000)
    return Quality(
        recall_at_10=recall_at_k(rows, truth),
        queries=len(queries),
        latency_ms_p50=float(np.percentile(latencies, 50)),
        latency_ms_p99=float(np.percentile(latencies, 99)),
        batch_queries_per_s=len(queries) / max(batch_s, 1e-9),
    )
