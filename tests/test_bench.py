"""`vsearch bench`: every section at tiny sizes through its command line, against a stack the bench
starts itself (real services, Redis, search_svc on its default FAISS store, ONNX model; the ANN section
also measures Milvus Lite). Checks the JSON's shape and that its figures are sane; never how fast
anything was."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from vsearch_cli.model_tools.prepare import ensure_model
from vsearch_cli.bench import command as bench
from vsearch_cli.bench.ann import ClusteredVectors, ExactTopK
from vsearch_cli.bench.procs import summarise_collapsed

INGEST_IMAGES = 20
NAIVE_IMAGES = 8
CATALOG = 20
CONCURRENCY = (1, 4)
REQUESTS = 8
ANN_VECTORS = 2000
NPROBES = (4, 16)


def run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vsearch")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def report(tmp_path_factory, shared_dir: Path) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    model_dir = ensure_model("mobilenetv2-12-int8", tmp / "models")
    out = tmp / "out" / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = run_bench([
            "all", "--json", "--out", str(out), "--model-dir", str(model_dir),
            "--images", str(shared_dir / "datasets/caltech101/101_ObjectCategories"),
            "--ingest-images", str(INGEST_IMAGES), "--naive-images", str(NAIVE_IMAGES), "--chunk", "8",
            "--search-catalog", str(CATALOG), "--requests", str(REQUESTS),
            "--concurrency", *map(str, CONCURRENCY), "--hit-set", "4", "--floor-samples", "5",
            "--ann-sizes", str(ANN_VECTORS), "--clusters", "50", "--queries", "20", "--batch-requests", "1",
            "--recall-queries", "20", "--nprobe", *map(str, NPROBES), "--work-dir", str(tmp / "ann"),
        ])
    assert status == 0, out.read_text() if out.exists() else "no report written"
    data = json.loads(out.read_text())
    # --json: the report on stdout, alone (the tables went to stderr).
    assert json.loads(printed.getvalue()) == data
    data["_work_dir"] = str(tmp / "ann")
    return data


def test_report_describes_machine_model_and_settings(report):
    assert report["section"] == "all" and "error" not in report
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["cpu_model"]
    assert report["model"]["name"] == "mobilenetv2-12-int8" and report["model"]["dimension"] == 1280
    assert report["stack"]["managed"] is True
    assert report["settings"]["ingest_images"] == INGEST_IMAGES
    assert report["settings"]["ann_sizes"] == [ANN_VECTORS]


def test_ingest_figures(report):
    ingest = report["ingest"]
    e2e = ingest["end_to_end"]
    assert (e2e["images"], e2e["indexed"], e2e["failed"]) == (INGEST_IMAGES, INGEST_IMAGES, 0)
    assert e2e["cleanup"].startswith(("dropped", "deleted by id")), e2e["cleanup"]
    for figure in (e2e, ingest["model_alone"], ingest["decode_alone"], ingest["naive"]):
        assert figure["images_per_s"] > 0
    assert ingest["naive"]["images"] == NAIVE_IMAGES
    assert ingest["bound_images_per_s"] > 0
    assert ingest["bound_images_per_s"] < min(ingest["model_alone"]["images_per_s"], ingest["decode_alone"]["images_per_s"])
    assert ingest["ratio_to_bound"] > 0 and ingest["ratio_to_naive"] > 0
    assert isinstance(ingest["meets_bound_target"], bool) and isinstance(ingest["meets_naive_target"], bool)
    # Stage figures come from the services' own metrics.
    assert e2e["stages"]["embedder"]["inference_runs"] >= 1
    assert set(e2e["cpu_by_process"]) >= {"gateway", "embedder", "search", "bench_client"}


def test_search_figures(report):
    search = report["search"]
    assert search["indexed"] == CATALOG
    assert search["floor"]["floor_ms"] > 0 and search["floor"]["model_batch1"]["p50_ms"] > 0
    assert search["modes"] == ["similar", "copy"] and search["copy_shortlist"] == 30
    assert search["copy_second_look"] == 0 and search["copy_feature_candidates"] == 5
    levels = {(level["mode"], level["cache"], level["concurrency"]): level for level in search["levels"]}
    assert set(levels) == ({("similar", cache, concurrency) for cache in ("miss", "hit") for concurrency in CONCURRENCY}
                           | {("copy", "miss", concurrency) for concurrency in CONCURRENCY})
    for (mode, cache, concurrency), level in levels.items():
        assert level["errors"] == {} and level["ok"] == max(REQUESTS, 4 * concurrency)
        assert level["latency"]["p50_ms"] > 0 and level["throughput_rps"] > 0
        if cache == "miss":  # really missed both caches, in either mode
            assert level["from_cache"] == 0 and level["embedding_from_cache"] == 0
        else:
            assert level["from_cache"] == level["ok"]
        # Copy mode really verified its shortlist (30 deep, so the whole 20-image catalog) on every search;
        # similar mode verified nothing.
        verified = level["stages"]["gateway_copy_candidates_copy"] + level["stages"]["gateway_copy_candidates_no_copy"]
        assert verified == (level["ok"] * min(30, CATALOG) if mode == "copy" else 0), (mode, cache, level["stages"])
        if (mode, cache) == ("copy", "miss"):
            assert set(level["cpu_by_process"]) >= {"gateway", "embedder", "search", "bench_client"}
        if (mode, cache) == ("similar", "miss"):  # CPU per process, also per request; the bound measured around it
            assert set(level["cpu_by_process"]) >= {"gateway", "embedder", "search", "bench_client"}
            assert all(usage["cpu_ms_per_request"] >= 0 for usage in level["cpu_by_process"].values())
            assert len(level["bound_images_per_s_runs"]) == 2 and level["bound_images_per_s"] > 0
    bound = search["bound"]
    assert bound["images_per_s"] > 0 and len(bound["images_per_s_runs"]) == 2 * len(CONCURRENCY)
    # The stage figures reported are the first run's; the bound is the mean over the runs (the VM drifts).
    decode, model = bound["decode_alone"]["images_per_s"], bound["model_alone"]["images_per_s"]
    assert bound["images_per_s_runs"][0] == round(1.0 / (1.0 / decode + 1.0 / model), 2) < min(decode, model)
    assert min(bound["images_per_s_runs"]) <= bound["images_per_s"] <= max(bound["images_per_s_runs"])
    targets = search["targets"]
    assert [entry["concurrency"] for entry in targets["hit_p50_over_miss_p50"]] == list(CONCURRENCY)
    assert all(entry["value"] > 0 for entry in targets["miss_p50_over_floor"])
    # Throughput against the decode+model bound, per miss level; the target is about concurrency 32.
    throughput = targets["miss_rps_over_bound"]
    assert [entry["concurrency"] for entry in throughput] == list(CONCURRENCY)
    for entry in throughput:
        level = levels[("similar", "miss", entry["concurrency"])]
        assert entry["value"] == round(level["throughput_rps"] / level["bound_images_per_s"], 3)
        assert entry["applies"] is (entry["concurrency"] == 32) and isinstance(entry["meets"], bool)
        assert set(entry["cpu_cores"]) >= {"gateway", "embedder", "search"}
    latency = {entry["concurrency"]: entry for entry in targets["miss_p50_over_floor"]}
    assert latency[1]["applies"] and latency[1]["target"] == 1.5
    # Copy mode's cost: its cache-miss p50 over similar mode's, per concurrency; the target is about 1.
    copy_cost = targets["copy_miss_p50_over_similar_miss_p50"]
    assert [entry["concurrency"] for entry in copy_cost] == list(CONCURRENCY)
    for entry in copy_cost:
        similar, copy = (levels[(mode, "miss", entry["concurrency"])]["latency"] for mode in ("similar", "copy"))
        assert entry["value"] == round(copy["p50_ms"] / similar["p50_ms"], 3)
        assert (entry["copy_p95_ms"], entry["similar_p95_ms"]) == (copy["p95_ms"], similar["p95_ms"])
        assert entry["applies"] is (entry["concurrency"] == 1) and entry["target"] == 3.0
        assert entry["meets"] is (entry["value"] <= 3.0)


def test_ann_figures(report):
    ann = report["ann"]
    assert ann["dimension"] == 1280
    expected = [("FLAT", None), *(("IVF_FLAT", nprobe) for nprobe in NPROBES)]
    milvus = [run for run in ann["runs"] if run["engine"] == "milvus-lite"]
    assert [(run["index"], run["search_params"].get("nprobe")) for run in milvus] == expected
    faiss_service = [run for run in ann["runs"] if run["engine"] == "search_svc faiss"]
    assert [(run["index"], run["search_params"].get("nprobe")) for run in faiss_service] == expected
    for run in faiss_service:
        assert run["memory_growth_mib"] is not None and run["insert_vectors_per_s"] > 0
        assert run["recall_at_k"] >= 0.8  # 50 tight clusters: even nprobe 4 finds most
    ivf = [run for run in faiss_service if run["index"] == "IVF_FLAT"]
    assert ivf[0]["train_wait_s"] >= 0 and "reopen_s" in ivf[1]  # the second setting reopened the snapshot
    for run in ann["runs"]:
        assert 0.0 <= run["recall_at_k"] <= 1.0
        assert run["qps_batch1"] > 0 and run["qps_batch100"] > 0 and run["build_s"] > 0
    for run in milvus:
        assert run["milvus_memory"]["rss_mib"] > 0
        assert run["insert_vectors_per_s"] > 0
    verdict = ann["single_machine_default"]
    assert verdict["backend"] in ("faiss", "milvus") and verdict["recall_at_k"] >= ann["target_recall"]
    assert verdict["qps_batch1"] == max(run["qps_batch1"] for run in milvus + faiss_service if run["meets_recall_target"])
    for flat in (milvus[0], faiss_service[0]):
        assert flat["recall_at_k"] == 1.0
    assert not list(Path(report["_work_dir"]).glob("*")), "the ANN bench left its store files behind"


def test_clustered_vectors_do_not_depend_on_the_size_asked_for():
    vectors = ClusteredVectors(dimension=16, clusters=5, spread=1.0, seed=3)
    small = np.concatenate([block for _start, block in vectors.blocks(15_000)])
    large = np.concatenate([block for _start, block in vectors.blocks(25_000)])
    assert small.shape == (15_000, 16)
    np.testing.assert_array_equal(small, large[:15_000])
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, rtol=1e-5)


def test_exact_top_k_merges_blocks_and_scores_recall():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    exact = ExactTopK(queries, k=5)
    for start in range(0, 50, 20):
        exact.add(start, data[start:start + 20])
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :5]
    assert [set(row) for row in exact.ids.tolist()] == [set(row) for row in truth.tolist()]
    assert exact.recall(truth.tolist()) == 1.0
    assert exact.recall([row[:4] + [-1] for row in truth.tolist()], [[0.0] * 4 + [-9.0]] * 3) == 0.8


def test_profile_summary_ranks_where_samples_end():
    collapsed = "\n".join([
        "main (app.py:1);serve (app.py:5);decode (img.py:9) 30",
        "main (app.py:1);serve (app.py:5);infer (model.py:3) 60",
        "main (app.py:1);idle (app.py:8) 10",
        "main (app.py:1);loop (app.py:3);EpollSelector.select (selectors.py:468) 50",
    ])
    summary = summarise_collapsed(collapsed, top=2)
    assert (summary["samples"], summary["idle_samples"]) == (100, 50)
    assert summary["top_self"] == [
        {"function": "infer (model.py)", "samples": 60, "percent": 60.0},
        {"function": "decode (img.py)", "samples": 30, "percent": 30.0},
    ]
    assert summary["top_inclusive"][0] == {"function": "main (app.py)", "samples": 100, "percent": 100.0}
