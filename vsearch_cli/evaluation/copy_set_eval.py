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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vsearch_cli.evaluation.copy_eval import (
    HITS_WANTED, MAX_REPORTED_EXAMPLES, TARGET_COPY_RECALL_AT_1, TARGET_FALSE_COPY_RATE, figure_text,
    format_run_lines, load_distractors, run_report, share_of,
)
from vsearch_cli.evaluation.eval_command import (
    EvalError, EvalSet, LabelledImage, QueryOutcome, evaluation_collection, new_collection_name, relevant_count,
    search_queries,
)
from vsearch_cli.gateway_connection import async_gateway_client

TOP_FOLDER = "(top)"
# The misses the text report lists (--json has them all).
MISSED_SHOWN = 10


def query_folder(query: LabelledImage) -> str:
    """The folder a query's path names (relative to the images root), TOP_FOLDER for none."""
    parent = Path(query.id).parent.as_posix()
    return TOP_FOLDER if parent in ("", ".") else parent


@dataclass(frozen=True)
class JudgedQuery:
    """One copy-set query's answer, read against the labels: its hits (id, is_copy) without its own, and
    the ranks among them of the hits with its label (None: a query with no copy in the catalog)."""

    query: LabelledImage
    hits: list[tuple[str, bool]]
    relevant_ranks: list[int] | None

    @property
    def first_relevant(self) -> int | None:
        """The rank of the first hit with the query's label, None without one."""
        return self.relevant_ranks[0] if self.relevant_ranks else None

    @property
    def false_copy(self) -> str | None:
        """The first hit called a copy, for a query with no copy in the catalog."""
        if self.relevant_ranks is not None:
            return None
        return next((hit_id for hit_id, is_copy in self.hits if is_copy), None)

    @property
    def missed(self) -> str | None:
        """Why a query with a copy in the catalog did not find it first as a copy (None: it did, or it has
        none): its original not among the hits, another image first, or found first but not verified."""
        if self.relevant_ranks is None:
            return None
        if self.first_relevant is None:
            return "not among the hits"
        if self.first_relevant > 0:
            return f"another image first (its original at rank {self.first_relevant + 1})"
        return None if self.hits[0][1] else "first, but not verified a copy"

    @property
    def other_copy_first(self) -> str | None:
        """The first hit, when it is called a copy without the query's label (a query with a copy)."""
        if self.relevant_ranks is None or not self.hits or not self.hits[0][1] or self.first_relevant == 0:
            return None
        return self.hits[0][0]


def judge(outcome: QueryOutcome, label_of: dict[str, str], label_counts: Counter) -> JudgedQuery:
    query = outcome.query
    # A query that is itself a catalog row: its own hit neither counts nor makes it a query with a copy.
    hits = [(hit_id, verdict is True) for hit_id, verdict in zip(outcome.ranked_ids, outcome.copy_verdicts)
            if hit_id != query.id]
    if relevant_count(query, label_of, label_counts) <= 0:
        return JudgedQuery(query, hits, None)
    return JudgedQuery(query, hits, [rank for rank, (hit_id, _) in enumerate(hits) if label_of.get(hit_id) == query.label])


def figures(group: Sequence[JudgedQuery]) -> dict:
    with_copy = [judged for judged in group if judged.relevant_ranks is not None]
    without = len(group) - len(with_copy)
    first = [judged for judged in with_copy if judged.first_relevant == 0]
    false_copies = sum(judged.false_copy is not None for judged in group)
    return {
        "queries": len(group), "with_copy": len(with_copy),
        "recall_at_1": share_of(len(first), len(with_copy)),
        "copy_recall_at_1": share_of(sum(judged.hits[0][1] for judged in first), len(with_copy)),
        "recall_at_10": share_of(sum(judged.first_relevant is not None and judged.first_relevant < 10
                                     for judged in with_copy), len(with_copy)),
        "copy_found": share_of(sum(any(judged.hits[rank][1] for rank in judged.relevant_ranks)
                                   for judged in with_copy), len(with_copy)),
        "relevant_absent": sum(judged.first_relevant is None for judged in with_copy),
        "first_hit_other_copy": sum(judged.other_copy_first is not None for judged in with_copy),
        "without_copy": without, "false_copies": false_copies, "false_copy_rate": share_of(false_copies, without),
    }


def score_copy_set(outcomes: Sequence[QueryOutcome], catalog: Sequence[LabelledImage]) -> dict:
    """Over all queries and per folder of them (`query_folder`): for copy queries (their label has a catalog
    image other than themselves) recall_at_1 (the first hit has the label), copy_recall_at_1 (and is verified
    a copy), recall_at_10, copy_found (a hit with the label is verified a copy, at any rank), relevant_absent
    (no hit has the label) and first_hit_other_copy (the first hit is verified a copy but has another label);
    for no-copy queries false_copies (any hit verified a copy) and false_copy_rate."""
    label_of = {image.id: image.label for image in catalog}
    label_counts = Counter(image.label for image in catalog)
    # In the queries' order by id, not the order the searches ended in: the same run lists the same way.
    judged = sorted((judge(outcome, label_of, label_counts) for outcome in outcomes), key=lambda one: one.query.id)
    by_folder: dict[str, list[JudgedQuery]] = {}
    for one in judged:
        by_folder.setdefault(query_folder(one.query), []).append(one)
    overall = figures(judged)
    return {
        **overall,
        "target_copy_recall_at_1": TARGET_COPY_RECALL_AT_1,
        "meets_copy_target": None if overall["copy_recall_at_1"] is None
        else overall["copy_recall_at_1"] >= TARGET_COPY_RECALL_AT_1,
        "target_false_copy_rate": TARGET_FALSE_COPY_RATE,
        "meets_false_copy_target": None if overall["false_copy_rate"] is None
        else overall["false_copy_rate"] <= TARGET_FALSE_COPY_RATE,
        "per_folder": {folder: figures(group) for folder, group in sorted(by_folder.items())},
        # Which queries went wrong, for a look at them.
        "false_copy_examples": [{"query": one.query.id, "copy_hit": one.false_copy}
                                for one in judged if one.false_copy is not None][:MAX_REPORTED_EXAMPLES],
        "first_hit_other_copy_examples": [{"query": one.query.id, "first_hit": one.other_copy_first}
                                          for one in judged if one.other_copy_first is not None][:MAX_REPORTED_EXAMPLES],
        # Every copy query that missed copy recall@1, and why: a set of one's own is looked at query by query.
        "missed": [{"query": one.query.id, "why": one.missed, "first_hit": one.hits[0][0] if one.hits else None}
                   for one in judged if one.missed is not None],
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
    shown = found["missed"][:MISSED_SHOWN]
    lines += [f"  missed {miss['query']}: {miss['why']}" for miss in shown]
    if len(found["missed"]) > len(shown):
        lines.append(f"  ... {len(found['missed']) - len(shown)} more missed (all in --json: copy_set.missed)")
    return "\n".join(lines + format_run_lines(report))
