"""The embedder's factory: wires the engine, its backend, the health monitor and the servicer into a
ManagedServer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedder_svc.backend_health import BackendHealthMonitor
from embedder_svc.backends import InferenceBackend, create_backend
from embedder_svc.engine import EmbeddingEngine
from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.metrics import EmbedderMetrics
from embedder_svc.model_card import ModelCard
from embedder_svc.servicer import SERVICE_NAME, EmbedderServicer
from embedder_svc.text_search import TextSearchService
from embedder_svc.settings import EmbedderSettings
from service_kit.server import ManagedServer
from vsearch.v1 import embedder_pb2_grpc

__all__ = ["SERVICE_NAME", "create_server"]


async def create_server(settings: EmbedderSettings) -> tuple[ManagedServer, int]:
    """Builds the embedder, bound but not started. The model loads in a startup hook after `start()`
    (health NOT_SERVING until then); executors and the model are released on `stop()`."""
    server = ManagedServer("embedder", settings, [SERVICE_NAME])
    metrics = EmbedderMetrics(server.metrics.registry)
    decode_executor = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="embedder-decode")

    def backend_factory(model_dir: Path, card: ModelCard) -> InferenceBackend:
        return create_backend(settings, model_dir, card)

    engine = EmbeddingEngine(
        model_dir=settings.model_dir,
        backend_factory=backend_factory,
        decoder=ImageDecoder(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
        decode_executor=decode_executor,
        decode_workers=settings.decode_workers,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000.0,
        metrics=metrics,
        copy_settings=settings.copy_search,
        reduced_decoding=settings.reduced_decoding,
    )
    monitor = BackendHealthMonitor(server, engine)
    # Search by words, when the model card has a text section: loaded after the model, never failing it.
    text = TextSearchService(settings.model_dir, lambda: engine.model.card)
    servicer = EmbedderServicer(engine, settings.backend, settings.max_images_per_request, metrics, monitor, text)
    embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server.grpc_server)

    async def shut_down_decoding() -> None:
        await asyncio.to_thread(decode_executor.shutdown, True, cancel_futures=True)

    server.on_startup(engine.load)
    server.on_startup(text.load)
    server.on_startup(monitor.start)
    # Shutdown hooks run in reverse: the health monitor, the engine (batcher, backend), then decoding.
    server.on_shutdown(shut_down_decoding)
    server.on_shutdown(engine.close)
    server.on_shutdown(text.close)
    server.on_shutdown(monitor.stop)
    return server, server.port
