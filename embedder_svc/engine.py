"""The embedding pipeline, independent of gRPC: bytes -> decode -> preprocess (decode executor) ->
micro-batch -> backend -> L2-normalised vector."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from embedder_svc.backends import BackendError, InferenceBackend
from embedder_svc.batching import MicroBatcher
from embedder_svc.metrics import EmbedderMetrics
from embedder_svc.image_decoding import CropBox, ImageDecoder
from embedder_svc.model_card import ModelCard, read_model_card
from embedder_svc.preprocessing import Preprocessor
from service_kit.tracing import span

logger = logging.getLogger(__name__)

BackendFactory = Callable[[Path, ModelCard], InferenceBackend]


class ModelNotLoaded(Exception):
    """A call arrived before the model finished loading (or after shutdown began). `cause` is why
    the last attempt to load it failed, if one did."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


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
    ) -> None:
        self.model_dir = model_dir
        self._backend_factory = backend_factory
        self._decoder = decoder
        self._decode_executor = decode_executor
        self._decode_workers = max(1, decode_workers)
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self._metrics = metrics
        self._model: LoadedModel | None = None
        self.last_load_error: BaseException | None = None

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
        batcher = MicroBatcher(backend.infer, self.max_batch_size, self.max_batch_wait_s, self._metrics)
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

    async def embed_many(self, images: list[tuple[bytes, CropBox | None]]) -> list[np.ndarray | Exception]:
        """Each image to its L2-normalised vector, or to the exception that stopped it: `ImageRejected`
        (the caller's fault), `BackendError`, `BatcherClosed` or `ModelNotLoaded`. All images are
        decoded before any is queued for inference, so one request's images reach the batcher
        together and share batches (queued as each decode finishes, they would trickle into small
        ones)."""
        model = self.model
        if not images:
            return []
        loop = asyncio.get_running_loop()
        # One executor call per decode worker, each preparing a contiguous share of the images: an
        # executor hop per image woke the event loop once per image (10% of the embedder's profile).
        share = -(-len(images) // self._decode_workers)
        with span("preprocess", {"vsearch.images": len(images)}):
            prepared = await asyncio.gather(*(
                loop.run_in_executor(
                    self._decode_executor, self._prepare_all, model.preprocessor, images[start:start + share]
                )
                for start in range(0, len(images), share)
            ))
        tensors = [outcome for part in prepared for outcome in part]
        queued = [tensor if isinstance(tensor, BaseException) else model.batcher.submit(tensor) for tensor in tensors]
        vectors = await asyncio.gather(
            *(entry for entry in queued if not isinstance(entry, BaseException)), return_exceptions=True
        )
        results: list[np.ndarray | Exception] = []
        vector_iter = iter(vectors)
        for entry in queued:
            result = entry if isinstance(entry, BaseException) else next(vector_iter)
            if not isinstance(result, BaseException) and not model.card.output.l2_normalized:
                result = result / max(float(np.linalg.norm(result)), 1e-12)
            results.append(result)
        return results

    def _prepare_all(
        self, preprocessor: Preprocessor, images: list[tuple[bytes, CropBox | None]]
    ) -> list[np.ndarray | Exception]:
        """Each image to its model input, or to the exception that stopped it (that image only)."""
        tensors: list[np.ndarray | Exception] = []
        for data, crop in images:
            try:
                tensors.append(preprocessor(self._decoder.decode(data, crop)))
            except Exception as error:  # noqa: BLE001 - reported per image by the caller
                tensors.append(error)
        return tensors
