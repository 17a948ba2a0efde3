"""`vsearch bench ingest`: end-to-end AddImages throughput against what its parts can do alone.

- end to end: images streamed to the gateway's AddImages (as `vsearch index` does: chunks of 64,
  two streams at once) into a fresh collection, dropped afterwards;
- model alone: the embedder's onnxruntime backend, same settings, on pre-decoded tensors, at the
  gateway's batch size;
- decode alone: the embedder's ImageDecoder + Preprocessor on the embedder's number of decode threads;
- naive: decode, preprocess, infer a batch of one, Upsert one item straight to search_svc, repeat.

The bound 1 / (1/decode + 1/model) is what a pipeline that keeps the cores busy with nothing but
decoding and inference would reach when both compete for the same cores."""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np
from google.protobuf import struct_pb2

from vsearch_cli.bench.common import BenchError, latency_summary, rate, ratio, read_all, sample_images
from vsearch_cli.model_rig import ModelRig
from vsearch_cli.bench.procs import CpuMeter, PySpyProfiles, histogram_delta, metric_delta, scrape
from vsearch_cli.bench.stack import (
    StackEndpoints,
    channel,
    drop_collection,
    new_collection_name,
)
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2, search_pb2_grpc

TARGET_RATIO_TO_BOUND = 0.85
TARGET_RATIO_TO_NAIVE = 3.0
# Single-thread decode is measured on at most this many images (it only adds context).
SINGLE_THREAD_DECODE_IMAGES = 100
# Distinct stacked batches cycled through by the model-alone run (stacking stays out of the timing).
MODEL_BATCH_VARIANTS = 4
ADD_TIMEOUT_S = 900.0
# Python services py-spy can sample (milvus and redis are native).
PYTHON_SERVICES = ("gateway", "embedder", "search")

ImageItem = tuple[str, bytes, Path]


@dataclass
class IngestConfig:
    images: int
    naive_images: int
    batch_size: int
    streams: int
    chunk: int
    dataset: Path
    seed: int
    # Every measurement this many times, interleaved: medians resist a neighbour's burst of load.
    repeat: int = 1
    # Where py-spy profiles go (first repetition only); None: no profiling.
    profile_dir: Path | None = None


def add_requests(items: Sequence[ImageItem], collection: str) -> list[gateway_pb2.AddImageRequest]:
    requests = []
    for item_id, data, path in items:
        metadata = struct_pb2.Struct()
        metadata.update({"category": path.parent.name, "filename": path.name})
        requests.append(gateway_pb2.AddImageRequest(
            id=item_id, image=data, image_uri=path.resolve().as_uri(), metadata=metadata, collection=collection,
        ))
    return requests


async def add_stream(stub: gateway_pb2_grpc.VisualSearchStub,
                     requests: Sequence[gateway_pb2.AddImageRequest]) -> gateway_pb2.AddImagesSummary:
    try:
        return await stub.AddImages(iter(requests), timeout=ADD_TIMEOUT_S, wait_for_ready=True)
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"gateway AddImages: {error.code().name}: {error.details()}") from None


async def add_all(stub: gateway_pb2_grpc.VisualSearchStub, items: Sequence[ImageItem], collection: str,
                  chunk: int, streams: int) -> tuple[list[gateway_pb2.AddImagesSummary], float]:
    """`streams` AddImages calls in flight, each carrying the next `chunk` images (like `vsearch index`).
    Returns the summaries and the seconds the calls took (requests are built before the clock starts)."""
    requests = add_requests(items, collection)
    chunks = [requests[start:start + chunk] for start in range(0, len(requests), chunk)]
    position = 0
    summaries: list[gateway_pb2.AddImagesSummary] = []

    async def sender() -> None:
        nonlocal position
        while position < len(chunks):
            mine, position = chunks[position], position + 1
            summaries.append(await add_stream(stub, mine))

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(max(1, streams))))
    return summaries, time.perf_counter() - started


def decode_alone(rig: ModelRig, images: Sequence[bytes]) -> tuple[list[np.ndarray], dict[str, Any]]:
    workers = rig.settings.decode_workers
    tensors, seconds = rig.prepare_all(images, workers)
    subset = images[:SINGLE_THREAD_DECODE_IMAGES]
    _, single_seconds = rig.prepare_all(subset, 1)
    return tensors, {
        "images": len(images), "workers": workers, "seconds": round(seconds, 3),
        "images_per_s": rate(len(images), seconds),
        "single_thread_images_per_s": rate(len(subset), single_seconds),
    }


async def model_alone(rig: ModelRig, tensors: Sequence[np.ndarray], batch_size: int, images: int) -> dict[str, Any]:
    variants = [
        np.stack([tensors[(start + offset) % len(tensors)] for offset in range(batch_size)])
        for start in range(0, batch_size * MODEL_BATCH_VARIANTS, batch_size)
    ]
    await rig.infer(variants[0])  # this batch shape's first run allocates
    batches = max(3, math.ceil(images / batch_size))
    latencies = []
    started = time.perf_counter()
    for index in range(batches):
        batch_started = time.perf_counter()
        await rig.infer(variants[index % len(variants)])
        latencies.append(time.perf_counter() - batch_started)
    seconds = time.perf_counter() - started
    return {
        "batch_size": batch_size, "batches": batches, "images": batches * batch_size, "seconds": round(seconds, 3),
        "images_per_s": rate(batches * batch_size, seconds), "batch_latency": latency_summary(latencies),
    }


def stage_figures(before: dict[str, dict], after: dict[str, dict], wall_s: float) -> dict[str, Any]:
    """Per-stage time from the services' own metrics: how full the embedder's batches were, how busy
    inference kept, and what each downstream call cost."""
    figures: dict[str, Any] = {}
    if after.get("embedder"):
        embedder = before.get("embedder", {}), after["embedder"]
        batches = histogram_delta(*embedder, "vsearch_embedder_batch_size")
        inference = histogram_delta(*embedder, "vsearch_embedder_inference_seconds")
        figures["embedder"] = {
            "inference_runs": batches["count"], "mean_batch_size": round(batches["mean"], 2),
            "inference_s": inference["sum"], "mean_inference_ms": round(inference["mean"] * 1000, 2),
            "inference_busy_fraction": round(inference["sum"] / wall_s, 3) if wall_s > 0 else None,
            "embed_images_rpc": _rpc(embedder, "EmbedImages"),
        }
    if after.get("search"):
        search = before.get("search", {}), after["search"]
        # The store's own calls, labelled with its backend (faiss or milvus).
        store_metric = "vsearch_store_call_seconds"
        store_labels = [dict(labels) for name, labels in search[1] if name == f"{store_metric}_count"]
        operations = sorted({labels.get("operation", "") for labels in store_labels})
        figures["search"] = {
            "upsert_rpc": _rpc(search, "Upsert"),
            "other_rpcs": {method: _rpc(search, method) for method in ("Get", "Stats", "Search")
                           if metric_delta(*search, "vsearch_grpc_latency_seconds_count", method=method)},
            "store": next((labels.get("backend", "") for labels in store_labels), "faiss"),
            "store_calls": {
                operation: _histogram_ms(histogram_delta(*search, store_metric, operation=operation))
                for operation in operations
                if metric_delta(*search, f"{store_metric}_count", operation=operation)
            },
        }
    if after.get("gateway"):
        figures["gateway"] = {"add_images_rpc": _rpc((before.get("gateway", {}), after["gateway"]), "AddImages")}
    return figures


def _histogram_ms(histogram: dict[str, float]) -> dict[str, float]:
    return {"calls": histogram["count"], "total_s": histogram["sum"], "mean_ms": round(histogram["mean"] * 1000, 2)}


def _rpc(pair: tuple[dict, dict], method: str) -> dict[str, float]:
    return _histogram_ms(histogram_delta(*pair, "vsearch_grpc_latency_seconds", method=method))


def scrape_all(stack: StackEndpoints) -> dict[str, dict]:
    return {name: scrape(url) for name, url in stack.metrics_urls.items()}


async def end_to_end(config: IngestConfig, stack: StackEndpoints, items: list[ImageItem],
                     warm_items: list[ImageItem]) -> dict[str, Any]:
    collection = new_collection_name("ingest")
    profiles = None
    if config.profile_dir is not None and stack.pids:
        profiles = PySpyProfiles({name: pid for name, pid in stack.pids.items() if name in PYTHON_SERVICES}
                                 | {"bench_client": os.getpid()}, config.profile_dir)
    meter = CpuMeter({**stack.pids, "bench_client": os.getpid()})
    async with channel(stack.gateway) as grpc_channel:
        stub = gateway_pb2_grpc.VisualSearchStub(grpc_channel)
        try:
            # Creates the collection and warms every process (connections, the model's batch shapes).
            await add_all(stub, warm_items, collection, config.chunk, 1)
            metrics_before = scrape_all(stack)
            meter.start()
            if profiles is not None:
                profiles.start()
            try:
                summaries, seconds = await add_all(stub, items, collection, config.chunk, config.streams)
            finally:
                profile_summary = profiles.stop() if profiles is not None else None
            cpu = meter.stop(seconds)
            metrics_after = scrape_all(stack)
        finally:
            cleanup = await drop_collection(stub, collection)
    failures = [failure for summary in summaries for failure in summary.failures]
    result: dict[str, Any] = {
        "images": len(items), "seconds": round(seconds, 3), "images_per_s": rate(len(items), seconds),
        "indexed": sum(summary.indexed for summary in summaries),
        "unchanged": sum(summary.unchanged for summary in summaries),
        "failed": sum(summary.failed for summary in summaries),
        "first_failures": [f"{failure.id}: {failure.message}" for failure in failures[:3]],
        "streams": config.streams, "chunk": config.chunk, "collection": collection, "cleanup": cleanup,
        "cpu_by_process": cpu, "machine_load": meter.machine,
        "stages": stage_figures(metrics_before, metrics_after, seconds),
    }
    if profiles is not None:
        result["profile"] = {"processes": profile_summary, "problems": profiles.problems}
    return result


async def naive_loop(rig: ModelRig, search_address: str, items: list[ImageItem]) -> dict[str, Any]:
    """One image at a time, nothing overlapped: the baseline the service's batching must beat."""
    collection = new_collection_name("naive")
    ids = [f"naive-{index:06d}" for index in range(len(items))]

    def upsert_request(item_id: str, vector: np.ndarray, path: Path) -> search_pb2.UpsertRequest:
        metadata = struct_pb2.Struct()
        metadata.update({"category": path.parent.name, "filename": path.name})
        return search_pb2.UpsertRequest(collection=collection, items=[search_pb2.Item(
            id=item_id, vector=search_pb2.Vector(values=vector.tolist()), image_uri=path.resolve().as_uri(),
            metadata=metadata,
        )])

    async with channel(search_address) as grpc_channel:
        stub = search_pb2_grpc.VectorSearchStub(grpc_channel)
        try:
            # The first write creates the collection: not part of the loop's speed.
            _id, data, path = items[0]
            await stub.Upsert(upsert_request("naive-warmup", await rig.embed(data), path), timeout=60)
            started = time.perf_counter()
            for item_id, (_item_id, data, path) in zip(ids, items):
                vector = (await rig.infer(rig.prepare(data)[np.newaxis]))[0]
                await stub.Upsert(upsert_request(item_id, vector, path), timeout=60)
            seconds = time.perf_counter() - started
        except grpc.aio.AioRpcError as error:
            raise BenchError(f"search_svc Upsert: {error.code().name}: {error.details()}") from None
        finally:
            cleanup = await drop_collection(stub, collection)
    return {"images": len(items), "seconds": round(seconds, 3), "images_per_s": rate(len(items), seconds),
            "collection": collection, "cleanup": cleanup}


async def one_repetition(config: IngestConfig, stack: StackEndpoints, rig: ModelRig, items: list[ImageItem],
                         warm_items: list[ImageItem], profile: bool) -> dict[str, Any]:
    """Every figure once, back to back, so the ratios compare measurements taken close in time."""
    datas = [data for _id, data, _path in items]
    tensors, decode = decode_alone(rig, datas)
    model = await model_alone(rig, tensors, config.batch_size, len(datas))
    bound = 1.0 / (1.0 / decode["images_per_s"] + 1.0 / model["images_per_s"])
    e2e = await end_to_end(config if profile else replace(config, profile_dir=None), stack, items, warm_items)
    if stack.search is None:
        naive: dict[str, Any] = {"skipped": "no search_svc address (give --search ADDR)"}
    else:
        naive = await naive_loop(rig, stack.search, items[:config.naive_images])
    return {
        "end_to_end": e2e, "model_alone": model, "decode_alone": decode, "naive": naive, "bound_images_per_s": bound,
        "ratio_to_bound": ratio(e2e["images_per_s"], bound),
        "ratio_to_naive": ratio(e2e["images_per_s"], naive.get("images_per_s")),
    }


def _median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return round(float(np.median(known)), 3) if known else None


async def run_ingest(config: IngestConfig, stack: StackEndpoints, rig: ModelRig) -> dict[str, Any]:
    """`config.repeat` repetitions; the figures reported are their medians (each stage's own runs
    listed beside it), the details (stages, CPU, profile) those of the first repetition."""
    paths, warm_paths = sample_images(config.dataset, [config.images, config.batch_size], config.seed)
    datas, warm_datas = read_all(paths), read_all(warm_paths)
    items = [(f"bench-{index:06d}", data, path) for index, (data, path) in enumerate(zip(datas, paths))]
    warm_items = [(f"bench-warmup-{index:03d}", data, path)
                  for index, (data, path) in enumerate(zip(warm_datas, warm_paths))]
    runs = [await one_repetition(config, stack, rig, items, warm_items, profile=index == 0)
            for index in range(config.repeat)]
    first = runs[0]
    stages = {}
    for stage in ("end_to_end", "model_alone", "decode_alone", "naive"):
        all_rates = [run[stage].get("images_per_s") for run in runs]
        stages[stage] = {**first[stage], "images_per_s": _median(all_rates), "images_per_s_runs": all_rates}
    # How busy the rest of the machine was during each end-to-end run: the noise in each repetition.
    stages["end_to_end"]["other_processes_cores_runs"] = [
        run["end_to_end"]["machine_load"].get("other_processes_cores") for run in runs]
    to_bound = _median([run["ratio_to_bound"] for run in runs])
    to_naive = _median([run["ratio_to_naive"] for run in runs])
    return {
        "images": len(items),
        "image_bytes": sum(len(data) for data in datas),
        "batch_size": config.batch_size,
        "repetitions": config.repeat,
        **stages,
        "bound_images_per_s": _median([run["bound_images_per_s"] for run in runs]),
        # Medians of each repetition's own ratio.
        "ratio_to_bound": to_bound,
        "ratio_to_bound_runs": [run["ratio_to_bound"] for run in runs],
        "target_ratio_to_bound": TARGET_RATIO_TO_BOUND,
        "meets_bound_target": None if to_bound is None else to_bound >= TARGET_RATIO_TO_BOUND,
        "ratio_to_naive": to_naive,
        "ratio_to_naive_runs": [run["ratio_to_naive"] for run in runs],
        "target_ratio_to_naive": TARGET_RATIO_TO_NAIVE,
        "meets_naive_target": None if to_naive is None else to_naive >= TARGET_RATIO_TO_NAIVE,
    }
