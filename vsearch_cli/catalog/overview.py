"""`vsearch stats` and `vsearch collections list|drop`: what the catalog holds, through the gateway."""

from __future__ import annotations

import argparse
import json
import sys

from vsearch.client import CollectionStats, FieldSummary, NotFound, VsearchError
from vsearch_cli.gateway_connection import add_gateway_arguments, gateway_client, report_gateway_failure

# Values of a string field shown in the text output (--json has every one the gateway sent).
SHOWN_VALUES = 10


def describe_field(summary: FieldSummary) -> str:
    """One field summary for people: "category (string): 56 items; shoes 30, bags 20, ..." or
    "price (float): 40 items; 9.5 .. 120"."""
    line = f"{summary.name} ({summary.type}): {summary.present} items"
    if summary.min is not None and summary.max is not None:
        return f"{line}; {summary.min:g} .. {summary.max:g}"
    if summary.top_values:
        values = ", ".join(f"{value.value} {value.count}" for value in summary.top_values[:SHOWN_VALUES])
        more = summary.more_values or len(summary.top_values) > SHOWN_VALUES
        return f"{line}; {values}{', ...' if more else ''}"
    return line


def print_stats(collection: str, stats: CollectionStats, fields: bool) -> None:
    print(f"collection {collection or '(default)'}: {stats.count} items, generation {stats.index_generation}")
    print(f"  index {stats.index_type} ({stats.metric}), {stats.dimension}-d; model {stats.model_name} "
          f"(version {stats.model_version})")
    print(f"  filterable fields: {', '.join(stats.filterable_fields) or 'none'}; search by words: "
          f"{stats.text_search or 'no'}; calibrated: {'yes' if stats.calibrated else 'no'}; "
          f"regions: {'yes' if stats.regions else 'no'}")
    if fields:
        for summary in stats.field_summaries:
            print(f"  {describe_field(summary)}")


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        with gateway_client(args) as client:
            stats = client.stats(collection=args.collection, field_summaries=args.fields)
    except VsearchError as error:
        return report_gateway_failure("stats", args.gateway, error)
    if args.json:
        print(json.dumps({"collection": args.collection, **stats.to_dict()}))
    else:
        print_stats(args.collection, stats, args.fields)
    return 0


def cmd_collections_list(args: argparse.Namespace) -> int:
    try:
        with gateway_client(args) as client:
            collections = client.collections()
    except VsearchError as error:
        return report_gateway_failure("collections list", args.gateway, error)
    if args.json:
        print(json.dumps({"collections": [entry.to_dict() for entry in collections]}))
        return 0
    print(f"{'NAME':<32} {'ITEMS':>10}  NOTES")
    for entry in collections:
        notes = ", ".join(note for note, present in (("default", entry.is_default), ("regions", entry.regions)) if present)
        print(f"{entry.name:<32} {entry.count:>10}  {notes}")
    return 0


def confirmed(name: str, count: int | None) -> bool:
    """Asks on the terminal whether to drop `name` (holding `count` items, when known)."""
    holding = f" and its {count} items" if count is not None else ""
    print(f"Drop collection {name!r}{holding}? This cannot be undone. [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def cmd_collections_drop(args: argparse.Namespace) -> int:
    command = "collections drop"
    if not args.yes and not sys.stdin.isatty():
        print(f"vsearch {command}: refusing to drop {args.name!r} without --yes (stdin is not a terminal to ask on)",
              file=sys.stderr)
        return 2
    try:
        with gateway_client(args) as client:
            if not args.yes:
                try:
                    count: int | None = client.stats(collection=args.name).count
                except NotFound:
                    count = None
                if not confirmed(args.name, count):
                    print(f"vsearch {command}: not dropped", file=sys.stderr)
                    return 1
            result = client.drop_collection(args.name)
    except VsearchError as error:
        return report_gateway_failure(command, args.gateway, error)
    if args.json:
        print(json.dumps({"collection": args.name, **result.to_dict()}))
    elif result.dropped:
        print(f"dropped collection {args.name}")
    else:
        print(f"no collection named {args.name}: nothing to drop")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    stats = sub.add_parser("stats", help="a collection's size, index, model and filterable fields")
    stats.add_argument("--collection", default="", help="the collection (default: the default one)")
    stats.add_argument("--fields", action="store_true",
                       help="also what each filterable field holds: its most frequent values, or its range")
    add_gateway_arguments(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=cmd_stats)

    collections = sub.add_parser("collections", help="list the catalog's collections, or drop one")
    commands = collections.add_subparsers(dest="collections_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="every collection, with its item count")
    add_gateway_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=cmd_collections_list)
    drop = commands.add_parser("drop", help="remove a whole collection (not the default one)")
    drop.add_argument("name", help="the collection to drop")
    drop.add_argument("--yes", action="store_true",
                      help="do not ask (needed when stdin is not a terminal, as in scripts)")
    add_gateway_arguments(drop)
    drop.add_argument("--json", action="store_true", help="print one JSON object")
    drop.set_defaults(func=cmd_collections_drop)
