"""`vsearch eval --mode copy` (without `--copies`): a copy-detection set you bring, searched through the
running system in copy mode.

The labels CSV says which query is a copy of which catalog image: give each original its own label (its
file name will do) and each copy its original's label. A query whose label some catalog image has is a
copy query: it scores when its first hit has that label and is verified a copy (copy recall@1). A query
whose label no catalog image has is a no-copy query: any hit verified a copy is a false copy. Figures are
also given per folder of the queries, since such sets keep each kind of transform in a folder of its own
(`crops/`, `jpeg/`, `strong/`). `--distractors DIR` and `--distractor-split` add no-copy queries, as with
`--copies`. A query that is itself a catalog row (no splits) never counts its own hit."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from vsearch_cli.evaluation.copy_eval import (
    HITS_WANTED, MAX_REPORTED_EXAMPLES, TARGET_COPY_RECALL_AT_1, TARGET_FALSE_COPY_RATE, figure_text,
    format_run_lines, load_distractors, run_report, share_of,
)
from vsearch_cli.evaluation.eval_command import (
    EvalError, EvalSet, LabelledImage, QueryOutcome, evaluation_collection, new_collection_name, search_queries,
)
from vsearch_cli.gateway_connection import async_gateway_client

TOP_FOLDER = "(top)"


def query_folder(query: LabelledImage) -> str:
    """The folder a query's path names (relative to the images root), TOP_FOLDER for none."""
    parent = Path(query.id).parent.as_posix()
    return TOP_FOLDER if parent in ("", ".") else parent


def _without_own_hit(outcome: QueryOutcome) -> list[tuple[str, bool]]:
    """The hits (id, is_copy) but the query's own, when the query is a catalog image."""
    return [(hit_id, verdict is True) for hit_id, verdict in zip(outcome.ranked_ids, outcome.copy_verdicts)
            if hit_id != outcome.query.id]


def score_copy_set(outcomes: Sequence[QueryOutcome], catalog: Sequence[LabelledImage]) -> dict:
    """Over all queries and per folder of them (`query_folder`): for copy queries (their label has a catalog
    image other than themselves) recall_at_1 (the first hit has the label), copy_recall_at_1 (and is verified
    a copy), recall_at_10, copy_found (a hit with the label is verified a copy, at any rank), relevant_absent
    (no hit has the label) and first_hit_other_copy (the first hit is verified a copy but has another label);
    for no-copy queries false_copies (any hit verified a copy) and false_copy_rate."""
    label_of = {image.id: image.label for image in catalog}
    label_counts = Counter(image.label for image in catalog)

    def figures(group: Sequence[QueryOutcome]) -> dict:
        with_copy = first = copy_first = at_10 = found = absent = other_first = without = false_copies = 0
        for outcome in group:
            query = outcome.query
            hits = _without_own_hit(outcome)
            relevant = label_counts[query.label] - (1 if label_of.get(query.id) == query.label else 0)
            if relevant <= 0:
                without += 1
                false_copies += any(is_copy for _id, is_copy in hits)
                continue
            with_copy += 1
            ranks = [rank for rank, (hit_id, _copy) in enumerate(hits) if label_of.get(hit_id) == query.label]
            first_is_copy = bool(hits) and hits[0][1]
            first += bool(ranks) and ranks[0] == 0
            copy_first += bool(ranks) and ranks[0] == 0 and first_is_copy
            at_10 += bool(ranks) and ranks[0] < 10
            found += any(hits[rank][1] for rank in ranks)
            absent += not ranks
            other_first += first_is_copy and not (ranks and ranks[0] == 0)
        return {
            "queries": len(group), "with_copy": with_copy,
            "recall_at_1": share_of(first, with_copy), "copy_recall_at_1": share_of(copy_first, with_copy),
            "recall_at_10": share_of(at_10, with_copy), "copy_found": share_of(found, with_copy),
            "relevant_absent": absent, "first_hit_other_copy": other_first,
            "without_copy": without, "false_copies": false_copies, "false_copy_rate": share_of(false_copies, without),
        }

    by_folder: dict[str, list[QueryOutcome]] = {}
    for outcome in outcomes:
        by_folder.setdefault(query_folder(outcome.query), []).append(outcome)
    overall = figures(outcomes)
    # Which queries went wrong, for a look at them.
    false_copy_examples, other_copy_examples = [], []
    for outcome in outcomes:
        hits = _without_own_hit(outcome)
        query = outcome.query
        has_copy = label_counts[query.label] - (1 if label_of.get(query.id) == query.label else 0) > 0
        if not has_copy and any(is_copy for _id, is_copy in hits):
            false_copy_examples.append({"query": query.id, "copy_hit": next(hit_id for hit_id, is_copy in hits if is_copy)})
        elif has_copy and hits and hits[0][1] and label_of.get(hits[0][0]) != query.label:
            other_copy_examples.append({"query": query.id, "first_hit": hits[0][0]})
    return {
        **overall,
        "target_copy_recall_at_1": TARGET_COPY_RECALL_AT_1,
        "meets_copy_target": None if overall["copy_recall_at_1"] is None
        else overall["copy_recall_at_1"] >= TARGET_COPY_RECALL_AT_1,
        "target_false_copy_rate": TARGET_FALSE_COPY_RATE,
        "meets_false_copy_target": None if overall["false_copy_rate"] is None
        else overall["false_copy_rate"] <= TARGET_FALSE_COPY_RATE,
        "per_folder": {folder: figures(group) for folder, group in sorted(by_folder.items())},
        "false_copy_examples": false_copy_examples[:MAX_REPORTED_EXAMPLES],
        "first_hit_other_copy_examples": other_copy_examples[:MAX_REPORTED_EXAMPLES],
    }


async def evaluate_copy_set(
    eval_set: EvalSet, gateway: str, *, concurrency: int = 8, keep_collection: bool = False,
    api_key: str | None = None, show_progress: bool = False, collection: str | None = None,
    distractors_dir: Path | None = None, distractor_split: str | None = None, regions: bool = False,
) -> dict:
    """Indexes the catalog rows (with regions when `regions`), searches every query row in copy mode, and the
    distractors (`distractors_dir`, or the set's rows of `distractor_split`) as no-copy queries, drops the
    collection unless `keep_collection`, and returns the report (`copy_set`: `score_copy_set`'s figures)."""
    started = time.perf_counter()
    distractors = await load_distractors(eval_set.catalog, distractors_dir, eval_set.distractors, distractor_split)
    collection = collection or new_collection_name()
    # One more hit than scored, for a query's own hit to drop out.
    hits_wanted = HITS_WANTED + 1
    async with async_gateway_client(gateway, api_key) as client:
        async with evaluation_collection(client, eval_set.catalog, collection, gateway, keep_collection,
                                         show_progress, regions) as indexed:
            search_started = time.perf_counter()
            outcomes, failures = await search_queries(client, eval_set.queries, collection, hits_wanted,
                                                      concurrency, show_progress, "copy")
            search_s = time.perf_counter() - search_started
            if not outcomes:
                raise EvalError(f"every query failed, e.g. {next(iter(failures.items()))}")
            distractor_outcomes, distractor_failures = (
                await search_queries(client, distractors.queries, collection, hits_wanted, concurrency,
                                     show_progress, "copy")
                if distractors and distractors.queries else ([], {}))
    return {
        "copy_set": score_copy_set(outcomes, indexed.indexed),
        **run_report(indexed, outcomes, failures, search_s, concurrency, started, distractors, distractor_outcomes,
                     distractor_failures),
    }


def format_copy_set_report(report: dict) -> str:
    found = report["copy_set"]
    width = max([12, *(len(folder) for folder in found["per_folder"])])
    lines = [f"your copy set, searched in copy mode; {report['catalog_size']} images in the catalog"
             f"{' (with regions)' if report['regions'] else ''}",
             f"{'folder':<{width}} {'copies':>7} {'R@1':>7} {'copy R@1':>9} {'R@10':>7} {'found':>7} {'absent':>7} "
             f"{'other 1st':>9} {'no-copy':>8} {'false':>6}"]
    for name, entry in [*found["per_folder"].items(), ("all", found)]:
        lines.append(f"{name:<{width}} {entry['with_copy']:>7} {figure_text(entry['recall_at_1']):>7} "
                     f"{figure_text(entry['copy_recall_at_1']):>9} {figure_text(entry['recall_at_10']):>7} "
                     f"{figure_text(entry['copy_found']):>7} {entry['relevant_absent']:>7} "
                     f"{entry['first_hit_other_copy']:>9} {entry['without_copy']:>8} {entry['false_copies']:>6}")
    if found["copy_recall_at_1"] is not None:
        verdict = "met" if found["meets_copy_target"] else "MISSED"
        lines.append(f"copy recall@1 (first hit has the query's label, is_copy) {found['copy_recall_at_1']:.4f}: "
                     f"target >= {found['target_copy_recall_at_1']} {verdict}")
    if found["false_copy_rate"] is not None:
        verdict = "met" if found["meets_false_copy_target"] else "MISSED"
        lines.append(f"false copies: {found['false_copies']} of {found['without_copy']} queries whose label no catalog "
                     f"image has (rate {found['false_copy_rate']:.4f}; target <= {found['target_false_copy_rate']} "
                     f"{verdict})")
    return "\n".join(lines + format_run_lines(report))
