"""Embedder settings, read from ``EMBEDDER_*`` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from embedder_svc.copy_features import CopyFeatureSettings
from service_kit.settings import ServiceSettings


class TritonSettings(BaseModel):
    """Where the `triton` backend finds its model: ``EMBEDDER_TRITON__URL`` and friends."""

    # protected_namespaces: model_name and model_version are Triton's words, not pydantic's.
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    # host:port of Triton's gRPC endpoint (not the HTTP one).
    url: str = "127.0.0.1:8001"
    # The model's name in Triton's repository; default: the model card's name (which is also what
    # `vsearch model triton-repo` names it).
    model_name: str | None = None
    # "" lets Triton choose (its version policy: the latest version by default).
    model_version: str = ""
    # Deadline of one inference call (one micro-batch).
    request_timeout_s: float = Field(30.0, gt=0)
    # Deadline of readiness and metadata calls, and of connecting at startup.
    check_timeout_s: float = Field(2.0, gt=0)
    # While serving, how often the embedder asks Triton whether the model is still ready; health
    # follows (NOT_SERVING while it is not, SERVING again once it is).
    health_interval_s: float = Field(1.0, gt=0)

    @field_validator("model_version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        if value and not value.isdigit():
            raise ValueError("must be empty (Triton chooses) or a version number")
        return value


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_")

    port: int = 50052
    # A directory written by `vsearch model prepare`: model.onnx + model_card.json.
    model_dir: Path
    # Where the model runs; each backend is an `InferenceBackend` (see backends.py). "onnxruntime":
    # in-process, model.onnx from model_dir. "triton": a Triton Inference Server over gRPC
    # (EMBEDDER_TRITON__*); model_dir then needs only the model card.
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    triton: TritonSettings = TritonSettings()
    max_batch_size: int = Field(32, ge=1)
    # How long the first image of a batch may wait for others to join it. 0: run at once. Batches still
    # fill under load (images queue while a batch runs, and one request's images arrive together), and
    # a lone query does not wait (measured: 11.4 -> 7.3 ms per single image).
    max_batch_wait_ms: float = Field(0.0, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Decompression-bomb guard: the pixels that will be decoded (a JPEG's at 1/2-1/8 of its size, where
    # reduced decoding takes it so), checked against the header before any is.
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(256, ge=1)
    decode_workers: int = Field(2, ge=1)
    # A JPEG larger than the model, the regions and the copy features need is decoded at 1/2, 1/4 or 1/8
    # of its size (libjpeg's DCT scaling): a 12-megapixel photo's decode and preprocessing take a third of
    # the CPU. Off: every pixel is decoded, as before (vectors of large JPEGs then differ slightly).
    reduced_decoding: bool = True
    # Copy features and their verification (EMBEDDER_COPY_SEARCH__KEYPOINTS, ...; see copy_features.py).
    copy_search: CopyFeatureSettings = CopyFeatureSettings()
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
