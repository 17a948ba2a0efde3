"""The embedding pipeline, independent of gRPC: bytes -> decode -> preprocess (decode executor) ->
micro-batch -> backend -> L2-normalised vector (a lone image, the batcher idle: decode, preprocess and
inference in one executor call); with the vectors of the image's regions (one decode,
the regions' inputs cut from it and batched with the full views), copy features extracted from the
decoded image alongside inference, and copy verification, both in the decode executor."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from opentelemetry.context import Context

from embedder_svc.backends import BackendError, InferenceBackend
from embedder_svc.copy_features import NO_COPY, CopyFeatureExtractor, CopyFeatureSettings, CopyVerifier, Verdict
from embedder_svc.batching import MicroBatcher
from embedder_svc.metrics import EmbedderMetrics
from embedder_svc.image_decoding import CropBox, DecodedImage, ImageDecoder, ResolutionNeed
from embedder_svc.model_card import ModelCard, read_model_card
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.regions import SMALLEST_REGION_SIDE, region_boxes
from service_kit.copy_feature_codec import CopyFeatures
from service_kit.tracing import current_trace, record_span, span

logger = logging.getLogger(__name__)

BackendFactory = Callable[[Path, ModelCard], InferenceBackend]


class ModelNotLoaded(Exception):
    """A call arrived before the model finished loading (or after shutdown began). `cause` is why
    the last attempt to load it failed, if one did."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class Embedded:
    """One image's vector, its copy features and its regions' vectors when they were asked for."""

    vector: np.ndarray
    copy_features: bytes | None = None
    regions: tuple[tuple[CropBox, np.ndarray], ...] = ()


@dataclass(frozen=True)
class Prepared:
    """One decoded image's model inputs: its full view's, and its regions' (when asked for)."""

    tensor: np.ndarray
    picture: DecodedImage | None  # kept for copy features only
    regions: tuple[tuple[CropBox, np.ndarray], ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    preprocessor: Preprocessor
    backend: InferenceBackend
    batcher: MicroBatcher


class EmbeddingEngine:
    def __init__(
        self,
        model_dir: Path,
        backend_factory: BackendFactory,
        decoder: ImageDecoder,
        decode_executor: Executor,
        decode_workers: int,
        max_batch_size: int,
        max_batch_wait_s: float,
        metrics: EmbedderMetrics,
        copy_settings: CopyFeatureSettings | None = None,
        reduced_decoding: bool = True,
    ) -> None:
        self.model_dir = model_dir
        self.copy_settings = copy_settings or CopyFeatureSettings()
        self._copy_extractor = CopyFeatureExtractor(self.copy_settings)
        self._copy_verifier = CopyVerifier(self.copy_settings)
        self._backend_factory = backend_factory
        self._decoder = decoder
        self._reduced_decoding = reduced_decoding
        self._decode_executor = decode_executor
        self._decode_workers = max(1, decode_workers)
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self._metrics = metrics
        self._model: LoadedModel | None = None
        self.last_load_error: BaseException | None = None
        self._embed_calls_in_flight = 0

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            cause = self.last_load_error
            raise ModelNotLoaded("model not loaded yet" + (f" ({cause})" if cause is not None else ""), cause)
        return self._model

    async def load(self) -> None:
        """Startup hook: reads the card, loads the model and checks it with one warm-up run.
        Raises (and the server retries) when any of that fails."""
        if self._model is not None:
            return
        try:
            card = await asyncio.to_thread(read_model_card, self.model_dir)
            backend = self._backend_factory(self.model_dir, card)
        except Exception as error:
            self.last_load_error = error
            raise
        try:
            await backend.load()
            await self._warm_up(backend, card)
        except BaseException as error:
            if isinstance(error, Exception):
                self.last_load_error = error
            await backend.close()
            raise
        self.last_load_error = None
        batcher = MicroBatcher(backend.infer, self.max_batch_size, self.max_batch_wait_s, self._metrics,
                               backend.blocking_infer())
        batcher.start()
        self._model = LoadedModel(card, Preprocessor(card), backend, batcher)
        logger.info(
            "model %s version %s (%d-d) loaded on %s; preprocessing: %s",
            card.name, card.version, card.output.dimension, backend.describe(), card.preprocessing_summary(),
        )

    @staticmethod
    async def _warm_up(backend: InferenceBackend, card: ModelCard) -> None:
        """The first run is slow (allocations, kernel choice), and a model that disagrees with its
        card should fail here rather than on a caller's image."""
        dtype = np.float16 if card.input.dtype == "float16" else np.float32
        probe = np.zeros((1, 3, card.input.height, card.input.width), dtype=dtype)
        output = await backend.infer(probe)
        if output.shape != (1, card.output.dimension):
            raise BackendError(
                f"model output has shape {list(output.shape)} for one image; the card says {card.output.dimension} values"
            )

    async def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            await model.batcher.close()
            await model.backend.close()

    async def embed_many(
        self, images: list[tuple[bytes, CropBox | None]], copy_features: Literal["index", "query"] | None = None,
        with_regions: bool = False,
    ) -> list[Embedded | Exception]:
        """Each image to its L2-normalised vector (and copy features, for the index or for a query,
        and its regions' vectors, when asked), or to the exception that stopped it: `ImageRejected`
        (the caller's fault), `BackendError`, `BatcherClosed` or `ModelNotLoaded`. All images are
        decoded before any is queued for inference, so one request's images reach the batcher together
        and share batches (queued as each decode finishes, they would trickle into small ones); an
        image's regions are cut from its one decode and queued right after it. Copy features are
        extracted from the decoded images while the batch runs."""
        model = self.model
        if not images:
            return []
        self._embed_calls_in_flight += 1
        try:
            # The only call, for one plain image, and nothing queued: it would run as a batch of one
            # anyway. (With other calls in flight it may share their batch instead.)
            if (len(images) == 1 and copy_features is None and not with_regions
                    and self._embed_calls_in_flight == 1 and model.batcher.idle):
                data, crop = images[0]
                return [await asyncio.get_running_loop().run_in_executor(
                    self._decode_executor, self._embed_alone, model, data, crop, current_trace(),
                )]
            return await self._embed_batched(model, images, copy_features, with_regions)
        finally:
            self._embed_calls_in_flight -= 1

    def _embed_alone(
        self, model: LoadedModel, data: bytes, crop: CropBox | None, trace: Context | None,
    ) -> Embedded | Exception:
        """One image decoded, preprocessed and run on this (decode worker) thread; `trace` is its
        request's context."""
        started_ns = time.time_ns()
        [prepared] = self._prepare_all(model.preprocessor, [(data, crop)], False, False)
        if trace is not None:
            record_span("preprocess", started_ns, context=trace, attributes={"vsearch.images": 1, "vsearch.regions": False})
        if isinstance(prepared, Exception):
            return prepared
        try:
            return Embedded(self._normalised(model, model.batcher.run_now(prepared.tensor, trace)))
        except Exception as error:  # noqa: BLE001 - reported per image by the caller
            return error

    async def _embed_batched(
        self, model: LoadedModel, images: list[tuple[bytes, CropBox | None]],
        copy_features: Literal["index", "query"] | None, with_regions: bool,
    ) -> list[Embedded | Exception]:
        loop = asyncio.get_running_loop()
        keep_images = copy_features is not None
        with span("preprocess", {"vsearch.images": len(images), "vsearch.regions": with_regions}):
            prepared = await self._in_shares(
                loop, images, lambda share: self._prepare_all(model.preprocessor, share, keep_images, with_regions)
            )
        queued = [
            outcome if isinstance(outcome, BaseException) else asyncio.ensure_future(asyncio.gather(
                model.batcher.submit(outcome.tensor), *(model.batcher.submit(tensor) for _box, tensor in outcome.regions)
            ))
            for outcome in prepared
        ]
        extraction = None
        if copy_features is not None:
            decoded = [outcome.picture for outcome in prepared if not isinstance(outcome, BaseException)]
            extraction = asyncio.ensure_future(self._extract_copy_features(loop, decoded, copy_features == "query"))
        try:
            vectors = await asyncio.gather(
                *(entry for entry in queued if not isinstance(entry, BaseException)), return_exceptions=True
            )
            features = iter(await extraction) if extraction is not None else None
        finally:
            if extraction is not None and not extraction.done():
                extraction.cancel()
        results: list[Embedded | Exception] = []
        vector_iter = iter(vectors)
        for outcome, entry in zip(prepared, queued):
            if isinstance(entry, BaseException):
                results.append(entry)
                continue
            outputs = next(vector_iter)
            feature = next(features) if features is not None else None
            if isinstance(outputs, BaseException):
                results.append(outputs)
            elif isinstance(feature, BaseException):
                results.append(feature)
            else:
                vector, *region_vectors = (self._normalised(model, output) for output in outputs)
                boxes = [box for box, _tensor in outcome.regions]
                results.append(Embedded(vector, feature, tuple(zip(boxes, region_vectors))))
        return results

    @staticmethod
    def _normalised(model: LoadedModel, vector: np.ndarray) -> np.ndarray:
        if model.card.output.l2_normalized:
            return vector
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    async def verify_copies(
        self, query: CopyFeatures, candidates: list[CopyFeatures | None], mirror_depth: int = 0, first_rank: int = 0,
        min_inliers: int | None = None,
    ) -> list[Verdict]:
        """Is the query a copy of each candidate (None: no features, so no copy)? Its mirror image is
        checked against the candidates ranked below `mirror_depth` only (0: all), the first candidate
        being `first_rank` in its shortlist; a copy needs `min_inliers` agreeing matches (None: the
        settings')."""
        if not candidates:
            return []
        mirror_depth = mirror_depth or first_rank + len(candidates)
        loop = asyncio.get_running_loop()
        verifier = self._copy_verifier

        def verify_share(share: list[tuple[int, CopyFeatures | None]]) -> list[Verdict]:
            present = [(rank, candidate) for rank, candidate in share if candidate is not None]
            verdicts = iter(verifier.verify_all(
                query, [candidate for _, candidate in present], [rank < mirror_depth for rank, _ in present],
                min_inliers))
            return [next(verdicts) if candidate is not None else NO_COPY for _, candidate in share]

        with span("verify copies", {"vsearch.candidates": len(candidates)}):
            return await self._in_shares(loop, list(enumerate(candidates, first_rank)), verify_share)

    async def _in_shares(self, loop: asyncio.AbstractEventLoop, items: list, work: Callable[[list], list]) -> list:
        """`work` over shares of `items`, one executor call per decode worker, results in order: an
        executor hop per item woke the event loop once per item (10% of the embedder's profile). The
        items are dealt in turn, not cut in halves: the first ones may cost more (a verification's
        first candidates get the mirror check), and halves would give one worker all of them."""
        if not items:
            return []
        workers = min(self._decode_workers, len(items))
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._decode_executor, work, items[first::workers]) for first in range(workers)
        ))
        results: list = [None] * len(items)
        for first, part in enumerate(parts):
            results[first::workers] = part
        return results

    def _prepare_all(
        self, preprocessor: Preprocessor, images: list[tuple[bytes, CropBox | None]], keep_images: bool,
        with_regions: bool,
    ) -> list[Prepared | Exception]:
        """Each image to its model inputs (and the decoded image, when kept), or to the exception that
        stopped it (that image only)."""
        need = self._resolution_need(preprocessor, keep_images, with_regions)
        outcomes: list[Prepared | Exception] = []
        for data, crop in images:
            try:
                picture = self._decoder.decode_for(data, crop, need)
                regions = ()
                if with_regions:
                    regions = tuple((box, preprocessor(picture.part(box))) for box in region_boxes(*picture.size))
                outcomes.append(Prepared(preprocessor(picture.image), picture if keep_images else None, regions))
            except Exception as error:  # noqa: BLE001 - reported per image by the caller
                outcomes.append(error)
        return outcomes

    def _resolution_need(self, preprocessor: Preprocessor, copy_features: bool, with_regions: bool) -> ResolutionNeed | None:
        """What the model (and the regions, and the copy features, when asked for) need of a decoded
        picture; None (every pixel) without reduced decoding."""
        if not self._reduced_decoding:
            return None
        need = preprocessor.resolution_need
        if with_regions:
            need = need.combined(ResolutionNeed(shorter=math.ceil(need.shorter / SMALLEST_REGION_SIDE)))
        if copy_features:
            need = need.combined(ResolutionNeed(longer=self.copy_settings.working_side))
        return need

    async def _extract_copy_features(
        self, loop: asyncio.AbstractEventLoop, pictures: list[DecodedImage], for_query: bool
    ) -> list[bytes | Exception]:
        """Each image's copy features. A lone query's, which a search waits for, are extracted in parts
        over the decode workers: its keypoints are detected on one while its shrunk image's are found
        on another, then described on it and on its mirror image side by side."""
        if not (for_query and len(pictures) == 1 and self._decode_workers > 1):
            return await self._in_shares(loop, pictures, lambda share: self._extract_all(share, for_query))
        extractor, executor, picture = self._copy_extractor, self._decode_executor, pictures[0]
        try:
            zoomed = loop.run_in_executor(executor, extractor.query_zoomed_sets, picture.image)
            detections = await loop.run_in_executor(executor, extractor.query_detections, picture.image, picture.size)
            plain, mirrored = await asyncio.gather(
                loop.run_in_executor(executor, extractor.query_plain_set, detections),
                loop.run_in_executor(executor, extractor.query_mirrored_set, detections),
            )
            return [extractor.combine(detections, plain, mirrored, await zoomed)]
        except Exception as error:  # noqa: BLE001 - reported per image by the caller
            zoomed.cancel()
            return [CopyFeaturesFailed(f"copy features failed: {error}")]

    def _extract_all(self, pictures: list[DecodedImage], for_query: bool) -> list[bytes | Exception]:
        outcomes: list[bytes | Exception] = []
        for picture in pictures:
            try:
                outcomes.append(self._copy_extractor.extract(picture.image, for_query=for_query, original_size=picture.size))
            except Exception as error:  # noqa: BLE001 - reported per image by the caller
                outcomes.append(CopyFeaturesFailed(f"copy features failed: {error}"))
        return outcomes


class CopyFeaturesFailed(Exception):
    """Extracting an image's copy features failed (not the caller's fault)."""
