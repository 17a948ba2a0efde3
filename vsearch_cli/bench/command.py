"""`vsearch bench ingest|search|ann|all`: measures the stack on this machine, prints a table per section
and writes every figure, the machine and the settings to one JSON file.

Everything in one run shares the machine, so ratios (end to end vs. the parts alone, cache hit vs.
miss, index vs. exact) hold even on a busy box where absolute numbers do not. With no --gateway the
bench starts the stack itself (as `vsearch up`, on free ports and a temporary data directory) and
stops it afterwards; EMBEDDER_*, SEARCH_* and GATEWAY_* variables reach it (and the bench's own
model-alone figures) as they would reach `vsearch up`.

The sections' modules (numpy, onnxruntime, pymilvus, ...) are imported when a bench runs, not when
the CLI starts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(".vsearch")
DEFAULT_OUT_DIR = Path(".bench")
SECTIONS = ("ingest", "search", "ann")
# Small enough that `vsearch bench all` takes a few minutes on 2 cores; larger runs go by flags.
DEFAULT_INGEST_IMAGES = 300
DEFAULT_NAIVE_IMAGES = 100
DEFAULT_SEARCH_CATALOG = 300
DEFAULT_SEARCH_REQUESTS = 100
DEFAULT_CONCURRENCY = [1, 8, 32]
DEFAULT_ANN_SIZES = [20_000]
DEFAULT_NPROBES = [8, 32, 128]
# Like `vsearch index`: chunks of 64 images per AddImages stream, two streams in flight.
DEFAULT_CHUNK = 64
DEFAULT_STREAMS = 2


def default_dataset() -> Path:
    from vsearch_cli.checkout import default_shared_dir

    return default_shared_dir() / "datasets" / "caltech101" / "101_ObjectCategories"


# ---- arguments ------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="JSON file to write (default .bench/bench-SECTION.json)")
    common.add_argument("--gateway", help="a running gateway (default: start the stack here, on free ports)")
    common.add_argument("--search",
                        help="its search_svc, for the floor and naive figures (known when the bench starts the stack)")
    common.add_argument("--embedder", help="its embedder, for the embedder-alone search latency (optional)")
    common.add_argument("--model-dir", type=Path,
                        help="the prepared model the embedder serves (default: prepare --model into DATA_DIR/models)")
    common.add_argument("--model", default="mobilenetv2-12-int8", help="model preset, when no --model-dir")
    common.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where prepared models are kept (default .vsearch)")
    common.add_argument("--images", type=Path, help="image folder to sample from (default: shared Caltech-101)")
    common.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same images and vectors)")
    common.add_argument("--no-redis", action="store_true", help="started stack: in-process cache even if redis-server exists")
    common.add_argument("--keep", action="store_true", help="keep the started stack's data directory and the ANN files")
    common.add_argument("--profile", action="store_true",
                        help="py-spy the started stack's services during the end-to-end ingest and the searches")
    common.add_argument("--json", action="store_true",
                        help="print the report (what --out gets) as one JSON object; the tables go to stderr")
    return common


def _client_options() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--streams", type=_positive, default=DEFAULT_STREAMS, help="AddImages streams in flight")
    client.add_argument("--chunk", type=_positive, default=DEFAULT_CHUNK, help="images per AddImages stream")
    return client


def _ingest_options() -> argparse.ArgumentParser:
    ingest = argparse.ArgumentParser(add_help=False)
    ingest.add_argument("--ingest-images", type=_positive, default=DEFAULT_INGEST_IMAGES, help="images to ingest end to end")
    ingest.add_argument("--naive-images", type=_positive, default=DEFAULT_NAIVE_IMAGES, help="images for the naive loop")
    ingest.add_argument("--batch-size", type=_positive, help="model-alone batch (default: the gateway's AddImages batch)")
    ingest.add_argument("--repeat", type=_positive, default=1,
                        help="measure everything this many times, interleaved, and report medians (noisy machines)")
    return ingest


def _search_options() -> argparse.ArgumentParser:
    search = argparse.ArgumentParser(add_help=False)
    search.add_argument("--search-catalog", type=_positive, default=DEFAULT_SEARCH_CATALOG, help="images indexed to search in")
    search.add_argument("--requests", type=_positive, default=DEFAULT_SEARCH_REQUESTS,
                        help="searches per (concurrency, cache) level; at least 4 per caller")
    search.add_argument("--concurrency", type=_positive, nargs="+", default=DEFAULT_CONCURRENCY, help="concurrent callers")
    search.add_argument("--hit-set", type=_positive, default=16, help="distinct images repeated by the cache-hit runs")
    search.add_argument("--floor-samples", type=_positive, default=30, help="single queries timed for the floor")
    search.add_argument("-k", type=_positive, default=10, help="hits per search")
    search.add_argument("--modes", nargs="+", choices=("similar", "copy"), default=["similar", "copy"],
                        help="search modes measured at cache miss, one after the other at each concurrency "
                             "(default both; similar, the reference of every ratio, is always measured)")
    return search


def _ann_options() -> argparse.ArgumentParser:
    ann = argparse.ArgumentParser(add_help=False)
    ann.add_argument("--ann-sizes", type=_positive, nargs="+", default=DEFAULT_ANN_SIZES, help="vector counts")
    ann.add_argument("--index-types", nargs="*", default=["FLAT", "IVF_FLAT"], type=str.upper,
                     help="FLAT, IVF_FLAT (both backends), AUTOINDEX (Milvus Lite); none at all: raw faiss only")
    ann.add_argument("--backends", nargs="+", default=["faiss", "milvus"], choices=["faiss", "milvus"],
                     help="search_svc backends to measure")
    ann.add_argument("--nprobe", type=_positive, nargs="+", default=DEFAULT_NPROBES, help="IVF search settings to try")
    ann.add_argument("--nlist", type=_positive, help="IVF lists (default 4*sqrt(n), a power of two)")
    ann.add_argument("--clusters", type=_positive, default=1000, help="Gaussian clusters of the synthetic vectors")
    ann.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the cluster centre")
    ann.add_argument("--dimension", type=_positive, help="vector length (default: the model's)")
    ann.add_argument("--queries", type=_positive, default=200, help="batch-1 queries timed")
    ann.add_argument("--batch-requests", type=_positive, default=5, help="batch-100 requests timed")
    ann.add_argument("--recall-queries", type=_positive, default=100, help="queries checked against exact search")
    ann.add_argument("--no-faiss", action="store_true", help="skip raw faiss-cpu (HNSW, IVF) without a service")
    ann.add_argument("--work-dir", type=Path, help="where the stores' files go (default: .bench/ann-work)")
    return ann


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure ingest, search, ANN and embedder speed on this machine",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = bench.add_subparsers(dest="section", metavar="SECTION", required=True)
    common, client = _common_options(), _client_options()
    ingest, search, ann = _ingest_options(), _search_options(), _ann_options()

    parser = sections.add_parser("ingest", parents=[common, client, ingest], help="AddImages images/s vs. its parts")
    parser.add_argument("size", nargs="?", type=_positive, help="images to ingest (same as --ingest-images)")
    parser.set_defaults(func=cmd_bench)
    parser = sections.add_parser("search", parents=[common, client, search], help="Search latency, cache miss and hit")
    parser.add_argument("size", nargs="?", type=_positive, help="catalog images (same as --search-catalog)")
    parser.set_defaults(func=cmd_bench)
    parser = sections.add_parser("ann", parents=[common, ann], help="search_svc index types: build, memory, QPS, recall")
    parser.add_argument("sizes", nargs="*", type=_positive, help="vector counts (same as --ann-sizes)")
    parser.set_defaults(func=cmd_bench)
    parser = sections.add_parser("all", parents=[common, client, ingest, search, ann], help="ingest, search and ann")
    parser.set_defaults(func=cmd_bench)

    from vsearch_cli.bench import embedder as bench_embedder

    parser = sections.add_parser(
        "embedder", help="embedder images/s and batch-1 latency: in-process onnxruntime vs Triton, same model",
        description=bench_embedder.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_embedder.add_arguments(parser)
    parser.set_defaults(func=bench_embedder.run)


def _apply_sizes(args: argparse.Namespace) -> None:
    if args.section == "ingest" and args.size:
        args.ingest_images = args.size
    elif args.section == "search" and args.size:
        args.search_catalog = args.size
    elif args.section == "ann" and args.sizes:
        args.ann_sizes = args.sizes


def show_table(args: argparse.Namespace, table: str) -> None:
    """A section's table: on stdout, or on stderr when stdout is for --json's one object."""
    print(table, file=sys.stderr if args.json else sys.stdout, flush=True)


def _settings_for_report(args: argparse.Namespace) -> dict[str, Any]:
    settings = {}
    for key, value in vars(args).items():
        if key in ("func", "size", "sizes"):
            continue
        settings[key] = str(value) if isinstance(value, Path) else value
    return settings


# ---- running --------------------------------------------------------------------------------

def resolve_model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir is not None:
        return args.model_dir.resolve()
    from vsearch_cli.model_tools.prepare import ModelPrepareError, ensure_model
    from vsearch_cli.bench.common import BenchError

    try:
        return ensure_model(args.model, args.data_dir.resolve() / "models").resolve()
    except ModelPrepareError as error:
        raise BenchError(f"cannot prepare model {args.model}: {error}") from None


def default_batch_size(max_batch_size: int) -> int:
    """What AddImages sends the embedder at once: the gateway's batch, capped by the embedder's."""
    from gateway.settings import GatewaySettings

    return min(GatewaySettings.model_fields["add_batch_size"].default, max_batch_size)


async def _check_external_model(gateway: str, model_version: str) -> str | None:
    import grpc

    from vsearch_cli.bench.stack import channel
    from vsearch.v1 import gateway_pb2, gateway_pb2_grpc

    async with channel(gateway) as grpc_channel:
        try:
            stats = await gateway_pb2_grpc.VisualSearchStub(grpc_channel).Stats(
                gateway_pb2.VisualStatsRequest(), timeout=30, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            from vsearch_cli.bench.common import BenchError

            raise BenchError(f"gateway {gateway}: {error.code().name}: {error.details()}") from None
    if stats.model_version != model_version:
        return (f"the gateway serves model {stats.model_version}, the model-alone figures use {model_version} "
                "(give --model-dir of the served model)")
    return None


async def run_stack_sections(args: argparse.Namespace, sections: list[str], report: dict[str, Any],
                             out_path: Path) -> None:
    from vsearch_cli.model_rig import ModelRig
    from vsearch_cli.bench.ingest import IngestConfig, run_ingest
    from vsearch_cli.bench.search import SearchConfig, run_search
    from vsearch_cli.bench.stack import bench_stack

    dataset = (args.images or default_dataset()).resolve()
    profile_dir = out_path.parent / f"{out_path.stem}-profiles" if args.profile else None
    rig = await ModelRig.load(resolve_model_dir(args))
    report["model"] = rig.describe()
    try:
        async with bench_stack(args.gateway, args.search, args.embedder, rig.model_dir, not args.no_redis,
                               args.keep) as stack:
            report["stack"] = stack.describe()
            if not stack.managed and (warning := await _check_external_model(stack.gateway, rig.card.version)):
                report.setdefault("warnings", []).append(warning)
                print(f"vsearch bench: warning: {warning}", file=sys.stderr)
            if "ingest" in sections:
                config = IngestConfig(
                    images=args.ingest_images, naive_images=min(args.naive_images, args.ingest_images),
                    batch_size=args.batch_size or default_batch_size(rig.settings.max_batch_size),
                    streams=args.streams, chunk=args.chunk, dataset=dataset, seed=args.seed, repeat=args.repeat,
                    profile_dir=profile_dir / "ingest" if profile_dir else None,
                )
                report["ingest"] = await run_ingest(config, stack, rig)
                show_table(args, format_ingest(report["ingest"], dataset))
            if "search" in sections:
                config = SearchConfig(
                    catalog=args.search_catalog, requests=args.requests, concurrency=args.concurrency,
                    hit_set=args.hit_set, floor_samples=args.floor_samples, k=args.k, dataset=dataset,
                    seed=args.seed, chunk=args.chunk, streams=args.streams,
                    batch_size=getattr(args, "batch_size", None) or default_batch_size(rig.settings.max_batch_size),
                    profile_dir=profile_dir / "search" if profile_dir else None,
                    modes=tuple(dict.fromkeys(["similar", *args.modes])),
                )
                report["search"] = await run_search(config, stack, rig)
                show_table(args, format_search(report["search"]))
    finally:
        await rig.close()


def ann_dimension(args: argparse.Namespace) -> int:
    """--dimension, else the model's (from its card, if prepared), else 1280."""
    if args.dimension:
        return args.dimension
    from embedder_svc.model_card import ModelCardError, read_model_card

    model_dir = args.model_dir or args.data_dir / "models" / args.model
    try:
        return read_model_card(model_dir).output.dimension
    except ModelCardError:
        return 1280


async def run_bench(args: argparse.Namespace, report: dict[str, Any], out_path: Path) -> None:
    sections = list(SECTIONS) if args.section == "all" else [args.section]
    if "ingest" in sections or "search" in sections:
        await run_stack_sections(args, sections, report, out_path)
    if "ann" in sections:
        from vsearch_cli.bench.ann import AnnConfig, run_ann

        config = AnnConfig(
            sizes=args.ann_sizes, index_types=args.index_types, nprobes=args.nprobe, nlist=args.nlist,
            clusters=args.clusters, spread=args.spread, dimension=ann_dimension(args), queries=args.queries,
            batch_requests=args.batch_requests, recall_queries=args.recall_queries, k=args.k if "k" in args else 10,
            seed=args.seed, work_dir=(args.work_dir or out_path.parent / "ann-work").resolve(),
            faiss=not args.no_faiss, backends=args.backends, keep=args.keep,
        )
        report["ann"] = await run_ann(config)
        show_table(args, format_ann(report["ann"]))


def cmd_bench(args: argparse.Namespace) -> int:
    from vsearch_cli.bench.common import BenchError, load_average, machine_info

    _apply_sizes(args)
    out_path = args.out or DEFAULT_OUT_DIR / f"bench-{args.section}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "section": args.section,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "settings": _settings_for_report(args),
    }
    status = 0
    try:
        asyncio.run(run_bench(args, report, out_path))
    except BenchError as error:
        report["error"] = str(error)
        print(f"vsearch bench: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        report["error"] = "interrupted"
        status = 130
    finally:
        report["load_average_end"] = load_average()
        report["duration_s"] = round(time.perf_counter() - started, 1)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    print(f"\nwrote {out_path} ({report['duration_s']:.0f}s; load average {report['load_average_start']} -> "
          f"{report['load_average_end']}, cpus {report['machine']['usable_cpus']})",
          file=sys.stderr if args.json else sys.stdout)
    return status


# ---- tables ---------------------------------------------------------------------------------

def _verdict(meets: bool | None) -> str:
    return "-" if meets is None else ("meets" if meets else "MISSES")


def _noise(figures: dict[str, Any]) -> str:
    machine = figures.get("machine_load") or {}
    if not machine:
        return ""
    return f"; other processes {machine['other_processes_cores']}, stolen {machine['stolen_cores']}"


def format_ingest(result: dict[str, Any], dataset: Path) -> str:
    from vsearch_cli.bench.common import format_table

    e2e, model, decode, naive = result["end_to_end"], result["model_alone"], result["decode_alone"], result["naive"]
    rows = [
        ["end to end: gateway AddImages", e2e["images_per_s"], e2e["seconds"],
         f"{e2e['streams']} streams x {e2e['chunk']}; indexed {e2e['indexed']}, failed {e2e['failed']}"],
        [f"model alone (batch {model['batch_size']})", model["images_per_s"], model["seconds"],
         f"batch p50 {model['batch_latency'].get('p50_ms')} ms"],
        [f"decode+preprocess alone ({decode['workers']} threads)", decode["images_per_s"], decode["seconds"],
         f"1 thread: {decode['single_thread_images_per_s']}/s"],
        ["bound 1/(1/decode + 1/model)", result["bound_images_per_s"], None, ""],
        ["naive loop (batch 1, one Upsert each)", naive.get("images_per_s"), naive.get("seconds"), naive.get("skipped", "")],
    ]
    runs = result["repetitions"]
    title = f"\n== ingest: {result['images']} images from {dataset}" + (
        f"; medians of {runs} interleaved repetitions (details: first)" if runs > 1 else "") + " =="
    text = [format_table(["path", "images/s", "seconds", "note"], rows, title=title)]
    if runs > 1:
        text.append("per repetition: " + "; ".join(
            f"{stage} {result[stage]['images_per_s_runs']}" for stage in ("end_to_end", "model_alone", "decode_alone", "naive"))
            + f"; other processes' cores during end to end {result['end_to_end']['other_processes_cores_runs']}")
    text.append(format_table(["ratio", "value", "target", "verdict", "per repetition"], [
        ["end to end / bound", result["ratio_to_bound"], f">= {result['target_ratio_to_bound']}",
         _verdict(result["meets_bound_target"]), " ".join(map(str, result["ratio_to_bound_runs"]))],
        ["end to end / naive", result["ratio_to_naive"], f">= {result['target_ratio_to_naive']}",
         _verdict(result["meets_naive_target"]), " ".join(map(str, result["ratio_to_naive_runs"]))],
    ]))
    if e2e.get("cpu_by_process"):
        text.append("CPU cores used during end to end: " + ", ".join(
            f"{name} {usage['cores']}" for name, usage in e2e["cpu_by_process"].items()) + _noise(e2e))
    embedder = e2e.get("stages", {}).get("embedder")
    if embedder:
        text.append(f"embedder: {embedder['inference_runs']} inference runs, mean batch {embedder['mean_batch_size']}, "
                    f"mean run {embedder['mean_inference_ms']} ms, inference busy {embedder['inference_busy_fraction']} "
                    "of the wall time")
    search = e2e.get("stages", {}).get("search")
    if search:
        calls = ", ".join(f"{operation} {figures['calls']} x {figures['mean_ms']} ms"
                          for operation, figures in search["store_calls"].items())
        text.append(f"search_svc: Upsert {search['upsert_rpc']['calls']} x {search['upsert_rpc']['mean_ms']} ms; "
                    f"{search['store']} {calls}")
    if e2e.get("profile"):
        text.append("(profiling: bench_client's CPU includes py-spy's)")
    for name, summary in (e2e.get("profile") or {}).get("processes", {}).items():
        top = "; ".join(f"{entry['percent']}% {entry['function']}" for entry in summary["top_self"][:6])
        text.append(f"profile {name} ({summary['samples']} busy samples): {top}")
    return "\n".join(text)


def format_search(result: dict[str, Any]) -> str:
    from vsearch_cli.bench.common import format_table

    floor = result["floor"]
    text = [f"\n== search: catalog {result['catalog_images']}, k {result['k']}, cache {result['cache']} =="]
    if "floor_ms" in floor:
        text.append(
            f"floor {floor['floor_ms']} ms = model batch-1 p50 {floor['model_batch1']['p50_ms']} ms + "
            f"search_svc Search p50 {floor['ann']['p50_ms']} ms (decode+preprocess p50 "
            f"{floor['decode_preprocess']['p50_ms']} ms more: {floor['floor_with_decode_ms']} ms)"
            + (f"; floor = mean of {floor['floor_ms_runs']} ms measured before and after the first level"
               if "floor_ms_runs" in floor else ""))
        if "embedder_rpc_batch1" in floor:
            text.append(f"embedder EmbedImages alone, one image: p50 {floor['embedder_rpc_batch1']['p50_ms']} ms "
                        "(decode + batching wait + model + one hop)")
    rows = []
    for level in result["levels"]:
        latency = level["latency"]
        rows.append([
            level["mode"], level["cache"], level["concurrency"], level["ok"],
            latency.get("p50_ms"), latency.get("p95_ms"), latency.get("p99_ms"), level["throughput_rps"], level["from_cache"], level["embedding_from_cache"],
            level["server_embed_ms_p50"], level["server_search_ms_p50"], level["server_total_ms_p50"],
            sum(level["errors"].values()),
        ])
    text.append(format_table(
        ["mode", "cache", "conc", "ok", "p50 ms", "p95 ms", "p99 ms", "req/s", "from cache", "emb cached",
         "gw embed p50", "gw search p50", "gw total p50", "errors"], rows))
    bound = result.get("bound")
    if bound:
        decode, model = bound["decode_alone"], bound["model_alone"]
        text.append(
            f"bound {bound['images_per_s']} img/s = 1 / (1/decode {decode['images_per_s']} + 1/model "
            f"{model['images_per_s']}) (decode+preprocess on {decode['workers']} threads, model at batch "
            f"{model['batch_size']}, on {bound['images']} images; mean of {bound['images_per_s_runs']}, measured "
            "right before and after each miss level, whose ratio uses its own two)")
    target_rows = []
    for entry in result["targets"]["miss_p50_over_floor"]:
        if entry["applies"]:
            target_rows.append([f"miss p50 / floor (conc {entry['concurrency']})", entry["value"],
                                f"<= {entry['target']}", _verdict(entry["meets"]), _cores(entry)])
    for entry in result["targets"].get("miss_rps_over_bound", []):
        if entry["applies"]:
            target_rows.append([f"miss req/s / bound {entry['bound_images_per_s']} (conc {entry['concurrency']})",
                                entry["value"],
                                f">= {entry['target']}", _verdict(entry["meets"]), _cores(entry)])
    for entry in result["targets"]["hit_p50_over_miss_p50"]:
        target_rows.append([f"hit p50 / miss p50 (conc {entry['concurrency']})", entry["value"],
                            f"<= {entry['target']}", _verdict(entry["meets"]), ""])
    for entry in result["targets"].get("copy_miss_p50_over_similar_miss_p50", []):
        target_rows.append([f"copy miss p50 / similar miss p50 (conc {entry['concurrency']})", entry["value"],
                            f"<= {entry['target']}" if entry["applies"] else "-",
                            _verdict(entry["meets"]) if entry["applies"] else "-",
                            f"p50 {entry['copy_p50_ms']} vs {entry['similar_p50_ms']} ms, p95 {entry['copy_p95_ms']} "
                            f"vs {entry['similar_p95_ms']} ms"])
    text.append(format_table(["ratio", "value", "target", "verdict", "CPU cores during that level / latencies"],
                             target_rows))
    if result.get("copy_shortlist"):
        text.append(f"copy mode: shortlist {result['copy_shortlist']} (GATEWAY_COPY_SEARCH__SHORTLIST of a started "
                    f"stack) and {result.get('copy_feature_candidates') or 0} feature candidates "
                    "(GATEWAY_COPY_SEARCH__FEATURE_CANDIDATES) verified per search, and a second look of "
                    f"{result.get('copy_second_look') or 0} (GATEWAY_COPY_SEARCH__SECOND_LOOK) when neither holds a copy")
    for level in result["levels"]:
        if level["cache"] == "miss":
            cores = ", ".join(f"{name} {usage['cores']} ({usage.get('cpu_ms_per_request')})"
                              for name, usage in level["cpu_by_process"].items())
            text.append(f"CPU, {level['mode']} miss at concurrency {level['concurrency']}, cores (ms per request): "
                        f"{cores}{_noise(level)}")
        for name, summary in (level.get("profile") or {}).get("processes", {}).items():
            if level["cache"] == "miss":
                top = "; ".join(f"{entry['percent']}% {entry['function']}" for entry in summary["top_self"][:5])
                text.append(f"  profile {name} ({summary['samples']} busy samples, {summary['file']}): {top}")
    return "\n".join(text)


def _cores(entry: dict[str, Any]) -> str:
    return ", ".join(f"{name} {cores}" for name, cores in entry.get("cpu_cores", {}).items())


def format_ann(result: dict[str, Any]) -> str:
    from vsearch_cli.bench.common import format_table

    rows = []
    for run in result["runs"]:
        params = {**run["index_params"], **run["search_params"]}
        memory = run.get("milvus_memory", {})
        rows.append([
            run["size"], run["engine"], run["index"], " ".join(f"{key}={value}" for key, value in params.items()),
            run.get("build_s"), run.get("insert_vectors_per_s"),
            memory.get("rss_mib") if memory else run.get("memory_growth_mib"), memory.get("peak_rss_mib"),
            run["qps_batch1"], run["latency_batch1"].get("p50_ms"), run["qps_batch100"], run["recall_at_k"],
            _verdict(run["meets_recall_target"]), (run.get("machine_load") or {}).get("other_processes_cores"),
        ])
    verdict = result.get("single_machine_default")
    decision = (
        f"\nsingle-machine default by this run: SEARCH_BACKEND={verdict['backend']} SEARCH_INDEX_TYPE={verdict['index']} "
        f"{' '.join(f'{k}={v}' for k, v in {**verdict['index_params'], **verdict['search_params']}.items())} "
        f"(fastest at {verdict['size']:,} vectors with recall@{result['k']} >= {result['target_recall']})"
        if verdict else "\nsingle-machine default by this run: none (no search_svc setting met the recall target)"
    )
    return format_table(
        ["vectors", "engine", "index", "params", "build s", "insert/s", "mem MiB", "peak MiB", "QPS b1",
         "b1 p50 ms", "QPS b100", f"recall@{result['k']}", f">= {result['target_recall']}", "others' cores"],
        rows,
        title=f"\n== ann: {result['dimension']}-d, {result['clusters']} clusters, spread {result['spread']}; "
              f"recall on {result['recall_queries']} queries; faiss: {result['faiss']} ==\n"
              "mem: RSS of the milvus process (milvus-lite), growth of this process's RSS while building (search_svc "
              "faiss and raw faiss run in this process); QPS b1: one query per request, one at a time",
    ) + decision
