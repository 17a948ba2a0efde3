"""`vsearch eval --copies N`: how well the running system finds the original of a transformed copy.

N catalog images (a seeded sample) each get one copy per transform (`copy_transforms.TRANSFORMS`); the
catalog is indexed into a fresh collection as `vsearch eval` does, every copy is searched through the
gateway, and each transform reports recall@1 and recall@10: the share of its copies whose original is
the first hit, or among the first ten. This measures the similarity search that copy detection starts
from (the shortlist); copy verification and `is_copy` are issue 13's next step."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vsearch_cli.evaluation.copy_transforms import TRANSFORMS, transformed_copy
from vsearch_cli.evaluation.eval_command import (
    MAX_REPORTED_FAILURES, EvalError, LabelledImage, QueryOutcome, evaluation_collection, new_collection_name,
    search_queries,
)
from vsearch_cli.gateway_connection import gateway_channel
from vsearch.v1 import gateway_pb2_grpc

COPY_ID_SEPARATOR = "#copy-"


def make_copies(originals: Sequence[LabelledImage], out_dir: Path, seed: int) -> list[LabelledImage]:
    """One JPEG per original and transform in `out_dir`, as queries whose label is the original's id
    and whose split is the transform's name. An original that does not decode gets no copies."""
    rng = random.Random(seed)
    copies = []
    for number, original in enumerate(originals):
        try:
            with Image.open(original.path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError):
            continue
        for transform in TRANSFORMS:
            path = out_dir / f"{number}-{transform}.jpg"
            path.write_bytes(transformed_copy(image, transform, rng))
            copies.append(LabelledImage(f"{original.id}{COPY_ID_SEPARATOR}{transform}", path, original.id, transform))
    return copies


def score_copies(outcomes: Sequence[QueryOutcome]) -> dict:
    """Per transform and over all: queries, recall@1, recall@10 (relevant = the copy's original)."""
    by_transform: dict[str, list[int | None]] = {name: [] for name in TRANSFORMS}
    for outcome in outcomes:
        ranked = outcome.ranked_ids
        by_transform[outcome.query.split].append(ranked.index(outcome.query.label)
                                                 if outcome.query.label in ranked else None)

    def recalls(ranks: list[int | None]) -> dict:
        found = [rank for rank in ranks if rank is not None]
        return {"queries": len(ranks),
                "recall_at_1": round(sum(rank == 0 for rank in found) / len(ranks), 4) if ranks else None,
                "recall_at_10": round(sum(rank < 10 for rank in found) / len(ranks), 4) if ranks else None}

    every = [rank for ranks in by_transform.values() for rank in ranks]
    return {"per_transform": {name: recalls(ranks) for name, ranks in by_transform.items()}, **recalls(every)}


async def evaluate_copies(
    catalog: Sequence[LabelledImage], gateway: str, originals: int, *, seed: int = 0, concurrency: int = 8,
    keep_collection: bool = False, api_key: str | None = None, show_progress: bool = False,
    collection: str | None = None,
) -> dict:
    """Indexes `catalog`, queries with transformed copies of `originals` of its images (those that
    indexed), drops the collection unless `keep_collection`, and returns the report."""
    if originals < 1:
        raise EvalError("--copies must be at least 1", 2)
    started = time.perf_counter()
    collection = collection or new_collection_name()
    async with gateway_channel(gateway, api_key) as channel:
        stub = gateway_pb2_grpc.VisualSearchStub(channel)
        async with evaluation_collection(stub, catalog, collection, gateway, keep_collection, show_progress) as indexed:
            sample = random.Random(seed).sample(indexed.indexed, min(originals, len(indexed.indexed)))
            with tempfile.TemporaryDirectory(prefix="vsearch-copies-") as work_dir:
                copies = make_copies(sample, Path(work_dir), seed)
                if not copies:
                    raise EvalError("none of the sampled catalog images could be decoded to make copies")
                search_started = time.perf_counter()
                outcomes, failures = await search_queries(stub, copies, collection, 10, concurrency, show_progress)
                search_s = time.perf_counter() - search_started
    latencies = np.array([outcome.latency_ms for outcome in outcomes]) if outcomes else np.zeros(1)
    return {
        "copies": {"originals": len(sample), "seed": seed, **score_copies(outcomes)},
        "queries_failed": len(failures),
        "catalog_size": len(indexed.indexed), "catalog_failed": len(indexed.failures),
        "collection": collection, "collection_dropped": indexed.dropped,
        "index_s": round(indexed.index_s, 3), "search_s": round(search_s, 3), "concurrency": concurrency,
        "query_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "failures": dict(list({**indexed.failures, **failures}.items())[:MAX_REPORTED_FAILURES]),
    }


def format_copies_report(report: dict) -> str:
    copies = report["copies"]
    lines = [f"copies of {copies['originals']} catalog images (seed {copies['seed']}), "
             f"{report['catalog_size']} images in the catalog", f"{'transform':<14} {'queries':>7} {'R@1':>7} {'R@10':>7}"]
    for name, entry in [*copies["per_transform"].items(), ("all", copies)]:
        if entry["queries"]:
            lines.append(f"{name:<14} {entry['queries']:>7} {entry['recall_at_1']:>7.4f} {entry['recall_at_10']:>7.4f}")
    lines.append(f"query p50 {report['query_p50_ms']:.1f} ms; {report['queries_failed']} queries failed; collection "
                 f"{report['collection']} ({'dropped' if report['collection_dropped'] else 'kept'})")
    return "\n".join(lines)
