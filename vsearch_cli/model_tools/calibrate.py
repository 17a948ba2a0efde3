"""Calibrated scores: the probability that a hit is relevant (has the query's label) given its cosine
score and its rank, fitted on labelled images as the system returns their neighbours.

1. Pairs: every labelled image queries all the others (itself left out), top K = 100 by cosine, ranks
   1..K; a pair is (score, rank, same label or not).
2. Isotonic regression (pool-adjacent-violators) of "same label" on the adjusted score
   t = score - rank_scale * ln(rank), compressed to at most 100 knots: consecutive blocks grouped
   into equal shares of the pairs, each a knot at its mean t and its share relevant. The probability
   is piecewise-linear through the knots and constant beyond the ends (the gateway computes the same).
3. rank_scale comes from a small grid, 0 included, by the log loss on folds the fit did not see.
4. The held-out check: the expected calibration error (10 bins) on labelled images the fit never saw.

`vsearch model calibrate` writes the result into a model's card (with a new version: responses change);
`vsearch model adapt` fits one on cross-fitted scores of the adapted model (adapt.py)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embedder_svc.model_card import MODEL_FILE_NAME, Calibration, ModelCard, ModelCardError, read_model_card
from vsearch_cli.evaluation.retrieval_metrics import expected_calibration_error
from vsearch_cli.model_tools.labelled_split import LabelledSplit

logger = logging.getLogger(__name__)

DEFAULT_K = 100
MAX_KNOTS = 100
RANK_SCALES = (0.0, 0.005, 0.01, 0.02, 0.04)
FOLDS = 2
_PROBABILITY_FLOOR = 1e-6
_SIMILARITY_CHUNK = 512


class CalibrateError(Exception):
    """The model, the labels or the options do not allow a calibration; nothing was written."""


# ---- pairs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeighbourPairs:
    """One row per (query, returned neighbour)."""

    scores: np.ndarray  # float64 cosine
    ranks: np.ndarray  # int64, 1-based
    relevant: np.ndarray  # bool: the neighbour has the query's label
    queries: np.ndarray  # int64: the query's row in the vectors given

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, mask: np.ndarray) -> NeighbourPairs:
        return NeighbourPairs(self.scores[mask], self.ranks[mask], self.relevant[mask], self.queries[mask])

    @staticmethod
    def join(parts: Sequence[NeighbourPairs]) -> NeighbourPairs:
        return NeighbourPairs(*(np.concatenate([getattr(part, name) for part in parts])
                                for name in ("scores", "ranks", "relevant", "queries")))


def neighbour_pairs(vectors: np.ndarray, labels: Sequence[str], k: int = DEFAULT_K) -> NeighbourPairs:
    """Every row with a label queries all the other rows: its top k by cosine (the rows are unit
    vectors), best first, ties by row. Rows labelled "" (distractors) are never queries nor relevant."""
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    label_array = np.asarray(labels, dtype=object)
    queries = np.array([index for index, label in enumerate(labels) if label], dtype=np.int64)
    depth = min(k, len(data) - 1)
    if len(queries) == 0 or depth < 1:
        raise CalibrateError("no labelled image has another image to be compared with")
    scores, ranks, relevant, owners = [], [], [], []
    for start in range(0, len(queries), _SIMILARITY_CHUNK):
        rows = queries[start:start + _SIMILARITY_CHUNK]
        similarity = data[rows] @ data.T
        similarity[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        order = np.lexsort((top, -np.take_along_axis(similarity, top, axis=1)), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        scores.append(np.take_along_axis(similarity, top, axis=1).astype(np.float64).ravel())
        ranks.append(np.tile(np.arange(1, depth + 1), len(rows)))
        same = label_array[top] == label_array[rows][:, None]
        relevant.append((same & (label_array[top] != "")).ravel())
        owners.append(np.repeat(rows, depth))
    return NeighbourPairs(np.concatenate(scores), np.concatenate(ranks), np.concatenate(relevant),
                          np.concatenate(owners))


# ---- the isotonic fit -----------------------------------------------------------------------------


def pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-decreasing fit (least squares, weighted) of `values` in the order given, as blocks:
    (first index, weight, mean) per block."""
    starts: list[int] = []
    totals: list[float] = []
    sums: list[float] = []
    for index, (value, weight) in enumerate(zip(values.tolist(), weights.tolist())):
        starts.append(index)
        totals.append(weight)
        sums.append(value * weight)
        while len(sums) > 1 and sums[-2] * totals[-1] >= sums[-1] * totals[-2]:
            merged_sum, merged_total = sums.pop(), totals.pop()
            sums[-1] += merged_sum
            totals[-1] += merged_total
            starts.pop()
    weight = np.array(totals)
    return np.array(starts, dtype=np.int64), weight, np.array(sums) / weight


def isotonic_knots(x: np.ndarray, y: np.ndarray, max_knots: int = MAX_KNOTS) -> tuple[np.ndarray, np.ndarray]:
    """Knots (strictly increasing x, non-decreasing y) of the isotonic regression of y on x: equal x
    pooled first, then PAV, then consecutive blocks grouped into at most `max_knots` groups of about
    equal weight, each a knot at its weighted mean x and y."""
    if len(x) == 0:
        raise CalibrateError("no pairs to fit a calibration on")
    unique_x, inverse = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    weights = np.bincount(inverse).astype(np.float64)
    means = np.bincount(inverse, np.asarray(y, dtype=np.float64)) / weights
    starts, block_weights, block_means = pool_adjacent_violators(means, weights)
    block_x = np.add.reduceat(unique_x * weights, starts) / block_weights
    # Group the blocks: a block is never split, so a group's x range never overlaps the next one's.
    cumulative = np.cumsum(block_weights)
    group = np.minimum((cumulative - block_weights / 2) / cumulative[-1] * max_knots, max_knots - 1).astype(np.int64)
    _, group_starts = np.unique(group, return_index=True)
    group_weights = np.add.reduceat(block_weights, group_starts)
    knot_x = np.add.reduceat(block_x * block_weights, group_starts) / group_weights
    knot_y = np.add.reduceat(block_means * block_weights, group_starts) / group_weights
    return knot_x, np.clip(knot_y, 0.0, 1.0)


@dataclass(frozen=True)
class ScoreCalibration:
    score_knots: np.ndarray
    probability_knots: np.ndarray
    rank_scale: float

    def probability(self, scores: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """As the gateway computes it: piecewise-linear through the knots at score - rank_scale * ln(rank),
        constant beyond the ends."""
        adjusted = np.asarray(scores, dtype=np.float64) - self.rank_scale * np.log(np.asarray(ranks, dtype=np.float64))
        return np.interp(adjusted, self.score_knots, self.probability_knots)

    def of(self, pairs: NeighbourPairs) -> np.ndarray:
        return self.probability(pairs.scores, pairs.ranks)

    def card_section(self, description: str, **record: object) -> Calibration:
        return Calibration(
            score_knots=[float(np.float32(value)) for value in self.score_knots],
            probability_knots=[round(float(value), 6) for value in self.probability_knots],
            rank_scale=self.rank_scale, description=description, **record,
        )


def fit_calibration(pairs: NeighbourPairs, rank_scale: float, max_knots: int = MAX_KNOTS) -> ScoreCalibration:
    adjusted = pairs.scores - rank_scale * np.log(pairs.ranks)
    knot_x, knot_y = isotonic_knots(adjusted, pairs.relevant, max_knots)
    return ScoreCalibration(knot_x, knot_y, rank_scale)


def log_loss(probabilities: np.ndarray, relevant: np.ndarray) -> float:
    clipped = np.clip(probabilities, _PROBABILITY_FLOOR, 1.0 - _PROBABILITY_FLOOR)
    return float(-np.mean(np.where(relevant, np.log(clipped), np.log1p(-clipped))))


@dataclass(frozen=True)
class RankScaleChoice:
    rank_scale: float
    # Mean log loss on the folds the fit did not see, per grid value.
    losses: dict[float, float]


def choose_rank_scale(folds: Sequence[NeighbourPairs], grid: Sequence[float] = RANK_SCALES) -> RankScaleChoice:
    """The grid value with the least log loss, each fold scored by a calibration fitted on the others;
    of equal losses (to 1e-5), the smallest scale."""
    if len(folds) < 2:
        raise CalibrateError("choosing the rank scale needs at least two folds")
    losses: dict[float, float] = {}
    for scale in grid:
        total, count = 0.0, 0
        for index, fold in enumerate(folds):
            rest = NeighbourPairs.join([other for position, other in enumerate(folds) if position != index])
            fitted = fit_calibration(rest, scale)
            total += log_loss(fitted.of(fold), fold.relevant) * len(fold)
            count += len(fold)
        losses[scale] = total / count
    best = min(losses.values())
    chosen = min(scale for scale, loss in losses.items() if loss <= best + 1e-5)
    return RankScaleChoice(chosen, losses)


def query_folds(pairs: NeighbourPairs, folds: int = FOLDS, seed: int = 0) -> list[NeighbourPairs]:
    """The pairs split by query into seeded folds (a query's neighbours stay together)."""
    queries = np.unique(pairs.queries)
    assignment = np.random.default_rng(seed).permutation(len(queries)) % folds
    fold_of = dict(zip(queries.tolist(), assignment.tolist()))
    which = np.array([fold_of[query] for query in pairs.queries.tolist()])
    return [pairs.subset(which == fold) for fold in range(folds)]


def calibration_error(calibration: ScoreCalibration, pairs: NeighbourPairs) -> float:
    return expected_calibration_error(calibration.of(pairs), pairs.relevant)


# ---- the command ----------------------------------------------------------------------------------


@dataclass
class CalibrateReport:
    card: ModelCard
    out_dir: Path
    calibration: ScoreCalibration
    pairs: int
    fit_images: int
    held_out_images: int
    held_out_ece: float | None
    # How held_out_ece was measured, in words.
    held_out_on: str
    rank_losses: dict[float, float]
    seconds: dict[str, float] = field(default_factory=dict)


def calibration_description(
    method: str, pairs: int, labelled: LabelledSplit, held_out_ece: float | None, held_out_on: str, k: int,
) -> str:
    ece = f"ECE {held_out_ece:.3f} on {held_out_on}" if held_out_ece is not None else "no held-out check"
    return (f"isotonic on {pairs:,} {method} pairs (top {k}) of {labelled.labels_csv.name} "
            f"(sha256 {labels_digest(labelled)}), {ece}")


def labels_digest(labelled: LabelledSplit) -> str:
    return labelled.labels_sha256[:12]


def calibrate_model(
    model_dir: Path,
    out_dir: Path,
    labelled: LabelledSplit,
    *,
    k: int = DEFAULT_K,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CalibrateReport:
    """Fits the calibration of `model_dir`'s own scores on `labelled`'s fit rows, checks it on the
    held-out rows, and writes the card (in place when `out_dir` is `model_dir`, else with a copy of
    the model). Raises `CalibrateError`, with nothing written, when it cannot."""
    from vsearch_cli.model_tools.projection_head import HeadError, embed_images

    say = progress or (lambda message: logger.info("%s", message))
    try:
        card = read_model_card(model_dir)
    except ModelCardError as error:
        raise CalibrateError(str(error)) from None
    if not (model_dir / MODEL_FILE_NAME).is_file():
        raise CalibrateError(f"no {MODEL_FILE_NAME} in {model_dir}")
    if not card.output.l2_normalized:
        raise CalibrateError(f"{model_dir}'s vectors are not L2-normalised in the graph: its scores are not cosines")
    seconds: dict[str, float] = {}
    paths = labelled.fit_paths + labelled.held_out_paths
    labels = labelled.fit_labels + labelled.held_out_labels
    say(f"embedding {len(paths)} labelled images with {card.name} ({card.output.dimension}-d)")
    started = time.perf_counter()
    try:
        embedded = embed_images(model_dir, card, paths, batch_size)
    except HeadError as error:
        raise CalibrateError(str(error)) from None
    seconds["embed"] = time.perf_counter() - started
    decoded = embedded.decoded
    fit_count = len(labelled.fit_paths)
    fit_rows = decoded[:fit_count]
    fit_vectors = embedded.vectors[:int(fit_rows.sum())]
    held_vectors = embedded.vectors[int(fit_rows.sum()):]
    fit_labels = [label for label, ok in zip(labels[:fit_count], fit_rows) if ok]
    held_labels = [label for label, ok in zip(labels[fit_count:], decoded[fit_count:]) if ok]
    if embedded.skipped:
        say(f"{embedded.skipped} of {len(paths)} images could not be decoded and were left out")

    started = time.perf_counter()
    pairs = neighbour_pairs(fit_vectors, fit_labels, k)
    if not pairs.relevant.any():
        raise CalibrateError("no fit image has a neighbour with its label: nothing to calibrate against")
    choice = choose_rank_scale(query_folds(pairs, FOLDS, seed))
    calibration = fit_calibration(pairs, choice.rank_scale)
    seconds["fit"] = time.perf_counter() - started
    say(f"isotonic calibration on {len(pairs):,} pairs, rank_scale {choice.rank_scale:g} (log loss by rank_scale: "
        + ", ".join(f"{scale:g}: {loss:.4f}" for scale, loss in choice.losses.items()) + ")")

    held_out_ece, held_out_on = None, "no held-out images"
    if any(held_labels) and len(held_vectors) > 1:
        held_pairs = neighbour_pairs(held_vectors, held_labels, k)
        held_out_ece = calibration_error(calibration, held_pairs)
        held_out_on = f"{len(held_vectors)} held-out images"
    else:
        # No held-out rows: the ECE of each fold by a calibration fitted on the other.
        folds = query_folds(pairs, FOLDS, seed)
        errors = [calibration_error(fit_calibration(folds[1 - index], choice.rank_scale), folds[index])
                  for index in range(FOLDS)]
        held_out_ece, held_out_on = float(np.mean(errors)), "the fit images' other fold (no held-out rows)"
    say(f"held-out expected calibration error {held_out_ece:.4f} ({held_out_on})")

    base_version = card.calibration.uncalibrated_version if card.calibration is not None else card.version
    section = calibration.card_section(
        calibration_description("model", len(pairs), labelled, held_out_ece, held_out_on, k),
        method="isotonic", uncalibrated_version=base_version, labels_sha256=labelled.labels_sha256,
        pairs=len(pairs), k=k, held_out_ece=None if held_out_ece is None else round(held_out_ece, 6),
    )
    calibrated = card.model_copy(update={
        "version": ModelCard.derive_calibrated_version(base_version, section), "calibration": section,
    })
    calibrated = ModelCard.model_validate(calibrated.model_dump())
    write_calibrated(model_dir, out_dir, calibrated)
    return CalibrateReport(calibrated, out_dir, calibration, len(pairs), len(fit_vectors), len(held_vectors),
                           held_out_ece, held_out_on, choice.losses, seconds)


def write_calibrated(model_dir: Path, out_dir: Path, card: ModelCard) -> None:
    """The new card in `model_dir` itself, or a copy of the model (and its text files) with it in `out_dir`."""
    from embedder_svc.model_card import write_model_card

    if out_dir.resolve() != model_dir.resolve():
        from vsearch_cli.model_tools.text_search import carry_text_search

        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / MODEL_FILE_NAME, out_dir / MODEL_FILE_NAME)
        card = carry_text_search(model_dir, out_dir, card)
    write_model_card(out_dir, card)


def probability_table(calibration: ScoreCalibration, scores: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> str:
    """The probability at a few scores, rank 1, for people."""
    return ", ".join(f"{score:.1f}: {float(calibration.probability(np.array([score]), np.array([1]))[0]):.2f}"
                     for score in scores)
