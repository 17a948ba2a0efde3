"""The `vsearch` command line: run the local stack, index images, search, and manage models."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from vsearch_cli.bench import command as bench
from vsearch_cli.model_tools import command as cli_model
from vsearch_cli.evaluation import eval_command as evaluation
from vsearch_cli.keys import command as api_keys
from vsearch_cli.catalog import backup as catalog_backup
from vsearch_cli.catalog import ingest
from vsearch_cli.catalog import overview as catalog_overview
from vsearch_cli.duplicates import command as duplicates
from vsearch_cli.gateway_connection import add_gateway_arguments, gateway_client, report_gateway_failure
from vsearch_cli.local_stack.launcher import LocalStack
from vsearch_cli.local_stack.layout import StackLayout
from vsearch_cli.local_stack.ports import free_port, free_port_run, port_is_free
from vsearch_cli.local_stack.supervisor import RestartPolicy, Supervisor
from vsearch.client import OPERATORS, Box, Hit, SearchResult, VsearchError

DEFAULT_DATA_DIR = Path(".vsearch")


# ---- up -------------------------------------------------------------------------------------

def redis_memory(text: str) -> str:
    """A size as redis-server's --maxmemory reads it: a number, optionally with a unit (256mb, 1gb)."""
    if not re.fullmatch(r"\d+(b|k|kb|m|mb|g|gb)?", text, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"a size like 256mb or 1gb, got {text!r}")
    return text.lower()


def replicas_problem(args: argparse.Namespace) -> str | None:
    """Why `--replicas N` (N > 1) cannot run as asked, if it cannot."""
    if args.search_backend == "faiss":
        return ("--replicas needs the Milvus backend (replicas share one Milvus server); FAISS keeps its index "
                "inside each search_svc process")
    if args.no_redis or shutil.which("redis-server") is None:
        return ("--replicas needs redis-server (apt-get install redis-server): the gateways share the cache and "
                "its index generation through it; with in-process caches a write through one gateway would "
                "not reach the others' cached results")
    return None


def up_banner(layout: StackLayout, cache: str) -> str:
    """The line `vsearch up` prints once everything is ready. It starts "vsearch up: gateway grpc ADDR
    http URL" (gateway 0); with replicas, every gateway and every search replica has its own "| gateway
    grpc ADDR http URL" and "| search ADDR" part, in order (gateway i uses search replica i)."""
    parts = []
    for index in range(layout.replicas):
        grpc_port, http_port = layout.gateway_ports(index)
        parts.append(f"gateway grpc 127.0.0.1:{grpc_port} http http://127.0.0.1:{http_port}")
    triton = f" (model on Triton grpc {layout.triton_url})" if layout.triton_url else ""
    parts.append(f"embedder 127.0.0.1:{layout.embedder_port}{triton}")
    parts += [f"search 127.0.0.1:{port}" for port in layout.search_ports]
    if layout.milvus_uri:
        parts.append(f"milvus {layout.milvus_uri} ({layout.data_dir / 'milvus.db'})")
    parts += [f"cache {cache}", f"data {layout.data_dir}", "Ctrl-C stops"]
    return "vsearch up: " + " | ".join(parts)


def up_addresses(layout: StackLayout, cache: str) -> dict[str, Any]:
    """What `vsearch up --json` prints once everything is ready: every address, once (gateway i uses
    search replica i)."""
    gateways = []
    for index in range(layout.replicas):
        grpc_port, http_port = layout.gateway_ports(index)
        gateways.append({"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"})
    return {
        "gateways": gateways, "embedder": f"127.0.0.1:{layout.embedder_port}", "triton": layout.triton_url,
        "search": [f"127.0.0.1:{port}" for port in layout.search_ports], "milvus": layout.milvus_uri,
        "redis": layout.redis_url, "cache": cache, "data_dir": str(layout.data_dir),
    }


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def cmd_up(args: argparse.Namespace) -> int:
    from embedder_svc.model_card import ModelCardError, read_model_card
    from vsearch_cli.model_tools.prepare import ModelPrepareError, ensure_model

    if args.replicas > 1 and (problem := replicas_problem(args)) is not None:
        print(f"vsearch up: {problem}", file=sys.stderr)
        return 1
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Port 0 picks free ports now (consecutive ones for replicas): a child restarted by the supervisor
    # must come back on the same one.
    args.grpc_port, args.http_port = (port or free_port_run(args.replicas) for port in (args.grpc_port, args.http_port))
    for base, flag in ((args.grpc_port, "--grpc-port"), (args.http_port, "--http-port")):
        for port in range(base, base + args.replicas):
            if not port_is_free(port):
                print(f"vsearch up: port {port} ({flag}{f' + {port - base}' if port > base else ''}) is already in use",
                      file=sys.stderr)
                return 1
    try:
        model_dir = Path(args.model_dir).resolve() if args.model_dir else ensure_model(args.model, data_dir / "models")
        # search_svc's vectors must have the model's dimension.
        dimension = read_model_card(model_dir).output.dimension
    except (ModelPrepareError, ModelCardError) as error:
        print(f"vsearch up: cannot use model {args.model_dir or args.model}: {error}", file=sys.stderr)
        return 1
    triton, triton_model = None, None
    if args.triton:
        from vsearch_cli.model_tools.triton_repo import TritonRepoError
        from vsearch_cli.local_stack.triton import prepare_local_triton

        try:
            triton, triton_model = prepare_local_triton(data_dir, model_dir)
        except (RuntimeError, TritonRepoError) as error:
            print(f"vsearch up: cannot set up Triton: {error}", file=sys.stderr)
            return 1
    layout = StackLayout(
        data_dir=data_dir, model_dir=model_dir, gateway_port=args.grpc_port, http_port=args.http_port,
        search_dimension=dimension,
        redis_port=None if args.no_redis else free_port(), redis_maxmemory=args.redis_maxmemory,
        triton_url=triton.grpc_url if triton else None, triton_model_name=triton_model,
        image_roots=[Path(root) for root in args.image_root],
        search_backend=args.search_backend, replicas=args.replicas,
    )
    stack = LocalStack(layout, data_dir / "logs", triton)
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        asyncio.run(stack.start(timeout=args.timeout, stop_requested=lambda: stop_requested))
    except (RuntimeError, TimeoutError) as error:
        print(f"vsearch up: could not start: {error}\nvsearch up: logs in {data_dir / 'logs'}", file=sys.stderr)
        stack.stop()
        return 1
    if layout.redis_url:
        cache = f"{layout.redis_url} (maxmemory {layout.redis_maxmemory}, allkeys-lru)"
    else:
        cache = "in-process cache (" + ("--no-redis" if args.no_redis else "no redis-server found") + ")"
    print(json.dumps(up_addresses(layout, cache)) if args.json else up_banner(layout, cache), flush=True)
    supervisor = Supervisor(stack, RestartPolicy(ready_timeout_s=args.timeout))
    failure = None
    try:
        failure = supervisor.run(lambda: stop_requested)
        if failure is not None:
            print(f"vsearch up: giving up: {failure}\nvsearch up: stopping everything", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    # With --json, stdout holds the one JSON line only.
    print("vsearch up: stopped", file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0 if failure is None else 1


# ---- search ---------------------------------------------------------------------------------

# Searches wait this long, UNAVAILABLE retries included.
SEARCH_TIMEOUT_S = 30.0


def parse_crop(text: str) -> Box:
    try:
        x, y, width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop must be x,y,w,h in pixels, got {text!r}") from None
    if min(x, y) < 0 or width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"crop needs x,y >= 0 and w,h > 0, got {text!r}")
    return Box(x, y, width, height)


def parse_value(text: str) -> Any:
    """A JSON literal when the text is one (3.5, true, ["a","b"], "123"), else the text as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def where_conditions(where: Sequence[Sequence[str]]) -> list[tuple[str, str, Any]]:
    """`--where FIELD OP VALUE`s as the client's conditions (the client refuses an unknown OP)."""
    return [(field_name, op, parse_value(value)) for field_name, op, value in where]


def check_search_arguments(args: argparse.Namespace) -> None:
    """Exactly one query (IMAGE, --item-id or --text), and the options that go with it; else a usage error."""
    given = [name for name, value in (("IMAGE", args.image), ("--item-id", args.item_id), ("--text", args.text))
             if value is not None]
    if not given:
        args.usage_error("give IMAGE, --item-id ID or --text WORDS")
    if len(given) > 1:
        args.usage_error(f"give one of IMAGE, --item-id or --text, not both: got {' and '.join(given)}")
    if args.crop is not None and args.image is None:
        args.usage_error(f"--crop applies only to an image, not to {given[0]}")
    if args.copies and args.text is not None:
        args.usage_error("--copies finds copies of an image (or of an indexed item), not of --text")


def cmd_search(args: argparse.Namespace) -> int:
    check_search_arguments(args)
    try:
        with gateway_client(args) as client:
            result = client.search(
                Path(args.image) if args.image is not None else None, item_id=args.item_id, text=args.text,
                crop=args.crop, k=args.k, where=where_conditions(args.where or []), min_score=args.min_score,
                min_probability=args.min_probability, collection=args.collection,
                mode="copy" if args.copies else "similar", page_token=args.page_token, timeout=SEARCH_TIMEOUT_S,
            )
    except OSError as error:
        print(f"vsearch search: cannot read {args.image}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"vsearch search: {error}", file=sys.stderr)
        return 2
    except VsearchError as error:
        return report_gateway_failure("search", args.gateway, error)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print_search_result(result)
    return 0


def print_search_result(result: SearchResult) -> None:
    timing = result.timing
    if result.understood_as:
        print(f"understood as: {result.understood_as}")
    if result.no_match_reason:
        print(f"no match: {result.no_match_reason}")
    elif result.no_good_match:
        print("no good match: " + ("no hits" if not result.hits else
                                   f"the best hit's match probability is {result.hits[0].match_probability:.2f}"))
    print(f"{len(result.hits)} hits in {timing.total_ms:.1f} ms (embed {timing.embed_ms:.1f}, "
          f"search {timing.search_ms:.1f}){' from cache' if result.from_cache else ''}")
    for rank, hit in enumerate(result.hits, 1):
        probability = f"  p={hit.match_probability:.2f}" if hit.match_probability is not None else ""
        print(f"{rank:>3}  {hit.score:.4f}{probability}{copy_verdict(hit)}{matched_region(hit)}  {hit.id}  "
              f"{hit.image_uri}  {json.dumps(hit.metadata)}")
    if result.next_page_token:
        print(f"next page: --page-token {result.next_page_token}")


def matched_region(hit: Hit) -> str:
    """"  region x,y,wxh" when a region of the hit's image matched (a collection indexed with regions)."""
    if hit.matched_region is None:
        return ""
    box = hit.matched_region
    return f"  region {box.x},{box.y},{box.width}x{box.height}"


def copy_verdict(hit: Hit) -> str:
    """A copy search's verdict on a hit, for the text output: "  COPY 0.91 at x,y,wxh" or "  copy 0.12";
    nothing for a similar search's hit."""
    if hit.is_copy is None:
        return ""
    if not hit.is_copy:
        return f"  copy {hit.copy_score or 0.0:.2f}"
    box = hit.matched_box
    where = f" at {box.x},{box.y},{box.width}x{box.height}" if box is not None else ""
    return f"  COPY {hit.copy_score or 0.0:.2f}{where}"


# ---- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack locally; Ctrl-C stops it")
    up.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="models, Milvus file and logs (default .vsearch)")
    up.add_argument("--grpc-port", type=int, default=50051, help="the gateway's gRPC port (0: a free one)")
    up.add_argument("--http-port", type=int, default=8080, help="the gateway's HTTP port (0: a free one)")
    up.add_argument("--model", default="mobilenetv2-12-int8", help="model preset to prepare and serve")
    up.add_argument("--model-dir", help="serve this prepared model directory instead (e.g. from `vsearch model pca` "
                                        "or `quantize`); use a --data-dir whose index has the model's dimension")
    up.add_argument("--replicas", type=_at_least_one, default=1, metavar="N",
                    help="N gateways (gRPC on --grpc-port + i, HTTP on --http-port + i) and N search_svc replicas "
                         "over one Milvus server (Milvus Lite in server mode, under --data-dir) and one Redis; "
                         "gateway i talks to search replica i")
    up.add_argument("--search-backend", choices=["faiss", "milvus"],
                    help="search_svc's store: in-process FAISS (the default) or Milvus Lite, under --data-dir")
    up.add_argument("--no-redis", action="store_true", help="use the in-process cache even if redis-server exists")
    up.add_argument("--redis-maxmemory", type=redis_memory, default="256mb", metavar="SIZE",
                    help="memory cap of the Redis cache it starts (redis-server --maxmemory, least recently used "
                         "keys evicted beyond it): e.g. 256mb (the default), 1gb; 0 for no cap")
    up.add_argument("--image-root", action="append", default=[], metavar="DIR",
                    help="let the web page show indexed images stored under DIR (repeatable)")
    up.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for every service to be SERVING, at start and after a restart")
    up.add_argument("--triton", action="store_true",
                    help="run the model on a local CPU Triton Inference Server (installed into .venv-triton by "
                         "scripts/setup-triton on first use); the embedder talks to it over gRPC")
    up.add_argument("--json", action="store_true",
                    help="once everything is ready, print one JSON line of every address instead of the banner")
    up.set_defaults(func=cmd_up)

    search = sub.add_parser("search", help="find the catalog images most similar to IMAGE, to an indexed item, "
                                           "or matching --text")
    search.add_argument("image", nargs="?", help="the query image (or give --item-id or --text)")
    search.add_argument("--item-id", metavar="ID", help="search with an indexed item's stored vector instead")
    search.add_argument("--text", help="search by words instead of an image (\"a red running shoe\"), when the "
                                       "model supports it")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--crop", type=parse_crop, help="x,y,w,h in pixels")
    search.add_argument("--where", nargs=3, action="append", metavar=("FIELD", "OP", "VALUE"),
                        help=f"filter; OP one of {' '.join(OPERATORS)}; VALUE a JSON literal (3.5, true, "
                             "[\"a\",\"b\"]) or else a string; repeat for AND")
    search.add_argument("--min-score", type=float)
    search.add_argument("--min-probability", type=float,
                        help="only hits whose match probability is at least this (0..1; needs a calibrated model)")
    search.add_argument("--copies", action="store_true",
                        help="copy search: is IMAGE (or --item-id's image) a copy (cropped, mirrored, greyed, "
                             "recompressed...) of catalog images? Verified copies come first, marked COPY with their "
                             "score and where IMAGE lies in them (x,y,wxh); --min-score and --min-probability apply "
                             "to the other hits")
    add_gateway_arguments(search)
    search.add_argument("--collection", default="", help="catalog to search (default: the default one)")
    search.add_argument("--page-token", default="", metavar="TOKEN",
                        help="the next page of a search: the token the previous page printed, with the same query")
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.set_defaults(func=cmd_search, usage_error=search.error)

    ingest.register(sub)
    catalog_overview.register(sub)
    catalog_backup.register(sub)
    duplicates.register(sub)
    cli_model.register(sub)
    evaluation.register(sub)
    bench.register(sub)
    api_keys.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
