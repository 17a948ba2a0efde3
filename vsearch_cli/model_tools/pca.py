"""`vsearch model pca`: a prepared embedding model in, one whose vectors have D dimensions out.

1. The source model embeds the catalog images in-process, as the embedder does: its decoder, the
   card-driven preprocessor and the onnxruntime backend.
2. PCA is fitted on those unit vectors in float64: their mean, and the top-D eigenvectors of their
   covariance (optionally whitened: each component divided by the square root of its variance).
3. The graph gets a tail after its output: subtract the mean, MatMul by the d x D projection
   (float32 initializers), L2-normalise again (as `vsearch model prepare` does). Its nodes are named
   `head/pca_*`, so `vsearch model quantize` keeps them float like the rest of the head.
4. The result is written as a prepared model directory whose card has the new dimension, records the
   PCA and has a new version: vectors of the two models are never mixed in a cache or an index."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from embedder_svc.model_card import MODEL_FILE_NAME, ModelCard, ModelCardError, PcaReduction, read_model_card
from vsearch_cli.model_tools.prepare import (
    BATCH_DIM,
    ModelPrepareError,
    write_prepared,
    file_sha256,
    l2_normalise_nodes,
    verify_embedding_model,
)
from embedder_svc.onnx_backend import OnnxRuntimeBackend
from vsearch_cli.model_tools.quantize import IMAGE_SUFFIXES, preprocessed_batches

logger = logging.getLogger(__name__)

PREFIX = "head/pca_"
MEAN_NAME = f"{PREFIX}mean"
PROJECTION_NAME = f"{PREFIX}projection"
# The written model must reproduce the numpy projection of the source vectors this closely.
_CHECK_TOLERANCE = 1e-4
# A component with less variance than this share of the total cannot be whitened.
_MIN_WHITEN_VARIANCE = 1e-10


class PcaError(Exception):
    """The model, the images or the options do not allow the reduction; nothing was written."""


# ---- images -------------------------------------------------------------------------------------


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted."""
    if not root.is_dir():
        raise PcaError(f"image folder {root} not found")
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def sample_images(paths: Sequence[Path], max_images: int | None, seed: int = 0) -> list[Path]:
    """At most `max_images` of `paths`, a seeded random pick (same options, same set), sorted."""
    if max_images is None or len(paths) <= max_images:
        return list(paths)
    return sorted(random.Random(seed).sample(list(paths), max_images))


# ---- fitting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcaFit:
    mean: np.ndarray  # [d], float64
    components: np.ndarray  # [D, d], float64, orthonormal rows by decreasing variance
    variances: np.ndarray  # [D], the variance of the vectors along each component
    total_variance: float  # the trace of the covariance
    whiten: bool

    @property
    def dimension(self) -> int:
        return len(self.components)

    @property
    def component_variance_ratios(self) -> np.ndarray:
        return self.variances / self.total_variance

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.variances.sum() / self.total_variance)

    def projection(self) -> np.ndarray:
        """[d, D] float64: what the centred vectors are multiplied by."""
        matrix = self.components.T
        return matrix / np.sqrt(self.variances) if self.whiten else matrix

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """The reduced, L2-normalised vectors, in float64 (what the written graph computes in float32)."""
        projected = (np.asarray(vectors, dtype=np.float64) - self.mean) @ self.projection()
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def check_dimension(dimension: int, source_dimension: int, fit_images: int | None = None) -> None:
    if dimension < 1:
        raise PcaError(f"--dim must be at least 1, got {dimension}")
    if dimension >= source_dimension:
        raise PcaError(f"--dim {dimension} does not reduce anything: the model's vectors have "
                       f"{source_dimension} dimensions")
    if fit_images is not None and dimension > fit_images - 1:
        # n centred vectors span at most n - 1 directions; further components would be arbitrary.
        raise PcaError(f"--dim {dimension} needs at least {dimension + 1} fit images (n images give at most n - 1 "
                       f"principal components), got {fit_images}")


def fit_pca(vectors: np.ndarray, dimension: int, whiten: bool = False) -> PcaFit:
    """Mean and the top `dimension` eigenvectors of the covariance of `vectors` [n, d], in float64.
    Each component's sign makes its largest entry positive, so the same vectors give the same fit."""
    count, source_dimension = vectors.shape
    check_dimension(dimension, source_dimension, count)
    data = np.asarray(vectors, dtype=np.float64)
    mean = data.mean(axis=0)
    centred = data - mean
    covariance = centred.T @ centred / (count - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    top = np.argsort(eigenvalues)[::-1][:dimension]
    variances = np.maximum(eigenvalues[top], 0.0)
    components = eigenvectors[:, top].T
    largest = np.abs(components).argmax(axis=1)
    components = components * np.sign(components[np.arange(dimension), largest])[:, None]
    total = float(np.trace(covariance))
    if total <= 0:
        raise PcaError("the fit images all give the same vector: there is no variance to keep")
    if whiten and variances.min() <= _MIN_WHITEN_VARIANCE * total:
        weakest = int(variances.argmin())
        raise PcaError(f"cannot whiten: component {weakest + 1} has no variance on the fit images "
                       "(too few distinct images for --dim)")
    return PcaFit(mean, components, variances, total, whiten)


# ---- the graph ----------------------------------------------------------------------------------


def append_pca(model: onnx.ModelProto, fit: PcaFit, output_name: str) -> None:
    """In place: the graph's output `output_name` [N, d] becomes the PCA-reduced, L2-normalised
    [N, D] under the same name."""
    graph = model.graph
    if [value.name for value in graph.output] != [output_name]:
        outputs = [value.name for value in graph.output]
        raise PcaError(f"expected the model's only output to be {output_name!r}, found {outputs}")
    source = f"{PREFIX}input"
    for node in graph.node:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                if name == output_name:
                    names[index] = source
    graph.initializer.extend([
        numpy_helper.from_array(fit.mean.astype(np.float32), MEAN_NAME),
        numpy_helper.from_array(fit.projection().astype(np.float32), PROJECTION_NAME),
    ])
    graph.node.extend([
        helper.make_node("Sub", [source, MEAN_NAME], [f"{PREFIX}centred"], name=f"{PREFIX}centre"),
        helper.make_node("MatMul", [f"{PREFIX}centred", PROJECTION_NAME], [f"{PREFIX}projected"],
                         name=f"{PREFIX}project"),
        *l2_normalise_nodes(model, f"{PREFIX}projected", output_name, PREFIX),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [BATCH_DIM, fit.dimension]))


def projection_sha256(model: onnx.ModelProto) -> str:
    """sha256 over the mean and projection initializers' raw float32 bytes."""
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    digest = hashlib.sha256()
    for name in (MEAN_NAME, PROJECTION_NAME):
        digest.update(np.ascontiguousarray(numpy_helper.to_array(tensors[name]), dtype=np.float32).tobytes())
    return digest.hexdigest()


# ---- the command --------------------------------------------------------------------------------


@dataclass
class EmbeddedImages:
    vectors: np.ndarray  # [n, d] of the images that decoded
    used: int
    skipped: int
    # The first preprocessed batch and its vectors: to check the written model against.
    sample_batch: np.ndarray
    sample_vectors: np.ndarray


async def _embed(model_dir: Path, card: ModelCard, paths: Sequence[Path], batch_size: int) -> EmbeddedImages:
    backend = OnnxRuntimeBackend(model_dir / MODEL_FILE_NAME, card.input.name, card.output.name)
    vectors = np.zeros((len(paths), card.output.dimension), dtype=np.float32)
    embedded = np.zeros(len(paths), dtype=bool)
    sample: tuple[np.ndarray, np.ndarray] | None = None
    batches = preprocessed_batches(paths, card, batch_size)
    await backend.load()
    try:
        # Decoding the next batch overlaps the model's run on this one.
        pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            indices, batch = item
            output = await backend.infer(batch)
            vectors[indices] = output
            embedded[indices] = True
            if sample is None:
                sample = (batch, output)
    finally:
        await backend.close()
    if sample is None:
        raise PcaError(f"none of the {len(paths)} images could be decoded")
    used = int(embedded.sum())
    return EmbeddedImages(vectors[embedded], used, len(paths) - used, *sample)


@dataclass
class PcaReport:
    card: ModelCard
    out_dir: Path
    fit_images: int
    skipped_images: int
    source_dimension: int
    seconds: dict[str, float] = field(default_factory=dict)


def reduce_model(
    model_dir: Path,
    out_dir: Path,
    *,
    images: Sequence[Path],
    dimension: int,
    whiten: bool = False,
    name: str | None = None,
    fit_set: str = "",
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> PcaReport:
    """Fits PCA on the source model's vectors of `images` and writes the reduced model to `out_dir`
    (model.onnx + model_card.json). Raises `PcaError`, with nothing written, when it cannot."""
    say = progress or (lambda message: logger.info("%s", message))
    if out_dir.resolve() == model_dir.resolve():
        raise PcaError("--out must differ from the source model's directory")
    try:
        card = read_model_card(model_dir)
    except ModelCardError as error:
        raise PcaError(str(error)) from None
    source_path = model_dir / MODEL_FILE_NAME
    if not source_path.is_file():
        raise PcaError(f"no {MODEL_FILE_NAME} in {model_dir}")
    if card.pca is not None:
        raise PcaError(f"{model_dir} is already PCA-reduced (to {card.pca.dimension} from {card.pca.source_name}); "
                       "reduce the source model instead")
    if not card.output.l2_normalized:
        raise PcaError(f"{model_dir}'s card says its vectors are not L2-normalised in the graph; the PCA is "
                       "fitted on, and appended after, unit vectors")
    source_dimension = card.output.dimension
    check_dimension(dimension, source_dimension)
    if not images:
        raise PcaError("no images to fit the PCA on")
    check_dimension(dimension, source_dimension, len(images))
    seconds: dict[str, float] = {}

    say(f"embedding {len(images)} images with {card.name} ({source_dimension}-d)")
    started = time.perf_counter()
    embedded = asyncio.run(_embed(model_dir, card, images, batch_size))
    seconds["embed"] = time.perf_counter() - started
    if embedded.skipped:
        say(f"{embedded.skipped} of {len(images)} images could not be decoded and were left out")

    started = time.perf_counter()
    fit = fit_pca(embedded.vectors, dimension, whiten)
    seconds["fit"] = time.perf_counter() - started
    say(f"{dimension} components keep {fit.explained_variance_ratio:.1%} of the variance of {embedded.used} vectors")

    model = onnx.load(str(source_path))
    append_pca(model, fit, card.output.name)
    model.producer_name = "vsearch model pca"
    try:
        onnx.checker.check_model(model)
        written_dimension = verify_embedding_model(model, card.input.name, card.input.height, card.input.width)
    except (onnx.checker.ValidationError, ModelPrepareError) as error:
        raise PcaError(f"the reduced model fails verification: {error}") from error
    if written_dimension != dimension:
        raise PcaError(f"the reduced model gives {written_dimension}-d vectors, expected {dimension}")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reduced,) = session.run([card.output.name], {card.input.name: embedded.sample_batch})
    difference = float(np.abs(reduced - fit.transform(embedded.sample_vectors)).max())
    if difference > _CHECK_TOLERANCE:
        raise PcaError(f"the reduced model differs from the numpy projection by {difference:.2e}")

    pca = PcaReduction(
        source_name=card.name, source_version=card.version, source_model_sha256=file_sha256(source_path),
        source_dimension=source_dimension, dimension=dimension, whiten=whiten, fit_images=embedded.used,
        fit_set=fit_set or f"{embedded.used} images",
        explained_variance_ratio=round(min(fit.explained_variance_ratio, 1.0), 6),
        component_variance_ratios=[round(float(value), 6) for value in fit.component_variance_ratios],
        projection_sha256=projection_sha256(model),
    )
    reduced_card = card.model_copy(update={
        "name": name or f"{card.name}-pca{dimension}{'w' if whiten else ''}",
        "version": ModelCard.derive_pca_version(card.version, pca),
        "output": card.output.model_copy(update={"dimension": dimension}),
        "pca": pca,
    })
    reduced_card = ModelCard.model_validate(reduced_card.model_dump())
    write_prepared(out_dir, model, reduced_card)
    return PcaReport(reduced_card, out_dir, embedded.used, embedded.skipped, source_dimension, seconds)
