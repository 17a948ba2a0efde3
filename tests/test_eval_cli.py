"""`vsearch eval` as a user runs it: a real `vsearch up` stack in subprocesses, the CLI in another."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from pathlib import Path

import grpc
import pytest

from conftest import run_cli, vsearch_up
from vsearch_cli.local_stack.ports import free_port
from vsearch_cli.evaluation.eval_command import EvalError, load_eval_set
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

REQUIRED_KEYS = {"map_at_k", "precision_at_1", "recall_at_10", "mrr_at_k", "ns_score", "queries", "wall_time_s"}


@pytest.fixture(scope="module")
def ukbench_dir(shared_dir: Path) -> Path:
    return shared_dir / "datasets/ukbench56"


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    with vsearch_up(tmp_path_factory.mktemp("up")) as stack:
        yield stack


async def _collection_count(gateway: str, collection: str = "") -> int | grpc.StatusCode:
    """The collection's item count, or the status code the gateway refused Stats with."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        try:
            reply = await gateway_pb2_grpc.VisualSearchStub(channel).Stats(
                gateway_pb2.VisualStatsRequest(collection=collection), timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return reply.count


def collection_count(gateway: str, collection: str = "") -> int | grpc.StatusCode:
    return asyncio.run(_collection_count(gateway, collection))


def drop_collection(gateway: str, collection: str) -> bool:
    async def drop() -> bool:
        async with grpc.aio.insecure_channel(gateway) as channel:
            reply = await gateway_pb2_grpc.VisualSearchStub(channel).DropCollection(
                search_pb2.DropCollectionRequest(collection=collection), timeout=30)
            return reply.dropped

    return asyncio.run(drop())


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---- the labelled set, without a stack -------------------------------------------------------------

def test_splits_and_excluded_labels(tmp_path):
    for name in ("a1", "a2", "b1", "bg1", "bg2", "u1"):
        (tmp_path / f"{name}.jpg").write_bytes(b"x")
    labels = write_csv(tmp_path / "labels.csv", ["file", "cls", "part"], [
        ["a1.jpg", "a", "train"], ["a2.jpg", "a", "test"], ["b1.jpg", "b", "test"],
        ["bg1.jpg", "BG", "train"], ["bg2.jpg", "BG", "test"], ["u1.jpg", "", "train"],
    ])
    everything = load_eval_set(tmp_path, labels, "file", "cls", "part", exclude_labels=["BG"])
    # Excluded labels and unlabelled rows stay in the catalog as distractors, never as queries.
    assert [image.id for image in everything.catalog] == ["a1.jpg", "a2.jpg", "b1.jpg", "bg1.jpg", "bg2.jpg", "u1.jpg"]
    assert [image.id for image in everything.queries] == ["a1.jpg", "a2.jpg", "b1.jpg"]
    split = load_eval_set(tmp_path, labels, "file", "cls", "part", catalog_split="train", query_split="test",
                          exclude_labels=["BG"])
    assert [image.id for image in split.catalog] == ["a1.jpg", "bg1.jpg", "u1.jpg"]
    assert [image.id for image in split.queries] == ["a2.jpg", "b1.jpg"]
    assert split.catalog[0].path == tmp_path / "a1.jpg" and split.catalog[0].label == "a"


def test_bad_labels_files_fail_before_touching_the_gateway(tmp_path, ukbench_dir):
    # A gateway address where nothing listens: these must fail on the input alone, with exit status 2.
    nowhere = f"127.0.0.1:{free_port()}"
    labels = ukbench_dir / "groundtruth.csv"
    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(labels), "--gateway", nowhere)
    assert result.returncode == 2 and "no column 'label'" in result.stderr and "group" in result.stderr
    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(labels), "--label-col", "group",
                     "--catalog-split", "train", "--gateway", nowhere)
    assert result.returncode == 2 and "no column 'split'" in result.stderr
    missing = write_csv(tmp_path / "missing.csv", ["path", "label"], [["images/nope.jpg", "x"]])
    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(missing), "--gateway", nowhere)
    assert result.returncode == 2 and "not found" in result.stderr and "nope.jpg" in result.stderr
    with pytest.raises(EvalError):
        load_eval_set(ukbench_dir, labels, label_col="group", exclude_labels=[str(group) for group in range(14)])


def test_no_gateway_is_a_quick_clear_failure(ukbench_dir):
    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(ukbench_dir / "groundtruth.csv"),
                     "--label-col", "group", "--gateway", f"127.0.0.1:{free_port()}", timeout=30)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


# ---- through the running system ----------------------------------------------------------------

def test_ukbench_all_vs_all_leaves_no_trace(running_stack, ukbench_dir, ukbench_images, tmp_path):
    gateway = running_stack.gateway
    # Something in the default catalog, to check the evaluation neither reads nor changes it.
    catalog = tmp_path / "default"
    catalog.mkdir()
    for path in ukbench_images[:6]:
        (catalog / path.name).write_bytes(path.read_bytes())
    assert run_cli("index", str(catalog), "--gateway", gateway, "--json").returncode == 0
    default_count = collection_count(gateway)
    assert default_count == 6

    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(ukbench_dir / "groundtruth.csv"),
                     "--label-col", "group", "--gateway", gateway, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert REQUIRED_KEYS <= set(report)
    assert report["queries"] == 56 and report["catalog_size"] == 56 and report["k"] == 100
    assert report["queries_failed"] == report["catalog_failed"] == 0
    assert report["ns_score"] >= 3.9, report
    assert report["map_at_k"] >= 0.9 and report["precision_at_1"] >= 0.95 and report["recall_at_10"] == 1.0, report
    assert 0.95 <= report["mrr_at_k"] <= 1.0
    assert re.fullmatch(r"eval_[0-9a-f]{8}", report["collection"]) and report["collection_dropped"] is True

    assert collection_count(gateway, report["collection"]) == grpc.StatusCode.NOT_FOUND
    assert collection_count(gateway) == default_count


def test_train_test_split_with_kept_collection(running_stack, ukbench_dir, tmp_path):
    # Views 0-2 of each object form the catalog, view 3 queries it; object 13 is excluded from the
    # queries but its views stay in the catalog.
    with (ukbench_dir / "groundtruth.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    labels = write_csv(tmp_path / "split.csv", ["path", "group", "split"], [
        [row["path"], row["group"], "query" if index % 4 == 3 else "catalog"] for index, row in enumerate(rows)
    ])
    gateway = running_stack.gateway
    result = run_cli("eval", "--images", str(ukbench_dir), "--labels", str(labels), "--label-col", "group",
                     "--catalog-split", "catalog", "--query-split", "query", "--exclude-label", "13",
                     "--k", "5", "--concurrency", "3", "--keep-collection", "--gateway", gateway)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^mAP@5\s+[01]\.\d{4}$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^queries\s+13 \(0 failed", result.stdout, re.MULTILINE), result.stdout
    # The query is not in the catalog: at most its 3 other views can be in the top 4.
    ns_score = float(re.search(r"^N-S score.*\s(\d\.\d{4})$", result.stdout, re.MULTILINE).group(1))
    assert 2.7 <= ns_score <= 3.0
    collection = re.search(r"^collection\s+(eval_[0-9a-f]{8}) \(kept\)$", result.stdout, re.MULTILINE).group(1)
    try:
        assert collection_count(gateway, collection) == 42
    finally:
        assert drop_collection(gateway, collection)
    assert collection_count(gateway, collection) == grpc.StatusCode.NOT_FOUND
