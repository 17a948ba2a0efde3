"""The embedder over gRPC: retrieval quality, the card driving preprocessing, whole-call errors,
micro-batching, health before and after the model loads, settings."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedder_svc.model_card import CARD_FILE_NAME, MODEL_FILE_NAME, Preprocessing, read_model_card, write_model_card
from embedder_svc.server import SERVICE_NAME
from conftest import (
    MOBILENET,
    RunningEmbedder,
    embed_one,
    embed_vectors,
    embedder_settings,
    image_input,
    ns_score,
    running_embedder,
)
from vsearch.v1 import embedder_pb2

async def _health(embedder: RunningEmbedder, service: str = SERVICE_NAME) -> int:
    stub = health_pb2_grpc.HealthStub(embedder.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def test_info_describes_the_card(mobilenet_embedder: RunningEmbedder, mobilenet_dir: Path) -> None:
    card = read_model_card(mobilenet_dir)
    info = await mobilenet_embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    assert (info.model_name, info.model_version, info.dimension) == (MOBILENET, card.version, 1280)
    assert info.backend == "onnxruntime" and info.max_batch_size == 32
    assert info.preprocessing.startswith("RGB resize 256 (bilinear) crop 224 /255 mean [0.485,0.456,0.406]")


async def test_mobilenet_retrieval_quality_on_ukbench(mobilenet_embedder: RunningEmbedder, ukbench_bytes: list[bytes], mobilenet_dir: Path) -> None:
    response = await mobilenet_embedder.stub.EmbedImages(
        embedder_pb2.EmbedImagesRequest(images=[image_input(data) for data in ukbench_bytes]), timeout=60
    )
    assert response.model_version == read_model_card(mobilenet_dir).version
    vectors = np.stack([np.asarray(result.embedding.values, dtype=np.float32) for result in response.results])
    assert vectors.shape == (56, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert ns_score(vectors) >= 3.9


async def test_squeezenet_quality_and_its_card_drives_preprocessing(
    squeezenet_dir: Path, ukbench_bytes: list[bytes], tmp_path: Path
) -> None:
    async with running_embedder(embedder_settings(squeezenet_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert info.dimension == 512 and info.preprocessing.startswith("BGR resize 256 (bilinear) crop 224 x1 mean [104,117,123]")
        caffe = await embed_vectors(embedder.stub, ukbench_bytes)
    caffe_score = ns_score(caffe)
    assert caffe_score >= 3.5  # measured 3.95

    # Same network, card rewritten to RGB/ImageNet normalisation: the vectors must follow the card.
    wrong_dir = tmp_path / "squeezenet-rgb-card"
    wrong_dir.mkdir()
    shutil.copy(squeezenet_dir / MODEL_FILE_NAME, wrong_dir / MODEL_FILE_NAME)
    card = read_model_card(squeezenet_dir)
    rgb = Preprocessing(
        resize_shorter=256, crop=224, channel_order="RGB", pixel_scale=1 / 255,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )
    write_model_card(wrong_dir, card.model_copy(update={"preprocessing": rgb}))
    async with running_embedder(embedder_settings(wrong_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert info.preprocessing.startswith("RGB resize 256 (bilinear) crop 224 /255")
        imagenet = await embed_vectors(embedder.stub, ukbench_bytes)
    same_image_cosines = np.sum(caffe * imagenet, axis=1)
    assert float(same_image_cosines.mean()) < 0.95
    assert ns_score(imagenet) < caffe_score  # measured 3.70


async def test_empty_and_oversized_batches_fail_the_whole_call(mobilenet_embedder: RunningEmbedder, ukbench_bytes: list[bytes]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await mobilenet_embedder.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(), timeout=5)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no images" in empty.value.details()

    too_many = embedder_pb2.EmbedImagesRequest(images=[image_input(ukbench_bytes[0])] * 257)
    with pytest.raises(grpc.aio.AioRpcError) as oversized:
        await mobilenet_embedder.stub.EmbedImages(too_many, timeout=5)
    assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "257 images in one request, over the limit of 256" in oversized.value.details()


async def test_concurrent_single_image_requests_are_batched(mobilenet_dir: Path, ukbench_bytes: list[bytes]) -> None:
    images = ukbench_bytes[:16]
    # A generous wait so batching does not depend on how fast this machine decodes.
    settings = embedder_settings(mobilenet_dir, max_batch_size=8, max_batch_wait_ms=100.0)
    async with running_embedder(settings) as embedder:
        warm_up_batches = embedder.sample("vsearch_embedder_batch_size_count")
        concurrent = await asyncio.gather(*(embed_one(embedder.stub, data) for data in images))
        batches = embedder.sample("vsearch_embedder_batch_size_count") - warm_up_batches
        single_image_batches = embedder.sample("vsearch_embedder_batch_size_bucket", {"le": "1.0"})
        assert embedder.sample("vsearch_embedder_batch_size_sum") == len(images)
        assert batches < len(images) and batches - single_image_batches >= 1
        assert embedder.sample("vsearch_embedder_images_embedded_total") == len(images)

        # Each caller got its own image's vector back.
        one_by_one = [await embed_one(embedder.stub, data) for data in images[:4]]
    np.testing.assert_allclose(np.stack(concurrent[:4]), np.stack(one_by_one), atol=1e-5)


async def test_one_request_of_many_images_runs_as_full_batches(mobilenet_dir: Path, ukbench_bytes: list[bytes]) -> None:
    # The default short wait: a request's images must not trickle into small batches as each decode ends.
    settings = embedder_settings(mobilenet_dir, max_batch_size=8, max_batch_wait_ms=2.0)
    async with running_embedder(settings) as embedder:
        before = embedder.sample("vsearch_embedder_batch_size_count")
        request = embedder_pb2.EmbedImagesRequest(images=[image_input(data) for data in ukbench_bytes[:16]])
        response = await embedder.stub.EmbedImages(request, timeout=60)
        assert all(result.WhichOneof("result") == "embedding" for result in response.results)
        assert embedder.sample("vsearch_embedder_batch_size_count") - before == 2  # 16 images, batches of 8


async def test_a_lone_image_runs_at_once_on_its_decode_thread(mobilenet_dir: Path, ukbench_bytes: list[bytes]) -> None:
    """One request at a time, of one image, with no batch wait: each runs as a batch of one on the
    thread that decoded it (counted), with the vector the batched path gives; a bad image is still
    that image's INVALID_ARGUMENT. Copy features, regions or a configured wait keep the queue."""
    images = ukbench_bytes[:6]
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder:
        alone = [await embed_one(embedder.stub, data) for data in images]
        assert embedder.sample("vsearch_embedder_lone_runs_total") == len(images)
        assert embedder.sample("vsearch_embedder_batch_size_sum") == len(images)
        assert embedder.sample("vsearch_embedder_batch_size_bucket", {"le": "1.0"}) == len(images)
        batched = await embed_vectors(embedder.stub, images)
        assert embedder.sample("vsearch_embedder_lone_runs_total") == len(images)
        np.testing.assert_allclose(np.stack(alone), np.stack(batched), atol=1e-5)

        broken = await embedder.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[image_input(b"not an image")]), timeout=10)
        assert broken.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        with_features = embedder_pb2.EmbedImagesRequest(images=[image_input(images[0])], with_copy_features=True)
        assert (await embedder.stub.EmbedImages(with_features, timeout=30)).results[0].copy_features
        assert embedder.sample("vsearch_embedder_lone_runs_total") == len(images)
    async with running_embedder(embedder_settings(mobilenet_dir, max_batch_wait_ms=1.0)) as waiting:
        await embed_one(waiting.stub, images[0])
        assert waiting.sample("vsearch_embedder_lone_runs_total") == 0
        assert waiting.sample("vsearch_embedder_batch_size_count") == 1


async def test_health_is_not_serving_until_the_model_is_loaded(mobilenet_dir: Path, tmp_path: Path) -> None:
    # The model directory starts empty (say, a volume still being filled): the startup hook fails
    # and is retried, and the service must say NOT_SERVING and refuse calls until it succeeds.
    model_dir = tmp_path / "arriving-model"
    model_dir.mkdir()
    async with running_embedder(embedder_settings(model_dir), wait_ready=False) as embedder:
        assert await _health(embedder) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(embedder, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert early.value.code() == grpc.StatusCode.UNAVAILABLE and "not loaded" in early.value.details()

        shutil.copy(mobilenet_dir / MODEL_FILE_NAME, model_dir / MODEL_FILE_NAME)
        shutil.copy(mobilenet_dir / CARD_FILE_NAME, model_dir / CARD_FILE_NAME)
        await embedder.server.wait_ready(timeout=15)
        assert await _health(embedder) == health_pb2.HealthCheckResponse.SERVING
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert info.dimension == 1280
