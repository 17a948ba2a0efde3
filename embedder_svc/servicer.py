"""The vsearch.v1.Embedder servicer: validates a request, hands its images to the engine and turns
each outcome into an embedding or a per-item error."""

from __future__ import annotations

import grpc

from embedder_svc.backend_health import BackendHealthMonitor
from embedder_svc.backends import BackendError, BackendMisconfigured, BackendUnavailable
from embedder_svc.batching import BatcherClosed
from embedder_svc.engine import EmbeddingEngine, ModelNotLoaded
from embedder_svc.image_decoding import CropBox, ImageRejected
from embedder_svc.metrics import EmbedderMetrics
from embedder_svc.model_card import ModelCard
from service_kit.float_vectors import float_message
from service_kit.status import ServiceError, invalid_argument
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


def _rpc_code(code: grpc.StatusCode) -> int:
    """google.rpc.Code value of a gRPC status code, for per-item errors."""
    return code.value[0]


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
        return embedder_pb2.EmbedResult(embedding=float_message(embedder_pb2.Embedding, outcome))

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
