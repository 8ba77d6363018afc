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

__all__ = ["METRICS", "coverage", "query_metrics"]

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


def coverage(recommended: Sequence[Sequence[str]], catalog_size: int) -> float:
    """Share of the catalog that appears in at least one query's recommendations."""
    if catalog_size < 1:
        return 0.0
    return len({item for row in recommended for item in row}) / catalog_size
