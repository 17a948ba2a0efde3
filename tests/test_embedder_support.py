"""Shared pieces of the embedder tests (no tests here): models prepared once per session, a real
in-process embedder on port 0, and helpers. Test modules import the fixtures they use."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import grpc
import numpy as np
import pytest
from PIL import Image

from embedder_svc.model_prepare import ensure_model
from embedder_svc.server import create_server
from embedder_svc.settings import EmbedderSettings
from service_kit.server import ManagedServer
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc

MOBILENET = "mobilenetv2-12-int8"
SQUEEZENET = "squeezenet1.0-fp16"
# Small enough that the "over max bytes" case needs no huge payload; larger than any test image.
TEST_MAX_IMAGE_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="session")
def embedder_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # getbasetemp() is the same for every module, and ensure_model prepares each preset only once.
    return tmp_path_factory.getbasetemp() / "embedder-models"


@pytest.fixture(scope="session")
def mobilenet_dir(embedder_models_dir: Path, shared_dir: Path) -> Path:
    return ensure_model(MOBILENET, embedder_models_dir, shared_dir=shared_dir)


@pytest.fixture(scope="session")
def squeezenet_dir(embedder_models_dir: Path, shared_dir: Path) -> Path:
    return ensure_model(SQUEEZENET, embedder_models_dir, shared_dir=shared_dir)


def embedder_settings(model_dir: Path, **overrides: object) -> EmbedderSettings:
    values: dict[str, object] = {
        "model_dir": model_dir, "host": "127.0.0.1", "port": 0, "log_format": "text",
        "max_image_bytes": TEST_MAX_IMAGE_BYTES, "grace_seconds": 1.0, "drain_seconds": 0.0,
    }
    values.update(overrides)
    return EmbedderSettings(**values)


@dataclass
class RunningEmbedder:
    server: ManagedServer
    channel: grpc.aio.Channel
    stub: embedder_pb2_grpc.EmbedderStub

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def running_embedder(settings: EmbedderSettings, wait_ready: bool = True) -> AsyncIterator[RunningEmbedder]:
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if wait_ready:
            await server.wait_ready(timeout=30)
        yield RunningEmbedder(server, channel, embedder_pb2_grpc.EmbedderStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=0.5)


@pytest.fixture(scope="module")
async def mobilenet_embedder(mobilenet_dir: Path) -> AsyncIterator[RunningEmbedder]:
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder:
        yield embedder


# --- helpers -----------------------------------------------------------------------------------


def image_input(data: bytes, crop: tuple[int, int, int, int] | None = None) -> embedder_pb2.ImageInput:
    if crop is None:
        return embedder_pb2.ImageInput(data=data)
    x, y, width, height = crop
    return embedder_pb2.ImageInput(data=data, crop=embedder_pb2.CropBox(x=x, y=y, width=width, height=height))


async def embed_results(stub: embedder_pb2_grpc.EmbedderStub, images: Sequence[embedder_pb2.ImageInput | bytes]) -> list[embedder_pb2.EmbedResult]:
    inputs = [image if isinstance(image, embedder_pb2.ImageInput) else image_input(image) for image in images]
    response = await stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=inputs), timeout=60)
    assert len(response.results) == len(inputs)
    return list(response.results)


def vector_of(result: embedder_pb2.EmbedResult) -> np.ndarray:
    assert result.WhichOneof("result") == "embedding", f"expected an embedding, got error {result.error}"
    return np.asarray(result.embedding.values, dtype=np.float32)


async def embed_vectors(stub: embedder_pb2_grpc.EmbedderStub, images: Sequence[embedder_pb2.ImageInput | bytes]) -> np.ndarray:
    return np.stack([vector_of(result) for result in await embed_results(stub, images)])


async def embed_one(stub: embedder_pb2_grpc.EmbedderStub, image: embedder_pb2.ImageInput | bytes) -> np.ndarray:
    return (await embed_vectors(stub, [image]))[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ns_score(vectors: np.ndarray, group_size: int = 4) -> float:
    """UKBench N-S: mean count of same-object images among each query's top 4 (query included)."""
    similarity = vectors @ vectors.T
    top = np.argsort(-similarity, axis=1)[:, :group_size]
    groups = np.arange(len(vectors)) // group_size
    return float(np.mean([(groups[top[i]] == groups[i]).sum() for i in range(len(vectors))]))


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()
