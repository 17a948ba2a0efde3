"""`vsearch model compare`: choose a model on the user's own labelled images.

Every model directory (model.onnx + model_card.json) embeds the same labelled sample in this process
with the embedder's own pieces (`vsearch_cli/model_rig.py`, shared with `vsearch bench`: its decoder,
the card-driven preprocessor, the inference backend as EMBEDDER_* settings configure it), so each
model gets its own preprocessing. The rankings (cosine, exact, catalog = the catalog split or every row, queries =
the labelled query rows, a query never counting itself) are scored by `vsearch eval`'s own code
(`score_outcomes` -> `vsearch_cli/evaluation/retrieval_metrics.py`): mAP@k, P@1, R@10, MRR@k. The
gateway and the index are not involved: `vsearch eval` through a running stack gives the same
metrics for the served model (exact search), plus the system's own latency.

Speed, measured after all models have embedded, the models taking turns run by run (a busy machine
slows them alike): batch-1 latency of one image end to end (decode, preprocess, model, normalise)
and batch-32 throughput of the model alone on preprocessed tensors; also the model file's size
and the decode + preprocess time per image.

The recommendation states its rule: the best model on the ranking metric among those within the
budgets (--max-latency-ms, --min-throughput); a model whose metric is within max(--tie, 1.96 x the
paired standard error of the per-query difference) of the best counts as tied with it; among tied
models the one with the highest batch-32 throughput wins."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from service_kit.file_digest import file_sha256

if TYPE_CHECKING:
    from vsearch_cli.evaluation.eval_command import EvalSet, LabelledImage
    from vsearch_cli.model_rig import ModelRig

# The ranking metrics: report key -> (column title, QueryScores field with the per-query value).
METRICS: dict[str, tuple[str, str]] = {
    "map_at_k": ("mAP@{k}", "average_precision"),
    "precision_at_1": ("P@1", "precision_at_1"),
    "recall_at_10": ("R@10", "hit_at_10"),
    "mrr_at_k": ("MRR@{k}", "reciprocal_rank"),
}
DEFAULT_TIE = 0.01
# Two-sided 95% normal quantile: the tie margin covers the sampling noise of a small sample.
_Z = 1.96
_SIMILARITY_CHUNK = 512


class CompareError(Exception):
    """A problem to report in one line; `exit_code` 2 for bad input, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ModelResult:
    model_dir: str
    name: str
    version: str
    dimension: int
    size_bytes: int
    quantized: bool
    preprocessing: str
    metrics: dict[str, float] = field(default_factory=dict)
    # One image end to end (decode, preprocess, model, normalise), median ms.
    latency_b1_ms: float = 0.0
    # The model alone on a batch of preprocessed images, images per second (from the median run).
    throughput: float = 0.0
    throughput_batch: int = 32
    # Decode + preprocess of one image on one thread, median ms.
    preprocess_ms: float = 0.0
    embed_s: float | None = None  # seconds to embed the images not in --cache-dir (None: all were)
    images_failed: int = 0
    within_budget: bool = True
    budget_notes: list[str] = field(default_factory=list)
    # Per-query values of each metric (METRICS' keys), in one query order for every model: the
    # paired tie test. Not in the JSON report.
    query_values: dict[str, list[float]] = field(default_factory=dict, repr=False)


@dataclass
class Recommendation:
    model: str | None
    rule: str
    reasons: list[str]


# ---- embedding -----------------------------------------------------------------------------------

class VectorCache:
    """One file per model (named by its card's name and version and the model file's sha256) holding
    the vectors of every image it embedded, keyed by the image's path, size and modification time:
    a later comparison on an overlapping sample embeds only the images it lacks."""

    def __init__(self, cache_dir: Path, rig: ModelRig) -> None:
        from embedder_svc.model_card import MODEL_FILE_NAME

        model_sha = file_sha256(rig.model_dir / MODEL_FILE_NAME)[:16]
        self.path = cache_dir / f"{rig.card.name}-{rig.card.version}-{model_sha}.npz"
        self.rows: dict[str, int] = {}
        self.vectors = np.zeros((0, rig.card.output.dimension), dtype=np.float32)
        self.ok = np.zeros(0, dtype=bool)
        if self.path.is_file():
            with np.load(self.path) as stored:
                self.rows = {str(key): row for row, key in enumerate(stored["keys"])}
                self.vectors, self.ok = stored["vectors"], stored["ok"]

    @staticmethod
    def key(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def lookup(self, keys: Sequence[str], vectors: np.ndarray, ok: np.ndarray) -> list[int]:
        """Fills the rows it holds; returns the indices of the keys it lacks."""
        missing = []
        for index, key in enumerate(keys):
            row = self.rows.get(key)
            if row is None:
                missing.append(index)
            else:
                vectors[index], ok[index] = self.vectors[row], self.ok[row]
        return missing

    def store(self, keys: Sequence[str], vectors: np.ndarray, ok: np.ndarray) -> None:
        new = [index for index, key in enumerate(keys) if key not in self.rows]
        if not new:
            return
        all_keys = list(self.rows) + [keys[index] for index in new]
        self.vectors = np.concatenate([self.vectors, vectors[new]])
        self.ok = np.concatenate([self.ok, ok[new]])
        self.rows = {key: row for row, key in enumerate(all_keys)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.stem + ".partial.npz")
        np.savez(partial, keys=np.array(all_keys), vectors=self.vectors, ok=self.ok)
        partial.replace(self.path)


def _prepare_or_none(rig: ModelRig, path: Path) -> np.ndarray | None:
    from embedder_svc.image_decoding import ImageRejected

    try:
        return rig.prepare(path.read_bytes())
    except (ImageRejected, OSError):
        return None


async def embed_images(
    rig: ModelRig, paths: Sequence[Path], batch_size: int, workers: int, say: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors [n, D] (zero rows where an image could not be decoded) and the mask of those that
    could; the next batch is decoded on `workers` threads while the model runs the current one."""
    vectors = np.zeros((len(paths), rig.card.output.dimension), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    starts = list(range(0, len(paths), batch_size))
    reported = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compare-decode") as pool:
        def submit(start: int) -> list[Future]:
            return [pool.submit(_prepare_or_none, rig, path) for path in paths[start:start + batch_size]]

        pending = submit(starts[0]) if starts else []
        for number, start in enumerate(starts):
            tensors = [future.result() for future in pending]
            if number + 1 < len(starts):
                pending = submit(starts[number + 1])
            kept = [start + offset for offset, tensor in enumerate(tensors) if tensor is not None]
            if kept:
                vectors[kept] = await rig.infer(np.stack([tensor for tensor in tensors if tensor is not None]))
                ok[kept] = True
            if time.monotonic() - reported > 10:
                reported = time.monotonic()
                say(f"{rig.card.name}: {start + len(tensors)}/{len(paths)} images")
    return vectors, ok


# ---- scoring -------------------------------------------------------------------------------------

def score_model(
    vectors: np.ndarray, images: Sequence[LabelledImage], eval_set: EvalSet, k: int,
) -> tuple[dict[str, float], list[Any]]:
    """The `vsearch eval` report's metrics for exact cosine rankings of these vectors (rows in the
    order of `images`, every one usable), and the per-query scores."""
    from vsearch_cli.evaluation.eval_command import QueryOutcome, score_outcomes
    from vsearch_cli.evaluation.retrieval_metrics import NS_DEPTH, summarise

    row_of = {image.id: row for row, image in enumerate(images)}
    catalog = [image for image in eval_set.catalog if image.id in row_of]
    queries = [image for image in eval_set.queries if image.id in row_of]
    catalog_rows = np.array([row_of[image.id] for image in catalog])
    catalog_vectors = vectors[catalog_rows]
    depth = min(max(k + 1, NS_DEPTH), len(catalog))
    order = np.arange(len(catalog))
    outcomes = []
    for start in range(0, len(queries), _SIMILARITY_CHUNK):
        chunk = queries[start:start + _SIMILARITY_CHUNK]
        similarity = vectors[[row_of[image.id] for image in chunk]] @ catalog_vectors.T
        top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        for row, (query, candidates) in enumerate(zip(chunk, top)):
            # Best first; ties by catalog order, so the ranking is deterministic.
            ranked = candidates[np.lexsort((order[candidates], -similarity[row, candidates]))]
            outcomes.append(QueryOutcome(query, [catalog[index].id for index in ranked], 0.0, False))
    scores, _ = score_outcomes(outcomes, catalog, k)
    if not scores:
        raise CompareError("no query has a relevant image in the catalog", 2)
    return summarise(scores), scores


# ---- speed ---------------------------------------------------------------------------------------

async def paired_timings(
    rigs: Sequence[ModelRig], images: Sequence[bytes], samples: Sequence[np.ndarray], batch: int, runs: int,
) -> tuple[list[float], list[float], list[float]]:
    """Per model: median ms of one image end to end, images/s of the model on a batch of `batch`
    preprocessed images, median ms of decode + preprocess. The models take turns run by run."""
    batches = []
    for sample in samples:
        repeats = -(-batch // len(sample))
        batches.append(np.ascontiguousarray(np.concatenate([sample] * repeats)[:batch]))
    for rig, data, tensor in zip(rigs, images, batches):  # warm-up: allocation, kernel choice
        await rig.embed(data)
        await rig.infer(tensor)
    single: list[list[float]] = [[] for _ in rigs]
    batched: list[list[float]] = [[] for _ in rigs]
    preprocess: list[list[float]] = [[] for _ in rigs]
    for _ in range(max(1, runs)):
        for index, (rig, data, tensor) in enumerate(zip(rigs, images, batches)):
            started = time.perf_counter()
            await rig.embed(data)
            single[index].append(time.perf_counter() - started)
            started = time.perf_counter()
            await rig.infer(tensor)
            batched[index].append(time.perf_counter() - started)
            started = time.perf_counter()
            rig.prepare(data)
            preprocess[index].append(time.perf_counter() - started)
    return ([float(np.median(values)) * 1000 for values in single],
            [batch / float(np.median(values)) for values in batched],
            [float(np.median(values)) * 1000 for values in preprocess])


# ---- the recommendation ----------------------------------------------------------------------------

def _paired_standard_error(best: Sequence[float], other: Sequence[float]) -> float:
    if len(best) != len(other) or len(best) < 2:
        return 0.0
    differences = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return float(differences.std(ddof=1) / math.sqrt(len(differences)))


def rule_text(metric_title: str, tie: float, max_latency_ms: float | None, min_throughput: float | None,
              batch: int = 32) -> str:
    budgets = []
    if max_latency_ms is not None:
        budgets.append(f"batch-1 latency <= {max_latency_ms:g} ms")
    if min_throughput is not None:
        budgets.append(f"batch-{batch} throughput >= {min_throughput:g} img/s")
    within = f" among the models within the budget ({', '.join(budgets)})" if budgets else ""
    return (f"highest {metric_title}{within}; a model within max({tie:g}, 1.96 x the paired standard error of the "
            f"per-query difference) of the best is tied with it; ties go to the highest batch-{batch} throughput")


def recommend(
    results: Sequence[ModelResult], metric: str, k: int, tie: float = DEFAULT_TIE,
    max_latency_ms: float | None = None, min_throughput: float | None = None,
) -> Recommendation:
    """Applies the rule (see `rule_text`) to measured results; marks each result's budget fields."""
    title = METRICS[metric][0].format(k=k)
    batch = results[0].throughput_batch if results else 32
    rule = rule_text(title, tie, max_latency_ms, min_throughput, batch)
    for result in results:
        result.budget_notes = []
        if max_latency_ms is not None and result.latency_b1_ms > max_latency_ms:
            result.budget_notes.append(f"batch-1 latency {result.latency_b1_ms:.1f} ms > {max_latency_ms:g} ms")
        if min_throughput is not None and result.throughput < min_throughput:
            result.budget_notes.append(f"batch-{batch} throughput {result.throughput:.1f} img/s < {min_throughput:g} img/s")
        result.within_budget = not result.budget_notes
    reasons: list[str] = []
    best_overall = max(results, key=lambda result: result.metrics[metric])
    for result in results:
        if not result.within_budget:
            reasons.append(f"{result.name} is too slow for the budget: {'; '.join(result.budget_notes)}")
    eligible = [result for result in results if result.within_budget]
    if not eligible:
        return Recommendation(None, rule, reasons + ["no model meets the budget"])
    best = max(eligible, key=lambda result: result.metrics[metric])
    if best_overall is not best:
        reasons.append(f"the best on {title} overall, {best_overall.name} ({best_overall.metrics[metric]:.4f}), "
                       f"is outside the budget")
    tied = []
    for result in eligible:
        gap = best.metrics[metric] - result.metrics[metric]
        if result is best:
            tied.append(result)
            continue
        margin = max(tie, _Z * _paired_standard_error(best.query_values.get(metric, []),
                                                        result.query_values.get(metric, [])))
        if gap <= margin:
            tied.append(result)
            reasons.append(f"{result.name} is tied with {best.name} on {title} ({result.metrics[metric]:.4f} vs "
                           f"{best.metrics[metric]:.4f}, gap {gap:.4f} <= margin {margin:.4f})")
        else:
            reasons.append(f"{result.name} is behind {best.name} on {title} by {gap:.4f} (margin {margin:.4f})")
    chosen = max(tied, key=lambda result: result.throughput)
    if len(tied) > 1:
        reasons.append(f"among the tied, {chosen.name} has the highest batch-{batch} throughput "
                       f"({chosen.throughput:.1f} img/s)")
    else:
        reasons.append(f"{chosen.name} has the best {title} ({chosen.metrics[metric]:.4f}) with no model tied")
    return Recommendation(chosen.name, rule, reasons)


# ---- the whole comparison ------------------------------------------------------------------------

async def compare_models(
    model_dirs: Sequence[Path], eval_set: EvalSet, *, k: int = 100, batch_size: int = 32, timing_runs: int = 10,
    workers: int = 2, cache_dir: Path | None = None, progress: Callable[[str], None] | None = None,
) -> tuple[list[ModelResult], dict[str, Any]]:
    """Embeds, scores and times every model; returns the results (in the order given) and facts
    about the sample (sizes, images that failed to decode)."""
    from embedder_svc.model_card import MODEL_FILE_NAME, ModelCardError
    from vsearch_cli.model_rig import ModelRig  # onnxruntime and the embedder: only when comparing

    say = progress or (lambda message: None)
    images = list({image.id: image for image in [*eval_set.catalog, *eval_set.queries]}.values())
    rigs: list[ModelRig] = []
    try:
        for model_dir in model_dirs:
            try:
                rigs.append(await ModelRig.load(model_dir))
            except ModelCardError as error:
                raise CompareError(str(error), 2) from None
            except Exception as error:  # noqa: BLE001 - backends raise their own errors
                raise CompareError(f"cannot load the model in {model_dir}: {error}") from None
        names = [rig.card.name for rig in rigs]
        if len(set(names)) < len(names):
            names = [f"{rig.card.name}@{rig.model_dir}" for rig in rigs]
        results, all_vectors, all_ok, embed_seconds = [], [], [], []
        keys = [VectorCache.key(image.path) for image in images] if cache_dir is not None else []
        for rig in rigs:
            vectors = np.zeros((len(images), rig.card.output.dimension), dtype=np.float32)
            ok = np.zeros(len(images), dtype=bool)
            cache = VectorCache(cache_dir, rig) if cache_dir is not None else None
            missing = cache.lookup(keys, vectors, ok) if cache is not None else list(range(len(images)))
            if cache is not None and len(missing) < len(images):
                say(f"{rig.card.name}: {len(images) - len(missing)} vectors from {cache.path}")
            seconds = None
            if missing:
                say(f"{rig.card.name}: embedding {len(missing)} images")
                started = time.perf_counter()
                vectors[missing], ok[missing] = await embed_images(
                    rig, [images[index].path for index in missing], batch_size, workers, say)
                seconds = round(time.perf_counter() - started, 2)
                if cache is not None:
                    cache.store(keys, vectors, ok)
            embed_seconds.append(seconds)
            all_vectors.append(vectors)
            all_ok.append(ok)
        # Every model is scored on the images every model could read.
        usable = np.logical_and.reduce(all_ok)
        if not usable.any():
            raise CompareError("no image of the sample could be decoded")
        kept = [image for image, good in zip(images, usable) if good]
        say(f"scoring {len(kept)} images ({int((~usable).sum())} undecodable left out)")
        for name, rig, vectors, ok, seconds in zip(names, rigs, all_vectors, all_ok, embed_seconds):
            metrics, scores = score_model(vectors[usable], kept, eval_set, k)
            results.append(ModelResult(
                model_dir=str(rig.model_dir), name=name, version=rig.card.version,
                dimension=rig.card.output.dimension, size_bytes=(rig.model_dir / MODEL_FILE_NAME).stat().st_size,
                quantized=rig.card.quantization is not None, preprocessing=rig.card.preprocessing_summary(),
                metrics=metrics, throughput_batch=batch_size, embed_s=seconds, images_failed=int((~ok).sum()),
                query_values={key: [float(getattr(score, attribute)) for score in scores]
                              for key, (_, attribute) in METRICS.items()},
            ))
        say(f"timing {len(rigs)} models ({timing_runs} turns each)")
        first = kept[0].path.read_bytes()
        samples = [np.stack([rig.prepare(image.path.read_bytes()) for image in kept[:batch_size]]) for rig in rigs]
        latency, throughput, preprocess = await paired_timings(rigs, [first] * len(rigs), samples, batch_size,
                                                               timing_runs)
        for result, b1, b32, prep in zip(results, latency, throughput, preprocess):
            result.latency_b1_ms, result.throughput, result.preprocess_ms = round(b1, 2), round(b32, 1), round(prep, 2)
    finally:
        for rig in rigs:
            await rig.close()
    scored = {image.id for image in kept}
    facts = {
        "images": len(images), "images_scored": len(kept), "undecodable": len(images) - len(kept),
        "catalog": sum(1 for image in eval_set.catalog if image.id in scored),
        "queries": sum(1 for image in eval_set.queries if image.id in scored),
        "queries_scored": len(results[0].query_values["map_at_k"]) if results else 0,
    }
    return results, facts


# ---- output --------------------------------------------------------------------------------------

def format_report(results: Sequence[ModelResult], recommendation: Recommendation, k: int, sample: str) -> str:
    """The table (Markdown; the recommended model in bold), what its columns mean, the rule and the
    recommendation with its reasons."""
    batch = results[0].throughput_batch if results else 32
    headers = ["model", "dim", "size MB", f"mAP@{k}", "P@1", "R@10", f"MRR@{k}", "b1 ms", f"b{batch} img/s",
               "prep ms", "budget"]
    rows = [[
        f"**{result.name}**" if result.name == recommendation.model else result.name, result.dimension,
        f"{result.size_bytes / 1e6:.2f}",
        *(f"{result.metrics[key]:.4f}" for key in ("map_at_k", "precision_at_1", "recall_at_10", "mrr_at_k")),
        f"{result.latency_b1_ms:.1f}", f"{result.throughput:.1f}", f"{result.preprocess_ms:.1f}",
        "ok" if result.within_budget else "over",
    ] for result in results]
    lines = [sample, "", _markdown_table(headers, rows), ""]
    lines.append(f"b1 ms: one image end to end (decode, preprocess, model); b{batch} img/s: the model alone on "
                 f"{batch} preprocessed images; prep ms: decode + preprocess of one image; metrics in process "
                 "(the embedder's code, exact cosine ranking, scored as `vsearch eval` scores)")
    lines.append(f"rule: {recommendation.rule}")
    lines.append(f"recommendation: {recommendation.model or 'none'}")
    lines += [f"  - {reason}" for reason in recommendation.reasons]
    return "\n".join(lines)


def report_json(results: Sequence[ModelResult], recommendation: Recommendation, facts: dict[str, Any],
                options: dict[str, Any]) -> dict[str, Any]:
    models = [{item.name: getattr(result, item.name) for item in fields(result) if item.name != "query_values"}
              for result in results]
    return {
        "sample": facts, "options": options, "models": models,
        "recommendation": asdict(recommendation), "machine": _machine(),
    }


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded for the terminal; also a Markdown table as it is."""
    text = [[str(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[column]) for row in text]) for column, header in enumerate(headers)]
    numeric = [all(_numeric(row[column]) for row in text) for column in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.rjust(width) if right else cell.ljust(width)
                                 for cell, width, right in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (width + 1) + ":") if right else ("-" * (width + 2))
                          for width, right in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in text)])


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _machine() -> dict[str, Any]:
    """Where the timings were taken, and how busy the machine was (others' work is noise)."""
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average": load}


# ---- command line --------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="compare prepared models on your own labelled images and recommend one",
        description=(
            "Embed a labelled image sample with every --model-dir (in process, each with its own card-driven "
            "preprocessing, as the embedder does), rank the catalog by exact cosine for every query and score "
            "it as `vsearch eval` does (mAP@k, P@1, R@10, MRR@k; relevant = same label; a query never counts "
            "itself), time each model (batch-1 latency end to end, batch-32 throughput of the model), and print "
            "one table and a recommendation with its rule: the best model on --rank-by within the budgets, "
            "ties (within max(--tie, 1.96 x paired standard error)) broken by throughput."
        ),
    )
    compare.add_argument("--model-dir", type=Path, action="append", required=True, dest="model_dirs",
                         help="a prepared model directory (model.onnx + model_card.json); give two or more")
    compare.add_argument("--images", type=Path, required=True, metavar="ROOT", help="folder the CSV's paths are relative to")
    compare.add_argument("--labels", type=Path, required=True, metavar="CSV", help="labels CSV with a header row")
    compare.add_argument("--path-col", default="path")
    compare.add_argument("--label-col", default="label")
    compare.add_argument("--split-col", default="split")
    compare.add_argument("--catalog-split", help="catalog: only the rows of this split (default: every row)")
    compare.add_argument("--query-split", help="queries: only the labelled rows of this split (default: every labelled row)")
    compare.add_argument("--exclude-label", action="append", default=[], metavar="LABEL",
                         help="no queries of this label (its images stay in the catalog), e.g. BACKGROUND_Google; repeatable")
    compare.add_argument("--k", type=_positive_int, default=100, help="ranking depth scored (default 100)")
    compare.add_argument("--rank-by", choices=sorted(METRICS), default="map_at_k",
                         help="the metric the recommendation ranks by (default map_at_k)")
    compare.add_argument("--tie", type=float, default=DEFAULT_TIE,
                         help=f"smallest metric difference that is never a tie (default {DEFAULT_TIE})")
    compare.add_argument("--max-latency-ms", type=float, help="budget: batch-1 latency, one image end to end")
    compare.add_argument("--min-throughput", type=float, help="budget: batch-32 throughput of the model, images/s")
    compare.add_argument("--batch-size", type=_positive_int, default=32, help="batch of the embedding pass and of the throughput figure (default 32)")
    compare.add_argument("--timing-runs", type=_positive_int, default=10, help="turns per timing figure, median (default 10)")
    compare.add_argument("--workers", type=_positive_int, default=2, help="decode threads (default 2)")
    compare.add_argument("--cache-dir", type=Path,
                         help="keep each model's vectors here, named by model version and image list, and reuse them")
    compare.add_argument("--json", action="store_true", help="print the report as one JSON object")
    compare.add_argument("--output", type=Path, help="also write the JSON report to this file")
    compare.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from vsearch_cli.evaluation.eval_command import EvalError, load_eval_set

    def progress(message: str) -> None:
        print(f"vsearch model compare: {message}", file=sys.stderr, flush=True)

    if len(args.model_dirs) < 2:
        print("vsearch model compare: error: give at least two --model-dir", file=sys.stderr)
        return 2
    try:
        eval_set = load_eval_set(args.images, args.labels, args.path_col, args.label_col, args.split_col,
                                 args.catalog_split, args.query_split, args.exclude_label)
        results, facts = asyncio.run(compare_models(
            args.model_dirs, eval_set, k=args.k, batch_size=args.batch_size, timing_runs=args.timing_runs,
            workers=args.workers, cache_dir=args.cache_dir, progress=progress,
        ))
    except EvalError as error:
        print(f"vsearch model compare: error: {error}", file=sys.stderr)
        return error.exit_code
    except CompareError as error:
        print(f"vsearch model compare: error: {error}", file=sys.stderr)
        return error.exit_code
    recommendation = recommend(results, args.rank_by, args.k, args.tie, args.max_latency_ms, args.min_throughput)
    splits = (f", catalog split {args.catalog_split}" if args.catalog_split else "") + (
        f", query split {args.query_split}" if args.query_split else "")
    sample = (f"{args.labels}: {facts['images_scored']} images, {facts['catalog']} in the catalog, "
              f"{facts['queries_scored']} queries scored{splits}")
    options = {
        "labels": str(args.labels), "images": str(args.images), "catalog_split": args.catalog_split,
        "query_split": args.query_split, "exclude_labels": args.exclude_label, "k": args.k, "rank_by": args.rank_by,
        "tie": args.tie, "max_latency_ms": args.max_latency_ms, "min_throughput": args.min_throughput,
        "batch_size": args.batch_size, "timing_runs": args.timing_runs,
    }
    report = report_json(results, recommendation, facts, options)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else format_report(results, recommendation, args.k, sample))
    return 0
