"""`vsearch duplicates [--collection C] [--json | --html FILE]`: the catalog's near-duplicate groups in
three tiers, exact bytes, verified copies and similar images (see scan.py for how they are found and
grouping.py for how they are grouped), with each group's size and representative image."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tqdm import tqdm

from vsearch.client import VsearchError
from vsearch_cli.duplicates.grouping import DuplicateGroups
from vsearch_cli.duplicates.report import summary, write_html, write_json, write_text
from vsearch_cli.duplicates.scan import ScanCounts, ScanError, scan_catalog, similar_threshold
from vsearch_cli.gateway_connection import add_gateway_arguments, async_gateway_client, gateway_failure

# Hits per item's search: enough for every copy of an item in a catalog with a few copies of each image
# (a group larger than this is still joined whole through its members' own searches).
DEFAULT_K = 10
# Each hit of a copy search is one pair verified: more than this is a similarity scan, not a duplicate one.
MAX_K = 100
DEFAULT_CONCURRENCY = 8
CONNECT_TIMEOUT_S = 20.0
STATS_TIMEOUT_S = 30.0


async def find_duplicates(args: argparse.Namespace, progress: tqdm) -> dict:
    async with async_gateway_client(args.gateway, args.api_key) as client:
        if not await client.wait_ready(CONNECT_TIMEOUT_S):
            raise ScanError(f"gateway {args.gateway}: UNAVAILABLE: not reachable after {CONNECT_TIMEOUT_S:.0f}s")
        try:
            stats = await client.stats(collection=args.collection, timeout=STATS_TIMEOUT_S)
        except VsearchError as error:
            raise ScanError(gateway_failure(args.gateway, error)) from None
        progress.total = stats.count
        threshold = similar_threshold(stats.calibrated, args.similar_above)
        groups = DuplicateGroups()
        counts = ScanCounts()
        await scan_catalog(client, args.collection, args.k, threshold, args.concurrency, groups, counts,
                           progress.update)
    elapsed = counts.elapsed_s
    found = groups.groups()
    report = summary(found, {
        "collection": args.collection, "model_version": stats.model_version, "items": counts.listed,
        "searched": counts.searched, "without_copy_features": counts.without_copy_features, "gone": counts.gone,
        "similar_threshold": {"kind": threshold.kind, "value": threshold.value, "chosen_by": threshold.chosen_by},
        "k": args.k, "concurrency": args.concurrency,
        "elapsed_s": round(elapsed, 3), "items_per_s": round(counts.listed / elapsed, 2) if elapsed > 0 else 0.0,
    })
    return {"report": report, "groups": found}


def cmd_duplicates(args: argparse.Namespace) -> int:
    if not 1 <= args.k <= MAX_K:
        print(f"vsearch duplicates: -k must be 1..{MAX_K}", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("vsearch duplicates: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if args.similar_above is not None and not 0.0 <= args.similar_above <= 1.0:
        print("vsearch duplicates: --similar-above must be within [0, 1]", file=sys.stderr)
        return 2
    show_progress = args.progress or sys.stderr.isatty()
    progress = tqdm(unit="item", disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    try:
        found = asyncio.run(find_duplicates(args, progress))
    except ScanError as error:
        print(f"vsearch duplicates: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        progress.close()
    report = found["report"]
    print(f"vsearch duplicates: {report['items']} items in {report['elapsed_s']:.1f} s "
          f"({report['items_per_s']:.1f} items/s)", file=sys.stderr)
    if args.html is not None:
        write_html(found["groups"], report, Path(args.html))
        print(f"vsearch duplicates: wrote {args.html}", file=sys.stderr)
    if args.json:
        write_json(report, sys.stdout)
    elif args.html is None:
        write_text(report, sys.stdout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    duplicates = sub.add_parser(
        "duplicates", help="near-duplicate groups of a catalog: exact bytes, verified copies, similar images")
    duplicates.add_argument("--collection", default="", help="catalog to scan (default: the default one)")
    add_gateway_arguments(duplicates)
    output = duplicates.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object (every group and its members)")
    output.add_argument("--html", metavar="FILE", help="write a self-contained page with thumbnails to FILE")
    duplicates.add_argument(
        "--similar-above", type=float, metavar="X",
        help="hits that are not verified copies join a similar group when their match probability (calibrated "
             "models) or else their cosine score is at least X (default: probability 0.9, or cosine 0.9)")
    duplicates.add_argument("-k", type=int, default=DEFAULT_K,
                            help=f"hits looked at per item (default {DEFAULT_K}, at most {MAX_K})")
    duplicates.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                            help=f"searches in flight (default {DEFAULT_CONCURRENCY})")
    duplicates.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    duplicates.set_defaults(func=cmd_duplicates)
