"""`vsearch model adapt`: a prepared embedding model in, one fitted to a catalog's own labels out.

1. The source model embeds the labelled images in-process, as the embedder does (its decoder, the
   card-driven preprocessor, the onnxruntime backend).
2. A regularised linear discriminant analysis is fitted on the fit rows' unit vectors: the directions
   that separate the labels best relative to the spread within each label (the within-label scatter
   shrunk towards a multiple of the identity), at most min(labels - 1, 256) of them, each scaled so
   that the within-label spread along it is 1.
   With `method="metric"` (the default) that projection is then fine-tuned with a metric-learning loss
   (normalised softmax over one learnable unit proxy per label, hand-written gradients, Adam), for a
   number of epochs chosen on the internal validation below: 0 keeps the LDA as fitted.
3. Labels never seen in the fit must not collapse, so the new vector is a blend: the source vector
   and the projected one, each unit length, concatenated with weights sqrt(1 - w) and sqrt(w) (the
   cosine of two new vectors is (1 - w) x their source cosine + w x their projected cosine). The
   shrinkage and w are chosen on an internal validation of the fit rows alone: half of the labels are
   fitted (on 3/4 of their images) and the other half held out, both ways round; the pair kept gives
   the best mAP@100 on the fitted labels' held-back images among those that lose at most
   `unseen_tolerance` mAP@100 on the held-out labels against the source model.
4. The guard: source and adapted model are scored all-vs-all (like `vsearch eval`) on labelled images
   the fit did not see (the rows of the other split, or a held-out fraction); a worse adapted model is
   refused and nothing is written.
5. The scores are calibrated (`calibrate.py`) on cross-fitted scores: the fit rows in two halves (each
   label's images split), each half's neighbours scored by a projection fitted on the other half, so
   the calibration sees scores like those of images the projection never saw.
6. The graph gets the head after its output (`head/adapt_*` nodes, float32, as `vsearch model pca`
   appends its own), and the card records the adaptation and the calibration, with a new version."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from embedder_svc.model_card import Adaptation, ModelCard
from service_kit.file_digest import file_sha256
from vsearch_cli.model_tools.calibrate import (
    DEFAULT_K,
    CalibrateError,
    NeighbourPairs,
    calibration_description,
    calibration_error,
    choose_rank_scale,
    fit_calibration,
    neighbour_pairs,
)
from vsearch_cli.model_tools.labelled_split import LabelledSplit
from vsearch_cli.model_tools.prepare import write_prepared
from vsearch_cli.model_tools.projection_head import (
    HeadError,
    append_projection,
    check_written_model,
    embed_images,
    initializers_sha256,
    read_source,
)

logger = logging.getLogger(__name__)

PREFIX = "head/adapt_"
MEAN_NAME = f"{PREFIX}mean"
PROJECTION_NAME = f"{PREFIX}projection"
MAX_DIMENSION = 256
# The internal validation's grid: shrinkage of the within-label scatter towards the identity, and the
# share w of the cosine given to the projected part (0: the source model; 1: the projection alone).
SHRINKAGES = (0.01, 0.03, 0.1, 0.3, 0.6)
BLENDS = tuple(round(0.1 * step, 1) for step in range(11))
DEFAULT_UNSEEN_TOLERANCE = 0.02
# "lda": the LDA alone; "metric": the LDA fine-tuned by a metric-learning loss (epochs chosen on the internal
# validation, 0 among them). Measured against each other on Caltech-101 in docs/models.md.
METHODS = ("lda", "metric")
DEFAULT_METHOD = "metric"
# The fine-tuning: the temperature's inverse, Adam's step, the minibatch, and the epochs tried (every
# METRIC_EPOCH_STEP up to METRIC_MAX_EPOCHS). A larger step or scale (3e-4, 32) fitted the internal validation
# better but generalised worse on Caltech-101's test rows, so both stay small.
METRIC_SCALE = 16.0
METRIC_LEARNING_RATE = 1e-4
METRIC_BATCH = 256
METRIC_MAX_EPOCHS = 30
METRIC_EPOCH_STEP = 5
SELECTION_K = 100
# Internal validation: share of a fitted label's images held back, and the least images a label needs.
_VALIDATION_SHARE = 0.25
_MIN_IMAGES_PER_LABEL = 4
_MIN_LABELS = 4


class AdaptError(Exception):
    """The model, the labels or the options do not allow the adaptation; nothing was written."""


# ---- fitting --------------------------------------------------------------------------------------


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class LdaFit:
    mean: np.ndarray  # [d] float64: the fit vectors' mean
    projection: np.ndarray  # [d, D] float64
    ratios: np.ndarray  # [D]: between-label over within-label variance along each direction (of the LDA)
    shrinkage: float
    # Epochs of metric-learning fine-tuning the projection had after the LDA (0: the LDA as fitted).
    epochs: int = 0

    @property
    def dimension(self) -> int:
        return int(self.projection.shape[1])


@dataclass(frozen=True)
class LabelScatter:
    """What every shrinkage's LDA of one fit set shares: the mean, the eigen-decomposition of the
    within-label scatter S_w (pooled over the images) and the between-label matrix B (one row per label,
    its mean minus the overall mean, weighted by sqrt(share of the images)), so that S_b = B^T B."""

    mean: np.ndarray
    within_values: np.ndarray
    within_vectors: np.ndarray
    between: np.ndarray

    @property
    def labels(self) -> int:
        return int(self.between.shape[0])


def label_scatter(vectors: np.ndarray, labels: Sequence[str]) -> LabelScatter:
    data = np.asarray(vectors, dtype=np.float64)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise AdaptError("the fit needs at least two labels")
    count, source_dimension = data.shape
    mean = data.mean(axis=0)
    counts = np.bincount(inverse)
    class_means = np.zeros((len(classes), source_dimension))
    np.add.at(class_means, inverse, data)
    class_means /= counts[:, None]
    within = data - class_means[inverse]
    values, vectors_w = np.linalg.eigh(within.T @ within / count)
    between = (class_means - mean) * np.sqrt(counts / count)[:, None]
    return LabelScatter(mean, np.maximum(values, 0.0), vectors_w, between)


def fit_lda(
    vectors: np.ndarray, labels: Sequence[str], shrinkage: float, dimension: int | None = None,
    scatter: LabelScatter | None = None,
) -> LdaFit:
    """Regularised LDA in float64. The within-label scatter is shrunk:
    (1 - shrinkage) S_w + shrinkage (trace(S_w) / d) I; the directions are the top generalised
    eigenvectors of the between-label scatter against it (by an SVD of B in the whitened coordinates),
    scaled to unit within-label variance. `dimension` defaults to min(labels - 1, 256); `scatter`
    (of these vectors and labels) saves recomputing it for another shrinkage."""
    scatter = scatter or label_scatter(vectors, labels)
    source_dimension = scatter.within_vectors.shape[0]
    dimension = dimension or min(scatter.labels - 1, MAX_DIMENSION)
    if not 1 <= dimension <= min(scatter.labels - 1, source_dimension):
        raise AdaptError(f"{dimension} directions asked of {scatter.labels} labels (at most labels - 1)")
    if not 0.0 < shrinkage <= 1.0:
        raise AdaptError(f"the shrinkage must be in (0, 1], got {shrinkage}")
    average = float(scatter.within_values.sum()) / source_dimension
    if average <= 0:
        raise AdaptError("the fit images give one vector per label: there is no spread within the labels to learn from")
    regularised = (1.0 - shrinkage) * scatter.within_values + shrinkage * average
    whitening = scatter.within_vectors / np.sqrt(np.maximum(regularised, average * 1e-9))
    _, singular, directions = np.linalg.svd(scatter.between @ whitening, full_matrices=False)
    projection = whitening @ directions[:dimension].T
    # Each direction's sign makes its largest entry positive: the same data give the same fit.
    largest = np.abs(projection).argmax(axis=0)
    projection = projection * np.sign(projection[largest, np.arange(dimension)])
    return LdaFit(scatter.mean, projection, singular[:dimension] ** 2, shrinkage)


def proxy_loss_gradients(
    centred: np.ndarray, labels: np.ndarray, projection: np.ndarray, proxies: np.ndarray, scale: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Normalised-softmax loss of z = unit(centred @ projection) against unit proxies (one row per label):
    the mean cross-entropy of scale * z . unit(proxy); returns it with its gradients for the projection
    and the proxies. `labels` are row indices into `proxies`."""
    projected = centred @ projection
    norm = np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)
    unit = projected / norm
    proxy_norm = np.maximum(np.linalg.norm(proxies, axis=1, keepdims=True), 1e-12)
    unit_proxies = proxies / proxy_norm
    logits = scale * unit @ unit_proxies.T
    logits -= logits.max(axis=1, keepdims=True)
    probability = np.exp(logits)
    probability /= probability.sum(axis=1, keepdims=True)
    rows = np.arange(len(centred))
    loss = float(-np.log(probability[rows, labels] + 1e-300).mean())
    gradient = probability  # d loss / d logits = softmax - one-hot (in place: the probabilities are not needed again)
    gradient[rows, labels] -= 1.0
    gradient /= len(centred)
    unit_gradient = scale * gradient @ unit_proxies
    proxy_unit_gradient = scale * gradient.T @ unit
    # Through the L2 normalisations: only the part orthogonal to the unit vector changes it.
    proxy_gradient = (proxy_unit_gradient - unit_proxies * (proxy_unit_gradient * unit_proxies).sum(
        axis=1, keepdims=True)) / proxy_norm
    projected_gradient = (unit_gradient - unit * (unit_gradient * unit).sum(axis=1, keepdims=True)) / norm
    return loss, centred.T @ projected_gradient, proxy_gradient


def fine_tune(
    fit: LdaFit, vectors: np.ndarray, labels: Sequence[str], epochs: int, *, seed: int = 0,
    every_step: Callable[[LdaFit], None] | None = None,
) -> LdaFit:
    """The LDA projection trained further by the proxy loss (`proxy_loss_gradients`, Adam) for `epochs`
    passes over the (unit) vectors in seeded minibatches; the proxies start at the labels' mean projected
    vectors. `every_step` gets the fit at epoch 0 and every METRIC_EPOCH_STEP epochs (early stopping)."""
    source = unit_rows(vectors)
    classes, targets = np.unique(np.asarray(labels), return_inverse=True)
    centred = source - fit.mean
    # Only the projection's direction matters (z is normalised): a common scale makes Adam's step comparable.
    projection = fit.projection / np.linalg.norm(fit.projection, axis=0).mean()
    proxies = np.zeros((len(classes), projection.shape[1]))
    np.add.at(proxies, targets, unit_rows(centred @ projection))
    proxies = unit_rows(proxies)
    parameters = [projection, proxies]
    first = [np.zeros_like(parameter) for parameter in parameters]
    second = [np.zeros_like(parameter) for parameter in parameters]
    rng = np.random.default_rng(seed)
    step = 0

    def current(epoch: int) -> LdaFit:
        return LdaFit(fit.mean, projection.copy(), fit.ratios, fit.shrinkage, epoch)

    if every_step is not None:
        every_step(current(0))
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(source))
        for start in range(0, len(order), METRIC_BATCH):
            rows = order[start:start + METRIC_BATCH]
            _, *gradients = proxy_loss_gradients(centred[rows], targets[rows], projection, proxies, METRIC_SCALE)
            step += 1
            for parameter, gradient, mean, square in zip(parameters, gradients, first, second):  # Adam
                mean *= 0.9
                mean += 0.1 * gradient
                square *= 0.999
                square += 0.001 * gradient * gradient
                parameter -= METRIC_LEARNING_RATE * (mean / (1 - 0.9 ** step)) / (
                    np.sqrt(square / (1 - 0.999 ** step)) + 1e-8)
        if every_step is not None and epoch % METRIC_EPOCH_STEP == 0:
            every_step(current(epoch))
    return current(epochs)


@dataclass(frozen=True)
class AdaptedHead:
    """What the adapted graph computes from a source vector x (unit length): z = unit((x - mean) P);
    with 0 < blend < 1 the concatenation [sqrt(1 - blend) x, sqrt(blend) z]; with blend 1, z alone."""

    fit: LdaFit
    blend: float

    @property
    def dimension(self) -> int:
        source = self.fit.projection.shape[0]
        return self.fit.dimension + (source if self.blend < 1.0 else 0)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return blend_vectors(vectors, self.fit, self.blend)


def blend_vectors(vectors: np.ndarray, fit: LdaFit, blend: float) -> np.ndarray:
    source = unit_rows(vectors)
    if blend <= 0.0:
        return source
    projected = unit_rows((source - fit.mean) @ fit.projection)
    if blend >= 1.0:
        return projected
    return np.hstack([np.sqrt(1.0 - blend) * source, np.sqrt(blend) * projected])


# ---- the internal validation ----------------------------------------------------------------------


def blended_map_at_k(
    source: np.ndarray, projected: np.ndarray | None, labels: Sequence[str], blends: Sequence[float] = (0.0,),
    k: int = SELECTION_K,
) -> np.ndarray:
    """Mean AP@k (normalised by min(k, relevant), as `vsearch eval`) of every image querying all the
    others, for each blend w of the two cosines: (1 - w) source + w projected (the rows are made unit
    length first). Images whose label has no other image are not queries."""
    source = unit_rows(source)
    projected = unit_rows(projected) if projected is not None else None
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(inverse)
    queries = np.flatnonzero(counts[inverse] >= 2)
    if len(queries) == 0:
        raise AdaptError("no label has two images to score")
    depth = min(k, len(source) - 1)
    totals = np.zeros(len(blends))
    for start in range(0, len(queries), 256):
        rows = queries[start:start + 256]
        source_similarity = source[rows] @ source.T
        projected_similarity = projected[rows] @ projected.T if projected is not None else None
        for index, blend in enumerate(blends):
            similarity = source_similarity if projected_similarity is None or blend == 0 else (
                (1.0 - blend) * source_similarity + blend * projected_similarity)
            similarity = similarity.copy()
            similarity[np.arange(len(rows)), rows] = -np.inf
            top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
            order = np.lexsort((top, -np.take_along_axis(similarity, top, axis=1)), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            relevant = inverse[top] == inverse[rows][:, None]
            precision = np.cumsum(relevant, axis=1) / np.arange(1, depth + 1)
            totals[index] += ((precision * relevant).sum(axis=1) / np.minimum(k, counts[inverse[rows]] - 1)).sum()
    return totals / len(queries)


def map_at_k(vectors: np.ndarray, labels: Sequence[str], k: int = SELECTION_K) -> float:
    """Mean AP@k of every image querying all the others (see `blended_map_at_k`)."""
    return float(blended_map_at_k(vectors, None, labels, (0.0,), k)[0])


@dataclass(frozen=True)
class Candidate:
    shrinkage: float
    blend: float
    seen: float  # mAP@100 on the held-back images of the fitted labels (mean of both rounds)
    unseen: float  # mAP@100 on the held-out labels
    epochs: int = 0  # of metric-learning fine-tuning after the LDA


@dataclass(frozen=True)
class Selection:
    shrinkage: float
    blend: float
    unseen_tolerance: float
    source_seen: float
    source_unseen: float
    chosen: Candidate
    candidates: list[Candidate]
    rounds: int
    labels: int
    method: str = "lda"
    epochs: int = 0  # of metric-learning fine-tuning after the LDA (method "metric"; 0: the LDA as fitted)

    def summary(self) -> str:
        return (f"internal validation ({self.labels} labels, half fitted and half held out, {self.rounds} rounds): "
                f"shrinkage {self.shrinkage:g}, blend {self.blend:g}, fine-tuning epochs {self.epochs} "
                f"(method {self.method}); fitted labels mAP@100 "
                f"{self.source_seen:.4f} -> {self.chosen.seen:.4f}, held-out labels {self.source_unseen:.4f} -> "
                f"{self.chosen.unseen:.4f} (allowed drop {self.unseen_tolerance:g})")


def validation_split(labels: Sequence[str], seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rounds of (fit, seen validation, unseen) row indices: the usable labels (at least 4 images) in
    two seeded halves; each round fits 3/4 of one half's images, validates on the rest of that half's
    images and on all the other half's."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    usable = classes[counts >= _MIN_IMAGES_PER_LABEL]
    if len(usable) < _MIN_LABELS:
        raise AdaptError(f"the internal validation needs at least {_MIN_LABELS} labels with "
                         f"{_MIN_IMAGES_PER_LABEL} or more images each; the fit rows have {len(usable)}")
    rng = np.random.default_rng(seed)
    halves = np.array_split(rng.permutation(usable), 2)
    held_back: dict[str, np.ndarray] = {}
    fitted: dict[str, np.ndarray] = {}
    for label in usable:
        rows = rng.permutation(np.flatnonzero(labels == label))
        back = max(2, int(round(_VALIDATION_SHARE * len(rows))))
        held_back[label], fitted[label] = np.sort(rows[:back]), np.sort(rows[back:])
    rounds = []
    for seen, unseen in ((halves[0], halves[1]), (halves[1], halves[0])):
        rounds.append((
            np.concatenate([fitted[label] for label in seen]),
            np.concatenate([held_back[label] for label in seen]),
            np.flatnonzero(np.isin(labels, unseen)),
        ))
    return rounds


def select_adaptation(
    vectors: np.ndarray, labels: Sequence[str], *, unseen_tolerance: float = DEFAULT_UNSEEN_TOLERANCE,
    shrinkages: Sequence[float] = SHRINKAGES, blends: Sequence[float] = BLENDS, seed: int = 0,
    method: str = DEFAULT_METHOD, progress: Callable[[str], None] | None = None,
) -> Selection:
    """Chooses the shrinkage and the blend on the fit rows alone (see the module's docstring); with method
    "metric", then the fine-tuning's epochs (and the blend again) for the chosen shrinkage's LDA."""
    if method not in METHODS:
        raise AdaptError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    labels = np.asarray(labels)
    rounds = validation_split(labels, seed)
    source_seen = float(np.mean([map_at_k(vectors[seen], labels[seen]) for _, seen, _ in rounds]))
    source_unseen = float(np.mean([map_at_k(vectors[unseen], labels[unseen]) for _, _, unseen in rounds]))
    scatters = [label_scatter(vectors[fit_rows], labels[fit_rows]) for fit_rows, _, _ in rounds]
    candidates = []
    for shrinkage in shrinkages:
        seen_scores = np.zeros(len(blends))
        unseen_scores = np.zeros(len(blends))
        for (fit_rows, seen, unseen), scatter in zip(rounds, scatters):
            fit = fit_lda(vectors[fit_rows], labels[fit_rows], shrinkage, scatter=scatter)
            for rows, scores in ((seen, seen_scores), (unseen, unseen_scores)):
                projected = blend_vectors(vectors[rows], fit, 1.0)
                scores += blended_map_at_k(vectors[rows], projected, labels[rows], blends) / len(rounds)
        candidates += [Candidate(shrinkage, blend, float(seen_scores[index]), float(unseen_scores[index]))
                       for index, blend in enumerate(blends)]
        if progress is not None:
            best = int(np.argmax(seen_scores))
            progress(f"shrinkage {shrinkage:g}: fitted labels mAP@100 up to {seen_scores[best]:.4f} "
                     f"(blend {blends[best]:g}), held-out labels {unseen_scores[best]:.4f}")
    allowed = [candidate for candidate in candidates
               if candidate.blend > 0 and candidate.unseen >= source_unseen - unseen_tolerance - 1e-12]
    # The best on the fitted labels; of equals, the least blend (closest to the source), then the most shrinkage.
    chosen = max(allowed, key=lambda candidate: (round(candidate.seen, 6), -candidate.blend, candidate.shrinkage),
                 default=None)
    if chosen is None or chosen.seen <= source_seen:
        best = max(candidates, key=lambda candidate: candidate.seen)
        raise AdaptError(
            "no adaptation helps on the fit rows' internal validation: the source model scores mAP@100 "
            f"{source_seen:.4f} on the fitted labels' held-back images (held-out labels {source_unseen:.4f}); "
            f"the best candidate (shrinkage {best.shrinkage:g}, blend {best.blend:g}) {best.seen:.4f} "
            f"(held-out labels {best.unseen:.4f}, allowed drop {unseen_tolerance:g})")
    if method == "metric":
        tuned = _fine_tuned_candidates(vectors, labels, rounds, scatters, chosen.shrinkage, blends, seed)
        candidates += tuned
        if progress is not None:
            best = max(tuned, key=lambda candidate: candidate.seen)
            progress(f"fine-tuning shrinkage {chosen.shrinkage:g}: fitted labels mAP@100 up to {best.seen:.4f} "
                     f"(epochs {best.epochs}, blend {best.blend:g}), held-out labels {best.unseen:.4f}")
        allowed = [candidate for candidate in tuned
                   if candidate.blend > 0 and candidate.unseen >= source_unseen - unseen_tolerance - 1e-12]
        # Epoch 0 (the LDA itself) is among them; of equals, the fewest epochs, then the least blend.
        chosen = max([chosen] + allowed, key=lambda candidate: (round(candidate.seen, 6), -candidate.epochs,
                                                               -candidate.blend))
    return Selection(chosen.shrinkage, chosen.blend, unseen_tolerance, source_seen, source_unseen, chosen, candidates,
                     len(rounds), len(set(labels.tolist())), method, chosen.epochs)


def _fine_tuned_candidates(
    vectors: np.ndarray, labels: np.ndarray, rounds: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    scatters: list[LabelScatter], shrinkage: float, blends: Sequence[float], seed: int,
) -> list[Candidate]:
    """Per epoch count (0, METRIC_EPOCH_STEP, .. METRIC_MAX_EPOCHS) and blend, the mean over the rounds of the
    fine-tuned projection's mAP@100 on the fitted labels' held-back images and on the held-out labels."""
    scores: dict[int, np.ndarray] = {}
    for (fit_rows, seen, unseen), scatter in zip(rounds, scatters):
        def score(fit: LdaFit, seen: np.ndarray = seen, unseen: np.ndarray = unseen) -> None:
            both = np.stack([blended_map_at_k(vectors[rows], blend_vectors(vectors[rows], fit, 1.0), labels[rows],
                                              blends) for rows in (seen, unseen)])
            scores[fit.epochs] = scores.get(fit.epochs, 0.0) + both / len(rounds)
        lda = fit_lda(vectors[fit_rows], labels[fit_rows], shrinkage, scatter=scatter)
        fine_tune(lda, vectors[fit_rows], labels[fit_rows], METRIC_MAX_EPOCHS, seed=seed, every_step=score)
    return [Candidate(shrinkage, blend, float(both[0, index]), float(both[1, index]), epochs)
            for epochs, both in sorted(scores.items()) for index, blend in enumerate(blends)]


# ---- the calibration's cross-fitted scores --------------------------------------------------------


def label_halves(labels: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two halves, each label's images split between them (seeded)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        first.append(rows[: (len(rows) + 1) // 2])
        second.append(rows[(len(rows) + 1) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def cross_fitted_pairs(
    vectors: np.ndarray, labels: Sequence[str], shrinkage: float, blend: float, k: int, seed: int, epochs: int = 0,
) -> list[NeighbourPairs]:
    """Per half of the fit rows: its images querying each other, with vectors adapted by a projection
    fitted (same shrinkage, fine-tuning epochs and blend) on the other half's labelled images only.
    Distractors (label "") are split too: they stay among the neighbours, never fitted on."""
    labels = np.asarray(labels)
    halves = label_halves(labels, seed)
    folds = []
    for scored, fitted in (halves, halves[::-1]):
        fitted = fitted[labels[fitted] != ""]
        fit = fit_lda(vectors[fitted], labels[fitted], shrinkage)
        if epochs:
            fit = fine_tune(fit, vectors[fitted], labels[fitted], epochs, seed=seed)
        folds.append(neighbour_pairs(blend_vectors(vectors[scored], fit, blend), labels[scored].tolist(), k))
    return folds


# ---- the command ----------------------------------------------------------------------------------

GUARD_METRIC = "map_at_100"
GUARD_K = 100
DEFAULT_TOLERANCE = 0.0
# The guard's query groups: every labelled held-out image, then those whose label was / was not fitted.
ALL_HELD_OUT = "held-out images"
SEEN_LABELS = "labels in the fit"
UNSEEN_LABELS = "labels not in the fit"


class AdaptGuardError(AdaptError):
    """The adapted model retrieves worse on the held-out images than the source model; nothing was written."""

    def __init__(self, message: str, report: AdaptReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class AdaptReport:
    source_name: str
    source_version: str
    labelled: str  # the labelled set, in words
    fit_images: int
    held_out_images: int
    selection: Selection
    source_dimension: int
    dimension: int
    # Query group -> (source model's metrics, adapted model's), scored like `vsearch eval` (see `guard`).
    guard: dict[str, tuple[dict[str, float], dict[str, float]]]
    tolerance: float
    calibration_ece: float | None = None
    calibration_pairs: int = 0
    rank_scale: float = 0.0
    text_note: str = ""
    skipped_images: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None
    card: ModelCard | None = None

    @property
    def guard_source(self) -> float:
        return self.guard[ALL_HELD_OUT][0][GUARD_METRIC]

    @property
    def guard_adapted(self) -> float:
        return self.guard[ALL_HELD_OUT][1][GUARD_METRIC]

    @property
    def passed(self) -> bool:
        return self.guard_adapted >= self.guard_source - self.tolerance

    def table(self) -> str:
        """Source and adapted model side by side on the held-out images, per query group, as Markdown."""
        lines = [f"| held-out queries | metric | source ({self.source_dimension}-d) | adapted ({self.dimension}-d) | change |",
                 "|---|---|---:|---:|---:|"]
        for group, (before, after) in self.guard.items():
            for name, value in before.items():
                if name == "queries":
                    lines.append(f"| {group} | queries | {int(value)} | {int(after[name])} | |")
                else:
                    lines.append(f"| {group} | {name} | {value:.4f} | {after[name]:.4f} | {after[name] - value:+.4f} |")
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        return {
            "passed": self.passed, "out_dir": str(self.out_dir) if self.out_dir else None,
            "name": self.card.name if self.card else None, "version": self.card.version if self.card else None,
            "source_version": self.source_version, "labelled": self.labelled, "fit_images": self.fit_images,
            "held_out_images": self.held_out_images, "skipped_images": self.skipped_images,
            "method": self.selection.method, "shrinkage": self.selection.shrinkage, "blend": self.selection.blend,
            "fine_tune_epochs": self.selection.epochs,
            "source_dimension": self.source_dimension, "dimension": self.dimension,
            "internal_validation": {
                "fitted_labels": [self.selection.source_seen, self.selection.chosen.seen],
                "held_out_labels": [self.selection.source_unseen, self.selection.chosen.unseen],
                "unseen_tolerance": self.selection.unseen_tolerance,
            },
            "guard_metric": GUARD_METRIC, "tolerance": self.tolerance,
            "guard": {group: {"source": before, "adapted": after} for group, (before, after) in self.guard.items()},
            "calibration": {"held_out_ece": self.calibration_ece, "pairs": self.calibration_pairs,
                            "rank_scale": self.rank_scale} if self.calibration_pairs else None,
            "text_search": self.text_note, "seconds": self.seconds,
        }


def guard_metrics(vectors: np.ndarray, labels: Sequence[str], fitted: set[str]) -> dict[str, dict[str, float]]:
    """All-vs-all over the held-out images (distractors, labelled "", stay in as never-relevant hits),
    scored as `vsearch eval` scores: per query group (every labelled image; those of fitted labels;
    those of labels the fit never saw, when there are any)."""
    from vsearch_cli.model_tools.quantize import QuantizeError, retrieval_metrics

    present = {label for label in labels if label}
    groups = {ALL_HELD_OUT: frozenset({""})}
    unseen = present - fitted
    if unseen and present & fitted:
        groups[SEEN_LABELS] = frozenset(unseen | {""})
        groups[UNSEEN_LABELS] = frozenset((present & fitted) | {""})
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    figures = {}
    for group, not_queries in groups.items():
        try:
            figures[group] = retrieval_metrics(data, list(labels), GUARD_K, not_queries)
        except QuantizeError:
            if group == ALL_HELD_OUT:
                raise AdaptError("no held-out image has another image of its label: the guard has nothing to score; "
                                 "give labelled rows outside --fit-split (or more images per label)") from None
    return figures


def adapt_model(
    model_dir: Path,
    out_dir: Path,
    labelled: LabelledSplit,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    unseen_tolerance: float = DEFAULT_UNSEEN_TOLERANCE,
    name: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    progress: Callable[[str], None] | None = None,
) -> AdaptReport:
    """Fits the adaptation on `labelled`'s fit rows, guards it on the held-out rows, calibrates it and
    writes `out_dir` (model.onnx + model_card.json). Raises `AdaptGuardError` (with the report) when the
    adapted model is worse on the held-out images, `AdaptError` when it cannot adapt; nothing is written
    then."""
    try:
        return _adapt_model(model_dir, out_dir, labelled, tolerance=tolerance, unseen_tolerance=unseen_tolerance,
                            name=name, batch_size=batch_size, seed=seed, method=method, progress=progress)
    except AdaptError:
        raise
    except (HeadError, CalibrateError) as error:  # the shared helpers' refusals, under this command's name
        raise AdaptError(str(error)) from error


def _adapt_model(
    model_dir: Path, out_dir: Path, labelled: LabelledSplit, *, tolerance: float, unseen_tolerance: float,
    name: str | None, batch_size: int, seed: int, method: str, progress: Callable[[str], None] | None,
) -> AdaptReport:
    say = progress or (lambda message: logger.info("%s", message))
    card, source_path = read_source(model_dir, out_dir)
    if card.adaptation is not None:
        raise AdaptError(f"{model_dir} is already adapted (from {card.adaptation.source_name}); adapt the source model")
    if card.pca is not None:
        raise AdaptError(f"{model_dir} is PCA-reduced; adapt the source model (and reduce the result if needed)")
    if not labelled.held_out_paths:
        raise AdaptError("no held-out rows to guard the adaptation with: give rows outside --fit-split")
    seconds: dict[str, float] = {}

    paths = labelled.fit_paths + labelled.held_out_paths
    say(f"embedding {len(paths)} labelled images with {card.name} ({card.output.dimension}-d)")
    started = time.perf_counter()
    embedded = embed_images(model_dir, card, paths, batch_size)
    seconds["embed"] = time.perf_counter() - started
    if embedded.skipped:
        say(f"{embedded.skipped} of {len(paths)} images could not be decoded and were left out")
    all_labels = np.asarray(labelled.fit_labels + labelled.held_out_labels, dtype=object)[embedded.decoded]
    is_fit = (np.arange(len(paths)) < len(labelled.fit_paths))[embedded.decoded]
    vectors = unit_rows(embedded.vectors)
    fit_rows = np.flatnonzero(is_fit & (all_labels != ""))
    fit_catalog = np.flatnonzero(is_fit)
    held_rows = np.flatnonzero(~is_fit)
    fit_labels = all_labels[fit_rows].astype(str)
    held_labels = all_labels[held_rows].tolist()

    say(f"choosing the shrinkage and the blend on the {len(fit_rows)} fit images (internal validation)")
    started = time.perf_counter()
    selection = select_adaptation(vectors[fit_rows], fit_labels, unseen_tolerance=unseen_tolerance, seed=seed,
                                  method=method, progress=say)
    say(selection.summary())
    fit = fit_lda(vectors[fit_rows], fit_labels, selection.shrinkage)
    if selection.epochs:
        fit = fine_tune(fit, vectors[fit_rows], fit_labels, selection.epochs, seed=seed)
    head = AdaptedHead(fit, selection.blend)
    seconds["fit"] = time.perf_counter() - started

    started = time.perf_counter()
    fitted = set(fit_labels.tolist())
    before = guard_metrics(vectors[held_rows], held_labels, fitted)
    after = guard_metrics(head.transform(vectors[held_rows]), held_labels, fitted)
    seconds["guard"] = time.perf_counter() - started
    report = AdaptReport(
        source_name=card.name, source_version=card.version, labelled=labelled.description,
        fit_images=len(fit_rows), held_out_images=len(held_rows), selection=selection,
        source_dimension=card.output.dimension, dimension=head.dimension,
        guard={group: (before[group], after[group]) for group in before}, tolerance=tolerance,
        skipped_images=embedded.skipped, seconds=seconds,
    )
    if not report.passed:
        raise AdaptGuardError(
            f"refusing to write the adapted model: {GUARD_METRIC} on the {len(held_rows)} held-out images fell from "
            f"{report.guard_source:.4f} to {report.guard_adapted:.4f} ({report.guard_adapted - report.guard_source:+.4f}, "
            f"tolerance {tolerance:.4f})", report)

    say("calibrating the adapted scores (cross-fitted halves of the fit images)")
    started = time.perf_counter()
    folds = cross_fitted_pairs(vectors[fit_catalog], all_labels[fit_catalog].astype(str), selection.shrinkage,
                               selection.blend, DEFAULT_K, seed, selection.epochs)
    choice = choose_rank_scale(folds)
    pairs = NeighbourPairs.join(folds)
    calibration = fit_calibration(pairs, choice.rank_scale)
    held_pairs = neighbour_pairs(head.transform(vectors[held_rows]), held_labels, DEFAULT_K)
    report.calibration_ece = calibration_error(calibration, held_pairs)
    report.calibration_pairs, report.rank_scale = len(pairs), choice.rank_scale
    seconds["calibrate"] = time.perf_counter() - started

    model = onnx.load(str(source_path))
    append_projection(model, card.output.name, PREFIX, fit.mean, fit.projection,
                      selection.blend if selection.blend < 1.0 else None)
    model.producer_name = "vsearch model adapt"
    check_written_model(model, card, embedded.sample_batch, head.transform(embedded.sample_vectors))

    metrics = {
        "validation_fitted_labels_source_map_at_100": selection.source_seen,
        "validation_fitted_labels_adapted_map_at_100": selection.chosen.seen,
        "validation_held_out_labels_source_map_at_100": selection.source_unseen,
        "validation_held_out_labels_adapted_map_at_100": selection.chosen.unseen,
        "calibration_held_out_ece": report.calibration_ece,
    }
    for group, (group_before, group_after) in report.guard.items():
        key = group.replace("-", "_").replace(" ", "_")
        for metric in (GUARD_METRIC, "precision_at_1", "recall_at_10"):
            metrics[f"guard_{key}_source_{metric}"] = group_before[metric]
            metrics[f"guard_{key}_adapted_{metric}"] = group_after[metric]
    record = Adaptation(
        method="lda_metric_blend" if selection.epochs else "lda_blend", fine_tune_epochs=selection.epochs,
        source_name=card.name, source_version=card.version, source_model_sha256=file_sha256(source_path),
        source_dimension=card.output.dimension, projection_dimension=fit.dimension, dimension=head.dimension,
        shrinkage=selection.shrinkage, blend=selection.blend, labels_file=labelled.labels_csv.name,
        labels_sha256=labelled.labels_sha256, classes=sorted(fitted), fit_images=len(fit_rows),
        fit_set=labelled.description, metrics={key: round(float(value), 6) for key, value in metrics.items()},
        projection_sha256=initializers_sha256(model, (MEAN_NAME, PROJECTION_NAME)),
    )
    adapted_version = ModelCard.derive_adapted_version(card.version, record)
    section = calibration.card_section(
        calibration_description("cross-fitted", len(pairs), labelled, report.calibration_ece,
                                f"{len(held_rows)} held-out images", DEFAULT_K),
        uncalibrated_version=adapted_version, labels_sha256=labelled.labels_sha256, pairs=len(pairs), k=DEFAULT_K,
        held_out_ece=round(report.calibration_ece, 6),
    )
    adapted = card.model_copy(update={
        "name": name or f"{card.name}-adapted",
        "version": ModelCard.derive_calibrated_version(adapted_version, section),
        "output": card.output.model_copy(update={"dimension": head.dimension}),
        "adaptation": record, "calibration": section,
    })
    adapted = ModelCard.model_validate(adapted.model_dump())
    adapted, report.text_note = _carry_text(model_dir, out_dir, adapted, head)
    write_prepared(out_dir, model, adapted)
    report.out_dir, report.card = out_dir, adapted
    return report


def _carry_text(model_dir: Path, out_dir: Path, card: ModelCard, head: AdaptedHead) -> tuple[ModelCard, str]:
    """The source's text search, when it has one. A blended vector holds the source vector, scaled by
    sqrt(1 - blend), so the text query [q, 0] scores every image as the source model did, times that
    constant: the same ranking. With blend 1 no linear map of the query does that, so the words go."""
    from vsearch_cli.model_tools.text_search import carry_text_search

    if card.text is None:
        return card, ""
    if head.blend >= 1.0:
        return card.model_copy(update={"text": None}), (
            "text search dropped: the adapted vectors are the projection alone, which no linear map of a text "
            "query can follow")
    source_dimension = head.fit.projection.shape[0]
    padding = np.vstack([np.eye(source_dimension), np.zeros((head.fit.dimension, source_dimension))])
    carried = carry_text_search(model_dir, out_dir, card, padding)
    return carried, "text search carried: words rank images as with the source model (the projected part is not used)"
