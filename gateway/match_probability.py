"""Calibrated scores: each hit's match_probability (the probability that it has the query's label) from
the model's calibration (the embedder's Info, fitted by `vsearch model calibrate` or `vsearch model
adapt`), the min_probability filter and the response's no_good_match.

The probability is piecewise-linear through the calibration's knots at score - rank_scale * ln(rank)
(rank 1-based, as the hits are returned), constant beyond the first and last knot. It is computed when a
response is sent, for fresh and cached results alike, so it always follows the model being served.

no_good_match: true when there is no hit, or when the best hit's probability is below the gateway's
`no_good_match_below`; false when there are hits but no probabilities (the model has no calibration, or
the query was text: text scores are on another scale, so they get none), and when a hit is a verified
copy (copy mode)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from vsearch.v1 import embedder_pb2, gateway_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchCalibration:
    score_knots: np.ndarray
    probability_knots: np.ndarray
    rank_scale: float
    description: str

    @classmethod
    def from_info(cls, info: embedder_pb2.InfoResponse) -> MatchCalibration | None:
        """The calibration the embedder reports, or None when it has none (or one that cannot be used,
        which is logged: hits then carry no probability rather than a made-up one)."""
        if not info.HasField("calibration"):
            return None
        message = info.calibration
        scores = np.asarray(message.score_knots, dtype=np.float64)
        probabilities = np.asarray(message.probability_knots, dtype=np.float64)
        problem = None
        if len(scores) == 0 or len(scores) != len(probabilities):
            problem = f"{len(scores)} score knots and {len(probabilities)} probabilities"
        elif not (np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)):
            problem = "score knots that do not increase"
        elif not (np.all((probabilities >= 0) & (probabilities <= 1)) and np.all(np.diff(probabilities) >= 0)):
            problem = "probabilities outside [0, 1] or decreasing"
        elif not (math.isfinite(message.rank_scale) and message.rank_scale >= 0):
            problem = f"rank_scale {message.rank_scale}"
        if problem is not None:
            logger.warning("model %s reports an unusable calibration (%s): hits get no match_probability",
                           info.model_version, problem)
            return None
        return cls(scores, probabilities, float(message.rank_scale), message.description)

    def probabilities(self, scores: np.ndarray, first_rank: int = 1) -> np.ndarray:
        """Of hits with these scores, at ranks first_rank, first_rank + 1, ... in that order."""
        adjusted = np.asarray(scores, dtype=np.float64)
        if self.rank_scale:
            ranks = np.arange(first_rank, first_rank + len(adjusted), dtype=np.float64)
            adjusted = adjusted - self.rank_scale * np.log(ranks)
        return np.interp(adjusted, self.score_knots, self.probability_knots)


def annotate(
    response: gateway_pb2.VisualSearchResponse, calibration: MatchCalibration | None, *,
    min_probability: float | None, no_good_match_below: float, first_rank: int = 1,
) -> int:
    """In place, on the response about to be sent: each hit's match_probability (when `calibration` is
    given; the first hit ranks `first_rank`, as on a later page of a search), the hits below
    `min_probability` removed, and no_good_match set (see the module's docstring). A verified copy (copy
    mode's is_copy) is never removed, and makes no_good_match false: the query is a copy of it, whatever
    its probability of sharing a label. Returns how many hits were removed."""
    hits = response.hits
    given = len(hits)
    if calibration is None and min_probability is not None:
        # (The core refuses min_probability without a calibration; hits of another model's vectors, from
        # a cached result, have no probability either, so none of them is known to reach it.)
        for index in reversed(range(len(hits))):
            if not hits[index].is_copy:
                del hits[index]
    if calibration is not None and len(hits):
        scores = np.array([hit.score for hit in hits])
        for hit, probability in zip(hits, calibration.probabilities(scores, first_rank)):
            hit.match_probability = float(probability)
        if min_probability is not None:
            for index in reversed(range(len(hits))):
                if hits[index].match_probability < min_probability and not hits[index].is_copy:
                    del hits[index]
    if not len(hits):
        no_good_match = True
    elif any(hit.is_copy for hit in hits):
        no_good_match = False
    elif hits[0].HasField("match_probability"):
        no_good_match = hits[0].match_probability < no_good_match_below
    else:
        no_good_match = False
    response.no_good_match = no_good_match or bool(response.no_match_reason)
    return given - len(hits)
