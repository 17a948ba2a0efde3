"""`vsearch model pca` on the real MobileNetV2 model, fitted on a few UKBench images: the written model
must give D-dimensional unit vectors equal to an independent numpy PCA of the source model's vectors,
record the fit on its card with a new version, be served by the embedder as D-dimensional, and
refuse bad arguments without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from embedder_svc.model_card import MODEL_FILE_NAME, read_model_card
from embedder_svc.text_search import TextSearcher
from vsearch_cli.model_tools.pca import PcaError, reduce_model
from vsearch_cli.model_tools.quantize import cpu_session, preprocessed_batches
from conftest import embed_vectors, embedder_settings, running_embedder
from vsearch_cli import main as cli
from vsearch_cli.local_stack.layout import StackLayout
from vsearch.v1 import embedder_pb2

FIT_IMAGES = 24
DIM = 8


@pytest.fixture(scope="module")
def fit_images(ukbench_images: list[Path]) -> list[Path]:
    return ukbench_images[:FIT_IMAGES]


@pytest.fixture(scope="module")
def reduced_dir(mobilenet_dir: Path, fit_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pca") / "mobilenet-pca8"
    reduce_model(mobilenet_dir, out, images=fit_images, dimension=DIM, fit_set="ukbench56, first 24")
    return out


def model_vectors(model_dir: Path, paths: list[Path]) -> np.ndarray:
    card = read_model_card(model_dir)
    session = cpu_session(model_dir / MODEL_FILE_NAME)
    batches = [session.run([card.output.name], {card.input.name: batch})[0]
               for _, batch in preprocessed_batches(paths, card, 16)]
    return np.concatenate(batches).astype(np.float64)


@pytest.fixture(scope="module")
def source_vectors(mobilenet_dir: Path, ukbench_images: list[Path]) -> np.ndarray:
    return model_vectors(mobilenet_dir, ukbench_images)


def numpy_pca(vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independently of the module: mean, top `dim` components [dim, d], variance ratios of all."""
    mean = vectors.mean(axis=0)
    _, singular, components = np.linalg.svd(vectors - mean, full_matrices=False)
    return mean, components[:dim], singular**2 / np.sum(singular**2)


def normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def sign_aligned(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """PCA components have arbitrary signs: flip each column of `expected` to agree with `actual`."""
    return expected * np.sign(np.sum(expected * actual, axis=0))


def test_reduced_model_is_numpy_pca_of_the_source_vectors(
    reduced_dir: Path, mobilenet_dir: Path, ukbench_images: list[Path], source_vectors: np.ndarray
) -> None:
    # All 56 images: the 24 the PCA was fitted on and 32 it never saw.
    reduced = model_vectors(reduced_dir, ukbench_images)
    assert reduced.shape == (56, DIM)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    mean, components, ratios = numpy_pca(source_vectors[:FIT_IMAGES], DIM)
    expected = normalised(sign_aligned((source_vectors - mean) @ components.T, reduced))
    np.testing.assert_allclose(reduced, expected, atol=1e-4)
    # Without the mean the projection is a different one.
    assert np.abs(normalised(sign_aligned(source_vectors @ components.T, reduced)) - reduced).max() > 0.05

    source_card, card = read_model_card(mobilenet_dir), read_model_card(reduced_dir)
    assert card.output.dimension == DIM and card.name == "mobilenetv2-12-int8-pca8"
    assert card.version != source_card.version and card.preprocessing == source_card.preprocessing
    pca = card.pca
    assert pca is not None
    assert (pca.source_version, pca.source_dimension, pca.dimension, pca.whiten, pca.fit_images) == (
        source_card.version, 1280, DIM, False, FIT_IMAGES)
    np.testing.assert_allclose(pca.component_variance_ratios, ratios[:DIM], atol=2e-6)
    assert pca.explained_variance_ratio == pytest.approx(ratios[:DIM].sum(), abs=2e-6)
    assert pca.fit_set == "ukbench56, first 24"
    assert '"explained_variance_ratio"' in (reduced_dir / "model_card.json").read_text()

    # The appended nodes are part of the head, which `vsearch model quantize` keeps float.
    source_nodes = len(onnx.load(str(mobilenet_dir / MODEL_FILE_NAME)).graph.node)
    appended = onnx.load(str(reduced_dir / MODEL_FILE_NAME)).graph.node[source_nodes:]
    assert appended and all(node.name.startswith("head/pca_") for node in appended)


def test_the_reduced_model_searches_by_words_through_the_same_projection(
    reduced_dir: Path, mobilenet_dir: Path, ukbench_images: list[Path], source_vectors: np.ndarray
) -> None:
    """The source's text section comes along with a projection: a text query scores the reduced vectors
    as it scores the source vectors projected onto the PCA's components (the mean is a constant per
    query, so it does not change a ranking)."""
    card = read_model_card(reduced_dir)
    assert card.text is not None and card.text.dimension == DIM and card.text.projection.source_dimension == 1280
    words = ["a photo of a goldfish", "a coffee mug"]
    source_queries = np.array([query.vector for query in TextSearcher(mobilenet_dir, read_model_card(mobilenet_dir))(words)])
    reduced_queries = np.array([query.vector for query in TextSearcher(reduced_dir, card)(words)])
    assert reduced_queries.shape == (2, DIM)
    mean, components, _ = numpy_pca(source_vectors[:FIT_IMAGES], DIM)
    reduced = model_vectors(reduced_dir, ukbench_images)
    # PCA components have arbitrary signs: take the model's.
    signs = np.sign(np.sum(((source_vectors - mean) @ components.T) * reduced, axis=0))
    components = components * signs[:, None]
    # For orthonormal components the mapped query is the projected one: q' = C q.
    np.testing.assert_allclose(reduced_queries, normalised(source_queries @ components.T), atol=1e-5)


def test_whitened_model_divides_by_the_component_spread(
    mobilenet_dir: Path, fit_images: list[Path], ukbench_images: list[Path], source_vectors: np.ndarray, tmp_path: Path
) -> None:
    card = reduce_model(mobilenet_dir, tmp_path / "whitened", images=fit_images, dimension=4, whiten=True).card
    assert card.name == "mobilenetv2-12-int8-pca4w" and card.pca is not None and card.pca.whiten
    reduced = model_vectors(tmp_path / "whitened", ukbench_images)
    fit = source_vectors[:FIT_IMAGES]
    mean, components, _ = numpy_pca(fit, 4)
    spread = np.std((fit - mean) @ components.T, axis=0, ddof=1)
    expected = normalised(sign_aligned((source_vectors - mean) @ components.T / spread, reduced))
    np.testing.assert_allclose(reduced, expected, atol=1e-4)


async def test_embedder_serves_the_reduced_model(reduced_dir: Path, ukbench_images: list[Path]) -> None:
    card = read_model_card(reduced_dir)
    async with running_embedder(embedder_settings(reduced_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=5)
        assert (info.model_name, info.model_version, info.dimension) == (card.name, card.version, DIM)
        served = await embed_vectors(embedder.stub, [path.read_bytes() for path in ukbench_images[:6]])
    assert served.shape == (6, DIM)
    np.testing.assert_allclose(served, model_vectors(reduced_dir, ukbench_images[:6]), atol=1e-5)


def test_cli_fits_on_a_manifest_sample(mobilenet_dir: Path, ukbench_images: list[Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "catalog.jsonl"
    rows = [json.dumps({"path": str(path), "category": "x"}) for path in ukbench_images[:12]]
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "reduced"
    code = cli.main(["model", "pca", "--model-dir", str(mobilenet_dir), "--manifest", str(manifest),
                     "--max-images", "10", "--dim", "4", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dimension"], report["fit_images"], report["source_dimension"]) == (4, 10, 1280)
    card = read_model_card(out)
    assert card.output.dimension == 4 and card.pca is not None
    assert card.pca.fit_set == f"manifest {manifest}: 10 of 12 images (seed 0)"
    assert StackLayout(data_dir=tmp_path, model_dir=out, gateway_port=1, http_port=2,
                       search_dimension=card.output.dimension).environments()["search"]["SEARCH_DIMENSION"] == "4"


@pytest.fixture(scope="module")
def broken_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("broken")
    paths = [folder / f"broken_{index}.jpg" for index in range(3)]
    for path in paths:
        path.write_bytes(b"\xff\xd8 not really a jpeg")
    return paths


@pytest.mark.parametrize(
    ("dim", "images", "message"),
    [
        (0, "fit", "--dim must be at least 1, got 0"),
        (1280, "fit", "--dim 1280 does not reduce anything: the model's vectors have 1280 dimensions"),
        (FIT_IMAGES + 1, "fit", f"--dim {FIT_IMAGES + 1} needs at least {FIT_IMAGES + 2} fit images"),
        (FIT_IMAGES, "fit", f"--dim {FIT_IMAGES} needs at least {FIT_IMAGES + 1} fit images"),
        # 8 files pass the first check; only 5 decode.
        (5, "five+broken", "--dim 5 needs at least 6 fit images (n images give at most n - 1 principal "
                           "components), got 5"),
        (2, "broken", "none of the 3 images could be decoded"),
        (2, "none", "no images to fit the PCA on"),
    ],
)
def test_cli_refuses_and_writes_nothing(
    dim: int, images: str, message: str, mobilenet_dir: Path, fit_images: list[Path], broken_images: list[Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    chosen = {"fit": fit_images, "five+broken": fit_images[:5] + broken_images, "broken": broken_images, "none": []}
    for path in chosen[images]:
        (folder / path.name).symlink_to(path)
    out = tmp_path / "out"
    code = cli.main(["model", "pca", "--model-dir", str(mobilenet_dir), "--images", str(folder), "--dim", str(dim),
                     "--out", str(out)])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_an_already_reduced_model_and_its_own_directory(reduced_dir: Path, fit_images: list[Path]) -> None:
    with pytest.raises(PcaError, match="already PCA-reduced"):
        reduce_model(reduced_dir, reduced_dir.parent / "again", images=fit_images, dimension=4)
    with pytest.raises(PcaError, match="--out must differ"):
        reduce_model(reduced_dir, reduced_dir, images=fit_images, dimension=4)
