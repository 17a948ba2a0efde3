"""Copy mode's answer (SEARCH_MODE_COPY in gateway.proto): a shortlist of similar-mode hits and the
embedder's verdict on each, ranked as the contract promises: verified copies first, by copy_score
(ties by score), then the other hits by score; k of them, each with is_copy and copy_score, the copies
with where the query lies in them (matched_box).

min_score applies to the hits that are not copies only: a copy cropped to a corner, greyed or mirrored
may have a low cosine and is still the answer a copy search is for."""

from __future__ import annotations

from typing import Sequence

from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2


def rank_copies(
    candidates: Sequence[search_pb2.Hit], verdicts: Sequence[embedder_pb2.CopyVerdict], k: int,
    min_score: float | None,
) -> list[gateway_pb2.SearchHit]:
    """`verdicts[i]` is the verdict on `candidates[i]` (search_svc's hits, best score first)."""
    if len(candidates) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(candidates)} candidates")
    pairs = list(zip(candidates, verdicts))
    copies = sorted(
        (pair for pair in pairs if pair[1].is_copy), key=lambda pair: (-pair[1].copy_score, -pair[0].score)
    )
    others = sorted(
        (pair for pair in pairs if not pair[1].is_copy and (min_score is None or pair[0].score >= min_score)),
        key=lambda pair: -pair[0].score,
    )
    return [copy_hit(candidate, verdict) for candidate, verdict in (copies + others)[:k]]


def copy_hit(candidate: search_pb2.Hit, verdict: embedder_pb2.CopyVerdict) -> gateway_pb2.SearchHit:
    hit = gateway_pb2.SearchHit(
        id=candidate.id, score=candidate.score, image_uri=candidate.image_uri, metadata=candidate.metadata,
        is_copy=verdict.is_copy, copy_score=verdict.copy_score,
    )
    if verdict.is_copy and verdict.HasField("matched_box"):
        hit.matched_box.CopyFrom(verdict.matched_box)
    if candidate.HasField("region"):
        region = candidate.region
        hit.matched_region.CopyFrom(
            embedder_pb2.CropBox(x=region.x, y=region.y, width=region.width, height=region.height)
        )
    return hit
