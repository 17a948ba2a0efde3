"""The vsearch.v1.Embedder servicer: validates a request, hands its images to the engine and turns
each outcome into an embedding or a per-item error."""

from __future__ import annotations

import grpc

from embedder_svc.backend_health import BackendHealthMonitor
from embedder_svc.backends import BackendError, BackendMisconfigured, BackendUnavailable
from embedder_svc.batching import BatcherClosed
from embedder_svc.engine import CopyFeaturesFailed, Embedded, EmbeddingEngine, ModelNotLoaded
from embedder_svc.image_decoding import CropBox, ImageRejected
from embedder_svc.metrics import EmbedderMetrics
from embedder_svc.model_card import ModelCard
from embedder_svc.regions import REGION_GRID
from embedder_svc.text_search import MAX_TEXT_CHARS, TextSearchService, TextSearchUnavailable, normalise_text
from service_kit.copy_feature_codec import CopyFeatures, CopyFeaturesInvalid, decode_copy_features
from service_kit.float_vectors import float_message
from service_kit.status import ServiceError, invalid_argument
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
# Candidates of one VerifyCopies call (the contract's limit).
MAX_COPY_CANDIDATES = 1000


def _rpc_code(code: grpc.StatusCode) -> int:
    """google.rpc.Code value of a gRPC status code, for per-item errors."""
    return code.value[0]


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(
        self, engine: EmbeddingEngine, backend_name: str, max_images_per_request: int, metrics: EmbedderMetrics,
        monitor: BackendHealthMonitor | None = None, text: TextSearchService | None = None,
    ) -> None:
        self._engine = engine
        self._text = text
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
        copy_features = None
        if request.with_copy_features:
            copy_features = "query" if request.copy_features_for_query else "index"
        outcomes = await self._engine.embed_many(inputs, copy_features, with_regions=request.with_regions)
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
        if isinstance(outcome, CopyFeaturesFailed):
            return self._item_error(grpc.StatusCode.INTERNAL, f"image {index}: {outcome}")
        if not isinstance(outcome, Embedded):
            raise outcome if isinstance(outcome, BaseException) else TypeError(f"unexpected outcome {outcome!r}")
        self._metrics.images_embedded.inc()
        return embedder_pb2.EmbedResult(
            embedding=float_message(embedder_pb2.Embedding, outcome.vector), copy_features=outcome.copy_features or b"",
            regions=[
                embedder_pb2.RegionEmbedding(
                    box=embedder_pb2.CropBox(x=box.x, y=box.y, width=box.width, height=box.height),
                    embedding=float_message(embedder_pb2.Embedding, vector),
                )
                for box, vector in outcome.regions
            ],
        )

    def _item_error(self, code: grpc.StatusCode, message: str) -> embedder_pb2.EmbedResult:
        self._metrics.images_failed.labels(code.name).inc()
        return embedder_pb2.EmbedResult(error=embedder_pb2.ItemError(code=_rpc_code(code), message=message))

    async def EmbedTexts(
        self, request: embedder_pb2.EmbedTextsRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedTextsResponse:
        """Per text: its query vector, or an item error: INVALID_ARGUMENT (empty, too long), NOT_FOUND (it
        matches nothing the model knows: the message says why). FAILED_PRECONDITION for the whole call
        when the model cannot search by words."""
        card = self._loaded_card()
        count = len(request.texts)
        if count == 0:
            raise invalid_argument("no texts in the request; send at least one")
        if count > self._max_images:
            raise invalid_argument(f"{count} texts in one request, over the limit of {self._max_images}")
        if self._text is None or self._text.searcher is None:
            reason = self._text.unavailable if self._text is not None else "text search is not wired in"
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"model {card.name} cannot search by words ({reason})")
        results: list[embedder_pb2.EmbedTextResult | None] = [None] * count
        valid: list[tuple[int, str]] = []
        for index, raw in enumerate(request.texts):
            text = normalise_text(raw)
            if not text:
                problem = "is empty"
            elif len(text) > MAX_TEXT_CHARS:
                problem = f"is {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
            else:
                valid.append((index, text))
                continue
            results[index] = embedder_pb2.EmbedTextResult(error=embedder_pb2.ItemError(
                code=_rpc_code(grpc.StatusCode.INVALID_ARGUMENT), message=f"text {index} {problem}"))
        if valid:
            try:
                queries = await self._text.embed([text for _, text in valid])
            except TextSearchUnavailable as error:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"model {card.name} cannot search by words ({error})") from None
            for (index, _text), query in zip(valid, queries, strict=True):
                if query.vector is None:
                    results[index] = embedder_pb2.EmbedTextResult(
                        error=embedder_pb2.ItemError(code=_rpc_code(grpc.StatusCode.NOT_FOUND), message=query.no_match),
                        understood_as=query.understood_as,
                    )
                else:
                    results[index] = embedder_pb2.EmbedTextResult(
                        embedding=float_message(embedder_pb2.Embedding, query.vector), understood_as=query.understood_as
                    )
        return embedder_pb2.EmbedTextsResponse(results=results, model_version=card.version)

    async def VerifyCopies(
        self, request: embedder_pb2.VerifyCopiesRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.VerifyCopiesResponse:
        """INVALID_ARGUMENT for a query or candidate that is not copy features (naming which); an empty
        candidate (an item stored without features) is no copy."""
        self._loaded_card()
        if len(request.candidates) > MAX_COPY_CANDIDATES:
            raise invalid_argument(
                f"{len(request.candidates)} candidates in one request, over the limit of {MAX_COPY_CANDIDATES}"
            )
        query = _parse_copy_features(request.query, "query")
        if query is None:
            raise invalid_argument("query: no copy features (empty); get them from EmbedImages with with_copy_features")
        least = self._engine.copy_settings.min_inliers
        if request.min_inliers and request.min_inliers < least:
            raise invalid_argument(
                f"min_inliers {request.min_inliers} is below this embedder's copy_min_inliers ({least}): a copy "
                "needs at least that many agreeing features"
            )
        candidates = [
            _parse_copy_features(blob, f"candidate {index}") for index, blob in enumerate(request.candidates)
        ]
        verdicts = await self._engine.verify_copies(
            query, candidates, request.mirror_depth, request.first_rank, request.min_inliers or None
        )
        return embedder_pb2.VerifyCopiesResponse(verdicts=[
            embedder_pb2.CopyVerdict(
                is_copy=verdict.is_copy, copy_score=verdict.copy_score, mirrored=verdict.mirrored,
                inliers=verdict.inliers,
                matched_box=None if verdict.matched_box is None else embedder_pb2.CropBox(
                    x=verdict.matched_box[0], y=verdict.matched_box[1],
                    width=verdict.matched_box[2], height=verdict.matched_box[3],
                ),
            )
            for verdict in verdicts
        ])

    async def Info(self, request: embedder_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> embedder_pb2.InfoResponse:
        card = self._loaded_card()
        return embedder_pb2.InfoResponse(
            model_name=card.name,
            model_version=card.version,
            dimension=card.output.dimension,
            preprocessing=card.preprocessing_summary(),
            backend=self._backend_name,
            max_batch_size=self._engine.max_batch_size,
            text_search=self._text.kind if self._text is not None else "",
            calibration=calibration_message(card),
            copy_min_inliers=self._engine.copy_settings.min_inliers,
            regions_per_image=len(REGION_GRID),
        )


def calibration_message(card: ModelCard) -> embedder_pb2.Calibration | None:
    """The card's calibration as Info reports it; None (the field unset) for a model without one."""
    if card.calibration is None:
        return None
    return embedder_pb2.Calibration(
        score_knots=card.calibration.score_knots, probability_knots=card.calibration.probability_knots,
        rank_scale=card.calibration.rank_scale, description=card.calibration.description,
    )


def _parse_copy_features(blob: bytes, what: str) -> CopyFeatures | None:
    if not blob:
        return None
    try:
        return decode_copy_features(blob)
    except CopyFeaturesInvalid as error:
        raise invalid_argument(f"{what}: {error}") from None
