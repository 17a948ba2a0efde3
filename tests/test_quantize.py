"""`vsearch model quantize` on the real squeezenet: static QDQ int8 calibrated on a few Caltech-101
images, the accuracy guard scored on UKBench. The int8 model must run, be smaller, hold QDQ nodes,
carry an updated card, serve from the embedder, and retrieve within the tolerance; the guard must
refuse (non-zero exit, nothing written) when the tolerance cannot be met or the calibration is bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from embedder_svc.model_card import MODEL_FILE_NAME, read_model_card
from vsearch_cli.model_tools.quantize import (
    GUARD_METRIC,
    AccuracyGuardError,
    QuantizeReport,
    count_qdq_nodes,
    cpu_session,
    draw_calibration_images,
    load_labelled_images,
    quantize_embedding_model,
)
from conftest import SQUEEZENET, embed_vectors, embedder_settings, ns_score, running_embedder
from vsearch_cli import main as cli
from vsearch.v1 import embedder_pb2

CALIBRATION_IMAGES = 16


@pytest.fixture(scope="module")
def calibration_images(shared_dir: Path) -> list[Path]:
    # A few Caltech-101 classes: the catalog the calibration is drawn from is not the evaluation set.
    folder = shared_dir / "datasets/caltech101/101_ObjectCategories"
    images = []
    for label in ("airplanes", "chair", "sunflower", "watch"):
        images += draw_calibration_images(folder / label, CALIBRATION_IMAGES // 4)
    return images


@pytest.fixture(scope="module")
def ukbench_labels(shared_dir: Path) -> Path:
    return shared_dir / "datasets/ukbench56/groundtruth.csv"


@pytest.fixture(scope="module")
def quantized(
    squeezenet_dir: Path, calibration_images: list[Path], ukbench_labels: Path, tmp_path_factory: pytest.TempPathFactory
) -> QuantizeReport:
    eval_set = load_labelled_images(ukbench_labels, label_col="group")
    out = tmp_path_factory.mktemp("quantized") / "squeezenet-int8"
    return quantize_embedding_model(
        squeezenet_dir, out, calibration_images=calibration_images, eval_set=eval_set,
        latency_batches=(1, 8), latency_runs=2,
    )


def test_int8_model_is_smaller_runs_and_holds_qdq_nodes(quantized: QuantizeReport, squeezenet_dir: Path) -> None:
    out = quantized.out_dir
    assert out is not None
    int8_file, float_file = out / MODEL_FILE_NAME, squeezenet_dir / MODEL_FILE_NAME
    assert int8_file.stat().st_size < 0.4 * float_file.stat().st_size  # measured 0.28
    model = onnx.load(str(int8_file))
    assert count_qdq_nodes(model) == quantized.qdq_nodes > 50
    quantized_convs = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    assert quantized_convs and quantized_convs <= dequantized  # every conv weight comes through a DequantizeLinear
    assert not any(node.name.startswith("head/") and node.op_type == "QuantizeLinear" for node in model.graph.node)

    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32) * 60
    (vectors,) = cpu_session(int8_file).run(["embedding"], {"data_0": batch})
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_card_records_the_quantization_and_changes_version(quantized: QuantizeReport, squeezenet_dir: Path) -> None:
    float_card, card = read_model_card(squeezenet_dir), read_model_card(quantized.out_dir)
    assert card == quantized.card
    assert card.name == f"{SQUEEZENET}-int8" and card.version != float_card.version
    assert (card.preprocessing, card.input, card.output) == (float_card.preprocessing, float_card.input, float_card.output)
    q = card.quantization
    assert q is not None and float_card.quantization is None
    assert (q.method, q.weight_type, q.activation_type, q.per_channel, q.calibration_method) == (
        "static_qdq", "int8", "uint8", True, "minmax")
    assert q.calibration_images == CALIBRATION_IMAGES and q.float_version == float_card.version
    assert q.guard_metric == GUARD_METRIC and q.guard_int8 == pytest.approx(quantized.int8_model.metrics[GUARD_METRIC], abs=1e-6)


async def test_int8_retrieval_on_ukbench_is_within_tolerance_and_it_serves(
    quantized: QuantizeReport, ukbench_images: list[Path]
) -> None:
    float_metrics, int8_metrics = quantized.float_model.metrics, quantized.int8_model.metrics
    assert float_metrics["queries"] == int8_metrics["queries"] == 56
    assert float_metrics[GUARD_METRIC] - int8_metrics[GUARD_METRIC] <= 0.01
    assert int8_metrics["ns_score"] >= 3.5  # float: 3.95
    table = quantized.table()
    assert "| map_at_100 |" in table and "| latency batch 8 (ms) |" in table and "| model file |" in table

    # The embedder serves the new directory as it is, and reports the new version.
    async with running_embedder(embedder_settings(quantized.out_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert (info.model_name, info.model_version) == (quantized.card.name, quantized.card.version)
        vectors = await embed_vectors(embedder.stub, [path.read_bytes() for path in ukbench_images])
    assert ns_score(vectors) >= 3.5


def test_guard_refuses_an_impossible_tolerance_and_writes_nothing(
    squeezenet_dir: Path, ukbench_labels: Path, shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never-written"
    code = cli.main([
        "model", "quantize", "--model-dir", str(squeezenet_dir), "--out", str(out),
        "--calibration-dir", str(shared_dir / "datasets/caltech101/101_ObjectCategories/airplanes"),
        "--calibration-count", "8", "--eval-labels", str(ukbench_labels), "--eval-label-col", "group",
        "--tolerance", "-0.5", "--latency-runs", "1", "--latency-batch-sizes", "1",
    ])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert not out.exists()
    assert "refusing to write the int8 model: map_at_100 fell from" in captured.err
    assert "| map_at_100 |" in captured.out  # the side-by-side table is still shown


def test_guard_refuses_a_badly_calibrated_model_at_the_default_tolerance(
    squeezenet_dir: Path, ukbench_labels: Path, calibration_images: list[Path], tmp_path: Path
) -> None:
    # Ranges at the 50th percentile clip half of every activation: a calibration gone wrong, which
    # the default tolerance (1 point of mAP@100) must catch (measured: 0.996 -> 0.858).
    out = tmp_path / "bad-int8"
    with pytest.raises(AccuracyGuardError) as refused:
        quantize_embedding_model(
            squeezenet_dir, out, calibration_images=calibration_images[:8],
            eval_set=load_labelled_images(ukbench_labels, label_col="group"),
            calibration_method="percentile", percentile=50.0, latency_batches=(1,), latency_runs=1,
        )
    assert not out.exists()
    report = refused.value.report
    assert report.tolerance == 0.01 and report.guard_drop > 0.05 and not report.passed
    assert "refusing to write the int8 model" in str(refused.value)


# ---- EfficientNet-Lite2: the project's own int8 version of a float model with a pooled output ---------


@pytest.fixture(scope="module")
def efficientnet_int8(
    efficientnet_dir: Path, calibration_images: list[Path], ukbench_labels: Path, tmp_path_factory: pytest.TempPathFactory
) -> QuantizeReport:
    # The defaults of `vsearch model quantize` (MinMax, per-channel int8 weights, uint8 activations,
    # tolerance 0.01), on fewer calibration images than its 128.
    return quantize_embedding_model(
        efficientnet_dir, tmp_path_factory.mktemp("quantized") / "efficientnet-int8",
        calibration_images=calibration_images, eval_set=load_labelled_images(ukbench_labels, label_col="group"),
        latency_batches=(1,), latency_runs=1,
    )


def test_efficientnet_int8_passes_the_guard_at_the_default_tolerance(
    efficientnet_int8: QuantizeReport, efficientnet_dir: Path
) -> None:
    report = efficientnet_int8
    assert report.passed and report.tolerance == 0.01 and report.guard_drop <= 0.01
    assert report.int8_model.metrics["ns_score"] >= 3.8
    out = report.out_dir
    assert out is not None
    assert (out / MODEL_FILE_NAME).stat().st_size < 0.35 * (efficientnet_dir / MODEL_FILE_NAME).stat().st_size  # measured 0.28
    model = onnx.load(str(out / MODEL_FILE_NAME))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    assert len(convs) == 64 and all(conv.input[0] in dequantized and conv.input[1] in dequantized for conv in convs)
    assert not any(node.name.startswith("head/") and node.op_type == "QuantizeLinear" for node in model.graph.node)

    float_card, card = read_model_card(efficientnet_dir), read_model_card(out)
    assert card.name == "efficientnet-lite2-int8" and card.quantization is not None
    assert card.quantization.float_version == float_card.version and card.version != float_card.version
    assert (card.preprocessing, card.input, card.output) == (float_card.preprocessing, float_card.input, float_card.output)
    assert card.output.pooling == "none"


async def test_the_embedder_serves_efficientnet_int8_close_to_float(
    efficientnet_int8: QuantizeReport, efficientnet_dir: Path, ukbench_bytes: list[bytes]
) -> None:
    vectors = {}
    for model_dir in (efficientnet_dir, efficientnet_int8.out_dir):
        async with running_embedder(embedder_settings(model_dir)) as embedder:
            info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
            assert (info.model_name, info.model_version) == (read_model_card(model_dir).name, read_model_card(model_dir).version)
            vectors[model_dir] = await embed_vectors(embedder.stub, ukbench_bytes)
    int8, float32 = vectors[efficientnet_int8.out_dir], vectors[efficientnet_dir]
    assert ns_score(int8) >= 3.8
    cosines = (int8 * float32).sum(axis=1)
    assert float(cosines.mean()) > 0.98, cosines  # measured 0.993 (min 0.981)


def test_triton_repository_for_efficientnet_float_and_int8(
    efficientnet_int8: QuantizeReport, efficientnet_dir: Path, tmp_path: Path
) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from vsearch_cli.model_tools.triton_repo import write_triton_repo

    precisions = {}
    for model_dir in (efficientnet_dir, efficientnet_int8.out_dir):
        written = write_triton_repo(model_dir, tmp_path / "repo")
        config = text_format.Parse(written.config_path.read_text(), model_config_pb2.ModelConfig())
        (tensor_in,), (tensor_out,) = config.input, config.output
        assert (tensor_in.name, list(tensor_in.dims), tensor_out.name, list(tensor_out.dims)) == (
            "input", [3, 260, 260], "embedding", [1280])
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        precisions[config.name] = accelerator.parameters["precision_mode"]
        assert (tmp_path / "repo" / config.name / "1" / MODEL_FILE_NAME).read_bytes() == (model_dir / MODEL_FILE_NAME).read_bytes()
    assert precisions == {"efficientnet-lite2": "FP16", "efficientnet-lite2-int8": "INT8"}
