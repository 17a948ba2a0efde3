"""`vsearch bench ann`: search_svc on synthetic clustered unit vectors, per backend (in-process FAISS,
Milvus Lite) and index type (FLAT, IVF_FLAT at several nprobe): build time, memory, QPS at batch 1 and
batch 100 through the service (gRPC Search), and recall@k against exact numpy search. Optionally
raw faiss-cpu (HNSW, IVF) in this process, without a service around it, as the ceiling.

search_svc runs in this process (`create_server`) on temporary files per backend and index type, so
its settings are exactly the ones under test. Memory: the RSS of the `milvus` process for Milvus
Lite; for FAISS, which lives in this process, the growth of this process's RSS while building. Vectors are generated in fixed blocks from the seed,
so even 1M x 1280 never has to sit in memory at once; the exact top-k of the recall queries is kept
up to date block by block."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np

from search_svc.server import create_server
from search_svc.settings import SearchSettings
from vsearch_cli.bench.common import BenchError, latency_summary, rate
from vsearch_cli.bench.procs import CpuMeter, memory, milvus_lite_pid
from vsearch_cli.bench.stack import channel
from vsearch.v1 import search_pb2, search_pb2_grpc

BLOCK_ROWS = 10_000
# Items per Upsert request: ~5 MB at 1280-d; search_svc splits it into Milvus calls of at most 4 MiB.
UPSERT_ITEMS = 1000
BATCH_QUERIES = 100
TARGET_RECALL = 0.95
# Scores within this of the k-th exact score count as correct: float32 sums differ by the summation
# order, and a near-tie at rank k is not an error of the index.
TIE_TOLERANCE = 1e-5
SERVER_READY_TIMEOUT_S = 1800.0
MILVUS_CALL_TIMEOUT_S = 600.0
INDEX_TYPES = ("FLAT", "IVF_FLAT")
BACKENDS = ("faiss", "milvus")
ENGINES = {"faiss": "search_svc faiss", "milvus": "milvus-lite"}


@dataclass
class AnnConfig:
    sizes: list[int]
    index_types: list[str]
    nprobes: list[int]
    nlist: int | None
    clusters: int
    spread: float
    dimension: int
    queries: int
    batch_requests: int
    recall_queries: int
    k: int
    seed: int
    work_dir: Path
    faiss: bool
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    faiss_hnsw_m: int = 32
    faiss_ef_search: list[int] = field(default_factory=lambda: [32, 64, 128])
    keep: bool = False


class ClusteredVectors:
    """Unit vectors around `clusters` random unit centres. `spread` is the noise's expected norm
    relative to the centre's (1.0: a point's cosine to its centre is about 0.7)."""

    def __init__(self, dimension: int, clusters: int, spread: float, seed: int) -> None:
        self.dimension = dimension
        self.spread = spread
        self.seed = seed
        self.centres = _unit(np.random.default_rng([seed, 0]).standard_normal((clusters, dimension), dtype=np.float32))

    def _draw(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        labels = rng.integers(len(self.centres), size=rows)
        noise = rng.standard_normal((rows, self.dimension), dtype=np.float32)
        noise *= self.spread / math.sqrt(self.dimension)
        return _unit(self.centres[labels] + noise)

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) in blocks of BLOCK_ROWS; block b is the same for every size."""
        for start in range(0, size, BLOCK_ROWS):
            rng = np.random.default_rng([self.seed, 1, start // BLOCK_ROWS])
            yield start, self._draw(rng, BLOCK_ROWS)[:min(BLOCK_ROWS, size - start)]

    def queries(self, count: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 2]), count)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class ExactTopK:
    """Exact top-k (inner product) of a few queries, merged block by block."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = queries
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, start: int, block: np.ndarray) -> None:
        scores = self.queries @ block.T
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, np.broadcast_to(np.arange(start, start + len(block)), scores.shape)], axis=1)
        keep = np.argpartition(-merged_scores, self.k - 1, axis=1)[:, :self.k]
        self.scores = np.take_along_axis(merged_scores, keep, axis=1)
        self.ids = np.take_along_axis(merged_ids, keep, axis=1)

    def recall(self, found: Sequence[Sequence[int]], found_scores: Sequence[Sequence[float]] | None = None) -> float:
        """Share of the exact top-k found. A hit whose exact score ties the k-th best (within
        TIE_TOLERANCE) counts too: its own score is recomputed from the true vectors when given."""
        kth = self.scores.min(axis=1)
        correct = 0
        for row, hits in enumerate(found):
            exact = set(self.ids[row].tolist())
            for position, hit in enumerate(hits[:self.k]):
                if hit in exact:
                    correct += 1
                elif found_scores is not None and found_scores[row][position] >= kth[row] - TIE_TOLERANCE:
                    correct += 1
        return round(correct / (self.k * len(found)), 4)


def default_nlist(size: int) -> int:
    """Milvus's rule of thumb, 4 * sqrt(n), as a power of two."""
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(size)))))


def item_id(row: int) -> str:
    return f"v{row}"


def upsert_requests(start: int, block: np.ndarray) -> Iterator[search_pb2.UpsertRequest]:
    for offset in range(0, len(block), UPSERT_ITEMS):
        rows = block[offset:offset + UPSERT_ITEMS]
        yield search_pb2.UpsertRequest(items=[
            search_pb2.Item(id=item_id(start + offset + index), vector=search_pb2.Vector(values=vector.tolist()))
            for index, vector in enumerate(rows)
        ])


async def start_search_service(settings: SearchSettings) -> Any:
    server, _port = await create_server(settings)
    await server.start()
    try:
        await server.wait_ready(SERVER_READY_TIMEOUT_S)
    except TimeoutError:
        await server.stop(grace=1)
        raise BenchError(f"search_svc ({settings.backend}) not ready after {SERVER_READY_TIMEOUT_S:.0f}s") from None
    return server


def search_settings(store_path: Path, backend: str, config: AnnConfig, index_type: str, nlist: int, nprobe: int | None,
                    size: int) -> SearchSettings:
    return SearchSettings(
        port=0,
        backend=backend,
        collection="bench_ann",
        # IVF lists trained once, on everything, when the last vector is in (as after a bulk load).
        **({"milvus": {"uri": str(store_path), "timeout_s": MILVUS_CALL_TIMEOUT_S}} if backend == "milvus" else
           {"faiss": {"data_dir": store_path, "ivf_train_min_items": max(100, size)}}),
        dimension=config.dimension,
        index_type=index_type,
        index_params={"nlist": nlist} if index_type.startswith("IVF") else {},
        search_params={"nprobe": nprobe} if nprobe is not None else {},
        log_level="WARNING",
    )


async def measure_queries(stub: search_pb2_grpc.VectorSearchStub, queries: np.ndarray, config: AnnConfig,
                          exact: ExactTopK) -> dict[str, Any]:
    """Batch 1 (one query per request, one at a time), then batch 100; recall from the batch-1 answers
    to the first queries (the ones `exact` holds)."""
    single = [search_pb2.SearchRequest(queries=[search_pb2.Vector(values=query.tolist())], k=config.k)
              for query in queries[:config.queries]]
    try:
        latencies, found, found_scores = [], [], []
        started = time.perf_counter()
        for request in single:
            request_started = time.perf_counter()
            reply = await stub.Search(request, timeout=MILVUS_CALL_TIMEOUT_S)
            latencies.append(time.perf_counter() - request_started)
            hits = reply.results[0].hits
            found.append([int(hit.id[1:]) for hit in hits])
            found_scores.append([hit.score for hit in hits])
        single_seconds = time.perf_counter() - started
        batched = [
            search_pb2.SearchRequest(k=config.k, queries=[
                search_pb2.Vector(values=query.tolist()) for query in queries[start:start + BATCH_QUERIES]])
            for start in range(0, BATCH_QUERIES * config.batch_requests, BATCH_QUERIES)
        ]
        batch_latencies = []
        started = time.perf_counter()
        for request in batched:
            request_started = time.perf_counter()
            await stub.Search(request, timeout=MILVUS_CALL_TIMEOUT_S)
            batch_latencies.append(time.perf_counter() - request_started)
        batch_seconds = time.perf_counter() - started
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"search_svc Search: {error.code().name}: {error.details()}") from None
    recall_rows = len(exact.queries)
    return {
        "qps_batch1": rate(len(single), single_seconds),
        "latency_batch1": latency_summary(latencies),
        "qps_batch100": rate(BATCH_QUERIES * len(batched), batch_seconds) if batched else None,
        "latency_batch100": latency_summary(batch_latencies),
        "recall_at_k": exact.recall(found[:recall_rows], found_scores[:recall_rows]),
    }


async def service_runs(config: AnnConfig, backend: str, vectors: ClusteredVectors, size: int, index_type: str,
                       queries: np.ndarray, exact: ExactTopK) -> list[dict[str, Any]]:
    """Builds one store (a Milvus Lite file or a FAISS data dir) with this index type, then measures
    it at each search setting (a search_svc setting, so each one gets its own server on the same
    store: the reopen time shows too)."""
    nlist = config.nlist or default_nlist(size)
    search_variants: list[int | None] = list(config.nprobes) if index_type.startswith("IVF") else [None]
    name = f"ann-{size}-{index_type.lower()}"
    store_path = config.work_dir / (f"{name}.db" if backend == "milvus" else f"{name}-faiss")
    runs = []
    build: dict[str, Any] = {}
    rss_before = memory_self()
    try:
        for variant_index, nprobe in enumerate(search_variants):
            settings = search_settings(store_path, backend, config, index_type, nlist, nprobe, size)
            started = time.perf_counter()
            server = await start_search_service(settings)
            open_seconds = time.perf_counter() - started
            pid = milvus_lite_pid(store_path) if backend == "milvus" else None
            meter = CpuMeter({"bench_process": os.getpid(), **({"milvus": pid} if pid is not None else {})})
            meter.start()
            measured = time.perf_counter()
            try:
                async with channel(server.address) as grpc_channel:
                    stub = search_pb2_grpc.VectorSearchStub(grpc_channel)
                    if variant_index == 0:
                        build = await build_index(stub, vectors, size, queries[:1], server if backend == "faiss" else None,
                                                  index_type)
                        if backend == "faiss":
                            build["memory_growth_mib"] = round(memory_self() - rss_before, 1)
                    run: dict[str, Any] = {
                        "size": size, "engine": ENGINES[backend], "backend": backend, "index": index_type,
                        "index_params": settings.index_params, "search_params": settings.search_params,
                        **build, "open_s" if variant_index == 0 else "reopen_s": round(open_seconds, 3),
                    }
                    run.update(await measure_queries(stub, queries, config, exact))
                    if backend == "milvus":
                        run["milvus_memory"] = memory(pid) if pid is not None else {"error": "milvus process not found"}
                    run["cpu_by_process"] = meter.stop(time.perf_counter() - measured)
                    run["machine_load"] = meter.machine
                    runs.append(run)
            finally:
                await server.stop(grace=1)
    finally:
        if not config.keep:
            if backend == "milvus":
                remove_milvus_files(config.work_dir, store_path.name)
            else:
                shutil.rmtree(store_path, ignore_errors=True)
    return runs


async def wait_for_ivf_training(server: Any, timeout_s: float = SERVER_READY_TIMEOUT_S) -> None:
    """The FAISS backend trains IVF lists in the background once the last vector is in; searches
    before that are exact (flat), so the figures wait for it."""
    deadline = time.monotonic() + timeout_s
    while not server.metrics.registry.get_sample_value(
        "vsearch_store_index_build_seconds_count", {"backend": "faiss", "index": "ivf"}
    ):
        if time.monotonic() > deadline:
            raise BenchError(f"the FAISS IVF index was not trained within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


def remove_milvus_files(folder: Path, db_name: str) -> None:
    """The Milvus Lite file and whatever Milvus keeps beside it (lock, folders named after it)."""
    for leftover in [*folder.glob(f"{db_name}*"), folder / f".{db_name}.lock"]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


async def build_index(stub: search_pb2_grpc.VectorSearchStub, vectors: ClusteredVectors, size: int,
                      probe: np.ndarray, faiss_server: Any | None = None, index_type: str = "FLAT") -> dict[str, Any]:
    """Inserts every vector through Upsert, waits for the FAISS backend's IVF training, then times
    the first search (whatever index work Milvus left for later shows there)."""
    encode_seconds = 0.0
    started = time.perf_counter()
    try:
        for start, block in vectors.blocks(size):
            encode_started = time.perf_counter()
            requests = list(upsert_requests(start, block))
            encode_seconds += time.perf_counter() - encode_started
            for request in requests:
                await stub.Upsert(request, timeout=MILVUS_CALL_TIMEOUT_S)
        insert_seconds = time.perf_counter() - started
        if faiss_server is not None and index_type == "IVF_FLAT":
            await wait_for_ivf_training(faiss_server)
        train_seconds = time.perf_counter() - started - insert_seconds
        first_started = time.perf_counter()
        await stub.Search(search_pb2.SearchRequest(queries=[search_pb2.Vector(values=probe[0].tolist())], k=10),
                          timeout=MILVUS_CALL_TIMEOUT_S)
        first_search_seconds = time.perf_counter() - first_started
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"search_svc Upsert: {error.code().name}: {error.details()}") from None
    return {
        "insert_s": round(insert_seconds, 3),
        "insert_vectors_per_s": rate(size, insert_seconds),
        "client_encode_s": round(encode_seconds, 3),
        "train_wait_s": round(train_seconds, 3),
        "first_search_s": round(first_search_seconds, 3),
        "build_s": round(insert_seconds + train_seconds + first_search_seconds, 3),
    }


def faiss_runs(config: AnnConfig, vectors: ClusteredVectors, size: int, queries: np.ndarray,
               exact: ExactTopK) -> list[dict[str, Any]]:
    """faiss-cpu in this process, no service around it: the ceiling of an in-process index, and HNSW,
    which search_svc's FAISS backend does not offer (no deletes)."""
    import faiss

    nlist = config.nlist or default_nlist(size)
    runs = []
    hnsw = faiss.IndexHNSWFlat(config.dimension, config.faiss_hnsw_m, faiss.METRIC_INNER_PRODUCT)
    runs.extend(_faiss_measure(
        hnsw, "HNSW", {"M": config.faiss_hnsw_m, "efConstruction": hnsw.hnsw.efConstruction},
        [("efSearch", value) for value in config.faiss_ef_search],
        lambda index, value: setattr(index.hnsw, "efSearch", value), vectors, size, queries, exact, config))
    del hnsw  # one index in memory at a time: at 1M x 1280 each holds 5 GB of vectors
    # `quantizer` must outlive `ivf`, which only points at it: both are locals of this function.
    quantizer = faiss.IndexFlatIP(config.dimension)
    ivf = faiss.IndexIVFFlat(quantizer, config.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    runs.extend(_faiss_measure(
        ivf, "IVF_FLAT", {"nlist": nlist}, [("nprobe", value) for value in config.nprobes],
        lambda index, value: setattr(index, "nprobe", value), vectors, size, queries, exact, config))
    return runs


def _faiss_measure(index: Any, name: str, build_params: dict[str, Any], variants: list[tuple[str, int]],
                   apply: Callable[[Any, int], None], vectors: ClusteredVectors, size: int, queries: np.ndarray, exact: ExactTopK,
                   config: AnnConfig) -> list[dict[str, Any]]:
    rss_before = memory_self()
    meter = CpuMeter({"bench_process": os.getpid()})
    meter.start()
    measured = started = time.perf_counter()
    if not index.is_trained:
        # k-means on a sample: 64 points per list (or everything, when smaller).
        training = np.concatenate([block for _start, block in vectors.blocks(min(size, 64 * build_params["nlist"]))])
        index.train(training)
    for _start, block in vectors.blocks(size):
        index.add(block)
    build_seconds = time.perf_counter() - started
    grown_mib = round(memory_self() - rss_before, 1)
    runs = []
    for key, value in variants:
        apply(index, value)
        latencies, found, found_scores = [], [], []
        started = time.perf_counter()
        for query in queries[:config.queries]:
            query_started = time.perf_counter()
            scores, ids = index.search(query[np.newaxis], config.k)
            latencies.append(time.perf_counter() - query_started)
            found.append(ids[0].tolist())
            found_scores.append(scores[0].tolist())
        single_seconds = time.perf_counter() - started
        batch_rows = min(len(queries), BATCH_QUERIES * config.batch_requests)
        started = time.perf_counter()
        for start in range(0, batch_rows, BATCH_QUERIES):
            index.search(queries[start:start + BATCH_QUERIES], config.k)
        batch_seconds = time.perf_counter() - started
        recall_rows = len(exact.queries)
        runs.append({
            "size": size, "engine": "raw faiss (no service)", "index": name, "index_params": build_params,
            "search_params": {key: value}, "build_s": round(build_seconds, 3), "memory_growth_mib": grown_mib,
            "qps_batch1": rate(len(latencies), single_seconds), "latency_batch1": latency_summary(latencies),
            "qps_batch100": rate(batch_rows, batch_seconds) if batch_rows >= BATCH_QUERIES else None,
            "recall_at_k": exact.recall(found[:recall_rows], found_scores[:recall_rows]),
        })
    cpu = meter.stop(time.perf_counter() - measured)
    for run in runs:
        run["cpu_by_process"], run["machine_load"] = cpu, meter.machine
    return runs


def memory_self() -> float:
    return memory(os.getpid()).get("rss_mib", 0.0)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def single_machine_default(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bench's verdict: at the largest size measured, the fastest (batch-1 QPS) search_svc setting
    that meets the recall target. SearchSettings' default backend follows it."""
    service = [run for run in runs if run.get("backend")]
    if not service:
        return None
    largest = max(run["size"] for run in service)
    eligible = [run for run in service if run["size"] == largest and run["meets_recall_target"]]
    if not eligible:
        return None
    best = max(eligible, key=lambda run: run["qps_batch1"])
    return {key: best[key] for key in ("size", "backend", "index", "index_params", "search_params", "qps_batch1",
                                       "recall_at_k")}


async def run_ann(config: AnnConfig) -> dict[str, Any]:
    vectors = ClusteredVectors(config.dimension, config.clusters, config.spread, config.seed)
    queries = vectors.queries(max(config.queries, config.recall_queries, BATCH_QUERIES * config.batch_requests))
    config.work_dir.mkdir(parents=True, exist_ok=True)
    use_faiss = config.faiss and faiss_available()
    runs: list[dict[str, Any]] = []
    for size in config.sizes:
        started = time.perf_counter()
        exact = ExactTopK(queries[:min(config.recall_queries, config.queries)], config.k)
        for start, block in vectors.blocks(size):
            exact.add(start, block)
        exact_seconds = time.perf_counter() - started
        for backend in config.backends:
            for index_type in config.index_types:
                for run in await service_runs(config, backend, vectors, size, index_type, queries, exact):
                    run["exact_numpy_s"] = round(exact_seconds, 3)
                    runs.append(run)
        if use_faiss:
            runs.extend(faiss_runs(config, vectors, size, queries, exact))
    for run in runs:
        run["meets_recall_target"] = run["recall_at_k"] >= TARGET_RECALL
    return {
        "single_machine_default": single_machine_default(runs),
        "dimension": config.dimension, "clusters": config.clusters, "spread": config.spread, "k": config.k,
        "queries_batch1": config.queries, "queries_batch100": BATCH_QUERIES * config.batch_requests,
        "recall_queries": min(config.recall_queries, config.queries), "target_recall": TARGET_RECALL,
        "faiss": "measured" if use_faiss else ("not installed (pip install faiss-cpu)" if config.faiss else "off"),
        "runs": runs,
    }
