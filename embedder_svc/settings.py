"""Embedder settings, read from ``EMBEDDER_*`` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from service_kit.settings import ServiceSettings


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_")

    port: int = 50052
    # A directory written by `vsearch model prepare`: model.onnx + model_card.json.
    model_dir: Path
    # Only in-process onnxruntime for now; each backend is an `InferenceBackend` (see backends.py).
    backend: Literal["onnxruntime"] = "onnxruntime"
    max_batch_size: int = Field(32, ge=1)
    # How long the first image of a batch may wait for others to join it.
    max_batch_wait_ms: float = Field(2.0, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Decompression-bomb guard, checked against the header before any pixel is decoded.
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(256, ge=1)
    decode_workers: int = Field(2, ge=1)
    # onnxruntime intra-op threads; 0 lets onnxruntime choose.
    inference_threads: int = Field(0, ge=0)
    # onnxruntime execution providers in order of preference. Empty: TensorRT and CUDA where this
    # onnxruntime build offers them, then CPU. From the environment: a JSON list or "A,B".
    providers: Annotated[list[str], NoDecode] = []

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value
