"""Metrics against hand-worked cases, and properties that must hold for any ranking."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.metrics import coverage, query_metrics


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
    assert coverage([["a", "b"], ["b", "c"]], catalog_size=10) == 0.3
    assert coverage([], catalog_size=0) == 0.0


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
