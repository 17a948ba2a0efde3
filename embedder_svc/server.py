"""The vsearch.v1.Embedder gRPC service and its factory."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from embedder_svc.backends import BackendError, InferenceBackend, create_backend
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


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, engine: EmbeddingEngine, backend_name: str, max_images_per_request: int, metrics: EmbedderMetrics) -> None:
        self._engine = engine
        self._backend_name = backend_name
        self._max_images = max_images_per_request
        self._metrics = metrics

    def _loaded_card(self) -> ModelCard:
        try:
            return self._engine.model.card
        except ModelNotLoaded as error:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"embedder: {error}") from None

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
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000.0,
        metrics=metrics,
    )
    servicer = EmbedderServicer(engine, settings.backend, settings.max_images_per_request, metrics)
    embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server.grpc_server)

    async def shut_down_decoding() -> None:
        await asyncio.to_thread(decode_executor.shutdown, True, cancel_futures=True)

    server.on_startup(engine.load)
    # Shutdown hooks run in reverse: the engine (batcher, backend) first, then decoding.
    server.on_shutdown(shut_down_decoding)
    server.on_shutdown(engine.close)
    return server, server.port
