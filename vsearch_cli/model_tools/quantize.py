"""`vsearch model quantize`: a prepared float embedding model in, a prepared int8 one out, but only if
it still retrieves as well.

1. The float model is made quantizable: float16 widened to float32 and a fixed batch dimension made
   dynamic (both already true of a model from `vsearch model prepare`), then
   `onnxruntime.quantization.shape_inference.quant_pre_process` (ONNX shape inference and graph
   optimisation; the symbolic shape pass is skipped: it needs sympy, and these CNNs have static
   spatial shapes).
2. Static quantization in QDQ format with `onnxruntime.quantization.quantize_static`: int8 weights
   per channel, activations calibrated on N images drawn from a catalog folder (MinMax, Entropy or
   Percentile). The appended head (pooling, L2 normalisation) stays float.
3. The accuracy guard: both models embed a labelled image set in-process (the embedder's own decoder
   and card-driven preprocessor, onnxruntime CPU), every image queries all the others, and the
   rankings are scored like `vsearch eval` scores them (relevant = same label; mAP@100, P@1, ...).
   If mAP@100 drops by more than the tolerance, nothing is written.
4. The int8 model is written as a prepared model directory whose card records the quantization and
   has a new version (vectors change, so an index built with the float model must be rebuilt).

Dynamic quantization is deliberately not offered: it quantizes activations at run time and makes
convolutional networks several times slower on CPU."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from embedder_svc.image_decoding import ImageDecoder, ImageRejected
from embedder_svc.model_card import MODEL_FILE_NAME, ModelCard, Quantization, read_model_card
from vsearch_cli.model_tools.prepare import (
    ModelPrepareError,
    write_prepared,
    file_sha256,
    float16_to_float32,
    make_batch_dynamic,
    verify_embedding_model,
)
from embedder_svc.preprocessing import Preprocessor
from vsearch_cli.evaluation.retrieval_metrics import score_query, summarise
from vsearch_cli.image_files import is_image_file

logger = logging.getLogger(__name__)

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[CalibrationMethodName, ...] = ("minmax", "entropy", "percentile")
QuantTypeName = Literal["int8", "uint8"]
GUARD_METRIC = "map_at_100"
GUARD_K = 100
DEFAULT_TOLERANCE = 0.01
# Nodes `vsearch model prepare` appended (pooling, L2 normalisation): kept float.
HEAD_PREFIX = "head/"
_DECODER = ImageDecoder(max_bytes=64 * 1024 * 1024, max_pixels=80_000_000)


class QuantizeError(Exception):
    """The model, the images or the options do not allow quantization."""


class AccuracyGuardError(QuantizeError):
    """The int8 model retrieves worse than the tolerance allows; nothing was written."""

    def __init__(self, message: str, report: QuantizeReport) -> None:
        super().__init__(message)
        self.report = report


# ---- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    labels: list[str]
    # Labels whose images are never queries (they stay in the set as distractors).
    excluded_labels: frozenset[str] = frozenset()
    description: str = ""


def load_labelled_images(
    labels_csv: Path,
    images_root: Path | None = None,
    *,
    path_col: str = "path",
    label_col: str = "label",
    split_col: str = "split",
    split: str | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    exclude_labels: Sequence[str] = (),
    seed: int = 0,
) -> LabelledImages:
    """Rows of a labels CSV (paths relative to `images_root`, default: the CSV's folder), optionally
    one split, at most `per_class` images per label and `limit` in all (a seeded random pick, so the
    same options give the same set)."""
    from vsearch_cli.evaluation.labelled_csv import LabelsFileError, read_label_rows

    images_root = images_root or labels_csv.parent
    try:
        rows = read_label_rows(labels_csv, [path_col, label_col] + ([split_col] if split is not None else []))
    except LabelsFileError as error:
        raise QuantizeError(str(error)) from None
    by_label: dict[str, list[Path]] = {}
    for row in rows:
        relative, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
        if not relative or not label or (split is not None and (row.get(split_col) or "").strip() != split):
            continue
        by_label.setdefault(label, []).append(images_root / relative)
    rng = random.Random(seed)
    chosen: list[tuple[Path, str]] = []
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        if per_class is not None and len(paths) > per_class:
            paths = sorted(rng.sample(paths, per_class))
        chosen.extend((path, label) for path in paths)
    if limit is not None and len(chosen) > limit:
        chosen = sorted(rng.sample(chosen, limit))
    if not chosen:
        raise QuantizeError(f"no labelled images in {labels_csv}" + (f" (split {split!r})" if split else ""))
    absent = [path for path, _ in chosen if not path.is_file()]
    if absent:
        raise QuantizeError(f"{len(absent)} listed image(s) not found, e.g. {absent[0]}")
    parts = [labels_csv.as_posix()] + ([f"split {split}"] if split else []) + (
        [f"{per_class}/class"] if per_class else []) + ([f"limit {limit}"] if limit else [])
    description = f"{', '.join(parts)}: {len(chosen)} images, {len({label for _, label in chosen})} labels"
    if exclude_labels:
        description += f" (no queries of {', '.join(sorted(exclude_labels))})"
    return LabelledImages([path for path, _ in chosen], [label for _, label in chosen],
                          frozenset(exclude_labels), description)


def draw_calibration_images(folder: Path, count: int, *, seed: int = 0, exclude: Sequence[Path] = ()) -> list[Path]:
    """`count` image files under `folder` (recursively), a seeded random pick, never one of `exclude`
    (the evaluation images: calibrating on them would flatter the guard)."""
    if count < 1:
        raise QuantizeError("the calibration set needs at least one image")
    if not folder.is_dir():
        raise QuantizeError(f"calibration folder {folder} not found")
    excluded = {path.resolve() for path in exclude}
    candidates = sorted(
        path for path in folder.rglob("*")
        if is_image_file(path) and path.is_file() and path.resolve() not in excluded
    )
    if not candidates:
        raise QuantizeError(f"no images under {folder}" + (" besides the evaluation images" if excluded else ""))
    if len(candidates) <= count:
        return candidates
    return sorted(random.Random(seed).sample(candidates, count))


def _tensor(preprocessor: Preprocessor, path: Path) -> np.ndarray | None:
    try:
        return preprocessor(_DECODER.decode(path.read_bytes()))
    except (ImageRejected, OSError) as error:
        logger.warning("skipping %s: %s", path, error)
        return None


def preprocessed_batches(
    paths: Sequence[Path], card: ModelCard, batch_size: int, workers: int | None = None
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices into `paths`, [n, 3, H, W]) per batch, decoded and preprocessed exactly as the
    embedder does, on a few threads (Pillow releases the GIL); unreadable images are skipped."""
    preprocessor = Preprocessor(card)
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            tensors = list(pool.map(lambda path: _tensor(preprocessor, path), chunk))
            kept = [start + offset for offset, tensor in enumerate(tensors) if tensor is not None]
            if kept:
                yield kept, np.stack([tensor for tensor in tensors if tensor is not None])


class _ListReader:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


# Batches per collect_data call.
_CALIBRATION_GROUP = 4


def calibrate(
    model_path: Path, augmented_path: Path, cache_path: Path, images: Sequence[Path], card: ModelCard,
    method: CalibrationMethodName, batch_size: int, percentile: float,
) -> int:
    """Runs onnxruntime's calibrator over the images and writes the tensor ranges to `cache_path`
    (what quantize_static reads with calibration_cache_path). Returns the images used.

    Called directly rather than through quantize_static, which cannot set the histogram size: its
    Entropy calibration gets 128 bins for 128 quantized bins, a single candidate threshold, and so
    silently equals MinMax."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options: dict[str, object] = {}
    if method == "entropy":
        options = {"num_bins": 2048, "num_quantized_bins": 128}
    elif method == "percentile":
        options = {"num_bins": 2048, "percentile": percentile}
    calibrator = create_calibrator(
        model_path, None, augmented_model_path=str(augmented_path), calibrate_method=_calibration_method(method),
        providers=["CPUExecutionProvider"], extra_options=options,
    )
    batches = preprocessed_batches(images, card, batch_size)
    used = 0
    # The calibrator holds every intermediate output of one collect_data call in memory, and merges
    # the ranges (or histograms) across calls: feed it a few batches at a time.
    while group := list(itertools.islice(batches, _CALIBRATION_GROUP)):
        # onnxruntime's histogram calibrators print progress: keep stdout for our report.
        with contextlib.redirect_stdout(sys.stderr):
            calibrator.collect_data(_ListReader([{card.input.name: batch} for _, batch in group]))
        used += sum(len(indices) for indices, _ in group)
    if used == 0:
        raise QuantizeError("none of the calibration images could be decoded")
    with contextlib.redirect_stdout(sys.stderr):
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache_path)
    return used


# ---- measuring --------------------------------------------------------------------------------


def cpu_session(model_path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def retrieval_metrics(vectors: np.ndarray, labels: Sequence[str], k: int = GUARD_K,
                      excluded_labels: frozenset[str] = frozenset()) -> dict[str, float]:
    """All-vs-all: every labelled image (label not excluded) queries the whole set; its own hit is
    removed and the ranking scored to depth k by `vsearch_cli.evaluation.retrieval_metrics` (as `vsearch eval`
    does). Queries whose label has no other image are skipped. Keys: map_at_{k}, precision_at_1,
    recall_at_10, mrr_at_{k}, ns_score, queries."""
    count = len(vectors)
    ids = [str(index) for index in range(count)]
    label_of = dict(zip(ids, labels))
    label_counts = Counter(labels)
    depth = min(k + 1, count)
    scores = []
    for start in range(0, count, 512):
        similarity = vectors[start:start + 512] @ vectors.T
        top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        for row, candidates in enumerate(top):
            query = start + row
            label = labels[query]
            if label in excluded_labels or label_counts[label] < 2:
                continue
            # Ties broken by index, so the ranking is deterministic.
            ranked = candidates[np.lexsort((candidates, -similarity[row, candidates]))]
            scores.append(score_query([ids[index] for index in ranked], ids[query], label, label_of,
                                      label_counts[label] - 1, k))
    if not scores:
        raise QuantizeError("no query in the labelled set has another image of its label")
    summary = summarise(scores)
    return {
        f"map_at_{k}": summary["map_at_k"], "precision_at_1": summary["precision_at_1"],
        "recall_at_10": summary["recall_at_10"], f"mrr_at_{k}": summary["mrr_at_k"],
        "ns_score": summary["ns_score"], "queries": summary["queries"],
    }


def paired_latency_ms(
    sessions: Sequence[ort.InferenceSession], input_name: str, sample: np.ndarray, batch: int, runs: int
) -> list[float]:
    """Median wall time of one run at this batch size, per session. The sessions take turns run by
    run (after a warm-up run each), so a busy machine slows them alike instead of whichever ran
    while it was busy."""
    repeats = -(-batch // len(sample))
    inputs = {input_name: np.ascontiguousarray(np.concatenate([sample] * repeats)[:batch])}
    for session in sessions:
        session.run(None, inputs)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(max(1, runs)):
        for index, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, inputs)
            times[index].append((time.perf_counter() - started) * 1000.0)
    return [float(np.median(values)) for values in times]


@dataclass
class ModelMeasurements:
    size_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class QuantizeReport:
    float_model: ModelMeasurements
    int8_model: ModelMeasurements
    eval_set: str
    eval_images: int
    calibration_images: int
    calibration_method: str
    tolerance: float
    qdq_nodes: int
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None
    card: ModelCard | None = None

    @property
    def guard_drop(self) -> float:
        return self.float_model.metrics[GUARD_METRIC] - self.int8_model.metrics[GUARD_METRIC]

    @property
    def passed(self) -> bool:
        return self.guard_drop <= self.tolerance

    def table(self) -> str:
        """Float and int8 side by side, as a Markdown table."""
        def size(value: int) -> str:
            return f"{value / 1e6:.2f} MB"

        rows = [("model file", size(self.float_model.size_bytes), size(self.int8_model.size_bytes),
                 f"x{self.int8_model.size_bytes / self.float_model.size_bytes:.2f}")]
        for batch in sorted(self.float_model.latency_ms):
            f, q = self.float_model.latency_ms[batch], self.int8_model.latency_ms[batch]
            rows.append((f"latency batch {batch} (ms)", f"{f:.1f}", f"{q:.1f}", f"x{q / f:.2f}"))
        for name, value in self.float_model.metrics.items():
            other = self.int8_model.metrics[name]
            if name == "queries":
                rows.append((name, str(int(value)), str(int(other)), ""))
            else:
                rows.append((name, f"{value:.4f}", f"{other:.4f}", f"{other - value:+.4f}"))
        lines = ["| | float32 | int8 (QDQ) | change |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
        return "\n".join(lines)


# ---- quantizing ---------------------------------------------------------------------------------


def _quant_type(name: QuantTypeName):  # noqa: ANN202 - onnxruntime's enum
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _calibration_method(name: CalibrationMethodName):  # noqa: ANN202
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantizable_float_model(model_path: Path, input_name: str) -> onnx.ModelProto:
    """Float32 with a dynamic batch dimension (the prepare step already does both; a model from
    elsewhere may not)."""
    model = onnx.load(str(model_path))
    float16_to_float32(model)
    (value,) = [value for value in model.graph.input if value.name == input_name]
    batch = value.type.tensor_type.shape.dim[0]
    if not batch.HasField("dim_param"):
        make_batch_dynamic(model, input_name)
    return model


def count_qdq_nodes(model: onnx.ModelProto) -> int:
    return sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def quantize_embedding_model(
    model_dir: Path,
    out_dir: Path,
    *,
    calibration_images: Sequence[Path],
    eval_set: LabelledImages,
    calibration_method: CalibrationMethodName = "minmax",
    per_channel: bool = True,
    activation_type: QuantTypeName = "uint8",
    weight_type: QuantTypeName = "int8",
    percentile: float = 99.999,
    tolerance: float = DEFAULT_TOLERANCE,
    name: str | None = None,
    calibration_batch: int = 8,
    eval_batch: int = 32,
    latency_batches: Sequence[int] = (1, 32),
    latency_runs: int = 10,
    progress: Callable[[str], None] | None = None,
) -> QuantizeReport:
    """Quantizes, measures both models, and writes `out_dir` only when mAP@100 on `eval_set` drops by
    at most `tolerance` (absolute); raises `AccuracyGuardError` (with the report) otherwise."""
    say = progress or (lambda message: logger.info("%s", message))
    if calibration_method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {calibration_method!r} (use {', '.join(CALIBRATION_METHODS)})")
    if out_dir.resolve() == model_dir.resolve():
        raise QuantizeError("--out must differ from the float model's directory")
    card = read_model_card(model_dir)
    if card.quantization is not None:
        raise QuantizeError(f"{model_dir} already holds a quantized model (from version {card.quantization.float_version})")
    float_path = model_dir / MODEL_FILE_NAME
    if not float_path.is_file():
        raise QuantizeError(f"no {MODEL_FILE_NAME} in {model_dir}")
    if not calibration_images:
        raise QuantizeError("no calibration images")
    seconds: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="vsearch-quantize-") as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        from onnxruntime.quantization import QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        float_model = quantizable_float_model(float_path, card.input.name)
        source_path = scratch / "float.onnx"
        onnx.save(float_model, str(source_path))
        pre_path = scratch / "float-pre.onnx"
        try:
            quant_pre_process(str(source_path), str(pre_path), skip_symbolic_shape=True)
        except Exception as error:  # noqa: BLE001 - onnx/onnxruntime raise assorted errors
            raise QuantizeError(f"quant_pre_process failed on {float_path}: {error}") from error
        head_nodes = [node.name for node in onnx.load(str(pre_path)).graph.node if node.name.startswith(HEAD_PREFIX)]

        say(f"calibrating on {len(calibration_images)} images ({calibration_method}, "
            f"{'per-channel' if per_channel else 'per-tensor'} weights {weight_type}, activations {activation_type})")
        calibration_cache = scratch / "calibration.json"
        try:
            calibrated = calibrate(pre_path, scratch / "augmented.onnx", calibration_cache, calibration_images, card,
                                   calibration_method, calibration_batch, percentile)
        except QuantizeError:
            raise
        except Exception as error:  # noqa: BLE001 - onnxruntime raises assorted errors
            raise QuantizeError(f"calibration failed: {error}") from error
        int8_path = scratch / "int8.onnx"
        try:
            quantize_static(
                str(pre_path), str(int8_path), None,
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=_quant_type(activation_type), weight_type=_quant_type(weight_type),
                calibrate_method=_calibration_method(calibration_method),
                nodes_to_exclude=head_nodes, calibration_cache_path=str(calibration_cache),
            )
        except Exception as error:  # noqa: BLE001
            raise QuantizeError(f"quantize_static failed: {error}") from error
        seconds["quantize"] = time.perf_counter() - started

        int8_model = onnx.load(str(int8_path))
        qdq_nodes = count_qdq_nodes(int8_model)
        if qdq_nodes == 0:
            raise QuantizeError("the quantized model has no QuantizeLinear/DequantizeLinear nodes")
        try:
            verify_embedding_model(int8_model, card.input.name, card.input.height, card.input.width)
        except ModelPrepareError as error:
            raise QuantizeError(f"the int8 model fails verification: {error}") from error

        say(f"embedding {len(eval_set.paths)} labelled images with both models")
        started = time.perf_counter()
        float_session, int8_session = cpu_session(float_path), cpu_session(int8_path)
        dimension = card.output.dimension
        float_vectors = np.zeros((len(eval_set.paths), dimension), dtype=np.float32)
        int8_vectors = np.zeros_like(float_vectors)
        embedded = np.zeros(len(eval_set.paths), dtype=bool)
        sample: np.ndarray | None = None
        for indices, batch in preprocessed_batches(eval_set.paths, card, eval_batch):
            float_vectors[indices] = float_session.run([card.output.name], {card.input.name: batch})[0]
            int8_vectors[indices] = int8_session.run([card.output.name], {card.input.name: batch})[0]
            embedded[indices] = True
            sample = batch if sample is None else sample
        if sample is None:
            raise QuantizeError("none of the labelled images could be decoded")
        labels = [label for label, ok in zip(eval_set.labels, embedded) if ok]
        float_metrics = retrieval_metrics(float_vectors[embedded], labels, GUARD_K, eval_set.excluded_labels)
        int8_metrics = retrieval_metrics(int8_vectors[embedded], labels, GUARD_K, eval_set.excluded_labels)
        seconds["evaluate"] = time.perf_counter() - started

        started = time.perf_counter()
        float_latency, int8_latency = {}, {}
        for batch in latency_batches:
            float_latency[batch], int8_latency[batch] = paired_latency_ms(
                [float_session, int8_session], card.input.name, sample, batch, latency_runs)
        seconds["latency"] = time.perf_counter() - started

        report = QuantizeReport(
            float_model=ModelMeasurements(float_path.stat().st_size, float_latency, float_metrics),
            int8_model=ModelMeasurements(int8_path.stat().st_size, int8_latency, int8_metrics),
            eval_set=eval_set.description, eval_images=int(embedded.sum()), calibration_images=calibrated,
            calibration_method=calibration_method, tolerance=tolerance, qdq_nodes=qdq_nodes, seconds=seconds,
        )
        if not report.passed:
            raise AccuracyGuardError(
                f"refusing to write the int8 model: {GUARD_METRIC} fell from {float_metrics[GUARD_METRIC]:.4f} to "
                f"{int8_metrics[GUARD_METRIC]:.4f} ({-report.guard_drop:+.4f}), more than the tolerance of "
                f"{tolerance:.4f} ({eval_set.description})",
                report,
            )

        digest = hashlib.sha256()
        for path in calibration_images:
            digest.update(path.read_bytes())
        quantization = Quantization(
            weight_type=weight_type, activation_type=activation_type, per_channel=per_channel,
            calibration_method=calibration_method, calibration_images=calibrated,
            calibration_sha256=digest.hexdigest(), float_version=card.version,
            float_model_sha256=file_sha256(float_path), guard_metric=GUARD_METRIC,
            guard_float=round(float_metrics[GUARD_METRIC], 6), guard_int8=round(int8_metrics[GUARD_METRIC], 6),
            guard_eval_set=eval_set.description,
        )
        int8_card = card.model_copy(update={
            "name": name or f"{card.name}-int8",
            "version": ModelCard.derive_quantized_version(card.version, quantization, file_sha256(int8_path)),
            "quantization": quantization,
            # Its scores differ from the float model's: that calibration does not carry over.
            "calibration": None,
        })
        int8_card = ModelCard.model_validate(int8_card.model_dump())
        # The int8 vectors live in the float model's space: its text-search files come along unchanged.
        from vsearch_cli.model_tools.text_search import carry_text_search

        int8_card = carry_text_search(model_dir, out_dir, int8_card)
        write_prepared(out_dir, int8_model, int8_card)
        report.out_dir, report.card = out_dir, int8_card
        return report
