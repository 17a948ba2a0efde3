"""An image with the same bytes as the query is a copy of it, whatever its local features say.

Verification needs local features, and a plain, tiny or strip-shaped image has none (a colour swatch, an
icon, a banner a few pixels high): without this, a copy search for such an image did not call the very
same image in the catalog a copy, while `vsearch duplicates` listed the two as exact duplicates. Items
carry the sha256 of the bytes they were indexed from (content_sha256), which a copy search's candidates
bring with their copy features; a query's is the hash of its image, when the whole image is the query
(a crop of it is another picture), or the stored hash of an item_id query."""

from __future__ import annotations

from typing import Sequence

from service_kit.copy_feature_codec import CopyFeaturesInvalid, decode_copy_features
from vsearch.v1 import embedder_pb2

# The most a verdict scores: a copy of every one of its pixels.
IDENTICAL_COPY_SCORE = 1.0


def with_identical_copies(
    candidate_hashes: Sequence[str], verdicts: Sequence[embedder_pb2.CopyVerdict], query_sha256: str,
    query_features: bytes,
) -> list[embedder_pb2.CopyVerdict]:
    """`verdicts` (one per candidate, whose content_sha256 is `candidate_hashes[i]`), with each candidate
    stored from the query's own bytes a copy scored IDENTICAL_COPY_SCORE, the query lying over the whole of
    it. Unchanged without a query hash, and for candidates stored without one."""
    if len(candidate_hashes) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(candidate_hashes)} candidates")
    # Most searches have no identical candidate: the query's features are read only for one that does.
    if not query_sha256 or query_sha256 not in candidate_hashes:
        return list(verdicts)
    box = _whole_image(query_features)
    return [
        # A copy of the whole image; the agreeing features, if any, kept.
        embedder_pb2.CopyVerdict(is_copy=True, copy_score=IDENTICAL_COPY_SCORE, matched_box=box,
                                 inliers=verdict.inliers)
        if candidate_hash == query_sha256 else verdict
        for candidate_hash, verdict in zip(candidate_hashes, verdicts)
    ]


def _whole_image(query_features: bytes) -> embedder_pb2.CropBox | None:
    """The whole picture, in its pixels (as displayed), from the query's copy features; None when they
    cannot say (no features, or features this gateway cannot read)."""
    try:
        width, height = decode_copy_features(query_features).original_size
    except CopyFeaturesInvalid:
        return None
    return embedder_pb2.CropBox(x=0, y=0, width=width, height=height) if width and height else None
