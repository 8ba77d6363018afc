"""Ranking metrics from graded relevance: nDCG@k, recall@k, MRR@k, hit rate@k, catalog coverage.

Conventions (the usual ones, stated so results can be recomputed by hand):
- gain of a retrieved item = its relevance (summed click weights), linear;
- discount of rank r (1-based) = 1 / log2(r + 1);
- ideal DCG@k = DCG of the query's own relevances sorted high to low, cut at k;
- recall@k = relevant items retrieved in the top k / min(k, relevant items);
- MRR@k = 1 / rank of the first relevant item in the top k, else 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from indexing.item_ids import sorted_positions

__all__ = ["METRICS", "coverage", "query_metrics", "ranked_metrics"]

METRICS = ("ndcg", "recall", "mrr", "hit_rate")


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def query_metrics(retrieved: Sequence[str], relevance: Mapping[str, float], k: int) -> dict[str, float]:
    """All metrics for one query.

    Args:
        retrieved: ranked item ids (the query itself already excluded); only the first k count.
        relevance: item id → positive relevance.

    Raises:
        ValueError: k < 1, or no positive relevance (nothing to measure).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    positive = {item: float(r) for item, r in relevance.items() if r > 0}
    if not positive:
        raise ValueError("query has no relevant items")
    top = list(retrieved[:k])
    gains = np.array([positive.get(item, 0.0) for item in top])
    discounts = _discounts(k)
    dcg = float(gains @ discounts[: len(gains)])
    ideal = np.sort(np.fromiter(positive.values(), dtype=float))[::-1][:k]
    idcg = float(ideal @ discounts[: len(ideal)])
    hits = gains > 0
    first = int(np.argmax(hits)) + 1 if hits.any() else 0
    return {
        "ndcg": dcg / idcg,
        "recall": float(hits.sum()) / min(k, len(positive)),
        "mrr": 1.0 / first if first else 0.0,
        "hit_rate": float(hits.any()),
    }


def ranked_metrics(retrieved: np.ndarray, query: np.ndarray, relevant: np.ndarray, weight: np.ndarray,
                   k: int) -> dict[str, np.ndarray]:  # fmt: skip
    """`query_metrics` of many queries at once, over rows (integers naming items) rather than ids: no Python object
    a query or an item, so a million queries take seconds.

    Args:
        retrieved: (queries, width) each query's ranked rows, the query itself excluded; -1 where none (a ranker
            that found fewer); only the first k columns count.
        query, relevant, weight: one entry per relevant (query, item) pair: the query's index into `retrieved`,
            the item's row, its relevance. A pair appears once.

    Raises:
        ValueError: k < 1, or a query with no positive relevance (nothing to measure).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    positive = weight > 0
    query, relevant, weight = query[positive], relevant[positive].astype(np.int64), weight[positive]
    n = len(retrieved)
    per_query = np.bincount(query, minlength=n)
    if (per_query == 0).any():
        raise ValueError(f"query {int(np.argmin(per_query))} has no relevant items")
    top = np.asarray(retrieved, dtype=np.int64)[:, :k]
    # A (query, row) pair as one integer; `span` exceeds every row by 2, so a -1 (nothing retrieved) matches none.
    span = int(max(top.max(initial=-1), relevant.max(initial=-1))) + 2
    keys = query.astype(np.int64) * span + relevant
    order = np.argsort(keys)
    at = sorted_positions(keys[order], (np.arange(n, dtype=np.int64)[:, None] * span + top).ravel())
    gains = np.where(at >= 0, weight[order][at], 0.0).reshape(top.shape)
    discounts = _discounts(k)
    dcg = gains @ discounts[: top.shape[1]]
    by_gain = np.lexsort((-weight, query))  # each query's pairs together, its largest relevance first
    place = np.arange(len(query)) - np.searchsorted(query[by_gain], query[by_gain])  # 0 for each query's largest
    ideal = place < k
    idcg = np.bincount(query[by_gain][ideal], weights=weight[by_gain][ideal] * discounts[place[ideal]], minlength=n)
    hits = gains > 0
    found = hits.any(axis=1)
    return {
        "ndcg": dcg / idcg,
        "recall": hits.sum(axis=1) / np.minimum(k, per_query),
        "mrr": np.where(found, 1.0 / (np.argmax(hits, axis=1) + 1), 0.0),
        "hit_rate": found.astype(np.float64),
    }


def coverage(recommended: np.ndarray, catalog_size: int) -> float:
    """Share of the catalog that appears in at least one query's recommendations (rows; -1: none)."""
    if catalog_size < 1:
        return 0.0
    rows = np.asarray(recommended, dtype=np.int64).ravel()
    return len(np.unique(rows[rows >= 0])) / catalog_size
