"""Retrieval metrics over one ranked result list per query, as pure functions.

A ranking is a sequence of booleans, best hit first: True where the hit is relevant (same label as the
query). Every function looks at the ranking exactly as given; removing the query's own hit and cutting
the list to k are the caller's business (see `score_query`, which does both the way `vsearch eval` needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

# UKBench's N-S score counts the same-object images among the first 4 hits (4 views per object).
NS_DEPTH = 4


def average_precision(relevance: Sequence[bool], relevant_total: int, k: int | None = None) -> float:
    """AP@k: the precision at each relevant hit among the first k, summed, divided by
    min(k, relevant_total), so a top k that is all relevant scores 1.0 even when more than k relevant
    items exist. `relevant_total` counts every relevant item the ranking could have held (the
    catalog's, excluding the query itself). k=None scores the whole ranking (plain AP, divided by
    relevant_total); a ranking shorter than k is not padded, its missing hits just count as misses."""
    if relevant_total <= 0:
        raise ValueError("average precision is undefined without relevant items")
    if k is not None and k <= 0:
        raise ValueError("k must be positive")
    flags = np.asarray(relevance[:k] if k is not None else relevance, dtype=bool)
    found = int(flags.sum())
    if found > relevant_total:
        raise ValueError(f"the ranking holds {found} relevant hits but only {relevant_total} exist")
    if found == 0:
        return 0.0
    ranks = np.flatnonzero(flags) + 1  # 1-based ranks of the relevant hits
    precision_at_hits = np.arange(1, found + 1) / ranks
    return float(precision_at_hits.sum() / min(k if k is not None else relevant_total, relevant_total))


def precision_at(relevance: Sequence[bool], n: int) -> float:
    """Share of the first n positions that hold a relevant hit (a missing hit counts as not relevant)."""
    if n <= 0:
        raise ValueError("n must be positive")
    return sum(bool(flag) for flag in relevance[:n]) / n


def hit_at(relevance: Sequence[bool], n: int) -> float:
    """1.0 when at least one of the first n hits is relevant, else 0.0 (averaged: the share of queries
    answered with something relevant in the top n, reported as `recall_at_10`)."""
    return 1.0 if any(relevance[:n]) else 0.0


def reciprocal_rank(relevance: Sequence[bool]) -> float:
    """1 / the rank of the first relevant hit; 0.0 when there is none."""
    for rank, flag in enumerate(relevance, 1):
        if flag:
            return 1.0 / rank
    return 0.0


def relevant_in_top(relevance: Sequence[bool], n: int) -> int:
    return sum(bool(flag) for flag in relevance[:n])


@dataclass(frozen=True)
class QueryScores:
    average_precision: float
    precision_at_1: float
    hit_at_10: float
    reciprocal_rank: float
    # Relevant hits among the first NS_DEPTH of the ranking that still holds the query itself.
    ns_relevant: int


def score_query(
    ranked_ids: Sequence[str],
    query_id: str,
    query_label: str,
    label_of: Mapping[str, str],
    relevant_total: int,
    k: int,
) -> QueryScores:
    """Scores one query's ranked hit ids.

    `ranked_ids` is what the index answered (at least k + 1 hits when the query is in the catalog).
    The query's own hit is removed before the ranking is cut to k and scored, so a query never counts
    itself; N-S is the exception, counted UKBench-style on the first NS_DEPTH hits with the query kept
    (it is relevant to itself). `relevant_total` excludes the query. Ids missing from `label_of` are
    not relevant.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    with_self = [label_of.get(hit_id) == query_label for hit_id in ranked_ids]
    relevance = [label_of.get(hit_id) == query_label for hit_id in ranked_ids if hit_id != query_id][:k]
    return QueryScores(
        average_precision=average_precision(relevance, relevant_total, k),
        precision_at_1=precision_at(relevance, 1),
        hit_at_10=hit_at(relevance, 10),
        reciprocal_rank=reciprocal_rank(relevance),
        ns_relevant=relevant_in_top(with_self, NS_DEPTH),
    )


def summarise(scores: Iterable[QueryScores]) -> dict[str, float | int]:
    """Means over the queries, under the names `vsearch eval` reports."""
    scores = list(scores)
    if not scores:
        raise ValueError("no queries to summarise")

    def mean(values: Iterable[float]) -> float:
        return float(np.mean(list(values)))

    return {
        "map_at_k": mean(s.average_precision for s in scores),
        "precision_at_1": mean(s.precision_at_1 for s in scores),
        "recall_at_10": mean(s.hit_at_10 for s in scores),
        "mrr_at_k": mean(s.reciprocal_rank for s in scores),
        "ns_score": mean(s.ns_relevant for s in scores),
        "queries": len(scores),
    }


# Equal-width probability bins of the expected calibration error.
CALIBRATION_BINS = 10


def expected_calibration_error(
    probabilities: Sequence[float], relevance: Sequence[bool], bins: int = CALIBRATION_BINS
) -> float:
    """ECE: the hits split into `bins` equal-width bins of their probability ([0, 0.1), ..., [0.9, 1.0]);
    per bin, |mean probability - share relevant|, weighted by the bin's share of the hits."""
    predicted = np.asarray(probabilities, dtype=np.float64)
    actual = np.asarray(relevance, dtype=np.float64)
    if predicted.shape != actual.shape:
        raise ValueError(f"{predicted.size} probabilities for {actual.size} relevance flags")
    if predicted.size == 0:
        raise ValueError("no hits to measure the calibration error on")
    if bins < 1:
        raise ValueError("bins must be positive")
    which = np.clip((predicted * bins).astype(np.int64), 0, bins - 1)
    gaps = np.abs(np.bincount(which, predicted, bins) - np.bincount(which, actual, bins))
    return float(gaps.sum() / predicted.size)
