"""The vsearch.v1.Embedder gRPC service and its factory."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from embedder_svc.backends import (
    BackendError,
    BackendMisconfigured,
    BackendUnavailable,
    InferenceBackend,
    create_backend,
)
from embedder_svc.batching import BatcherClosed
from embedder_svc.embedder_metrics import EmbedderMetrics
from embedder_svc.engine import EmbeddingEngine, ModelNotLoaded
from embedder_svc.image_decoding import CropBox, ImageDecoder, ImageRejected
from embedder_svc.model_card import ModelCard
from embedder_svc.settings import EmbedderSettings
from service_kit.server import ManagedServer
from service_kit.status import ServiceError, invalid_argument
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


def _rpc_code(code: grpc.StatusCode) -> int:
    """google.rpc.Code value of a gRPC status code, for per-item errors."""
    return code.value[0]


class BackendHealthMonitor:
    """Keeps health in step with a backend that can stop being ready after it loaded (a remote
    model server): every `health_interval_s`, and at once after an inference call found it
    unavailable, it asks the backend; NOT_SERVING while it is not ready, SERVING again when it is.
    In-process backends (no interval) are never checked."""

    def __init__(self, server: ManagedServer, engine: EmbeddingEngine) -> None:
        self._server = server
        self._engine = engine
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.serving = True
        self.last_error: BackendError | None = None

    async def start(self) -> None:
        """Startup hook, after the model loaded (health turns SERVING right after)."""
        if self._task is None and self._engine.model.backend.health_interval_s is not None:
            self._task = asyncio.create_task(self._run(), name="embedder-backend-health")

    def backend_failed(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                backend = self._engine.model.backend
            except ModelNotLoaded:  # shutting down
                return
            interval = backend.health_interval_s or 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await backend.check_ready()
            except BackendError as error:
                self.last_error = error
                await self._set_serving(False, str(error))
            else:
                self.last_error = None
                await self._set_serving(True, backend.describe())

    async def _set_serving(self, serving: bool, reason: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            logger.info("embedder backend ready again: %s; SERVING", reason)
        else:
            logger.warning("embedder backend not ready: %s; NOT_SERVING", reason)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # After a SIGTERM the health servicer ignores this (it stays NOT_SERVING while draining).
        for name in ("", *self._server.service_names):
            await self._server.health.set(name, status)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(
        self, engine: EmbeddingEngine, backend_name: str, max_images_per_request: int, metrics: EmbedderMetrics,
        monitor: BackendHealthMonitor | None = None,
    ) -> None:
        self._engine = engine
        self._backend_name = backend_name
        self._max_images = max_images_per_request
        self._metrics = metrics
        self._monitor = monitor

    def _loaded_card(self) -> ModelCard:
        try:
            return self._engine.model.card
        except ModelNotLoaded as error:
            # A model server without the model will not get it by retrying: say so precisely.
            code = (grpc.StatusCode.FAILED_PRECONDITION if isinstance(error.cause, BackendMisconfigured)
                    else grpc.StatusCode.UNAVAILABLE)
            raise ServiceError(code, f"embedder: {error}") from None

    async def EmbedImages(
        self, request: embedder_pb2.EmbedImagesRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedImagesResponse:
        card = self._loaded_card()
        count = len(request.images)
        if count == 0:
            raise invalid_argument("no images in the request; send at least one")
        if count > self._max_images:
            raise invalid_argument(f"{count} images in one request, over the limit of {self._max_images}")
        inputs = [
            (image.data, CropBox(image.crop.x, image.crop.y, image.crop.width, image.crop.height)
             if image.HasField("crop") else None)
            for image in request.images
        ]
        outcomes = await self._engine.embed_many(inputs)
        results = [self._result(index, outcome) for index, outcome in enumerate(outcomes)]
        return embedder_pb2.EmbedImagesResponse(results=results, model_version=card.version)

    def _result(self, index: int, outcome: object) -> embedder_pb2.EmbedResult:
        if isinstance(outcome, ImageRejected):
            return self._item_error(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {outcome.message}")
        if isinstance(outcome, (BatcherClosed, ModelNotLoaded)):
            return self._item_error(grpc.StatusCode.UNAVAILABLE, f"image {index}: {outcome}")
        if isinstance(outcome, BackendUnavailable):
            if self._monitor is not None:
                self._monitor.backend_failed()
            return self._item_error(grpc.StatusCode.UNAVAILABLE, f"image {index}: {outcome}")
        if isinstance(outcome, BackendMisconfigured):
            if self._monitor is not None:
                self._monitor.backend_failed()
            return self._item_error(grpc.StatusCode.FAILED_PRECONDITION, f"image {index}: {outcome}")
        if isinstance(outcome, BackendError):
            return self._item_error(grpc.StatusCode.INTERNAL, f"image {index}: inference failed: {outcome}")
        if isinstance(outcome, BaseException):
            raise outcome
        self._metrics.images_embedded.inc()
        return embedder_pb2.EmbedResult(embedding=embedder_pb2.Embedding(values=outcome.tolist()))

    def _item_error(self, code: grpc.StatusCode, message: str) -> embedder_pb2.EmbedResult:
        self._metrics.images_failed.labels(code.name).inc()
        return embedder_pb2.EmbedResult(error=embedder_pb2.ItemError(code=_rpc_code(code), message=message))

    async def Info(self, request: embedder_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> embedder_pb2.InfoResponse:
        card = self._loaded_card()
        return embedder_pb2.InfoResponse(
            model_name=card.name,
            model_version=card.version,
            dimension=card.output.dimension,
            preprocessing=card.preprocessing_summary(),
            backend=self._backend_name,
            max_batch_size=self._engine.max_batch_size,
        )


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
    )
    monitor = BackendHealthMonitor(server, engine)
    servicer = EmbedderServicer(engine, settings.backend, settings.max_images_per_request, metrics, monitor)
    embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server.grpc_server)

    async def shut_down_decoding() -> None:
        await asyncio.to_thread(decode_executor.shutdown, True, cancel_futures=True)

    server.on_startup(engine.load)
    server.on_startup(monitor.start)
    # Shutdown hooks run in reverse: the health monitor, the engine (batcher, backend), then decoding.
    server.on_shutdown(shut_down_decoding)
    server.on_shutdown(engine.close)
    server.on_shutdown(monitor.stop)
    return server, server.port
