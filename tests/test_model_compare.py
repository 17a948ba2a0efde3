"""`vsearch model compare` on real models and real images: every model embeds the labelled sample with
its own card-driven code (checked against the embedder service's vectors), the metrics are the ones
`vsearch eval` would report (checked against a plain numpy computation), the vectors cache is reused,
splits are honoured, and the recommendation follows its stated rule (checked on measured results
whose numbers the test sets)."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from embedder_svc.model_card import MODEL_FILE_NAME, read_model_card
from vsearch_cli import main as cli
from vsearch_cli.model_tools.compare import ModelResult, recommend
from conftest import MOBILENET, SQUEEZENET, embed_vectors, embedder_settings, ns_score, running_embedder


@pytest.fixture(scope="module")
def ukbench_root(shared_dir: Path) -> Path:
    return shared_dir / "datasets/ukbench56"


def _compare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["model", "compare", "--timing-runs", "2", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _map_at_k(vectors: np.ndarray, groups: np.ndarray, k: int = 100) -> float:
    """All vs all, the query left out, AP@k divided by min(k, relevant): independent of the project."""
    similarity = vectors @ vectors.T
    values = []
    for query in range(len(vectors)):
        order = [index for index in np.argsort(-similarity[query], kind="stable") if index != query][:k]
        relevant = groups[order] == groups[query]
        total = int((groups == groups[query]).sum()) - 1
        hits = np.flatnonzero(relevant)
        values.append(float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / min(k, total)))
    return float(np.mean(values))


async def _served_vectors(model_dir: Path, images: list[Path]) -> np.ndarray:
    async with running_embedder(embedder_settings(model_dir)) as embedder:
        return await embed_vectors(embedder.stub, [path.read_bytes() for path in images])


def test_compare_scores_each_model_with_its_own_card_like_the_embedder(
    mobilenet_dir: Path, squeezenet_dir: Path, ukbench_root: Path, ukbench_images: list[Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    report_file = tmp_path / "compare.json"
    code, out, err = _compare(
        capsys, "--model-dir", str(mobilenet_dir), "--model-dir", str(squeezenet_dir), "--images", str(ukbench_root),
        "--labels", str(ukbench_root / "groundtruth.csv"), "--label-col", "group", "--cache-dir", str(tmp_path / "cache"),
        "--output", str(report_file),
    )
    assert code == 0, err
    # The table, the legend and the rule are printed; the same report is written as JSON.
    assert "mAP@100" in out and "b32 img/s" in out and "rule: highest mAP@100" in out and "recommendation: " in out
    report = json.loads(report_file.read_text())
    models = {model["name"]: model for model in report["models"]}
    assert list(models) == [MOBILENET, SQUEEZENET]
    assert report["sample"]["images_scored"] == report["sample"]["queries_scored"] == 56
    assert report["recommendation"]["model"] in models and "throughput" in report["recommendation"]["rule"]
    for name, model_dir in ((MOBILENET, mobilenet_dir), (SQUEEZENET, squeezenet_dir)):
        model = models[name]
        assert model["size_bytes"] == (model_dir / MODEL_FILE_NAME).stat().st_size
        assert model["dimension"] == read_model_card(model_dir).output.dimension
        assert model["latency_b1_ms"] > 0 and model["throughput"] > 0 and model["preprocess_ms"] > 0
        assert model["embed_s"] is not None and model["images_failed"] == 0

        # The embedder service (gRPC) gives the vectors compare kept in its cache, and they score the same.
        vectors = asyncio.run(_served_vectors(model_dir, ukbench_images))
        (cache_file,) = (tmp_path / "cache").glob(f"{name}-*.npz")
        with np.load(cache_file) as cached:
            row_of = {str(key).split("|")[0]: row for row, key in enumerate(cached["keys"])}
            kept = cached["vectors"][[row_of[str(path.resolve())] for path in ukbench_images]]
        np.testing.assert_allclose(kept, vectors, atol=1e-5)
        groups = np.arange(56) // 4
        assert model["metrics"]["map_at_k"] == pytest.approx(_map_at_k(vectors, groups), abs=1e-6)
        assert model["metrics"]["ns_score"] == pytest.approx(ns_score(vectors), abs=1e-6)
    # SqueezeNet with MobileNet's RGB preprocessing would score worse: the two cards really differ.
    assert models[SQUEEZENET]["preprocessing"].startswith("BGR") and models[MOBILENET]["preprocessing"].startswith("RGB")

    # Again, from the cache: nothing embedded, the same metrics.
    code, out, err = _compare(
        capsys, "--model-dir", str(mobilenet_dir), "--model-dir", str(squeezenet_dir), "--images", str(ukbench_root),
        "--labels", str(ukbench_root / "groundtruth.csv"), "--label-col", "group", "--cache-dir", str(tmp_path / "cache"),
        "--json",
    )
    assert code == 0, err
    again = {model["name"]: model for model in json.loads(out)["models"]}
    assert "56 vectors from" in err and "embedding" not in err
    for name in models:
        assert again[name]["embed_s"] is None and again[name]["metrics"] == models[name]["metrics"]


def test_compare_honours_catalog_and_query_splits(
    mobilenet_dir: Path, squeezenet_dir: Path, ukbench_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Views 0 and 1 of every object are the catalog, views 2 and 3 the queries.
    labels = tmp_path / "split.csv"
    with labels.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file", "object", "part"])
        for index in range(56):
            writer.writerow([f"images/ukbench{index:05d}.jpg", index // 4, "catalog" if index % 4 < 2 else "query"])
    code, out, err = _compare(
        capsys, "--model-dir", str(mobilenet_dir), "--model-dir", str(squeezenet_dir), "--images", str(ukbench_root),
        "--labels", str(labels), "--path-col", "file", "--label-col", "object", "--split-col", "part",
        "--catalog-split", "catalog", "--query-split", "query", "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["sample"]["catalog"], report["sample"]["queries_scored"]) == (28, 28)
    for model in report["models"]:
        # Two relevant catalog images per query; the query is never in the catalog, so N-S counts
        # at most 2 (its own view is not there to count).
        assert 0 < model["metrics"]["map_at_k"] <= 1 and model["metrics"]["ns_score"] <= 2


def test_compare_refuses_bad_input(mobilenet_dir: Path, ukbench_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _compare(capsys, "--model-dir", str(mobilenet_dir), "--images", str(ukbench_root),
                            "--labels", str(ukbench_root / "groundtruth.csv"), "--label-col", "group")
    assert code == 2 and "give at least two --model-dir" in err
    code, _, err = _compare(capsys, "--model-dir", str(mobilenet_dir), "--model-dir", str(mobilenet_dir),
                            "--images", str(ukbench_root), "--labels", str(ukbench_root / "groundtruth.csv"))
    assert code == 2 and "has no column 'label'" in err


# ---- the rule, on results whose numbers the test sets ---------------------------------------------------


def _result(name: str, quality: float, throughput: float, latency_ms: float, per_query: list[float] | None = None) -> ModelResult:
    return ModelResult(
        model_dir=f"/models/{name}", name=name, version="0" * 12, dimension=1280, size_bytes=1, quantized=False,
        preprocessing="", metrics={"map_at_k": quality}, latency_b1_ms=latency_ms, throughput=throughput,
        query_values={"map_at_k": per_query or []},
    )


def test_recommendation_takes_the_best_unless_a_faster_one_is_tied() -> None:
    clear = recommend([_result("small", 0.60, 400, 5), _result("big", 0.70, 60, 40)], "map_at_k", 100)
    assert clear.model == "big" and "behind big on mAP@100 by 0.1000" in " ".join(clear.reasons)

    tied = recommend([_result("small", 0.695, 400, 5), _result("big", 0.70, 60, 40)], "map_at_k", 100)
    assert tied.model == "small"
    assert any("tied with big" in reason for reason in tied.reasons)
    assert "ties go to the highest batch-32 throughput" in tied.rule


def test_recommendation_widens_the_tie_by_the_paired_standard_error() -> None:
    # A 0.02 gap is outside the 0.01 tie on a steady sample, inside it when the per-query
    # differences are noisy (paired standard error 0.05 here).
    steady = [_result("a", 0.72, 100, 10, [0.72] * 100), _result("b", 0.70, 300, 5, [0.70] * 100)]
    assert recommend(steady, "map_at_k", 100).model == "a"
    noisy_b = [0.70 + (0.5 if index % 2 else -0.5) for index in range(100)]
    noisy = [_result("a", 0.72, 100, 10, [0.72] * 100), _result("b", 0.70, 300, 5, noisy_b)]
    assert recommend(noisy, "map_at_k", 100).model == "b"


def test_recommendation_respects_the_budget_and_says_why() -> None:
    results = [_result("fast", 0.60, 400, 5), _result("slow", 0.75, 30, 80)]
    within = recommend(results, "map_at_k", 100, max_latency_ms=50)
    assert within.model == "fast" and not results[1].within_budget
    text = " ".join(within.reasons)
    assert "slow is too slow for the budget: batch-1 latency 80.0 ms > 50 ms" in text
    assert "the best on mAP@100 overall, slow (0.7500), is outside the budget" in text
    assert "batch-1 latency <= 50 ms" in within.rule

    nothing = recommend(results, "map_at_k", 100, min_throughput=1000)
    assert nothing.model is None and "no model meets the budget" in nothing.reasons
