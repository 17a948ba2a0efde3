"""Wires the search service: the configured store, the servicer and its executor, in a ManagedServer."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from search_svc.generation import IndexGeneration
from search_svc.item_codec import ItemCodec
from search_svc.metrics import StoreMetrics, store_queue_seconds
from search_svc.servicer import SERVICE_NAME, VectorSearchServicer
from search_svc.settings import SearchSettings
from search_svc.vector_store import VectorStore
from service_kit.server import ManagedServer
from vsearch.v1 import search_pb2_grpc

__all__ = ["SERVICE_NAME", "create_server", "create_store"]


def create_store(settings: SearchSettings, registry: CollectorRegistry) -> VectorStore:
    """The backend `settings.backend` names. Its module is imported here, so a process loads only its
    own backend's libraries (pymilvus and Milvus Lite, or faiss)."""
    metrics = StoreMetrics(settings.backend, registry)
    if settings.backend == "faiss":
        from search_svc.faiss_store import FaissStore

        return FaissStore(settings, metrics)
    from search_svc.milvus_store import MilvusStore

    return MilvusStore(settings, metrics)


async def create_server(settings: SearchSettings) -> tuple[ManagedServer, int]:
    """The search service, not started. `start()` binds the port at once; health stays NOT_SERVING
    until the store is reached or loaded and the collection is ready (retried with backoff)."""
    server = ManagedServer("search_svc", settings, [SERVICE_NAME])
    registry = server.metrics.registry
    executor = ThreadPoolExecutor(max_workers=settings.store_workers, thread_name_prefix="search-store")
    store = create_store(settings, registry)
    servicer = VectorSearchServicer(
        settings, store, ItemCodec(settings.dimension, settings.filter_fields), IndexGeneration(), executor,
        store_queue_seconds(registry),
    )
    search_pb2_grpc.add_VectorSearchServicer_to_server(servicer, server.grpc_server)

    async def open_store() -> None:
        await asyncio.get_running_loop().run_in_executor(executor, store.open)

    async def close_store() -> None:
        # Off the loop: waits for calls still in the executor (each bounded by the store's timeout),
        # including a startup attempt that stop() gave up on, then closes what they used.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(executor.shutdown, wait=True, cancel_futures=True))
        await loop.run_in_executor(None, store.close)

    server.on_startup(open_store)
    server.on_shutdown(close_store)
    return server, server.port
