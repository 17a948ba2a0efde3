"""One prepared model as the embedder runs it, in this process: its decoder, the card-driven
preprocessor and the inference backend that EMBEDDER_* settings choose (the embedder's own settings
class), plus normalisation when the graph does not normalise. `vsearch bench` times it ("alone"
figures, the naive loop) and `vsearch model compare` embeds and times every model with it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedder_svc.backends import InferenceBackend, create_backend
from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.model_card import ModelCard, read_model_card
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.settings import EmbedderSettings


@dataclass
class ModelRig:
    """The embedder's own decode, preprocess and inference pieces, built from the same settings class
    (EMBEDDER_* variables apply here too), for the "alone" figures and the naive loop."""

    model_dir: Path
    settings: EmbedderSettings
    card: ModelCard
    decoder: ImageDecoder
    preprocessor: Preprocessor
    backend: InferenceBackend

    @classmethod
    async def load(cls, model_dir: Path) -> ModelRig:
        settings = EmbedderSettings(model_dir=model_dir)
        card = read_model_card(model_dir)
        backend = create_backend(settings, model_dir, card)
        await backend.load()
        rig = cls(
            model_dir=model_dir,
            settings=settings,
            card=card,
            decoder=ImageDecoder(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
            preprocessor=Preprocessor(card),
            backend=backend,
        )
        await rig.infer(np.stack([rig.zero_tensor()]))  # first run allocates and picks kernels
        return rig

    def zero_tensor(self) -> np.ndarray:
        dtype = np.float16 if self.card.input.dtype == "float16" else np.float32
        return np.zeros((3, self.card.input.height, self.card.input.width), dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.card.name,
            "version": self.card.version,
            "dimension": self.card.output.dimension,
            "dir": str(self.model_dir),
            "backend": self.backend.describe(),
            "inference_threads": self.settings.inference_threads,
            "decode_workers": self.settings.decode_workers,
            "max_batch_size": self.settings.max_batch_size,
        }

    def prepare(self, data: bytes) -> np.ndarray:
        """Bytes -> model input tensor, exactly as the embedder's decode executor does it for a search."""
        need = self.preprocessor.resolution_need if self.settings.reduced_decoding else None
        return self.preprocessor(self.decoder.decode_for(data, None, need).image)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        output = await self.backend.infer(batch)
        if not self.card.output.l2_normalized:
            output = output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return output

    async def embed(self, data: bytes) -> np.ndarray:
        return (await self.infer(np.stack([self.prepare(data)])))[0]

    def prepare_all(self, images: Sequence[bytes], workers: int) -> tuple[list[np.ndarray], float]:
        """Every image decoded and preprocessed on `workers` threads (Pillow and numpy release the
        GIL, as in the embedder's decode executor); returns the tensors and the seconds it took."""
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode") as pool:
            started = time.perf_counter()
            tensors = list(pool.map(self.prepare, images))
            return tensors, time.perf_counter() - started

    async def close(self) -> None:
        await self.backend.close()
