"""`vsearch eval`: retrieval quality of the running system on a labelled image set.

The catalog images are indexed through the gateway into a fresh collection of their own, every query
image is searched through the gateway exactly as a client would, and the rankings are scored against
the labels (relevant = same label). The collection is dropped at the end, so the default catalog and
any other collection are left as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from vsearch.client import AddItem, AsyncVisualSearchClient, InvalidArgument, NotFound, VsearchError
from vsearch_cli.evaluation.labelled_csv import LabelsFileError, read_listed_images
from vsearch_cli.evaluation.retrieval_metrics import (
    NS_DEPTH, QueryScores, expected_calibration_error, precision_at, score_query, summarise,
)
from vsearch_cli.gateway_connection import add_gateway_arguments, async_gateway_client, gateway_failure

# Images per AddImages stream, and streams in flight: two streams let the gateway embed one batch
# while the search service writes the other.
INGEST_CHUNK = 128
INGEST_STREAMS = 2
INGEST_TIMEOUT_S = 600.0
SEARCH_TIMEOUT_S = 120.0
CONTROL_TIMEOUT_S = 60.0
MAX_REPORTED_FAILURES = 20


class EvalError(Exception):
    """A problem to report in one line; `exit_code` 2 for bad input, 1 for the system's answer."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LabelledImage:
    id: str  # the path relative to the images root, as written in the labels file
    path: Path
    label: str  # "" for an unlabelled row: a catalog distractor, never a query
    split: str


@dataclass(frozen=True)
class EvalSet:
    catalog: list[LabelledImage]
    queries: list[LabelledImage]
    # With a distractor split: its rows (not of excluded labels, nor catalog rows), no-copy queries.
    distractors: list[LabelledImage] = field(default_factory=list)


@dataclass(frozen=True)
class QueryOutcome:
    query: LabelledImage
    ranked_ids: list[str]
    latency_ms: float
    embedding_from_cache: bool
    # Each hit's match_probability, in ranked_ids' order; None where the hit has none (uncalibrated model).
    probabilities: tuple[float | None, ...] = ()
    # Each hit's is_copy, in ranked_ids' order; None where the hit has none (a similar-mode search).
    copy_verdicts: tuple[bool | None, ...] = ()


# ---- the labelled set ----------------------------------------------------------------------------

def load_eval_set(
    images_root: Path,
    labels_csv: Path,
    path_col: str = "path",
    label_col: str = "label",
    split_col: str = "split",
    catalog_split: str | None = None,
    query_split: str | None = None,
    exclude_labels: Sequence[str] = (),
    distractor_split: str | None = None,
) -> EvalSet:
    """Catalog: the rows of `catalog_split` (all rows without one). Queries: the labelled rows of
    `query_split` (all of them without one) whose label is not excluded. Excluded labels stay in the
    catalog as distractors, as unrelated images do in a real catalog. Distractors (no-copy queries of a
    copy evaluation): the rows of `distractor_split` that are not catalog rows, nor of an excluded label."""
    needs_split = catalog_split is not None or query_split is not None or distractor_split is not None
    try:
        listed = read_listed_images(images_root, labels_csv, path_col, label_col, split_col if needs_split else None)
    except LabelsFileError as error:
        raise EvalError(str(error), 2) from None
    images = [LabelledImage(id=image.relative, path=image.path, label=image.label, split=image.split)
              for image in listed]

    excluded = set(exclude_labels)
    catalog = [image for image in images if catalog_split is None or image.split == catalog_split]
    queries = [
        image for image in images
        if (query_split is None or image.split == query_split) and image.label and image.label not in excluded
    ]
    if not catalog:
        raise EvalError(f"no catalog images (split {catalog_split!r})" if catalog_split else "no catalog images", 2)
    if not queries:
        raise EvalError("no query images left after the split and the excluded labels", 2)
    distractors = []
    if distractor_split is not None:
        in_catalog = {image.id for image in catalog}
        distractors = [image for image in images if image.split == distractor_split
                       and image.id not in in_catalog and image.label not in excluded]
        if not distractors:
            raise EvalError(f"--distractor-split {distractor_split}: no rows of that split outside the catalog "
                            "and the excluded labels", 2)
    return EvalSet(catalog=catalog, queries=queries, distractors=distractors)


def new_collection_name() -> str:
    return f"eval_{secrets.token_hex(4)}"


# ---- talking to the gateway ------------------------------------------------------------------------

async def gather_or_cancel(coroutines: Iterable[Awaitable[None]]) -> None:
    """Runs them all; on the first failure (or our own cancellation) cancels and awaits the rest, so
    nothing still writes to the collection while it is being dropped."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def require_collection_support(client: AsyncVisualSearchClient, collection: str, gateway: str) -> None:
    """A gateway that predates collections ignores the field and would fill the default catalog with
    the evaluation's images: refuse to start unless the fresh collection reads as NOT_FOUND. Also the
    first call, so it does not wait for the gateway: no gateway is a quick UNAVAILABLE."""
    try:
        await client.stats(collection=collection, timeout=CONTROL_TIMEOUT_S)
    except NotFound:
        return
    except VsearchError as error:
        raise EvalError(gateway_failure(gateway, error)) from None
    raise EvalError(f"the gateway answered Stats for the new collection {collection!r} instead of NOT_FOUND: "
                    "it does not support collections, and indexing would write into the default catalog")


def add_items(images: Sequence[LabelledImage]) -> Iterator[AddItem]:
    """The images as the client adds them: by path, so each is read as its stream sends it (only the
    images of the streams in flight are held in memory)."""
    for image in images:
        yield AddItem(image=image.path, id=image.id, metadata={"label": image.label} if image.label else None)


async def index_catalog(
    client: AsyncVisualSearchClient, catalog: Sequence[LabelledImage], collection: str,
    show_progress: bool, regions: bool = False,
) -> dict[str, str]:
    """Indexes the catalog; returns {id: "CODE: message"} for the images the gateway refused."""
    chunks = [catalog[start:start + INGEST_CHUNK] for start in range(0, len(catalog), INGEST_CHUNK)]
    failures: dict[str, str] = {}
    streams = asyncio.Semaphore(INGEST_STREAMS)
    progress = tqdm(total=len(catalog), desc="index", unit="img", disable=not show_progress, file=sys.stderr,
                    dynamic_ncols=True)

    async def index_chunk(chunk: Sequence[LabelledImage]) -> None:
        async with streams:
            summary = await client.add(add_items(chunk), collection=collection, regions=regions,
                                       timeout=INGEST_TIMEOUT_S)
        for failure in summary.failures:
            failures[chunk[failure.index].id] = f"{failure.code.name}: {failure.message}"
        progress.update(len(chunk))

    try:
        await gather_or_cancel(index_chunk(chunk) for chunk in chunks)
    finally:
        progress.close()
    return failures


async def search_queries(
    client: AsyncVisualSearchClient, queries: Sequence[LabelledImage], collection: str,
    hits_wanted: int, concurrency: int, show_progress: bool, mode: str = "similar",
) -> tuple[list[QueryOutcome], dict[str, str]]:
    """Every query through gateway Search in `mode`, at most `concurrency` in flight. An image the
    system refuses (INVALID_ARGUMENT) is a failed query; any other error ends the evaluation."""
    in_flight = asyncio.Semaphore(concurrency)
    outcomes: list[QueryOutcome] = []
    failures: dict[str, str] = {}
    progress = tqdm(total=len(queries), desc="search", unit="query", disable=not show_progress, file=sys.stderr,
                    dynamic_ncols=True)

    async def search_one(query: LabelledImage) -> None:
        async with in_flight:
            image = await asyncio.to_thread(query.path.read_bytes)
            started = time.perf_counter()
            try:
                reply = await client.search(image, k=hits_wanted, collection=collection, mode=mode,
                                            timeout=SEARCH_TIMEOUT_S)
            except InvalidArgument as error:
                failures[query.id] = f"{error.code.name}: {error.message}"
            else:
                probabilities = tuple(hit.match_probability for hit in reply.hits)
                copy_verdicts = tuple(hit.is_copy for hit in reply.hits)
                outcomes.append(QueryOutcome(query, [hit.id for hit in reply.hits],
                                             (time.perf_counter() - started) * 1000.0, reply.embedding_from_cache,
                                             probabilities, copy_verdicts))
            progress.update(1)

    try:
        await gather_or_cancel(search_one(query) for query in queries)
    finally:
        progress.close()
    return outcomes, failures


# ---- search by words ------------------------------------------------------------------------------

def label_words(label: str) -> str:
    """A label as words for a text query: underscores read as spaces ("car_side" -> "car side")."""
    return " ".join(label.replace("_", " ").split())


@dataclass(frozen=True)
class TextOutcome:
    label: str
    text: str
    ranked_ids: list[str]
    understood_as: str
    no_match_reason: str
    latency_ms: float


async def search_texts(
    client: AsyncVisualSearchClient, labels: Sequence[str], template: str, collection: str,
    hits_wanted: int, concurrency: int,
) -> list[TextOutcome]:
    """One text query per label, `template` with {label} replaced by the label's words. A text the
    model matches to nothing comes back with no hits and its reason (scored as such)."""
    in_flight = asyncio.Semaphore(concurrency)
    outcomes: list[TextOutcome] = []

    async def search_one(label: str) -> None:
        text = template.format(label=label_words(label))
        async with in_flight:
            started = time.perf_counter()
            reply = await client.search(text=text, k=hits_wanted, collection=collection, timeout=SEARCH_TIMEOUT_S)
            outcomes.append(TextOutcome(label, text, [hit.id for hit in reply.hits], reply.understood_as,
                                        reply.no_match_reason, (time.perf_counter() - started) * 1000.0))

    await gather_or_cancel(search_one(label) for label in labels)
    return sorted(outcomes, key=lambda outcome: outcome.label)


def score_texts(outcomes: Sequence[TextOutcome], catalog: Sequence[LabelledImage], k: int, template: str) -> dict:
    """mAP@k, P@1, P@10, recall@10 and MRR over the labels' text queries (relevant = an image of the label),
    with each query's figures and what it was understood as."""
    label_of = {image.id: image.label for image in catalog}
    label_counts = Counter(image.label for image in catalog)
    per_query = {}
    scores = []
    for outcome in outcomes:
        relevant_total = label_counts[outcome.label]
        if relevant_total == 0:
            continue
        one = score_query(outcome.ranked_ids, "", outcome.label, label_of, relevant_total, k)
        relevance = [label_of.get(hit_id) == outcome.label for hit_id in outcome.ranked_ids][:k]
        p10 = precision_at(relevance, 10)
        scores.append((one, p10))
        per_query[outcome.label] = {
            "text": outcome.text, "ap": round(one.average_precision, 4), "p_at_10": p10,
            "understood_as": outcome.understood_as, "no_match_reason": outcome.no_match_reason,
        }
    if not scores:
        raise EvalError("no text query has a relevant image in the catalog")
    summary = summarise(one for one, _ in scores)
    summary.pop("ns_score")
    latencies = np.array([outcome.latency_ms for outcome in outcomes])
    return {
        "template": template,
        **summary,
        "precision_at_10": float(np.mean([p10 for _, p10 in scores])),
        "no_match": sum(1 for outcome in outcomes if outcome.no_match_reason),
        "query_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "per_query": per_query,
    }


async def drop_collection(client: AsyncVisualSearchClient, collection: str) -> bool:
    try:
        reply = await client.drop_collection(collection, timeout=CONTROL_TIMEOUT_S)
    except VsearchError as error:
        print(f"vsearch eval: could not drop collection {collection}: {error}", file=sys.stderr)
        return False
    return reply.dropped


# ---- the evaluation ------------------------------------------------------------------------------

def relevant_count(query: LabelledImage, label_of: dict[str, str], label_counts: Counter) -> int:
    """The catalog images relevant to `query` (its label's), the query itself left out when it is one."""
    return label_counts[query.label] - (1 if label_of.get(query.id) == query.label else 0)


def score_outcomes(
    outcomes: Sequence[QueryOutcome], catalog: Sequence[LabelledImage], k: int,
) -> tuple[list[QueryScores], int]:
    """Scores per query, and the number of queries skipped because the catalog holds nothing relevant
    to them (AP is undefined there)."""
    label_of = {image.id: image.label for image in catalog}
    label_counts = Counter(image.label for image in catalog)
    scores: list[QueryScores] = []
    skipped = 0
    for outcome in outcomes:
        query = outcome.query
        relevant_total = relevant_count(query, label_of, label_counts)
        if relevant_total <= 0:
            skipped += 1
            continue
        scores.append(score_query(outcome.ranked_ids, query.id, query.label, label_of, relevant_total, k))
    return scores, skipped


def calibration_error_of(outcomes: Sequence[QueryOutcome], catalog: Sequence[LabelledImage], k: int) -> dict | None:
    """The expected calibration error (10 equal-width bins) of the hits' match_probability against their
    relevance, over the hits scored: each scored query's first k hits, its own hit left out. None when
    no hit carries a probability."""
    label_of = {image.id: image.label for image in catalog}
    label_counts = Counter(image.label for image in catalog)
    probabilities: list[float] = []
    relevance: list[bool] = []
    missing = 0
    for outcome in outcomes:
        query = outcome.query
        if relevant_count(query, label_of, label_counts) <= 0:
            continue  # not scored (see score_outcomes)
        hits = [(hit_id, probability) for hit_id, probability in zip(outcome.ranked_ids, outcome.probabilities)
                if hit_id != query.id][:k]
        for hit_id, probability in hits:
            if probability is None:
                missing += 1
                continue
            probabilities.append(probability)
            relevance.append(label_of.get(hit_id) == query.label)
    if not probabilities:
        return None
    return {
        "calibration_error": round(expected_calibration_error(probabilities, relevance), 4),
        "calibration_hits": len(probabilities),
        "calibration_hits_without_probability": missing,
        "mean_match_probability": round(float(np.mean(probabilities)), 4),
        "relevant_share": round(float(np.mean(relevance)), 4),
    }


@dataclass
class IndexedCatalog:
    collection: str
    indexed: list[LabelledImage]
    failures: dict[str, str]  # id -> "CODE: message" of the images the gateway refused
    index_s: float
    dropped: bool = False
    regions: bool = False  # the collection's items have regions (Stats.regions)


@contextlib.asynccontextmanager
async def evaluation_collection(
    client: AsyncVisualSearchClient, catalog: Sequence[LabelledImage], collection: str, gateway: str,
    keep_collection: bool, show_progress: bool, regions: bool = False,
) -> AsyncIterator[IndexedCatalog]:
    """Indexes `catalog` into the fresh `collection` (with regions when `regions`) and checks the count,
    and that the collection has regions when asked; on the way out drops the collection (unless
    `keep_collection`; `dropped` says whether it went) and turns the gateway's errors into an `EvalError`."""
    await require_collection_support(client, collection, gateway)
    indexed_catalog = IndexedCatalog(collection, [], {}, 0.0)
    try:
        index_started = time.perf_counter()
        failures = await index_catalog(client, catalog, collection, show_progress, regions)
        indexed_catalog.index_s = time.perf_counter() - index_started
        indexed_catalog.failures = failures
        indexed_catalog.indexed = [image for image in catalog if image.id not in failures]
        if not indexed_catalog.indexed:
            raise EvalError(f"no catalog image could be indexed, e.g. {next(iter(failures.items()))}")
        stats = await client.stats(collection=collection, timeout=CONTROL_TIMEOUT_S)
        if stats.count != len(indexed_catalog.indexed):
            raise EvalError(f"collection {collection} holds {stats.count} items after indexing "
                            f"{len(indexed_catalog.indexed)}")
        # A gateway that predates regions ignores the flag: its figures would be measured without them.
        if regions and not stats.regions:
            raise EvalError(f"collection {collection} has no regions after indexing with --regions: the gateway "
                            "does not make them")
        indexed_catalog.regions = stats.regions
        yield indexed_catalog
    except VsearchError as error:
        raise EvalError(gateway_failure(gateway, error)) from None
    finally:
        if not keep_collection:
            indexed_catalog.dropped = await drop_collection(client, collection)


async def evaluate(
    eval_set: EvalSet, gateway: str, k: int, concurrency: int = 8, keep_collection: bool = False,
    api_key: str | None = None,
    show_progress: bool = False, collection: str | None = None, text_templates: Sequence[str] = (),
    regions: bool = False,
) -> dict:
    """Indexes the catalog into `collection` (a fresh `eval_<hex>` by default; with regions when
    `regions`), searches with every query, drops the collection unless `keep_collection`, and returns
    the report (`regions`: the collection's Stats.regions): the metrics of
    `retrieval_metrics.summarise` (mean over the queries that have a relevant catalog image), then
    wall_time_s and the extras (sizes, failures, per-phase timings, query latencies). With
    `text_templates`, the queries are words instead: one per query label and template, and the report
    holds one `text` entry per template (see `score_texts`)."""
    started = time.perf_counter()
    collection = collection or new_collection_name()
    # One more hit than scored, for the query's own hit to drop out; at least N-S's depth.
    hits_wanted = max(k + 1, NS_DEPTH)
    async with async_gateway_client(gateway, api_key) as client:
        async with evaluation_collection(
            client, eval_set.catalog, collection, gateway, keep_collection, show_progress, regions,
        ) as catalog:
            search_started = time.perf_counter()
            if text_templates:
                labels = sorted({image.label for image in eval_set.queries})
                text_outcomes = [
                    await search_texts(client, labels, template, collection, hits_wanted, concurrency)
                    for template in text_templates
                ]
                outcomes, query_failures = [], {}
            else:
                outcomes, query_failures = await search_queries(
                    client, eval_set.queries, collection, hits_wanted, concurrency, show_progress)
            search_s = time.perf_counter() - search_started
            if not outcomes and not text_templates:
                raise EvalError(f"every query failed, e.g. {next(iter(query_failures.items()))}")
    indexed, catalog_failures, index_s, dropped = catalog.indexed, catalog.failures, catalog.index_s, catalog.dropped
    with_regions = catalog.regions

    if text_templates:
        return {
            "text": [score_texts(found, indexed, k, template) for template, found in zip(text_templates, text_outcomes)],
            "wall_time_s": round(time.perf_counter() - started, 3), "k": k, "catalog_size": len(indexed),
            "catalog_labels": len({image.label for image in indexed if image.label}),
            "catalog_failed": len(catalog_failures), "regions": with_regions, "collection": collection,
            "collection_dropped": dropped, "index_s": round(index_s, 3), "search_s": round(search_s, 3),
            "concurrency": concurrency,
            "failures": dict(list(catalog_failures.items())[:MAX_REPORTED_FAILURES]),
        }
    scores, without_relevant = score_outcomes(outcomes, indexed, k)
    if not scores:
        raise EvalError("no query has a relevant image in the catalog")
    latencies = np.array([outcome.latency_ms for outcome in outcomes])
    report: dict = summarise(scores)
    report.update({
        "wall_time_s": round(time.perf_counter() - started, 3),
        "k": k,
        "catalog_size": len(indexed),
        "catalog_labels": len({image.label for image in indexed if image.label}),
        "catalog_failed": len(catalog_failures),
        "queries_failed": len(query_failures),
        "queries_without_relevant": without_relevant,
        "regions": with_regions,
        "collection": collection,
        "collection_dropped": dropped,
        "index_s": round(index_s, 3),
        "search_s": round(search_s, 3),
        "ingest_images_per_s": round(len(eval_set.catalog) / index_s, 2),
        "queries_per_s": round(len(eval_set.queries) / search_s, 2),
        "query_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "query_p95_ms": round(float(np.percentile(latencies, 95)), 2),
        "embedding_cache_hits": sum(outcome.embedding_from_cache for outcome in outcomes),
        # calibration_error and its counts, when the hits carry match_probability.
        **(calibration_error_of(outcomes, indexed, k) or {}),
        "concurrency": concurrency,
        # The first few only: the counts above are complete.
        "failures": dict(list({**catalog_failures, **query_failures}.items())[:MAX_REPORTED_FAILURES]),
    })
    return report


# ---- command line --------------------------------------------------------------------------------

METRIC_ROWS = (
    ("map_at_k", "mAP@{k}"), ("precision_at_1", "P@1"), ("recall_at_10", "recall@10 (any relevant in top 10)"),
    ("mrr_at_k", "MRR@{k}"), ("ns_score", "N-S score (relevant in top 4, query kept; max 4)"),
)


def format_text_report(report: dict) -> str:
    lines = []
    for entry in report["text"]:
        lines += [
            f"text queries {entry['template']!r}: {entry['queries']} labels, {entry['no_match']} matched nothing",
            f"  {'mAP@' + str(report['k']):<16} {entry['map_at_k']:.4f}   {'P@10':<6} {entry['precision_at_10']:.4f}   "
            f"P@1 {entry['precision_at_1']:.4f}   recall@10 {entry['recall_at_10']:.4f}   MRR {entry['mrr_at_k']:.4f}   "
            f"p50 {entry['query_p50_ms']:.0f} ms",
        ]
    lines += [
        f"{'catalog':<50} {report['catalog_size']} images, {report['catalog_labels']} labels "
        f"({report['catalog_failed']} failed to index)",
        f"{'wall time':<50} {report['wall_time_s']:.1f} s",
        f"{'collection':<50} {report['collection']} ({'dropped' if report['collection_dropped'] else 'kept'})",
    ]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    if "text" in report:
        return format_text_report(report)
    if "copies" in report:
        from vsearch_cli.evaluation.copy_eval import format_copies_report  # builds on this module
        return format_copies_report(report)
    if "copy_set" in report:
        from vsearch_cli.evaluation.copy_set_eval import format_copy_set_report  # builds on this module
        return format_copy_set_report(report)
    lines = [f"{label.format(k=report['k']):<50} {report[key]:.4f}" for key, label in METRIC_ROWS]
    if "calibration_error" in report:
        lines.append(f"{'calibration error (ECE, 10 bins, hits scored)':<50} {report['calibration_error']:.4f} "
                     f"({report['calibration_hits']} hits: mean probability {report['mean_match_probability']:.4f}, "
                     f"relevant {report['relevant_share']:.4f})")
    lines += [
        f"{'queries':<50} {report['queries']} ({report['queries_failed']} failed, "
        f"{report['queries_without_relevant']} without a relevant catalog image)",
        f"{'catalog':<50} {report['catalog_size']} images, {report['catalog_labels']} labels "
        f"({report['catalog_failed']} failed to index){', with regions' if report['regions'] else ''}",
        f"{'index':<50} {report['index_s']:.1f} s ({report['ingest_images_per_s']:.1f} images/s)",
        f"{'search':<50} {report['search_s']:.1f} s ({report['queries_per_s']:.1f} queries/s, "
        f"p50 {report['query_p50_ms']:.0f} ms, p95 {report['query_p95_ms']:.0f} ms, "
        f"{report['concurrency']} in flight)",
        f"{'wall time':<50} {report['wall_time_s']:.1f} s",
        f"{'collection':<50} {report['collection']} ({'dropped' if report['collection_dropped'] else 'kept'})",
    ]
    for image_id, message in list(report["failures"].items())[:10]:
        lines.append(f"  failed {image_id}: {message}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.k < 1 or args.concurrency < 1:
        print("vsearch eval: --k and --concurrency must be at least 1", file=sys.stderr)
        return 2
    for template in args.text_template or ():
        try:
            if template.format(label="x") == template:
                raise ValueError("it has no {label}")
        except (ValueError, KeyError, IndexError) as error:
            print(f"vsearch eval: --text-template {template!r}: {error}", file=sys.stderr)
            return 2
    if args.copies is not None and args.text_template:
        print("vsearch eval: --copies and --text-template are two different evaluations; give one", file=sys.stderr)
        return 2
    # --mode copy without --copies: the query rows are a copy-detection set of the user's own.
    copy_set = args.copies is None and args.mode == "copy"
    if copy_set and args.text_template:
        print("vsearch eval: --mode copy and --text-template are two different evaluations; give one",
              file=sys.stderr)
        return 2
    if args.copies is None and args.transforms:
        print("vsearch eval: --transforms goes with --copies N", file=sys.stderr)
        return 2
    copies_only = [flag for flag, value in (("--distractors", args.distractors),
                                            ("--distractor-split", args.distractor_split)) if value]
    if copies_only and args.copies is None and not copy_set:
        print(f"vsearch eval: {' and '.join(copies_only)} go with --copies N or --mode copy", file=sys.stderr)
        return 2
    if args.distractors and args.distractor_split:
        print("vsearch eval: give --distractors or --distractor-split, not both", file=sys.stderr)
        return 2
    if (args.distractors or args.distractor_split) and args.mode == "similar":
        flag = "--distractors" if args.distractors else "--distractor-split"
        print(f"vsearch eval: {flag} measures false copies, which only copy mode tells: drop --mode similar",
              file=sys.stderr)
        return 2
    collection = new_collection_name()
    try:
        eval_set = load_eval_set(
            Path(args.images), Path(args.labels), args.path_col, args.label_col, args.split_col,
            args.catalog_split, args.query_split, args.exclude_label or (), args.distractor_split,
        )
        show_progress = args.progress or sys.stderr.isatty()
        if args.copies is not None:
            # Imported here: copy_eval builds on this module.
            from vsearch_cli.evaluation.copy_eval import evaluate_copies
            report = asyncio.run(evaluate_copies(
                eval_set.catalog, args.gateway, args.copies, seed=args.seed, concurrency=args.concurrency,
                keep_collection=args.keep_collection, api_key=args.api_key, show_progress=show_progress,
                collection=collection, mode=args.mode or "copy",
                distractors_dir=Path(args.distractors) if args.distractors else None, regions=args.regions,
                transforms=args.transforms or "issue", distractor_rows=eval_set.distractors,
                distractor_split=args.distractor_split,
            ))
        elif copy_set:
            from vsearch_cli.evaluation.copy_set_eval import evaluate_copy_set  # builds on this module
            report = asyncio.run(evaluate_copy_set(
                eval_set, args.gateway, concurrency=args.concurrency, keep_collection=args.keep_collection,
                api_key=args.api_key, show_progress=show_progress, collection=collection,
                distractors_dir=Path(args.distractors) if args.distractors else None,
                distractor_split=args.distractor_split, regions=args.regions,
            ))
        else:
            report = asyncio.run(evaluate(
                eval_set, args.gateway, args.k, args.concurrency, args.keep_collection, api_key=args.api_key,
                show_progress=show_progress, collection=collection, text_templates=args.text_template or (),
                regions=args.regions,
            ))
    except EvalError as error:
        print(f"vsearch eval: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        # asyncio.run cancelled the evaluation, whose cleanup has dropped the collection by now.
        kept = "kept" if args.keep_collection else "dropped"
        print(f"vsearch eval: interrupted; collection {collection} {kept}", file=sys.stderr)
        return 130
    print(json.dumps(report) if args.json else format_report(report))
    # A collection left behind is the caller's to clean up: say so in the exit status too.
    return 0 if args.keep_collection or report["collection_dropped"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    evaluation = sub.add_parser(
        "eval", help="measure retrieval quality on a labelled image set, through the running system",
        description=(
            "Indexes the catalog rows of a labels CSV into a fresh collection through the gateway, searches "
            "with every query row, scores the rankings (relevant = same label; a query's own hit is never "
            "counted, except by the N-S score) and drops the collection. Excluded labels are removed from "
            "the queries only: their images stay in the catalog as distractors."
        ),
    )
    evaluation.add_argument("--images", required=True, help="folder the CSV's paths are relative to")
    evaluation.add_argument("--labels", required=True, help="CSV with a header row")
    evaluation.add_argument("--path-col", default="path")
    evaluation.add_argument("--label-col", default="label")
    evaluation.add_argument("--split-col", default="split")
    evaluation.add_argument("--catalog-split", help="index only the rows of this split (default: all rows)")
    evaluation.add_argument("--query-split", help="query with the rows of this split (default: all labelled rows)")
    evaluation.add_argument("--exclude-label", action="append", metavar="LABEL",
                            help="no queries with this label (they stay in the catalog); repeatable")
    evaluation.add_argument("--k", type=int, default=100,
                            help="ranking depth scored (default 100; k+1 hits are asked for, so at most "
                                 "the gateway's max_k - 1)")
    add_gateway_arguments(evaluation)
    evaluation.add_argument("--concurrency", type=int, default=8, help="searches in flight (default 8)")
    evaluation.add_argument("--keep-collection", action="store_true",
                            help="leave the evaluation's collection in place (its name is in the report)")
    evaluation.add_argument("--text-template", action="append", metavar="TEMPLATE",
                            help="search by words instead of the query images: one query per query label, "
                                 "TEMPLATE with {label} replaced by the label's words (underscores as spaces), "
                                 "e.g. \"a photo of a {label}\"; repeatable (each scored on its own)")
    evaluation.add_argument("--copies", type=int, metavar="N",
                            help="instead of the query rows: transformed copies (crops to 70%% and 50%%, JPEG "
                                 "quality 20, half size, rotation, mirror, greyscale, brightness, a caption) of N "
                                 "catalog images, searched in copy mode; reports per transform recall@1 of the "
                                 "original (also with is_copy on it), recall@10 and how often it was not in the "
                                 "hits")
    evaluation.add_argument("--transforms", choices=("issue", "more", "chains", "all"),
                            help="with --copies: which transforms make the copies: issue 13's nine (the default), "
                                 "15 more that copy search was not developed on (blur, noise, a border, squeezed, "
                                 "quarter size, JPEG quality 10, contrast, saturation, a 50%% crop mirrored, a 70%% "
                                 "crop greyed or rotated, a perspective tilt, a patch, a 40%% crop, double size), "
                                 "8 chains of two or three of the issue's (e.g. crop70+mirror+jpeg20), or all 32")
    evaluation.add_argument("--mode", choices=("copy", "similar"),
                            help="with --copies: search the copies in copy mode (the default) or in similar mode "
                                 "(the baseline copy search starts from). Without --copies, copy: the query rows are "
                                 "a copy-detection set of your own, searched in copy mode: give each original its "
                                 "own label and each copy its original's; a query whose label no catalog row has is "
                                 "a query with no copy. Reports copy recall@1 (first hit of the label, is_copy) and "
                                 "the false-copy rate, also per folder of the queries")
    evaluation.add_argument("--distractors", metavar="DIR",
                            help="with --copies or --mode copy: every image under DIR (recursively) is also a "
                                 "query, one with no copy in the catalog; reports the false-copy rate (queries "
                                 "with any hit is_copy). They must not be catalog images: one whose sha256 is a "
                                 "catalog image's is excluded, and counted")
    evaluation.add_argument("--distractor-split", metavar="SPLIT",
                            help="with --copies or --mode copy: the labels CSV's rows of SPLIT (outside the "
                                 "catalog; not of an --exclude-label label) are also queries with no copy in the "
                                 "catalog, as --distractors: photos of the catalog's own subjects, so its "
                                 "look-alikes (e.g. --catalog-split train --distractor-split test)")
    evaluation.add_argument("--regions", action="store_true",
                            help="index the catalog with its images' regions too (the full view plus a grid of "
                                 "14 parts, as vsearch index --regions; about 6x slower to index): measures what "
                                 "regions change, e.g. for crops (docs/regions.md)")
    evaluation.add_argument("--seed", type=int, default=0, help="of the --copies sample and transforms (default 0)")
    evaluation.add_argument("--json", action="store_true", help="print one JSON object")
    evaluation.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    evaluation.set_defaults(func=cmd_eval)
