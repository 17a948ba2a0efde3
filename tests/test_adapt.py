"""`vsearch model adapt` as a user runs it, on a small labelled sample of Caltech-101 (six pairs of classes
the default model confuses, 6 train and 4 test images each): the written graph computes the documented
head, the card records the adaptation and a calibration, a real embedder serves it, and a model that does
not clear the guard, or labels with nothing to learn, are refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import CALTECH_SAMPLE_CLASSES, embed_vectors, embedder_settings, run_cli, running_embedder, write_labels_csv
from embedder_svc.model_card import ModelCard, read_model_card
from vsearch.v1 import embedder_pb2


def adapt_args(sample, model_dir: Path, labels_csv: Path, out: Path, *extra: str) -> list[str]:
    return ["model", "adapt", "--model-dir", str(model_dir), "--images", str(sample.root), "--labels", str(labels_csv),
            "--split-col", "split", "--fit-split", "train", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def adapted(caltech_sample, mobilenet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "model"
    result = run_cli(*adapt_args(caltech_sample, mobilenet_dir, caltech_sample.labels_csv, out), timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result


def test_adapt_prints_source_and_adapted_side_by_side_and_records_the_fit(adapted, mobilenet_dir, caltech_sample):
    out, result = adapted
    card, source = read_model_card(out), read_model_card(mobilenet_dir)
    adaptation = card.adaptation
    assert adaptation is not None and card.calibration is not None
    # The source model, the labels file, the classes, the dimension and the fit's figures.
    assert (adaptation.source_name, adaptation.source_version) == (source.name, source.version)
    assert adaptation.source_model_sha256 == hashlib.sha256((mobilenet_dir / "model.onnx").read_bytes()).hexdigest()
    assert adaptation.labels_sha256 == hashlib.sha256(caltech_sample.labels_csv.read_bytes()).hexdigest()
    assert adaptation.classes == sorted(CALTECH_SAMPLE_CLASSES)
    assert adaptation.fit_images == 72
    assert adaptation.projection_dimension == len(CALTECH_SAMPLE_CLASSES) - 1
    # The default method fine-tunes the LDA for the epochs the internal validation chose (0 keeps the LDA).
    assert adaptation.method == ("lda_metric_blend" if adaptation.fine_tune_epochs else "lda_blend")
    assert f"fine-tuning epochs {adaptation.fine_tune_epochs}," in result.stdout
    expected = adaptation.projection_dimension + (1280 if adaptation.blend < 1 else 0)
    assert card.output.dimension == adaptation.dimension == expected
    before = adaptation.metrics["guard_held_out_images_source_map_at_100"]
    after = adaptation.metrics["guard_held_out_images_adapted_map_at_100"]
    assert after >= before
    # A new version, from the adaptation and then the calibration.
    assert card.version != source.version
    assert card.calibration.uncalibrated_version == ModelCard.derive_adapted_version(source.version, adaptation)
    assert card.version == ModelCard.derive_calibrated_version(card.calibration.uncalibrated_version, card.calibration)
    # The printed guard: both models on the 48 held-out images, the same figures as the card's.
    assert "| held-out queries | metric | source (1280-d) | adapted" in result.stdout
    assert f"| held-out images | map_at_100 | {before:.4f} | {after:.4f} |" in result.stdout
    assert f"wrote {card.name} version {card.version} to {out}" in result.stdout


async def test_the_graph_computes_the_recorded_head_and_a_real_embedder_serves_it(adapted, mobilenet_dir, caltech_sample):
    out, _ = adapted
    card = read_model_card(out)
    blend = card.adaptation.blend
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(out / "model.onnx")).graph.initializer}
    mean, projection = weights["head/adapt_mean"].astype(np.float64), weights["head/adapt_projection"].astype(np.float64)
    images = [path.read_bytes() for path in caltech_sample.paths("test")[:8]]
    async with running_embedder(embedder_settings(mobilenet_dir)) as source_embedder:
        source = (await embed_vectors(source_embedder.stub, images)).astype(np.float64)
    async with running_embedder(embedder_settings(out)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=10)
        served = await embed_vectors(embedder.stub, images)
    assert (info.model_version, info.dimension) == (card.version, card.output.dimension)
    assert list(info.calibration.score_knots) == pytest.approx(card.calibration.score_knots)
    # z = L2((x - mean) P); the output L2([sqrt(1 - w) x, sqrt(w) z]) (or z alone with w = 1).
    projected = (source - mean) @ projection
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    expected = projected if blend >= 1 else np.hstack([np.sqrt(1 - blend) * source, np.sqrt(blend) * projected])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() < 1e-4


def test_random_labels_give_a_worse_model_which_the_guard_refuses_with_nothing_written(
    caltech_sample, mobilenet_dir, tmp_path,
):
    # The fit rows' labels shuffled: whatever the fit learns from them only hurts on the held-out images.
    rows = list(caltech_sample.rows)
    train = [index for index, (_, _, split) in enumerate(rows) if split == "train"]
    shuffled = [rows[index][1] for index in train]
    random.Random(0).shuffle(shuffled)
    for index, label in zip(train, shuffled):
        rows[index] = (rows[index][0], label, "train")
    labels_csv = write_labels_csv(tmp_path / "random.csv", rows)
    out = tmp_path / "adapted"
    result = run_cli(*adapt_args(caltech_sample, mobilenet_dir, labels_csv, out), timeout=300)
    assert result.returncode == 3, result.stderr
    refusal = re.search(r"refusing to write the adapted model: map_at_100 on the 48 held-out images fell from "
                        r"(\d\.\d{4}) to (\d\.\d{4})", result.stderr)
    assert refusal is not None, result.stderr
    before, after = refusal.groups()
    assert float(after) < float(before)
    # Both models side by side, as when it passes.
    assert f"| held-out images | map_at_100 | {before} | {after} |" in result.stdout
    assert not out.exists()


def test_bad_options_are_refused_before_anything_is_embedded(caltech_sample, mobilenet_dir, tmp_path):
    out = tmp_path / "adapted"
    result = run_cli("model", "adapt", "--model-dir", str(mobilenet_dir), "--images", str(caltech_sample.root),
                     "--labels", str(caltech_sample.labels_csv), "--split-col", "split", "--out", str(out))
    assert result.returncode == 1
    assert "--split-col and --fit-split go together" in result.stderr
    result = run_cli(*adapt_args(caltech_sample, mobilenet_dir, caltech_sample.labels_csv, mobilenet_dir))
    assert result.returncode == 1 and "--out must differ" in result.stderr
    assert json.loads((mobilenet_dir / "model_card.json").read_text()).get("adaptation") is None


def test_the_metric_loss_gradients_match_finite_differences():
    from vsearch_cli.model_tools.adapt import proxy_loss_gradients

    rng = np.random.default_rng(0)
    centred, labels = rng.normal(size=(20, 6)), rng.integers(0, 4, 20)
    projection, proxies = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    _, projection_gradient, proxy_gradient = proxy_loss_gradients(centred, labels, projection, proxies, 8.0)
    for parameter, gradient in ((projection, projection_gradient), (proxies, proxy_gradient)):
        numeric = np.zeros_like(parameter)
        for index in np.ndindex(parameter.shape):
            saved = parameter[index]
            parameter[index] = saved + 1e-6
            above = proxy_loss_gradients(centred, labels, projection, proxies, 8.0)[0]
            parameter[index] = saved - 1e-6
            below = proxy_loss_gradients(centred, labels, projection, proxies, 8.0)[0]
            parameter[index] = saved
            numeric[index] = (above - below) / 2e-6
        assert np.abs(numeric - gradient).max() < 1e-5 * max(1.0, np.abs(gradient).max())


def test_metric_selection_keeps_fine_tuning_that_validates_better_than_the_lda_and_zero_epochs_is_the_lda():
    from vsearch_cli.model_tools.adapt import (
        blend_vectors,
        fine_tune,
        fit_lda,
        select_adaptation,
    )

    # Eight labels in 20-d whose noise is far from isotropic: room for a projection to learn.
    rng = np.random.default_rng(0)
    labels = np.repeat([f"label{index}" for index in range(8)], 30)
    vectors = (0.6 * rng.normal(size=(8, 20))[np.repeat(np.arange(8), 30)]
               + rng.normal(size=(240, 20)) * np.linspace(0.2, 2.0, 20))
    lda = select_adaptation(vectors, labels, method="lda")
    metric = select_adaptation(vectors, labels, method="metric")
    assert lda.epochs == 0 and metric.method == "metric"
    # The LDA (epoch 0) is among the metric method's candidates, so epochs are kept only for a gain; here
    # (a gradient of the wrong sign, or none, would keep 0) the fine-tuning validates better.
    assert metric.epochs > 0 and metric.chosen.seen > lda.chosen.seen
    assert {candidate.epochs for candidate in metric.candidates} == {0, 5, 10, 15, 20, 25, 30}
    fit = fit_lda(vectors, labels, metric.shrinkage)
    # Zero epochs: the LDA's vectors (its projection only rescaled, which the normalisation undoes).
    untouched = fine_tune(fit, vectors, labels, 0)
    assert np.allclose(blend_vectors(vectors, untouched, 1.0), blend_vectors(vectors, fit, 1.0), atol=1e-12)
    tuned = fine_tune(fit, vectors, labels, 5)
    assert tuned.epochs == 5 and not np.allclose(tuned.projection, untouched.projection)
