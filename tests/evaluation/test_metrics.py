"""Metrics against hand-worked cases, and properties that must hold for any ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.metrics import coverage, query_metrics, ranked_metrics


def test_hand_worked_case():
    # relevant: b (1) at rank 2, d (2) at rank 4
    m = query_metrics(["a", "b", "c", "d", "e"], {"b": 1.0, "d": 2.0}, k=5)
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg"] == pytest.approx(dcg / idcg, abs=1e-12)  # 0.567209...
    assert m["recall"] == 1.0 and m["mrr"] == 0.5 and m["hit_rate"] == 1.0


def test_cut_at_k_and_ideal_from_the_query_itself():
    # three relevant items, k=2: ideal DCG uses the two best relevances
    m = query_metrics(["x", "c", "a"], {"a": 3.0, "b": 2.0, "c": 1.0}, k=2)
    assert m["ndcg"] == pytest.approx((1 / math.log2(3)) / (3 + 2 / math.log2(3)), abs=1e-12)
    assert m["recall"] == 0.5 and m["mrr"] == 0.5


def test_perfect_and_empty_rankings():
    assert query_metrics(["a", "b"], {"a": 2.0, "b": 1.0}, k=5)["ndcg"] == 1.0
    m = query_metrics(["x", "y"], {"a": 1.0}, k=5)
    assert m == {"ndcg": 0.0, "recall": 0.0, "mrr": 0.0, "hit_rate": 0.0}


def test_nothing_relevant_is_an_error():
    with pytest.raises(ValueError, match="no relevant"):
        query_metrics(["a"], {"a": 0.0}, k=5)
    with pytest.raises(ValueError, match="k must be"):
        query_metrics(["a"], {"a": 1.0}, k=0)


def test_coverage():
    assert coverage(np.array([[0, 1], [1, 2]]), catalog_size=10) == 0.3
    assert coverage(np.array([[0, -1], [-1, -1]]), catalog_size=10) == 0.1  # -1: nothing found there
    assert coverage(np.empty((0, 5)), catalog_size=0) == 0.0


items = st.sampled_from([f"i{n}" for n in range(12)])
relevances = st.dictionaries(items, st.floats(min_value=0.1, max_value=5.0), min_size=1, max_size=8)
rankings = st.lists(items, unique=True, max_size=12)


@given(rankings, relevances, st.integers(min_value=1, max_value=10))
def test_every_metric_is_between_0_and_1(ranking, relevance, k):
    for name, value in query_metrics(ranking, relevance, k).items():
        assert 0.0 <= value <= 1.0 + 1e-12, (name, value)


@given(rankings, relevances, st.integers(min_value=1, max_value=10), st.randoms())
def test_order_of_the_relevance_mapping_and_of_items_past_k_does_not_matter(ranking, relevance, k, random):
    shuffled_relevance = dict(random.sample(list(relevance.items()), len(relevance)))
    tail = ranking[k:]
    random.shuffle(tail)
    assert query_metrics(ranking[:k] + tail, shuffled_relevance, k) == query_metrics(ranking, relevance, k)


@given(relevances, st.integers(min_value=1, max_value=10))
def test_ranking_by_relevance_is_ideal(relevance, k):
    ideal = sorted(relevance, key=lambda item: -relevance[item])
    assert query_metrics(ideal, relevance, k)["ndcg"] == pytest.approx(1.0)


@given(rankings, relevances, st.integers(min_value=1, max_value=10))
def test_moving_a_relevant_item_up_never_lowers_ndcg(ranking, relevance, k):
    for i in range(1, len(ranking)):
        if ranking[i] in relevance and ranking[i - 1] not in relevance:
            better = ranking[: i - 1] + [ranking[i], ranking[i - 1]] + ranking[i + 1 :]
            assert query_metrics(better, relevance, k)["ndcg"] >= query_metrics(ranking, relevance, k)["ndcg"] - 1e-12


def _as_rows(queries: list[tuple[list[str], dict[str, float]]], k: int) -> dict[str, np.ndarray]:
    """`ranked_metrics` of (ranking, relevance) queries given as ids, the ids numbered, the rankings padded with -1,
    and the pairs shuffled (the order they come in must not matter)."""
    number = {f"i{n}": n for n in range(12)}
    width = max([len(ranking) for ranking, _ in queries] + [1])
    retrieved = np.full((len(queries), width), -1)
    for q, (ranking, _) in enumerate(queries):
        retrieved[q, : len(ranking)] = [number[item] for item in ranking]
    pairs = [(q, number[item], weight) for q, (_, rel) in enumerate(queries) for item, weight in rel.items()]
    pairs = [pairs[i] for i in np.random.default_rng(len(pairs)).permutation(len(pairs))]
    query, relevant, weight = (np.array(column) for column in zip(*pairs, strict=True))
    return ranked_metrics(retrieved, query, relevant, weight.astype(float), k)


@given(st.lists(st.tuples(rankings, relevances), min_size=1, max_size=6), st.integers(min_value=1, max_value=10))
def test_many_queries_at_once_measure_as_each_alone(queries, k):
    at_once = _as_rows(queries, k)
    for q, (ranking, relevance) in enumerate(queries):
        alone = query_metrics(ranking, relevance, k)
        for metric, value in alone.items():
            assert at_once[metric][q] == pytest.approx(value, abs=1e-12), (q, metric)


def test_many_queries_at_once_hand_worked_and_refused():
    m = _as_rows([(["i0", "i1", "i2", "i3", "i4"], {"i1": 1.0, "i3": 2.0}), (["i5"], {"i6": 1.0})], k=5)
    dcg, idcg = 1 / math.log2(3) + 2 / math.log2(5), 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg"].tolist() == pytest.approx([dcg / idcg, 0.0], abs=1e-12)
    assert m["recall"].tolist() == [1.0, 0.0] and m["mrr"].tolist() == [0.5, 0.0]
    assert m["hit_rate"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="query 1 has no relevant items"):
        ranked_metrics(np.array([[0], [1]]), np.array([0, 1]), np.array([1, 0]), np.array([1.0, 0.0]), k=5)
    with pytest.raises(ValueError, match="k must be"):
        ranked_metrics(np.array([[0]]), np.array([0]), np.array([1]), np.array([1.0]), k=0)
