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

from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.model_card import CARD_FILE_NAME, MODEL_FILE_NAME, read_model_card
from vsearch_cli.model_tools.prepare import (
    ChecksumMismatchError,
    ModelPrepareError,
    download_verified,
    ensure_model,
    file_sha256,
    prepare_model,
    resolve_source,
)
from vsearch_cli.model_tools.presets import PRESETS
from embedder_svc.preprocessing import Preprocessor
from conftest import MOBILENET, SQUEEZENET
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


def test_prepared_dir_holds_only_the_model_and_its_card(tmp_path: Path, mobilenet_dir: Path) -> None:
    """No partial files left behind; the directory is self-contained (it may be copied or mounted)."""
    copy = Path(shutil.copytree(mobilenet_dir, tmp_path / "copy"))
    assert read_model_card(copy) == read_model_card(mobilenet_dir)
    assert sorted(p.name for p in copy.iterdir()) == sorted([CARD_FILE_NAME, MODEL_FILE_NAME])
