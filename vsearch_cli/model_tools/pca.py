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

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from embedder_svc.model_card import ModelCard, PcaReduction
from service_kit.file_digest import file_sha256
from vsearch_cli.model_tools.prepare import write_prepared
from vsearch_cli.model_tools.projection_head import (
    HeadError,
    append_projection,
    check_written_model,
    embed_images,
    initializers_sha256,
    read_source,
)
from vsearch_cli.image_files import is_image_file

logger = logging.getLogger(__name__)

PREFIX = "head/pca_"
MEAN_NAME = f"{PREFIX}mean"
PROJECTION_NAME = f"{PREFIX}projection"
# A component with less variance than this share of the total cannot be whitened.
_MIN_WHITEN_VARIANCE = 1e-10


class PcaError(HeadError):
    """The model, the images or the options do not allow the reduction; nothing was written."""


# ---- images -------------------------------------------------------------------------------------


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted."""
    if not root.is_dir():
        raise PcaError(f"image folder {root} not found")
    return sorted(path for path in root.rglob("*") if is_image_file(path) and path.is_file())


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
    append_projection(model, output_name, PREFIX, fit.mean, fit.projection())


def projection_sha256(model: onnx.ModelProto) -> str:
    """sha256 over the mean and projection initializers' raw float32 bytes."""
    return initializers_sha256(model, (MEAN_NAME, PROJECTION_NAME))


# ---- the command --------------------------------------------------------------------------------


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
    try:
        return _reduce_model(model_dir, out_dir, images=images, dimension=dimension, whiten=whiten, name=name,
                             fit_set=fit_set, batch_size=batch_size, progress=progress)
    except PcaError:
        raise
    except HeadError as error:  # from the shared helpers: the same refusal, under this command's name
        raise PcaError(str(error)) from error


def _reduce_model(
    model_dir: Path, out_dir: Path, *, images: Sequence[Path], dimension: int, whiten: bool, name: str | None,
    fit_set: str, batch_size: int, progress: Callable[[str], None] | None,
) -> PcaReport:
    say = progress or (lambda message: logger.info("%s", message))
    card, source_path = read_source(model_dir, out_dir)
    if card.pca is not None:
        raise PcaError(f"{model_dir} is already PCA-reduced (to {card.pca.dimension} from {card.pca.source_name}); "
                       "reduce the source model instead")
    source_dimension = card.output.dimension
    check_dimension(dimension, source_dimension)
    if not images:
        raise PcaError("no images to fit the PCA on")
    check_dimension(dimension, source_dimension, len(images))
    seconds: dict[str, float] = {}

    say(f"embedding {len(images)} images with {card.name} ({source_dimension}-d)")
    started = time.perf_counter()
    embedded = embed_images(model_dir, card, images, batch_size)
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
    check_written_model(model, card, embedded.sample_batch, fit.transform(embedded.sample_vectors))

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
        # Its scores differ from the source model's: that calibration does not carry over.
        "calibration": None,
    })
    reduced_card = ModelCard.model_validate(reduced_card.model_dump())
    # Text queries follow the vectors: pinv(projection) maps a query made for the source space into the
    # reduced one (imported here: text_search imports onnxruntime and the prepare module).
    from vsearch_cli.model_tools.text_search import carry_text_search

    reduced_card = carry_text_search(model_dir, out_dir, reduced_card, np.linalg.pinv(fit.projection()))
    write_prepared(out_dir, model, reduced_card)
    return PcaReport(reduced_card, out_dir, embedded.used, embedded.skipped, source_dimension, seconds)
