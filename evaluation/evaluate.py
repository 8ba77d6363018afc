"""Evaluate rankers (snapshots, or a built-in baseline) on the same queries, and compare them.

A query counts only when its item and at least one clicked item are in every ranker
being compared; relevance is then restricted to items every ranker holds, so both are
judged on exactly the same queries and the same relevant sets. Everything left out is
counted by reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder.throttled import progress
from evaluation.logs import PAIR_COLUMNS, Judgments
from evaluation.metrics import METRICS, coverage, ranked_metrics
from evaluation.rankings import Rankings
from indexing.client import without_own
from indexing.item_ids import ItemIds

__all__ = ["Comparison", "EvalResult", "Ranker", "SnapshotRanker", "VectorRanker", "evaluate", "left_out"]

log = logging.getLogger(__name__)

RANK_SLICE = 65_536  # queries asked of a ranker at once: a progress line's worth (~8 s on 2 cores at 1M items)


def left_out(counts: dict[str, int]) -> str:
    """What an evaluation's counts say was dropped on the way (`before since 12, query not in snapshot 3`), or ""."""
    return ", ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in counts.items()
                     if value and name not in ("rows", "queries", "pairs", "evaluated_queries"))  # fmt: skip


class Ranker(Protocol):
    """What evaluation asks of a ranker, in its own rows (integers naming its items), many items at a time."""

    name: str

    @property
    def catalog_size(self) -> int: ...

    def rows(self, item_ids: pa.Array) -> np.ndarray:
        """Each item's row (int64), -1 where the ranker's catalog does not hold it."""
        ...

    def neighbours(self, rows: np.ndarray, k: int) -> np.ndarray:
        """(len(rows), ≤ k) int64: each item's top-k neighbours' rows, the item itself excluded; -1 where none."""
        ...

    def ids(self, rows: np.ndarray) -> list[str]:
        """The item ids at these rows."""
        ...


class SnapshotRanker:
    """A published (or pinned) snapshot through `SnapshotClient`: the snapshot it serves when the ranker is made.
    `remembered`: its top k of some queries, kept by an earlier evaluation (`evaluation.rankings`), not searched
    again; `reused` counts them."""

    def __init__(self, client, name: str | None = None, batch: int = 4096, remembered: Rankings | None = None) -> None:
        self.snapshot = client.loaded  # rows mean the same throughout, whatever a refresh does meanwhile
        self.name, self._batch, self.remembered, self.reused = name or self.snapshot.snapshot_id, batch, remembered, 0

    @property
    def catalog_size(self) -> int:
        return len(self.snapshot.item_ids)

    def rows(self, item_ids: pa.Array) -> np.ndarray:
        return self.snapshot.item_ids.rows(item_ids)

    def neighbours(self, rows: np.ndarray, k: int) -> np.ndarray:
        if self.remembered is None or self.remembered.k != k:
            return self._search(rows, k)
        held, kept = self.remembered.lookup(rows)
        out = np.empty((len(rows), min(k, self.catalog_size)), np.int64)
        out[held], out[~held] = kept, self._search(rows[~held], k)
        self.reused += int(held.sum())
        return out

    def _search(self, rows: np.ndarray, k: int) -> np.ndarray:
        parts = [np.empty((0, min(k, self.catalog_size)), np.int64)]
        for start in range(0, len(rows), self._batch):
            asked = rows[start : start + self._batch]
            order = np.argsort(asked)  # the memory-mapped vectors read in file order
            queries = np.empty((len(asked), self.snapshot.vectors.shape[1]), np.float32)
            queries[order] = self.snapshot.vectors[asked[order]]
            parts.append(self.snapshot.neighbour_rows(queries, k, asked)[1])
        return np.concatenate(parts)

    def ids(self, rows: np.ndarray) -> list[str]:
        return self.snapshot.item_ids.ids(rows)


class VectorRanker:
    """Exact inner-product neighbours over vectors held in memory (baselines, validation while training)."""

    def __init__(self, name: str, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        import faiss

        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids but {len(vectors)} vectors")
        self.name, self.item_ids = name, list(item_ids)
        self._ids = ItemIds(self.item_ids)
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self._vectors.shape[1])
        self._index.add(self._vectors)

    @property
    def catalog_size(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: pa.Array) -> np.ndarray:
        return self._ids.rows(item_ids)

    def neighbours(self, rows: np.ndarray, k: int) -> np.ndarray:
        scores, found = self._index.search(self._vectors[rows], min(k + 1, len(self.item_ids)))
        return without_own(scores, found, rows, k)[1]

    def ids(self, rows: np.ndarray) -> list[str]:
        return self._ids.ids(rows)


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
    queries: list[str]  # the evaluated query items, in order of their ids
    per_query: dict[str, dict[str, np.ndarray]]  # ranker name → metric → (n_queries,)
    counts: dict[str, int]
    coverage: dict[str, float]
    comparisons: list[Comparison] = field(default_factory=list)
    _rankings: dict[str, tuple[Ranker, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # name →
    # (the ranker, each query's row in it, the rows it ranked for each)
    _relevant: tuple[np.ndarray, pa.Array, np.ndarray] | None = field(default=None, repr=False)  # offsets, ids, weights

    def mean(self, ranker: str, metric: str) -> float:
        return float(self.per_query[ranker][metric].mean())

    def ranking(self, ranker: str, query: int) -> list[str]:
        """The top-k item ids the ranker gave the query at this index of `queries`."""
        held, _, rows = self._rankings[ranker]
        return held.ids(rows[query][rows[query] >= 0])

    def query_rows_and_rankings(self, ranker: str) -> tuple[np.ndarray, np.ndarray]:
        """Each query's row in the ranker, and the rows it ranked for each (-1 where fewer)."""
        return self._rankings[ranker][1:]

    def relevant(self, query: int) -> dict[str, float]:
        """The query's relevant items (restricted to those every ranker holds) and their relevance."""
        offsets, item_ids, weights = self._relevant
        start, end = int(offsets[query]), int(offsets[query + 1])
        return dict(zip(item_ids[start:end].to_pylist(), weights[start:end].tolist(), strict=True))


def _bootstrap(candidate: dict[str, np.ndarray], baseline: dict[str, np.ndarray], samples: int, seed: int
               ) -> dict[str, tuple[tuple[float, float], tuple[float, float] | None]]:  # fmt: skip
    """Paired bootstrap over queries: each metric's 95% intervals of the difference and of the relative change.

    Every metric is measured on the same resamples. A resample is its queries' counts (each query drawn
    uniformly, n times), applied to the per-query differences and baselines at once as one product: a gather of
    every metric per resample cost ~85 ms for a million queries, where the counts and their product cost ~8."""
    metrics = list(candidate)
    n = len(candidate[metrics[0]])
    values = np.stack([candidate[m] - baseline[m] for m in metrics] + [baseline[m] for m in metrics], axis=1)
    rng = np.random.default_rng(seed)
    means = np.empty((samples, values.shape[1]))
    step = max(1, 4_000_000 // max(n, 1))  # resamples a pass: ~100 MB of draws and counts
    for first in range(0, samples, step):
        batch = min(step, samples - first)
        drawn = rng.integers(0, n, size=(batch, n)) + np.arange(batch)[:, None] * n
        counts = np.bincount(drawn.ravel(), minlength=batch * n).reshape(batch, n).astype(np.float64)
        means[first : first + batch] = counts @ values / n
    out = {}
    for j, metric in enumerate(metrics):
        deltas, bases = means[:, j], means[:, len(metrics) + j]
        with np.errstate(divide="ignore", invalid="ignore"):
            relatives = np.where(bases > 0, deltas / bases, np.nan)
        finite = relatives[np.isfinite(relatives)]
        out[metric] = (
            (float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))),
            (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if len(finite) else None,
        )
    return out


@dataclass
class _Queries:
    """The queries every ranker can be judged on, and their relevant pairs (items every ranker holds)."""

    ids: pa.Array  # the evaluated query items, in order of their ids
    item_of_query: np.ndarray  # each query's index into `items`
    query: np.ndarray  # per relevant pair: its query's index into `ids`, ascending
    item_of_pair: np.ndarray  # per relevant pair: the clicked item's index into `items`
    weight: np.ndarray  # per relevant pair


def _judged(judgments: Judgments, items: pa.Array, held: np.ndarray, counts: dict[str, int]) -> _Queries:
    """The queries held by every ranker with at least one relevant item they all hold, in order of their ids;
    everything else counted by reason."""
    query_id, clicked_id, weight = (judgments.pairs.column(c) for c in PAIR_COLUMNS)
    queries = pc.unique(query_id)
    queries = queries.take(pc.sort_indices(queries))

    def index_in(values, value_set) -> np.ndarray:
        return pc.index_in(values, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.int64)

    query_of_pair, item_of_pair = index_in(query_id, queries), index_in(clicked_id, items)
    item_of_query = index_in(queries, items)
    query_held = held[item_of_query]
    weight = weight.to_numpy().astype(np.float64)
    asked = query_held[query_of_pair] & (weight > 0)  # pairs of queries every ranker holds
    kept = asked & held[item_of_pair]
    relevant_per_query = np.bincount(query_of_pair[kept], minlength=len(queries))
    evaluated = query_held & (relevant_per_query > 0)
    counts["query_not_in_snapshot"] = int((~query_held).sum())
    counts["clicks_not_in_snapshot"] = int((asked & ~kept).sum())
    counts["no_relevant_in_snapshot"] = int((query_held & (relevant_per_query == 0)).sum())
    counts["evaluated_queries"] = int(evaluated.sum())
    renumbered = np.cumsum(evaluated) - 1  # a kept query's index among the evaluated ones
    order = np.argsort(query_of_pair[kept], kind="stable")
    return _Queries(ids=queries.filter(pa.array(evaluated)), item_of_query=item_of_query[evaluated],
                    query=renumbered[query_of_pair[kept][order]], item_of_pair=item_of_pair[kept][order],
                    weight=weight[kept][order])  # fmt: skip


def _ranked(ranker: Ranker, rows: np.ndarray, k: int, ranked_some: Callable[[int], None]) -> np.ndarray:
    """The ranker's neighbours of these rows, asked for a slice at a time so that progress shows."""
    parts = []
    for start in range(0, len(rows), RANK_SLICE):
        parts.append(ranker.neighbours(rows[start : start + RANK_SLICE], k))
        ranked_some(len(parts[-1]))
    return np.concatenate(parts) if parts else ranker.neighbours(rows, k)


def evaluate(judgments: Judgments, rankers: Sequence[Ranker], k: int = 5, bootstrap: int = 1000,
             seed: int = 0) -> EvalResult:  # fmt: skip
    """Metrics of every ranker on the same queries; with two rankers, the first is compared to the second.

    Raises:
        ValueError: no query can be measured (the counts say why).
    """
    counts = dict(judgments.counts)
    items = judgments.items()
    rows = {ranker.name: np.asarray(ranker.rows(items), dtype=np.int64) for ranker in rankers}
    held = np.logical_and.reduce([r >= 0 for r in rows.values()]) if rankers else np.zeros(len(items), bool)
    judged = _judged(judgments, items, held, counts)
    if not len(judged.ids):
        raise ValueError(f"no query can be measured: {counts}")

    per_query, rankings, cover = {}, {}, {}
    with progress(log, "ranking queries", len(judged.ids) * len(rankers), unit="query") as ranked_some:
        for ranker in rankers:
            query_rows = rows[ranker.name][judged.item_of_query]
            rankings[ranker.name] = (ranker, query_rows, _ranked(ranker, query_rows, k, ranked_some))
    for ranker in rankers:
        item_rows, ranked = rows[ranker.name], rankings[ranker.name][2]
        per_query[ranker.name] = ranked_metrics(ranked, judged.query, item_rows[judged.item_of_pair], judged.weight, k)
        cover[ranker.name] = coverage(ranked, ranker.catalog_size)
    offsets = np.searchsorted(judged.query, np.arange(len(judged.ids) + 1))
    result = EvalResult(k, judged.ids.to_pylist(), per_query, counts, cover, _rankings=rankings,
                        _relevant=(offsets, items.take(pa.array(judged.item_of_pair)), judged.weight))  # fmt: skip
    if len(rankers) == 2:
        cand, base = per_query[rankers[0].name], per_query[rankers[1].name]
        intervals = _bootstrap(cand, base, bootstrap, seed)
        for metric in METRICS:
            mean_c, mean_s = float(cand[metric].mean()), float(base[metric].mean())
            delta_ci, relative_ci = intervals[metric]
            result.comparisons.append(Comparison(
                metric=f"{metric}@{k}", candidate=mean_c, baseline=mean_s, delta=mean_c - mean_s,
                relative=(mean_c - mean_s) / mean_s if mean_s > 0 else None,
                delta_ci=delta_ci, relative_ci=relative_ci,
            ))  # fmt: skip
    return result
