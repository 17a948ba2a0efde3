"""The retrieval metrics against hand-computed cases, chosen so that a wrong normalisation, a wrong
cut-off or a query counting itself gives a different number."""

from __future__ import annotations

import pytest

from vsearch_cli.evaluation.retrieval_metrics import (
    QueryScores,
    average_precision,
    hit_at,
    precision_at,
    reciprocal_rank,
    relevant_in_top,
    score_query,
    summarise,
)

T, F = True, False


def test_ap_of_rel_non_rel_with_two_relevant():
    assert average_precision([T, F, T], 2) == pytest.approx((1 + 2 / 3) / 2)


def test_ap_whole_ranking_divides_by_all_relevant_items_even_those_not_retrieved():
    # Hits at ranks 2 and 4; a third relevant item was never retrieved: (1/2 + 2/4) / 3.
    assert average_precision([F, T, F, T], 3) == pytest.approx(1 / 3)


def test_ap_at_k_divides_by_min_of_k_and_relevant_total():
    # Dividing by relevant_total (5) would give 0.4, by the hits found (2) 1.0.
    assert average_precision([T, T, F], 5, k=3) == pytest.approx(2 / 3)
    # All of the top k relevant, more relevant items beyond k: perfect.
    assert average_precision([T, T, T], 10, k=3) == pytest.approx(1.0)
    # Fewer relevant items than k: divide by relevant_total (2), not by k (4).
    assert average_precision([T, F, F, T], 2, k=4) == pytest.approx((1 + 2 / 4) / 2)


def test_ap_at_k_ignores_hits_after_k_and_does_not_pad_short_rankings():
    assert average_precision([F, F, T], 1, k=2) == 0.0
    assert average_precision([T, F, T, T], 3, k=2) == pytest.approx(1 / 2)
    # Only 2 hits came back for k=5; the missing ones are misses: 1 / min(5, 3).
    assert average_precision([T, F], 3, k=5) == pytest.approx(1 / 3)


def test_ap_refuses_impossible_inputs():
    with pytest.raises(ValueError):
        average_precision([F, F], 0)
    with pytest.raises(ValueError):
        average_precision([T, T, T], 2)  # more relevant hits than relevant items
    with pytest.raises(ValueError):
        average_precision([T], 1, k=0)


def test_precision_hit_rate_reciprocal_rank():
    assert precision_at([F, T], 1) == 0.0
    assert precision_at([T, F, T, F], 4) == 0.5
    assert precision_at([T], 2) == 0.5  # a missing hit is not relevant
    assert hit_at([F] * 9 + [T], 10) == 1.0
    assert hit_at([F] * 10 + [T], 10) == 0.0
    assert reciprocal_rank([F, F, T, T]) == pytest.approx(1 / 3)
    assert reciprocal_rank([F, F]) == 0.0
    assert reciprocal_rank([]) == 0.0
    assert relevant_in_top([T, F, T, T, T], 4) == 3


LABELS = {"q": "cat", "a": "cat", "b": "cat", "c": "cat", "x": "dog", "y": "dog"}


def test_score_query_drops_the_query_before_cutting_to_k():
    # The index answered k + 1 = 4 hits, the query first.
    scores = score_query(["q", "a", "x", "b"], "q", "cat", LABELS, relevant_total=3, k=3)
    # Scored ranking [a, x, b]: (1 + 2/3) / min(3, 3).
    assert scores.average_precision == pytest.approx((1 + 2 / 3) / 3)
    assert scores.precision_at_1 == 1.0
    assert scores.reciprocal_rank == 1.0
    assert scores.hit_at_10 == 1.0
    # N-S keeps the query: q, a, x, b -> 3 relevant.
    assert scores.ns_relevant == 3


def test_score_query_when_the_query_is_not_ranked_first():
    # A near-duplicate outranks the query itself; the query still never counts for AP/P@1/MRR.
    scores = score_query(["x", "q", "a", "y"], "q", "cat", LABELS, relevant_total=3, k=2)
    # Scored ranking [x, a]: 1/2 / min(2, 3).
    assert scores.average_precision == pytest.approx(0.25)
    assert scores.precision_at_1 == 0.0
    assert scores.reciprocal_rank == pytest.approx(0.5)
    assert scores.ns_relevant == 2


def test_score_query_for_a_query_outside_the_catalog():
    # Train/test split: the query is not in the index; unknown ids are not relevant.
    scores = score_query(["y", "a", "stranger", "b", "c"], "q", "cat", LABELS, relevant_total=3, k=4)
    assert scores.average_precision == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert scores.ns_relevant == 2


def test_ukbench_style_perfect_query_scores_four():
    labels = {"u0": "0", "u1": "0", "u2": "0", "u3": "0", "v0": "1"}
    scores = score_query(["u2", "u0", "u3", "u1", "v0"], "u2", "0", labels, relevant_total=3, k=4)
    assert scores.ns_relevant == 4
    assert scores.average_precision == 1.0


def test_summarise_means_and_names():
    summary = summarise([
        QueryScores(average_precision=1.0, precision_at_1=1.0, hit_at_10=1.0, reciprocal_rank=1.0, ns_relevant=4),
        QueryScores(average_precision=0.25, precision_at_1=0.0, hit_at_10=0.0, reciprocal_rank=0.5, ns_relevant=1),
    ])
    assert summary == pytest.approx({
        "map_at_k": 0.625, "precision_at_1": 0.5, "recall_at_10": 0.5, "mrr_at_k": 0.75, "ns_score": 2.5,
        "queries": 2,
    })
    with pytest.raises(ValueError):
        summarise([])
