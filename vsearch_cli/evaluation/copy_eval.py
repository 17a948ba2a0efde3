"""`vsearch eval --copies N`: how well the running system finds the original of a transformed copy,
and how rarely it calls an unrelated image a copy.

N catalog images (a seeded sample) each get one copy per transform (`copy_transforms.TRANSFORMS`); the
catalog is indexed into a fresh collection as `vsearch eval` does, and every copy is searched through the
gateway, in copy mode by default (similar mode is the baseline copy search starts from). Each transform
reports recall@1 (the original is the first hit), copy recall@1 (and it is marked is_copy: the issue's
measure), recall@10 and how often the original was not among the hits at all. With distractors (images
that are copies of nothing in the catalog), the false-copy rate: the share of them with any hit is_copy."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from service_kit.file_digest import file_sha256
from vsearch.client import AsyncVisualSearchClient
from vsearch_cli.evaluation.copy_transforms import TRANSFORM_SETS, TRANSFORMS, transformed_copy
from vsearch_cli.evaluation.eval_command import (
    MAX_REPORTED_FAILURES, SEARCH_TIMEOUT_S, EvalError, IndexedCatalog, LabelledImage, QueryOutcome,
    evaluation_collection, new_collection_name, search_queries,
)
from vsearch_cli.image_files import is_image_file
from vsearch_cli.gateway_connection import async_gateway_client

COPY_ID_SEPARATOR = "#copy-"
MAX_REPORTED_EXAMPLES = 100
HITS_WANTED = 10
# Issue 13's targets: copies found and marked as such, and unrelated images seldom called copies.
TARGET_COPY_RECALL_AT_1 = 0.98
TARGET_FALSE_COPY_RATE = 0.01


def make_copies(originals: Sequence[LabelledImage], out_dir: Path, seed: int,
                transforms: Sequence[str] = tuple(TRANSFORMS)) -> list[LabelledImage]:
    """One JPEG per original and transform (by name, in `copy_transforms.TRANSFORM_SETS["all"]`) in
    `out_dir`, as queries whose label is the original's id and whose split is the transform's name. An
    original that does not decode gets no copies."""
    rng = random.Random(seed)
    copies = []
    for number, original in enumerate(originals):
        try:
            with Image.open(original.path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError):
            continue
        for transform in transforms:
            path = out_dir / f"{number}-{transform}.jpg"
            path.write_bytes(transformed_copy(image, transform, rng))
            copies.append(LabelledImage(f"{original.id}{COPY_ID_SEPARATOR}{transform}", path, original.id, transform))
    return copies


def share_of(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def first_hit_is_copy(outcome: QueryOutcome) -> bool:
    return bool(outcome.copy_verdicts) and outcome.copy_verdicts[0] is True


def first_hit_is_another_copy(outcome: QueryOutcome) -> bool:
    """The copy's first hit is another image than its original, verified a copy (a duplicate of the
    original in the catalog, or a false copy)."""
    return first_hit_is_copy(outcome) and outcome.ranked_ids[0] != outcome.query.label


def score_copies(outcomes: Sequence[QueryOutcome], duplicates: Mapping[str, frozenset[str]] | None = None,
                 transforms: Sequence[str] = tuple(TRANSFORMS)) -> dict:
    """Per transform (of `transforms`, in that order) and over all (relevant = the copy's original): queries;
    recall_at_1, the original first; copy_recall_at_1, the original first and is_copy (None when the hits carry no
    verdict: similar mode); recall_at_10; original_absent (and its rate), the original not among the hits at all;
    first_hit_other_copy, a copy whose first hit is another image verified a copy (a duplicate of the original in
    the catalog, or a false copy); and, with `duplicates` (an original's id -> the catalog items verified copies of
    it, `catalog_duplicates`), first_hit_catalog_duplicate, those whose first hit is one of them, and
    copy_recall_at_1_duplicates_counted, copy recall@1 that counts them right."""
    duplicates = duplicates or {}
    by_transform: dict[str, list[QueryOutcome]] = {name: [] for name in transforms}
    for outcome in outcomes:
        by_transform[outcome.query.split].append(outcome)
    verdicts_given = any(verdict is not None for outcome in outcomes for verdict in outcome.copy_verdicts)

    def figures(group: list[QueryOutcome]) -> dict:
        first = absent = at_10 = copy_first = other_copy_first = duplicate_first = 0
        for outcome in group:
            ranked, original = outcome.ranked_ids, outcome.query.label
            rank = ranked.index(original) if original in ranked else None
            absent += rank is None
            at_10 += rank is not None and rank < 10
            first += rank == 0
            copy_first += rank == 0 and first_hit_is_copy(outcome)
            other_first = first_hit_is_another_copy(outcome)
            other_copy_first += other_first
            duplicate_first += other_first and ranked[0] in duplicates.get(original, ())
        total = len(group)
        return {
            "queries": total, "recall_at_1": share_of(first, total),
            "copy_recall_at_1": share_of(copy_first, total) if verdicts_given else None,
            "recall_at_10": share_of(at_10, total),
            "original_absent": absent, "original_absent_rate": share_of(absent, total),
            "first_hit_other_copy": other_copy_first if verdicts_given else None,
            "first_hit_catalog_duplicate": duplicate_first if verdicts_given else None,
            "copy_recall_at_1_duplicates_counted": share_of(copy_first + duplicate_first, total) if verdicts_given
            else None,
        }

    every = [outcome for group in by_transform.values() for outcome in group]
    # Which images took the first place as copies: telling a duplicate in the catalog from a false copy
    # needs a look at them.
    other_copies_first = [{"copy": outcome.query.id, "first_hit": outcome.ranked_ids[0]} for outcome in every
                          if first_hit_is_another_copy(outcome)]
    return {"per_transform": {name: figures(group) for name, group in by_transform.items()}, **figures(every),
            "first_hit_other_copy_examples": other_copies_first[:MAX_REPORTED_EXAMPLES]}


async def catalog_duplicates(client: AsyncVisualSearchClient, collection: str,
                             originals: Iterable[str]) -> dict[str, frozenset[str]]:
    """For each original: the other catalog items that a copy search by its item_id verifies as copies
    of it, its duplicates in the catalog (the same photograph re-encoded, resized, mirrored or cropped,
    as Caltech-101's Faces_easy photos are crops of its Faces ones). A copy of the original that finds
    one of them first has found the photograph, under another id."""
    found = {}
    for original in originals:
        reply = await client.search(item_id=original, k=HITS_WANTED, collection=collection, mode="copy",
                                    timeout=SEARCH_TIMEOUT_S)
        found[original] = frozenset(hit.id for hit in reply.hits if hit.is_copy and hit.id != original)
    return found


def list_distractors(directory: Path) -> list[Path]:
    """Every image under `directory`, recursively, through symbolic links (a distractor set is often
    links to folders kept elsewhere), each real folder once; the suffixes `vsearch index` takes."""
    if not directory.is_dir():
        raise EvalError(f"--distractors {directory}: not a directory", 2)
    images, seen = [], set()
    for folder, subfolders, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        images += [path for path in (Path(folder) / name for name in files)
                   if is_image_file(path) and path.is_file()]
    images.sort()
    if not images:
        raise EvalError(f"--distractors {directory}: no images under it", 2)
    return images


def split_catalog_images(distractors: Sequence[Path],
                         catalog: Sequence[LabelledImage]) -> tuple[list[Path], list[Path]]:
    """(distractors, excluded): a distractor whose sha256 is a catalog image's is in the catalog, so not a
    distractor. Only catalog files of a distractor's size are hashed: a different size is different bytes."""
    sizes = {path.stat().st_size for path in distractors}
    catalog_digests = {file_sha256(image.path) for image in catalog if image.path.stat().st_size in sizes}
    kept, excluded = [], []
    for path in distractors:
        (excluded if catalog_digests and file_sha256(path) in catalog_digests else kept).append(path)
    return kept, excluded


@dataclass(frozen=True)
class Distractors:
    """No-copy queries: `queries`, the images `listed` (from `source`: a folder, or a split of the labels)
    less those `excluded` for being catalog images."""

    source: str
    listed: list[Path]
    excluded: list[Path]
    queries: list[LabelledImage]


async def load_distractors(
    catalog: Sequence[LabelledImage], distractors_dir: Path | None, distractor_rows: Sequence[LabelledImage],
    distractor_split: str | None,
) -> Distractors | None:
    """The images under `distractors_dir`, or `distractor_rows` (the labels' rows of `distractor_split`), as
    no-copy queries (ids `distractor:...`), less those that are catalog images; None without either."""
    if distractors_dir is not None and distractor_rows:
        raise EvalError("give --distractors or --distractor-split, not both", 2)
    if distractors_dir is not None:
        source = str(distractors_dir)
        listed = list_distractors(distractors_dir)
        ids = {path: str(path.relative_to(distractors_dir)) for path in listed}
    elif distractor_rows:
        source = f"split {distractor_split} of the labels"
        listed = [row.path for row in distractor_rows]
        ids = {row.path: row.id for row in distractor_rows}
    else:
        return None
    kept, excluded = await asyncio.to_thread(split_catalog_images, listed, catalog)
    queries = [LabelledImage(f"distractor:{ids[path]}", path, "", "distractor") for path in kept]
    return Distractors(source, listed, excluded, queries)


def score_distractors(distractors: Distractors, outcomes: Sequence[QueryOutcome], failures: dict[str, str]) -> dict:
    """The false-copy rate: the share of the distractors searched with any hit verified a copy."""
    excluded = distractors.excluded
    false_copies = sorted(outcome.query.id for outcome in outcomes if any(outcome.copy_verdicts))
    searched = len(outcomes)
    rate = share_of(len(false_copies), searched)
    latencies = [outcome.latency_ms for outcome in outcomes]
    return {
        "source": distractors.source, "images": len(distractors.listed), "excluded_in_catalog": len(excluded),
        "excluded_examples": [str(path) for path in excluded[:MAX_REPORTED_EXAMPLES]],
        "searched": searched, "failed": len(failures),
        "with_copy_hit": len(false_copies), "false_copy_rate": rate,
        "target_false_copy_rate": TARGET_FALSE_COPY_RATE,
        "meets_target": None if rate is None else rate <= TARGET_FALSE_COPY_RATE,
        "false_copy_examples": false_copies[:MAX_REPORTED_EXAMPLES],
        "query_p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
    }


async def evaluate_copies(
    catalog: Sequence[LabelledImage], gateway: str, originals: int, *, seed: int = 0, concurrency: int = 8,
    keep_collection: bool = False, api_key: str | None = None, show_progress: bool = False,
    collection: str | None = None, mode: str = "copy", distractors_dir: Path | None = None, regions: bool = False,
    transforms: str = "issue", distractor_rows: Sequence[LabelledImage] = (), distractor_split: str | None = None,
) -> dict:
    """Indexes `catalog` (with regions when `regions`), queries in `mode` with transformed copies of
    `originals` of its images (those that indexed; the transforms of `copy_transforms.TRANSFORM_SETS[transforms]`)
    and with distractors not in the catalog (the images under `distractors_dir`, or `distractor_rows`: the
    labels' rows of `distractor_split`), drops the collection unless `keep_collection`, and returns the report.
    Issue 13's target is judged on its own transforms only."""
    if originals < 1:
        raise EvalError("--copies must be at least 1", 2)
    if transforms not in TRANSFORM_SETS:
        raise EvalError(f"--transforms is one of {', '.join(TRANSFORM_SETS)}, not {transforms!r}", 2)
    transform_names = tuple(TRANSFORM_SETS[transforms])
    if (distractors_dir is not None or distractor_rows) and mode != "copy":
        raise EvalError("distractors measure false copies, which only copy mode tells", 2)
    started = time.perf_counter()
    distractors = await load_distractors(catalog, distractors_dir, distractor_rows, distractor_split)
    distractor_queries = distractors.queries if distractors else []
    collection = collection or new_collection_name()
    async with async_gateway_client(gateway, api_key) as client:
        async with evaluation_collection(client, catalog, collection, gateway, keep_collection, show_progress,
                                         regions) as indexed:
            sample = random.Random(seed).sample(indexed.indexed, min(originals, len(indexed.indexed)))
            with tempfile.TemporaryDirectory(prefix="vsearch-copies-") as work_dir:
                copies = make_copies(sample, Path(work_dir), seed, transform_names)
                if not copies:
                    raise EvalError("none of the sampled catalog images could be decoded to make copies")
                search_started = time.perf_counter()
                outcomes, failures = await search_queries(client, copies, collection, HITS_WANTED, concurrency,
                                                          show_progress, mode)
                search_s = time.perf_counter() - search_started
            # Only the originals whose copies found another verified copy first need the look.
            duplicates = await catalog_duplicates(client, collection, sorted({
                outcome.query.label for outcome in outcomes if first_hit_is_another_copy(outcome)
            })) if mode == "copy" else {}
            distractor_outcomes, distractor_failures = (
                await search_queries(client, distractor_queries, collection, HITS_WANTED, concurrency, show_progress,
                                     mode)
                if distractor_queries else ([], {}))
    scores = score_copies(outcomes, duplicates, transform_names)
    return {
        "copies": {
            "mode": mode, "originals": len(sample), "seed": seed, "transforms": transforms, **scores,
            "target_copy_recall_at_1": TARGET_COPY_RECALL_AT_1,
            "meets_target": None if scores["copy_recall_at_1"] is None or transforms != "issue"
            else scores["copy_recall_at_1"] >= TARGET_COPY_RECALL_AT_1,
        },
        **run_report(indexed, outcomes, failures, search_s, concurrency, started, distractors, distractor_outcomes,
                     distractor_failures),
    }


def run_report(
    indexed: IndexedCatalog, outcomes: Sequence[QueryOutcome], failures: dict[str, str], search_s: float,
    concurrency: int, started: float, distractors: Distractors | None, distractor_outcomes: Sequence[QueryOutcome],
    distractor_failures: dict[str, str],
) -> dict:
    """What a copy evaluation's report says of its run besides its scores: the catalog, the collection,
    timings, failures, and the distractors' false-copy rate when there were any."""
    latencies = np.array([outcome.latency_ms for outcome in outcomes]) if outcomes else np.zeros(1)
    report = {
        "queries_failed": len(failures),
        "catalog_size": len(indexed.indexed), "catalog_failed": len(indexed.failures), "regions": indexed.regions,
        "collection": indexed.collection, "collection_dropped": indexed.dropped,
        "index_s": round(indexed.index_s, 3), "search_s": round(search_s, 3), "concurrency": concurrency,
        "query_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "query_p95_ms": round(float(np.percentile(latencies, 95)), 2),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "failures": dict(list({**indexed.failures, **failures, **distractor_failures}.items())[:MAX_REPORTED_FAILURES]),
    }
    if distractors:
        report["distractors"] = score_distractors(distractors, distractor_outcomes, distractor_failures)
    return report


def figure_text(value: float | int | None) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def format_copies_report(report: dict) -> str:
    copies = report["copies"]
    width = max([17, *(len(name) for name in copies["per_transform"])])  # chains have long names
    lines = [f"copies of {copies['originals']} catalog images (seed {copies['seed']}), searched in {copies['mode']} "
             f"mode; {report['catalog_size']} images in the catalog{' (with regions)' if report['regions'] else ''}",
             f"{'transform':<{width}} {'queries':>7} {'R@1':>7} {'copy R@1':>9} {'R@10':>7} {'absent':>7} "
             f"{'other copy 1st':>15}"]
    for name, entry in [*copies["per_transform"].items(), ("all", copies)]:
        if entry["queries"]:
            lines.append(f"{name:<{width}} {entry['queries']:>7} {figure_text(entry['recall_at_1']):>7} "
                         f"{figure_text(entry['copy_recall_at_1']):>9} {figure_text(entry['recall_at_10']):>7} "
                         f"{entry['original_absent']:>7} {figure_text(entry['first_hit_other_copy']):>15}")
    if copies["copy_recall_at_1"] is not None:
        if copies["meets_target"] is None:
            verdict = "(issue 13's target is judged on its own transforms: --transforms issue)"
        else:
            verdict = f"target >= {copies['target_copy_recall_at_1']} {'met' if copies['meets_target'] else 'MISSED'}"
        lines.append(f"copy recall@1 (the original first, is_copy) {copies['copy_recall_at_1']:.4f}: {verdict}")
        lines.append(f"counting a catalog duplicate of the original first as right "
                     f"({copies['first_hit_catalog_duplicate']} copies): "
                     f"{copies['copy_recall_at_1_duplicates_counted']:.4f}")
    return "\n".join(lines + format_run_lines(report))


def format_run_lines(report: dict) -> list[str]:
    """The lines of `run_report`'s part: the distractors' false copies, latencies, failures, the collection."""
    lines = []
    distractors = report.get("distractors")
    if distractors:
        rate = distractors["false_copy_rate"]
        verdict = "-" if rate is None else ("met" if distractors["meets_target"] else "MISSED")
        lines.append(f"false copies: {distractors['with_copy_hit']} of {distractors['searched']} distractors had a "
                     f"hit is_copy (rate {figure_text(rate)}; target <= {distractors['target_false_copy_rate']} "
                     f"{verdict}); {distractors['images']} images ({distractors['source']}), "
                     f"{distractors['excluded_in_catalog']} excluded as catalog images, {distractors['failed']} failed")
    lines.append(f"query p50 {report['query_p50_ms']:.1f} ms, p95 {report['query_p95_ms']:.1f} ms; "
                 f"{report['queries_failed']} queries failed; collection "
                 f"{report['collection']} ({'dropped' if report['collection_dropped'] else 'kept'})")
    return lines
