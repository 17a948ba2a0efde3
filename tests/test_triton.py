"""The embedder on a real Triton Inference Server: the tritonserver binary of the nvidia-pytriton wheel
(installed into .venv-triton by scripts/setup-triton), serving a cpu-flavour repository written by
`vsearch model triton-repo`, on free loopback ports. One server for the module.

Covered: both repository flavours parse as Triton model configs with the fields production needs;
vectors through Triton equal the in-process backend's; the embedder's micro-batches reach Triton as
batches; a missing or mismatched model is FAILED_PRECONDITION naming it; Triton killed is UNAVAILABLE
at once and NOT_SERVING, and the embedder recovers by itself when Triton is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2

from embedder_svc.model_card import (
    CARD_FILE_NAME,
    CARD_VERSION_PARAMETER,
    MODEL_FILE_NAME,
    Quantization,
    read_model_card,
    write_model_card,
)
from embedder_svc.server import SERVICE_NAME
from embedder_svc.settings import TritonSettings
from vsearch_cli.model_tools.triton_repo import (
    PYTHON_MODEL_FILE_NAME,
    TritonRepoOptions,
    write_triton_repo,
)
from conftest import (
    MOBILENET,
    SQUEEZENET,
    RunningEmbedder,
    embed_results,
    embed_vectors,
    embedder_settings,
    running_embedder,
    wait_until,
)
from vsearch_cli.bench.embedder import bench_embedder, format_report
from vsearch_cli.local_stack.layout import StackLayout
from vsearch_cli.local_stack.triton import TritonNotInstallable, TritonServerProcess, ensure_triton, prepare_local_triton
from vsearch.v1 import embedder_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory, squeezenet_dir: Path, mobilenet_dir: Path) -> Path:
    repo = tmp_path_factory.mktemp("triton-repo")
    for model_dir in (squeezenet_dir, mobilenet_dir):
        write_triton_repo(model_dir, repo, TritonRepoOptions(flavour="cpu", max_batch_size=16, cpu_threads=0))
    return repo


@pytest.fixture(scope="module")
def triton(triton_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServerProcess]:
    try:
        install = ensure_triton()
    except TritonNotInstallable as error:
        pytest.skip(f"Triton cannot be installed on this machine: {error}")
    server = TritonServerProcess(install, triton_repo, tmp_path_factory.mktemp("triton-logs") / "triton.log")
    server.start()
    try:
        server.wait_ready(timeout=60, models=[SQUEEZENET, MOBILENET])
        yield server
    finally:
        server.kill()  # a graceful stop unloads the models first (seconds); nothing here needs it


def triton_settings(server: TritonServerProcess, **overrides: object) -> TritonSettings:
    values: dict[str, object] = {"url": server.grpc_url, "health_interval_s": 0.2, "check_timeout_s": 1.0,
                                 "request_timeout_s": 10.0}
    values.update(overrides)
    return TritonSettings(**values)


async def health(embedder: RunningEmbedder) -> int:
    reply = await health_pb2_grpc.HealthStub(embedder.channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    return reply.status


async def model_stats(server: TritonServerProcess, model: str) -> object:
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        (stats,) = (await client.get_inference_statistics(model, client_timeout=5)).model_stats
        return stats


# ---- the repository, without a server -------------------------------------------------------------


def test_gpu_repository_config_has_what_production_needs(squeezenet_dir: Path, tmp_path: Path) -> None:
    card = read_model_card(squeezenet_dir)
    options = TritonRepoOptions(flavour="gpu", max_batch_size=64, max_queue_delay_us=1500, instance_count=2, gpus=(0,))
    written = write_triton_repo(squeezenet_dir, tmp_path / "repo", options)
    config = parse_config(written.config_path)
    assert written.config_path == tmp_path / "repo" / SQUEEZENET / "config.pbtxt"
    assert (config.name, config.platform, config.max_batch_size) == (SQUEEZENET, "onnxruntime_onnx", 64)
    (tensor_in,), (tensor_out,) = config.input, config.output
    assert (tensor_in.name, tensor_in.data_type, list(tensor_in.dims)) == ("data_0", model_config_pb2.TYPE_FP32, [3, 224, 224])
    assert (tensor_out.name, tensor_out.data_type, list(tensor_out.dims)) == ("embedding", model_config_pb2.TYPE_FP32, [512])
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2, [0])
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) > 0
    assert accelerator.parameters["trt_profile_max_shapes"] == "data_0:64x3x224x224"
    warmups = {(warmup.batch_size, tuple(warmup.inputs["data_0"].dims), warmup.inputs["data_0"].zero_data)
               for warmup in config.model_warmup}
    assert warmups == {(1, (3, 224, 224), True), (64, (3, 224, 224), True)}
    assert config.parameters[CARD_VERSION_PARAMETER].string_value == card.version
    model_file = tmp_path / "repo" / SQUEEZENET / "1" / MODEL_FILE_NAME
    assert model_file.read_bytes() == (squeezenet_dir / MODEL_FILE_NAME).read_bytes()
    assert not (tmp_path / "repo" / SQUEEZENET / "1" / PYTHON_MODEL_FILE_NAME).exists()

    # A quantized model (its card records the quantization) gets the INT8 TensorRT engine.
    int8_dir = tmp_path / "int8-model"
    int8_dir.mkdir()
    (int8_dir / MODEL_FILE_NAME).write_bytes((squeezenet_dir / MODEL_FILE_NAME).read_bytes())
    quantization = Quantization(weight_type="int8", activation_type="uint8", per_channel=True,
                                calibration_method="minmax", calibration_images=8, calibration_sha256="0" * 64,
                                float_version=card.version, float_model_sha256="0" * 64)
    write_model_card(int8_dir, card.model_copy(update={"name": "squeezenet-int8", "version": "0123456789ab",
                                                       "quantization": quantization}))
    int8 = parse_config(write_triton_repo(int8_dir, tmp_path / "repo").config_path)
    (accelerator,) = int8.optimization.execution_accelerators.gpu_execution_accelerator
    assert int8.name == "squeezenet-int8" and accelerator.parameters["precision_mode"] == "INT8"
    assert {path.name for path in (tmp_path / "repo").iterdir()} == {SQUEEZENET, "squeezenet-int8"}


def test_cpu_repository_is_a_batching_python_model(mobilenet_dir: Path, tmp_path: Path) -> None:
    written = write_triton_repo(mobilenet_dir, tmp_path / "repo", TritonRepoOptions(flavour="cpu", max_batch_size=8,
                                                                                    model_name="embedder"))
    config = parse_config(written.config_path)
    assert (config.name, config.backend, config.platform, config.max_batch_size) == ("embedder", "python", "", 8)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    (group,) = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(config.output[0].dims) == [1280]
    version_dir = tmp_path / "repo" / "embedder" / "1"
    assert (version_dir / MODEL_FILE_NAME).read_bytes() == (mobilenet_dir / MODEL_FILE_NAME).read_bytes()
    assert "class TritonPythonModel" in (version_dir / PYTHON_MODEL_FILE_NAME).read_text()
    assert (tmp_path / "repo" / "embedder" / CARD_FILE_NAME).is_file()


# ---- a real Triton ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [SQUEEZENET, MOBILENET])
async def test_triton_embeddings_equal_in_process_ones(
    model: str, triton: TritonServerProcess, squeezenet_dir: Path, mobilenet_dir: Path, ukbench_bytes: list[bytes]
) -> None:
    model_dir = squeezenet_dir if model == SQUEEZENET else mobilenet_dir
    async with running_embedder(embedder_settings(model_dir)) as embedder:
        in_process = await embed_vectors(embedder.stub, ukbench_bytes)
    settings = embedder_settings(model_dir, backend="triton", triton=triton_settings(triton))
    async with running_embedder(settings) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert (info.backend, info.model_name) == ("triton", model)
        on_triton = await embed_vectors(embedder.stub, ukbench_bytes)
    assert on_triton.shape == in_process.shape
    assert float(np.abs(on_triton - in_process).max()) <= 1e-5


async def test_concurrent_requests_reach_triton_as_batches(
    triton: TritonServerProcess, squeezenet_dir: Path, ukbench_bytes: list[bytes]
) -> None:
    before = await model_stats(triton, SQUEEZENET)
    settings = embedder_settings(squeezenet_dir, backend="triton", triton=triton_settings(triton),
                                 max_batch_size=8, max_batch_wait_ms=100.0)
    async with running_embedder(settings) as embedder:
        single = [embedder.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[embedder_pb2.ImageInput(data=data)]),
                                            timeout=30) for data in ukbench_bytes[:16]]
        replies = await asyncio.gather(*single)
    assert all(reply.results[0].WhichOneof("result") == "embedding" for reply in replies)
    expected = 16 + 1  # the images, and the embedder's one-image warm-up
    after = before

    async def all_counted() -> bool:
        # Triton's python backend records an execution's statistics just after answering it.
        nonlocal after
        after = await model_stats(triton, SQUEEZENET)
        return after.inference_count - before.inference_count >= expected

    await wait_until(all_counted, 5, "Triton statistics counting every image")
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == expected
    assert executions < inferences
    batched = {stats.batch_size: stats.compute_infer.count for stats in after.batch_stats}
    assert any(size > 1 and count > 0 for size, count in batched.items()), batched


async def info_is_failed_precondition(embedder: RunningEmbedder) -> bool:
    try:
        await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.FAILED_PRECONDITION
    return False


async def test_missing_model_is_failed_precondition_naming_it(triton: TritonServerProcess, squeezenet_dir: Path) -> None:
    settings = embedder_settings(squeezenet_dir, backend="triton", triton=triton_settings(triton, model_name="no-such-model"))
    async with running_embedder(settings, wait_ready=False) as embedder:
        await wait_until(lambda: info_is_failed_precondition(embedder), 10, "Info answering FAILED_PRECONDITION")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await embedder.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[embedder_pb2.ImageInput(data=b"x")]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'no-such-model'" in refused.value.details() and triton.grpc_url in refused.value.details()
        assert await health(embedder) == NOT_SERVING


async def test_a_model_that_is_not_the_cards_is_refused(triton: TritonServerProcess, mobilenet_dir: Path) -> None:
    # The mobilenet card pointed at squeezenet on Triton: preprocessing and vectors would not match.
    settings = embedder_settings(mobilenet_dir, backend="triton", triton=triton_settings(triton, model_name=SQUEEZENET))
    async with running_embedder(settings, wait_ready=False) as embedder:
        await wait_until(lambda: info_is_failed_precondition(embedder), 10, "Info answering FAILED_PRECONDITION")
        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert "does not match the model card" in mismatch.value.details()
        assert "1280 values" in mismatch.value.details()


def test_bench_embedder_compares_both_backends(triton: TritonServerProcess, squeezenet_dir: Path) -> None:
    report = bench_embedder(squeezenet_dir, triton.grpc_url, batch_sizes=(1, 4), n=8, concurrency=4)
    assert set(report["backends"]) == {"onnxruntime", "triton"}
    for entry in report["backends"].values():
        assert set(entry["backend"]) == {"1", "4"} and entry["batch1_latency_ms"] > 0
        assert all(result["images_per_s"] > 0 for result in entry["backend"].values())
        assert entry["service"]["images_per_s"] > 0 and entry["service"]["single_image_ms_p50"] > 0
    assert "| triton |" in format_report(report)


def test_local_stack_runs_the_embedder_on_triton(mobilenet_dir: Path, tmp_path: Path) -> None:
    # What `vsearch up --triton` sets up: a cpu repository in the data dir, the embedder pointed at it.
    server, model_name = prepare_local_triton(tmp_path, mobilenet_dir)
    assert model_name == MOBILENET and server.repo_dir == tmp_path / "triton-repo"
    assert parse_config(tmp_path / "triton-repo" / MOBILENET / "config.pbtxt").backend == "python"
    layout = StackLayout(data_dir=tmp_path, model_dir=mobilenet_dir, gateway_port=1, http_port=2,
                         triton_url=server.grpc_url, triton_model_name=model_name)
    embedder = layout.environments()["embedder"]
    assert embedder["EMBEDDER_BACKEND"] == "triton" and embedder["EMBEDDER_TRITON__URL"] == server.grpc_url
    assert embedder["EMBEDDER_TRITON__MODEL_NAME"] == MOBILENET
    assert "EMBEDDER_BACKEND" not in StackLayout(data_dir=tmp_path, model_dir=mobilenet_dir, gateway_port=1,
                                                 http_port=2).environments()["embedder"]
    command = server.command()
    assert f"--grpc-port={server.grpc_port}" in command and "--grpc-address=127.0.0.1" in command


async def test_triton_killed_is_unavailable_at_once_and_the_embedder_recovers(
    triton: TritonServerProcess, squeezenet_dir: Path, ukbench_bytes: list[bytes]
) -> None:
    # Runs last in the module: it kills the shared server and starts it again on the same ports.
    settings = embedder_settings(squeezenet_dir, backend="triton", triton=triton_settings(triton))
    async with running_embedder(settings) as embedder:
        before = await embed_vectors(embedder.stub, ukbench_bytes[:2])
        assert await health(embedder) == SERVING

        triton.kill()
        started = time.monotonic()
        (result,) = await embed_results(embedder.stub, [ukbench_bytes[0]])
        elapsed = time.monotonic() - started
        assert result.WhichOneof("result") == "error"
        assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0], result.error
        assert "triton" in result.error.message
        assert elapsed < 2.0  # far inside any caller's deadline: no waiting on a dead server

        async def not_serving() -> bool:
            return await health(embedder) == NOT_SERVING

        await wait_until(not_serving, 5, "health NOT_SERVING after Triton died")

        triton.start()
        await asyncio.to_thread(triton.wait_ready, 60, [SQUEEZENET])

        async def serving() -> bool:
            return await health(embedder) == SERVING

        await wait_until(serving, 15, "health SERVING after Triton came back")
        after = await embed_vectors(embedder.stub, ukbench_bytes[:2])
    assert float(np.abs(after - before).max()) <= 1e-5
