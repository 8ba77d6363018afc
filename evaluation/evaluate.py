"""Evaluate rankers (snapshots, or a built-in baseline) on the same queries, and compare them.

A query counts only when its item and at least one clicked item are in every ranker
being compared; relevance is then restricted to items every ranker holds, so both are
judged on exactly the same queries and the same relevant sets. Everything left out is
counted by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from evaluation.logs import Judgments
from evaluation.metrics import METRICS, coverage, query_metrics

__all__ = ["Comparison", "EvalResult", "Ranker", "SnapshotRanker", "VectorRanker", "evaluate", "left_out"]


def left_out(counts: dict[str, int]) -> str:
    """What an evaluation's counts say was dropped on the way (`before since 12, query not in snapshot 3`), or ""."""
    return ", ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in counts.items()
                     if value and name not in ("rows", "queries", "pairs", "evaluated_queries"))  # fmt: skip


class Ranker(Protocol):
    name: str

    def holds(self, item_ids: Sequence[str]) -> Sequence[bool]:
        """Whether each item is in the ranker's catalog, for many items at once."""
        ...

    @property
    def catalog_size(self) -> int: ...

    def rank(self, item_ids: Sequence[str], k: int) -> list[list[str]]:
        """Top-k neighbour ids of each item, the item itself excluded."""
        ...


class SnapshotRanker:
    """A published (or pinned) snapshot through `SnapshotClient`."""

    def __init__(self, client, name: str | None = None, batch: int = 4096) -> None:
        self.client, self.name, self._batch = client, name or client.snapshot_id, batch

    def holds(self, item_ids: Sequence[str]) -> Sequence[bool]:
        return self.client.holds(item_ids)

    @property
    def catalog_size(self) -> int:
        return len(self.client)

    def rank(self, item_ids: Sequence[str], k: int) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(item_ids), self._batch):
            found = self.client.search(item_ids=list(item_ids[start : start + self._batch]), k=k)
            out.extend([n.item_id for n in row] for row in found)
        return out


class VectorRanker:
    """Exact inner-product neighbours over vectors held in memory (baselines, validation while training)."""

    def __init__(self, name: str, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        import faiss

        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids but {len(vectors)} vectors")
        self.name, self.item_ids = name, list(item_ids)
        self._rows = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self._vectors.shape[1])
        self._index.add(self._vectors)

    def holds(self, item_ids: Sequence[str]) -> Sequence[bool]:
        return [item_id in self._rows for item_id in item_ids]

    @property
    def catalog_size(self) -> int:
        return len(self.item_ids)

    def rank(self, item_ids: Sequence[str], k: int) -> list[list[str]]:
        rows = [self._rows[i] for i in item_ids]
        _, found = self._index.search(self._vectors[rows], min(k + 1, len(self.item_ids)))
        return [
            [self.item_ids[r] for r in row if r >= 0 and r != own][:k] for row, own in zip(found, rows, strict=True)
        ]


@dataclass
class Comparison:
    """Candidate vs baseline for one metric: means, change, and paired bootstrap 95% intervals."""

    metric: str
    candidate: float
    baseline: float
    delta: float
    relative: float | None
    delta_ci: tuple[float, float]
    relative_ci: tuple[float, float] | None


@dataclass
class EvalResult:
    k: int
    queries: list[str]
    per_query: dict[str, dict[str, np.ndarray]]  # ranker name → metric → (n_queries,)
    rankings: dict[str, list[list[str]]]  # ranker name → top-k per query
    relevance: list[dict[str, float]]  # per evaluated query, restricted to items every ranker holds
    counts: dict[str, int]
    coverage: dict[str, float]
    comparisons: list[Comparison] = field(default_factory=list)

    def mean(self, ranker: str, metric: str) -> float:
        return float(self.per_query[ranker][metric].mean())


def _bootstrap(candidate: np.ndarray, baseline: np.ndarray, samples: int, seed: int):
    """Paired bootstrap over queries: 95% intervals of the difference and of the relative change."""
    rng = np.random.default_rng(seed)
    n = len(candidate)
    deltas, relatives = np.empty(samples), np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, size=n)
        c, s = candidate[idx].mean(), baseline[idx].mean()
        deltas[b] = c - s
        relatives[b] = (c - s) / s if s > 0 else np.nan
    delta_ci = (float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5)))
    finite = relatives[np.isfinite(relatives)]
    relative_ci = (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if len(finite) else None
    return delta_ci, relative_ci


def evaluate(judgments: Judgments, rankers: Sequence[Ranker], k: int = 5, bootstrap: int = 1000,
             seed: int = 0) -> EvalResult:  # fmt: skip
    """Metrics of every ranker on the same queries; with two rankers, the first is compared to the second.

    Raises:
        ValueError: no query can be measured (the counts say why).
    """
    counts = dict(judgments.counts)
    counts.update(query_not_in_snapshot=0, clicks_not_in_snapshot=0, no_relevant_in_snapshot=0)
    named = list({item: None for query, clicked in judgments.relevance.items() for item in (query, *clicked)})
    held = set(named)  # the items every ranker holds, asked of each ranker at once (one by one: ~3 µs an item)
    for ranker in rankers:
        held.intersection_update(item for item, holds in zip(named, ranker.holds(named), strict=True) if holds)
    queries, relevance = [], []
    for query in sorted(judgments.relevance):
        if query not in held:
            counts["query_not_in_snapshot"] += 1
            continue
        clicked = judgments.relevance[query]
        kept = {item: rel for item, rel in clicked.items() if item in held}
        counts["clicks_not_in_snapshot"] += len(clicked) - len(kept)
        if not kept:
            counts["no_relevant_in_snapshot"] += 1
            continue
        queries.append(query)
        relevance.append(kept)
    counts["evaluated_queries"] = len(queries)
    if not queries:
        raise ValueError(f"no query can be measured: {counts}")

    per_query, rankings, cover = {}, {}, {}
    for ranker in rankers:
        ranked = ranker.rank(queries, k)
        rankings[ranker.name] = ranked
        rows = [query_metrics(r, rel, k) for r, rel in zip(ranked, relevance, strict=True)]
        per_query[ranker.name] = {m: np.array([row[m] for row in rows]) for m in METRICS}
        cover[ranker.name] = coverage(ranked, ranker.catalog_size)
    result = EvalResult(k, queries, per_query, rankings, relevance, counts, cover)
    if len(rankers) == 2:
        cand, base = rankers[0].name, rankers[1].name
        for metric in METRICS:
            c, s = per_query[cand][metric], per_query[base][metric]
            delta_ci, relative_ci = _bootstrap(c, s, bootstrap, seed)
            mean_c, mean_s = float(c.mean()), float(s.mean())
            result.comparisons.append(Comparison(
                metric=f"{metric}@{k}", candidate=mean_c, baseline=mean_s, delta=mean_c - mean_s,
                relative=(mean_c - mean_s) / mean_s if mean_s > 0 else None,
                delta_ci=delta_ci, relative_ci=relative_ci,
            ))  # fmt: skip
    return result
