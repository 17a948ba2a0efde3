"""`vsearch bench search`: gateway Search latency and throughput, cache misses and cache hits apart,
against the floor of what one query must cost (the model on one image plus one ANN search) and, for
throughput, against the decode+model bound `1 / (1/decode + 1/model)` as `vsearch bench ingest`
defines it (decode+preprocess alone on the embedder's decode threads, the model alone at the
gateway's AddImages batch), measured in the same run.

A cache miss must miss both the embedding cache (keyed by the image's sha256) and the result cache:
every miss request carries an image no other request of the run uses. Against a stack the bench did
not start (whose Redis may remember an earlier run), the bytes also get a per-run trailer after the
image's end marker, which decoders ignore. Every answer's from_cache flags are counted, so a miss
that was not one shows in the figures.

Copy mode (SEARCH_MODE_COPY: a deeper shortlist, verified pairwise by the embedder) is measured at cache
miss in the same run, right after similar mode at each concurrency, on images of its own (the result
cache key holds the mode, and copy mode never reads the embedding cache, so its misses are misses too):
copy miss p50 / similar miss p50 is issue 13's cost target."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import grpc
import numpy as np

from vsearch_cli.bench.common import BenchError, latency_summary, rate, ratio, read_all, sample_images
from vsearch_cli.model_rig import ModelRig
from vsearch_cli.bench.ingest import PYTHON_SERVICES, add_all, decode_alone, model_alone, scrape_all
from vsearch_cli.bench.procs import CpuMeter, PySpyProfiles, histogram_delta, metric_delta
from vsearch_cli.bench.stack import StackEndpoints, channel, drop_collection, new_collection_name
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, search_pb2, search_pb2_grpc

# Cache-miss p50 at concurrency 1 over the floor, and cache-miss req/s at concurrency 32 over the
# decode+model bound (issue 11, part 5).
TARGET_MISS_OVER_FLOOR = 1.5
TARGET_MISS_RPS_OVER_BOUND = 0.8
TARGET_LATENCY_CONCURRENCY = 1
TARGET_THROUGHPUT_CONCURRENCY = 32
TARGET_HIT_OVER_MISS = 0.1
# Copy-mode cache-miss p50 over similar-mode cache-miss p50, at concurrency 1 (issue 13).
TARGET_COPY_OVER_SIMILAR = 3.0
SEARCH_MODES = {"similar": gateway_pb2.SEARCH_MODE_SIMILAR, "copy": gateway_pb2.SEARCH_MODE_COPY}
WARMUP_QUERIES = 4
SEARCH_TIMEOUT_S = 60.0
# Passes over the hit set, at most, until one is answered wholly from the cache.
WARM_PASSES = 5


@dataclass
class SearchConfig:
    catalog: int
    requests: int
    concurrency: list[int]
    hit_set: int
    floor_samples: int
    k: int
    dataset: Path
    seed: int
    chunk: int
    streams: int
    # The model-alone batch of the bound (the gateway's AddImages batch, as in `vsearch bench ingest`).
    batch_size: int = 32
    # Where py-spy profiles of the searches go; None: no profiling.
    profile_dir: Path | None = None
    # The modes measured at cache miss; similar mode, the reference of every ratio, always is.
    modes: tuple[str, ...] = ("similar", "copy")

    @property
    def copy_mode(self) -> bool:
        return "copy" in self.modes

    def requests_at(self, concurrency: int) -> int:
        """Enough requests that every caller sends several: one wave of `concurrency` measures the
        queue filling up, not the steady state."""
        return max(self.requests, 4 * concurrency)


def fresh_bytes(data: bytes, nonce: bytes) -> bytes:
    """The same image under another sha256: data after a JPEG's end marker (or a PNG's IEND chunk)
    is ignored by decoders."""
    return data + b"vsearch-bench" + nonce


async def search_load(stub: gateway_pb2_grpc.VisualSearchStub, requests: Sequence[gateway_pb2.VisualSearchRequest],
                      concurrency: int) -> dict[str, Any]:
    """`concurrency` callers, each sending its next request as soon as its last one is answered."""
    latencies: list[float] = []
    server_embed_ms: list[float] = []
    server_search_ms: list[float] = []
    server_total_ms: list[float] = []
    errors: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    pending = iter(requests)

    async def caller() -> None:
        for request in pending:
            started = time.perf_counter()
            try:
                reply = await stub.Search(request, timeout=SEARCH_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                errors[f"{error.code().name}: {error.details()}"[:160]] += 1
                continue
            latencies.append(time.perf_counter() - started)
            flags["from_cache"] += reply.from_cache
            flags["embedding_from_cache"] += reply.embedding_from_cache
            if not reply.from_cache:
                server_embed_ms.append(reply.timing.embed_ms)
                server_search_ms.append(reply.timing.search_ms)
                server_total_ms.append(reply.timing.total_ms)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "ok": len(latencies),
        "errors": dict(errors),
        "seconds": round(seconds, 3),
        "throughput_rps": rate(len(latencies), seconds),
        "latency": latency_summary(latencies),
        "from_cache": flags["from_cache"],
        "embedding_from_cache": flags["embedding_from_cache"],
        # The gateway's own split of an uncached search (Timing in the reply).
        "server_embed_ms_p50": round(float(np.median(server_embed_ms)), 3) if server_embed_ms else None,
        "server_search_ms_p50": round(float(np.median(server_search_ms)), 3) if server_search_ms else None,
        "server_total_ms_p50": round(float(np.median(server_total_ms)), 3) if server_total_ms else None,
    }


async def warm_cache(stub: gateway_pb2_grpc.VisualSearchStub,
                     requests: Sequence[gateway_pb2.VisualSearchRequest]) -> dict[str, Any]:
    """Searches `requests` one at a time, pass after pass, until a whole pass is answered from the cache
    (at most WARM_PASSES): a hit level must measure hits. One pass is not always enough: its last cache
    write may still be in flight when it ends, and a cache that was unavailable meanwhile (a Redis call
    that timed out on a loaded machine may start the gateway's cool-down) stored nothing."""
    cached = 0
    for passes in range(1, WARM_PASSES + 1):
        cached = (await search_load(stub, requests, 1))["from_cache"]
        if cached == len(requests):
            return {"passes": passes, "cached": True}
    return {"passes": WARM_PASSES, "cached": False, "cached_in_last_pass": cached, "requests": len(requests)}


def report_uncached_hits(level: dict[str, Any]) -> None:
    """A hit level whose answers did not all come from the cache says so, and why as far as the gateway
    counted (on stderr; the figures are in the JSON)."""
    if level["cache"] != "hit" or level["from_cache"] == level["ok"]:
        return
    stages = level.get("stages", {})
    print(f"bench search: hit level at concurrency {level['concurrency']}: only {level['from_cache']} of "
          f"{level['ok']} answers came from the cache (warm-up {level.get('warm_up')}; gateway cache errors "
          f"{stages.get('gateway_cache_errors')}, writes skipped {stages.get('gateway_cache_writes_skipped')}, "
          f"result misses {stages.get('gateway_cache_result_misses')})", file=sys.stderr, flush=True)


async def embedder_latencies(address: str, datas: Sequence[bytes]) -> list[float]:
    """EmbedImages with one image, straight to the embedder: decode, batching wait, model, one hop."""
    requests = [embedder_pb2.EmbedImagesRequest(images=[embedder_pb2.ImageInput(data=data)]) for data in datas]
    async with channel(address) as grpc_channel:
        stub = embedder_pb2_grpc.EmbedderStub(grpc_channel)
        return await timed_calls(stub.EmbedImages, requests, "embedder EmbedImages")


async def timed_calls(call: Callable[..., Awaitable[Any]], requests: Sequence[Any], what: str) -> list[float]:
    """Seconds per call, one at a time, after WARMUP_QUERIES untimed calls."""
    latencies = []
    try:
        for request in requests[:WARMUP_QUERIES]:
            await call(request, timeout=SEARCH_TIMEOUT_S)
        for request in requests:
            started = time.perf_counter()
            await call(request, timeout=SEARCH_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"{what}: {error.code().name}: {error.details()}") from None
    return latencies


async def measure_floor(rig: ModelRig, stack: StackEndpoints, datas: Sequence[bytes], collection: str,
                        k: int) -> dict[str, Any]:
    """Model on one pre-decoded image, and search_svc Search with a precomputed vector, each alone.
    Also, for the gap between the floor and a real search: decode+preprocess alone, and the embedder
    service on one image (when its address is known)."""
    search_address = stack.search
    decode_latencies, tensors = [], []
    for data in datas:
        started = time.perf_counter()
        tensors.append(rig.prepare(data))
        decode_latencies.append(time.perf_counter() - started)
    model_latencies, vectors = [], []
    for tensor in tensors:
        batch = tensor[np.newaxis]
        started = time.perf_counter()
        vectors.append((await rig.infer(batch))[0])
        model_latencies.append(time.perf_counter() - started)
    floor: dict[str, Any] = {
        "samples": len(datas),
        "model_batch1": latency_summary(model_latencies),
        "decode_preprocess": latency_summary(decode_latencies),
    }
    if search_address is None:
        floor["ann"] = {"skipped": "no search_svc address (give --search ADDR)"}
        return floor
    requests = [search_pb2.SearchRequest(queries=[search_pb2.Vector(values=vector.tolist())], k=k, collection=collection)
                for vector in vectors]
    async with channel(search_address) as grpc_channel:
        stub = search_pb2_grpc.VectorSearchStub(grpc_channel)
        ann_latencies = await timed_calls(stub.Search, requests, "search_svc Search")
    floor["ann"] = latency_summary(ann_latencies)
    if stack.embedder is not None:
        floor["embedder_rpc_batch1"] = latency_summary(await embedder_latencies(stack.embedder, datas))
    floor["floor_ms"] = round(floor["model_batch1"]["p50_ms"] + floor["ann"]["p50_ms"], 3)
    # Not part of the floor as defined, but every uncached image query pays it too.
    floor["floor_with_decode_ms"] = round(floor["floor_ms"] + floor["decode_preprocess"]["p50_ms"], 3)
    return floor


async def measure_bound(rig: ModelRig, datas: Sequence[bytes], batch_size: int) -> dict[str, Any]:
    """The decode+model bound of `vsearch bench ingest`, on these images: what a pipeline doing nothing
    but decoding and inference on these cores would reach."""
    tensors, decode = decode_alone(rig, datas)
    model = await model_alone(rig, tensors, batch_size, len(datas))
    return {
        "images": len(datas), "decode_alone": decode, "model_alone": model,
        "images_per_s": round(1.0 / (1.0 / decode["images_per_s"] + 1.0 / model["images_per_s"]), 2),
    }


def level_stages(before: dict[str, dict], after: dict[str, dict]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    if after.get("gateway"):
        # What the gateway's cache did during the level: a "hit" level that was not all served from the
        # cache says why here (store errors, hence its cool-down; skipped writes; plain misses).
        gateway_before, gateway_after = before.get("gateway", {}), after["gateway"]
        for kind in ("embedding", "result"):
            for outcome in ("hits", "misses"):
                stages[f"gateway_cache_{kind}_{outcome}"] = round(metric_delta(
                    gateway_before, gateway_after, f"vsearch_gateway_cache_{outcome}_total", cache=kind))
        for name in ("errors", "writes_skipped"):
            stages[f"gateway_cache_{name}"] = round(metric_delta(
                gateway_before, gateway_after, f"vsearch_gateway_cache_{name}_total"))
        # Copy mode: the shortlist hits the embedder verified (VerifyCopies), and how many were copies.
        for verdict in ("copy", "no_copy"):
            stages[f"gateway_copy_candidates_{verdict}"] = round(metric_delta(
                gateway_before, gateway_after, "vsearch_gateway_copy_candidates_total", verdict=verdict))
    if after.get("embedder"):
        batches = histogram_delta(before.get("embedder", {}), after["embedder"], "vsearch_embedder_batch_size")
        stages["embedder_mean_batch_size"] = round(batches["mean"], 2)
        stages["embedder_inference_runs"] = batches["count"]
    if after.get("search"):
        for method in ("Search", "Stats"):
            calls = histogram_delta(before.get("search", {}), after["search"], "vsearch_grpc_latency_seconds",
                                    method=method)
            stages[f"search_svc_{method.lower()}_calls"] = calls["count"]
            stages[f"search_svc_{method.lower()}_mean_ms"] = round(calls["mean"] * 1000, 3)
    return stages


async def measure_level(stub: gateway_pb2_grpc.VisualSearchStub, stack: StackEndpoints,
                        requests: Sequence[gateway_pb2.VisualSearchRequest], concurrency: int,
                        profile_dir: Path | None) -> dict[str, Any]:
    """One load level, with the CPU each process used, the services' own stage figures and, when
    asked, py-spy profiles of the services."""
    profiles = None
    if profile_dir is not None and stack.pids:
        profiles = PySpyProfiles({name: pid for name, pid in stack.pids.items() if name in PYTHON_SERVICES}
                                 | {"bench_client": os.getpid()}, profile_dir)
    meter = CpuMeter({**stack.pids, "bench_client": os.getpid()})
    metrics_before = scrape_all(stack)
    meter.start()
    if profiles is not None:
        profiles.start()
    try:
        level = await search_load(stub, requests, concurrency)
    finally:
        profile_summary = profiles.stop() if profiles is not None else None
    level["cpu_by_process"] = meter.stop(level["seconds"])
    # Per request: what each process spends on one search, whatever the concurrency.
    for usage in level["cpu_by_process"].values():
        usage["cpu_ms_per_request"] = round(1000 * usage["cpu_s"] / level["ok"], 3) if level["ok"] else None
    level["machine_load"] = meter.machine
    level["stages"] = level_stages(metrics_before, scrape_all(stack))
    if profiles is not None:
        level["profile"] = {"processes": profile_summary, "problems": profiles.problems}
    return level


async def run_search(config: SearchConfig, stack: StackEndpoints, rig: ModelRig) -> dict[str, Any]:
    # Every miss level (one per concurrency and mode) gets images no other request uses.
    miss_count = (sum(config.requests_at(concurrency) for concurrency in config.concurrency) + WARMUP_QUERIES) * (
        1 + config.copy_mode)
    catalog_paths, miss_paths, floor_paths, hit_paths = sample_images(
        config.dataset, [config.catalog, miss_count, config.floor_samples, config.hit_set], config.seed + 1)
    nonce = uuid.uuid4().hex.encode()
    # A stack the bench started has empty caches; another one may remember earlier runs' images.
    prepare_query = (lambda data: data) if stack.managed else (lambda data: fresh_bytes(data, nonce))
    miss_datas = [prepare_query(data) for data in read_all(miss_paths)]
    hit_datas = [prepare_query(data) for data in read_all(hit_paths)]
    floor_datas = read_all(floor_paths)
    collection = new_collection_name("search")
    items = [(f"catalog-{index:06d}", data, path)
             for index, (data, path) in enumerate(zip(read_all(catalog_paths), catalog_paths))]

    def request(image: bytes, mode: str = "similar") -> gateway_pb2.VisualSearchRequest:
        return gateway_pb2.VisualSearchRequest(image=image, k=config.k, collection=collection, mode=SEARCH_MODES[mode])

    levels: list[dict[str, Any]] = []
    async with channel(stack.gateway) as grpc_channel:
        stub = gateway_pb2_grpc.VisualSearchStub(grpc_channel)
        try:
            summaries, _seconds = await add_all(stub, items, collection, config.chunk, config.streams)
            floor = await measure_floor(rig, stack, floor_datas, collection, config.k)
            catalog_datas = [data for _id, data, _path in items]
            bound_runs: list[dict[str, Any]] = []
            misses = iter(miss_datas)
            for mode in ("similar", "copy") if config.copy_mode else ("similar",):
                await search_load(stub, [request(next(misses), mode) for _ in range(WARMUP_QUERIES)], 1)
            hit_requests = [request(data) for data in hit_datas]
            for concurrency in config.concurrency:
                count = config.requests_at(concurrency)
                miss_requests = [request(next(misses)) for _ in range(count)]
                # The bound right before and right after each miss level: the machine's speed drifts
                # (by 20% within a minute on a shared VM), and the ratio must compare like with like.
                bracket = [await measure_bound(rig, catalog_datas, config.batch_size)]
                level = await measure_level(stub, stack, miss_requests, concurrency,
                                            config.profile_dir / f"miss-c{concurrency}" if config.profile_dir else None)
                bracket.append(await measure_bound(rig, catalog_datas, config.batch_size))
                bound_runs.extend(bracket)
                level["bound_images_per_s_runs"] = [run["images_per_s"] for run in bracket]
                level["bound_images_per_s"] = round(float(np.mean(level["bound_images_per_s_runs"])), 2)
                levels.append({"mode": "similar", "cache": "miss", **level})
                if len(levels) == 1 and "floor_ms" in floor:
                    # The floor again right after the first miss level, so the ratio compares
                    # measurements taken around the same time on a machine whose load drifts.
                    again = await measure_floor(rig, stack, floor_datas, collection, config.k)
                    floor["floor_ms_runs"] = [floor["floor_ms"], again["floor_ms"]]
                    floor["floor_ms"] = round((floor["floor_ms"] + again["floor_ms"]) / 2, 3)
                    floor["after_first_level"] = again
                if config.copy_mode:
                    # Right after similar mode at the same concurrency, so their ratio compares like with like.
                    copy_requests = [request(next(misses), "copy") for _ in range(count)]
                    level = await measure_level(stub, stack, copy_requests, concurrency,
                                                config.profile_dir / f"copy-miss-c{concurrency}"
                                                if config.profile_dir else None)
                    levels.append({"mode": "copy", "cache": "miss", **level})
                # Fill both caches first; then every request repeats one of these images.
                warm_up = await warm_cache(stub, hit_requests)
                repeats = [hit_requests[index % len(hit_requests)] for index in range(count)]
                level = await measure_level(stub, stack, repeats, concurrency,
                                            config.profile_dir / f"hit-c{concurrency}" if config.profile_dir else None)
                levels.append({"mode": "similar", "cache": "hit", "warm_up": warm_up, **level})
                report_uncached_hits(levels[-1])
        finally:
            cleanup = await drop_collection(stub, collection)
    bound = {**bound_runs[0], "images_per_s": round(float(np.mean([run["images_per_s"] for run in bound_runs])), 2),
             "images_per_s_runs": [run["images_per_s"] for run in bound_runs]}
    return {
        "catalog_images": len(items), "indexed": sum(summary.indexed for summary in summaries), "k": config.k,
        "collection": collection, "cleanup": cleanup, "cache": stack.cache, "modes": list(config.modes),
        # What a stack the bench starts uses; another gateway's own setting is not known here.
        "copy_shortlist": copy_search_setting("shortlist") if config.copy_mode else None,
        "copy_second_look": copy_search_setting("second_look") if config.copy_mode else None,
        "copy_feature_candidates": copy_search_setting("feature_candidates") if config.copy_mode else None,
        "floor": floor, "bound": bound, "levels": levels, "targets": targets(floor, bound, levels),
    }


def copy_search_setting(name: str) -> int:
    """GATEWAY_COPY_SEARCH__<NAME> as the gateway reads it (the environment reaches a started stack)."""
    from gateway.settings import CopySearchSettings

    value = os.environ.get(f"GATEWAY_COPY_SEARCH__{name.upper()}")
    return int(value) if value else CopySearchSettings.model_fields[name].default


def targets(floor: dict[str, Any], bound: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios, per miss level; `applies` marks the level each target is about. Each carries the
    CPU every process took during that level."""
    by_key = {(level["mode"], level["cache"], level["concurrency"]): level for level in levels}
    result: dict[str, Any] = {"miss_p50_over_floor": [], "miss_rps_over_bound": [], "hit_p50_over_miss_p50": [],
                              "copy_miss_p50_over_similar_miss_p50": []}
    for (mode, cache, concurrency), level in sorted(by_key.items(), key=lambda entry: entry[0][2]):
        if (mode, cache) != ("similar", "miss"):
            continue
        cpu = {name: usage["cores"] for name, usage in level.get("cpu_by_process", {}).items()}
        miss_p50 = level["latency"].get("p50_ms")
        value = ratio(miss_p50, floor.get("floor_ms"))
        result["miss_p50_over_floor"].append({
            "concurrency": concurrency, "value": value, "target": TARGET_MISS_OVER_FLOOR,
            # The floor is one query alone: the target is about concurrency 1.
            "applies": concurrency == TARGET_LATENCY_CONCURRENCY,
            "meets": None if value is None else value <= TARGET_MISS_OVER_FLOOR,
            "cpu_cores": cpu,
        })
        # Against the bound measured around this level.
        value = ratio(level["throughput_rps"], level.get("bound_images_per_s", bound.get("images_per_s")))
        result["miss_rps_over_bound"].append({
            "concurrency": concurrency, "value": value, "target": TARGET_MISS_RPS_OVER_BOUND,
            "applies": concurrency == TARGET_THROUGHPUT_CONCURRENCY,
            "meets": None if value is None else value >= TARGET_MISS_RPS_OVER_BOUND,
            "bound_images_per_s": level.get("bound_images_per_s"),
            "cpu_cores": cpu,
        })
        hit = by_key.get(("similar", "hit", concurrency))
        hit_ratio = ratio(hit["latency"].get("p50_ms"), miss_p50) if hit else None
        result["hit_p50_over_miss_p50"].append({
            "concurrency": concurrency, "value": hit_ratio, "target": TARGET_HIT_OVER_MISS,
            "meets": None if hit_ratio is None else hit_ratio <= TARGET_HIT_OVER_MISS,
        })
        copy = by_key.get(("copy", "miss", concurrency))
        if copy:
            copy_ratio = ratio(copy["latency"].get("p50_ms"), miss_p50)
            result["copy_miss_p50_over_similar_miss_p50"].append({
                "concurrency": concurrency, "value": copy_ratio, "target": TARGET_COPY_OVER_SIMILAR,
                # Latency of one search alone: the target is about concurrency 1.
                "applies": concurrency == TARGET_LATENCY_CONCURRENCY,
                "meets": None if copy_ratio is None else copy_ratio <= TARGET_COPY_OVER_SIMILAR,
                "similar_p50_ms": miss_p50, "similar_p95_ms": level["latency"].get("p95_ms"),
                "copy_p50_ms": copy["latency"].get("p50_ms"), "copy_p95_ms": copy["latency"].get("p95_ms"),
            })
    return result
