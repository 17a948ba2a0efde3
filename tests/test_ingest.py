"""`vsearch index` and `vsearch delete` as a user runs them, against `vsearch up` as real processes:
idempotent re-indexing, in-run duplicates, kill -9 and resume, manifests, deletes. Each test writes
to its own collection, so counts are its own."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from PIL import Image

from conftest import VSEARCH, children_of, process_gone, run_cli, vsearch_up, wait_for
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2, search_pb2_grpc
from vsearch_cli.catalog.ingest import DEFAULT_RETRY_FOR_S

def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Stack:
    def __init__(self, gateway: str, search: str) -> None:
        self.gateway = gateway
        self.channel = grpc.insecure_channel(gateway)
        self.search_channel = grpc.insecure_channel(search)
        self.stub = gateway_pb2_grpc.VisualSearchStub(self.channel)
        # Get is not on the gateway: ask the search service directly what is stored.
        self.index = search_pb2_grpc.VectorSearchStub(self.search_channel)

    def close(self) -> None:
        self.channel.close()
        self.search_channel.close()

    def cli(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_cli(*args, "--gateway", self.gateway, timeout=timeout, cwd=cwd)

    def index_json(self, *args: str, cwd: Path) -> dict:
        result = self.cli("index", *args, "--json", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def count(self, collection: str) -> int:
        try:
            return self.stub.Stats(gateway_pb2.VisualStatsRequest(collection=collection), timeout=10).count
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:  # created by its first write
                return 0
            raise

    def stored(self, ids: list[str], collection: str) -> list[search_pb2.Item]:
        return list(self.index.Get(search_pb2.GetRequest(ids=ids, collection=collection), timeout=10).items)

    def search(self, image: bytes, collection: str, k: int = 10, **where: object) -> list[gateway_pb2.SearchHit]:
        request = gateway_pb2.VisualSearchRequest(image=image, k=k, collection=collection)
        for field, (op, value) in where.items():
            struct_value = struct_pb2.Value()
            if isinstance(value, str):
                struct_value.string_value = value
            else:
                struct_value.number_value = value
            request.filter.conditions.append(search_pb2.Condition(field=field, op=op, value=struct_value))
        return list(self.stub.Search(request, timeout=30).hits)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with vsearch_up(tmp_path_factory.mktemp("ingest-up"), "--no-redis") as up:
        stack = Stack(up.gateway, up.search)
        yield stack
        stack.channel.close()
        stack.search_channel.close()


def copy_images(sources: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in sources:
        copy = folder / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    return copies


def flipped_copies(sources: list[Path], folder: Path) -> list[Path]:
    """Mirror images re-encoded as JPEG: new content, so new ids."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in sources:
        buffer = io.BytesIO()
        Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, format="JPEG", quality=90)
        copy = folder / f"{source.stem}-flipped.jpg"
        copy.write_bytes(buffer.getvalue())
        copies.append(copy)
    return copies


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reindexing_is_a_no_op_and_a_manifest_updates_metadata(stack, ukbench_images, tmp_path):
    collection = "ingest_idempotence"
    folder = ukbench_images[0].parent
    first = stack.index_json(str(folder), "--collection", collection, cwd=tmp_path)
    assert (first["indexed"], first["unchanged"], first["failed"], first["duplicates"]) == (56, 0, 0, 0)
    assert stack.count(collection) == 56

    again = stack.cli("index", str(folder), "--collection", collection, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("indexed 0, unchanged 56,")
    assert "everything was already indexed" in again.stdout
    assert stack.count(collection) == 56

    # New metadata for four ids (their content ids, since the manifest gives none): upserted in place.
    relabelled = ukbench_images[:4]
    manifest = tmp_path / "relabel.csv"
    manifest.write_text("path,category,price,title\n" + "".join(
        f"{path},relabelled,{9.5 + n},Object zero view {n}\n" for n, path in enumerate(relabelled)))
    update = stack.index_json("--manifest", str(manifest), "--collection", collection, cwd=tmp_path)
    assert (update["indexed"], update["unchanged"], update["failed"]) == (4, 0, 0)
    assert stack.count(collection) == 56
    hits = stack.search(relabelled[0].read_bytes(), collection, category=(search_pb2.EQ, "relabelled"))
    assert {hit.id for hit in hits} == {sha256_hex(path) for path in relabelled}
    by_id = {hit.id: hit for hit in hits}
    for n, path in enumerate(relabelled):
        metadata = by_id[sha256_hex(path)].metadata
        assert (metadata["title"], metadata["price"]) == (f"Object zero view {n}", 9.5 + n)
        assert "filename" not in metadata  # replaced, not merged
    assert stack.index_json("--manifest", str(manifest), "--collection", collection, cwd=tmp_path)["unchanged"] == 4


def test_the_same_image_twice_in_one_run_is_stored_once(stack, ukbench_images, tmp_path):
    collection = "ingest_duplicates"
    folder = tmp_path / "photos"
    copy_images(ukbench_images[:2], folder)
    (folder / "zz-copy-of-first.jpg").write_bytes(ukbench_images[0].read_bytes())
    summary = stack.index_json(str(folder), "--collection", collection, cwd=tmp_path)
    assert (summary["indexed"], summary["duplicates"], summary["failed"]) == (2, 1, 0)
    [duplicate] = summary["duplicate_items"]
    assert duplicate["path"].endswith("zz-copy-of-first.jpg")
    assert duplicate["duplicate_of"].endswith(ukbench_images[0].name)
    assert duplicate["id"] == sha256_hex(ukbench_images[0])
    assert stack.count(collection) == 2

    # The same explicit id twice in a manifest: the first row wins, the second is reported.
    manifest = tmp_path / "skus.jsonl"
    manifest.write_text(
        json.dumps({"path": str(folder / ukbench_images[1].name), "id": "sku-1", "title": "first"}) + "\n"
        + json.dumps({"path": str(ukbench_images[2]), "id": "sku-1", "title": "second"}) + "\n")
    summary = stack.index_json("--manifest", str(manifest), "--collection", collection, cwd=tmp_path)
    assert (summary["indexed"], summary["duplicates"]) == (1, 1)
    assert summary["duplicate_items"][0]["line"] == 2
    [stored] = stack.stored(["sku-1"], collection)
    assert stored.metadata["title"] == "first"


def test_a_killed_run_resumes_without_losing_or_repeating_anything(stack, ukbench_images, tmp_path):
    collection = "ingest_resume"
    folder = tmp_path / "catalog"
    images = copy_images(ukbench_images, folder / "originals") + flipped_copies(ukbench_images, folder / "flipped")
    ids = [sha256_hex(path) for path in images]
    assert len(set(ids)) == len(images) == 112
    command = [*VSEARCH, "index", str(folder), "--collection", collection, "--gateway", stack.gateway, "--json",
               "--errors", str(tmp_path / "errors.jsonl")]

    # Small chunks, one at a time: the count grows step by step, so there is a moment to kill it.
    first = subprocess.Popen([*command, "--chunk-size", "16", "--concurrency", "1"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: first.poll() is not None or stack.count(collection) >= 16, 60, "the first chunk")
        assert first.poll() is None, "the first run finished before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    written_before_resume = stack.count(collection)
    assert 16 <= written_before_resume < len(images)

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["failed"], summary["duplicates"]) == (0, 0)
    assert summary["indexed"] + summary["unchanged"] == len(images)
    assert summary["unchanged"] >= written_before_resume
    assert stack.count(collection) == len(images)
    stored = stack.stored(ids, collection)
    assert sorted(item.id for item in stored) == sorted(ids)  # each exactly once
    assert all(item.content_sha256 == item.id for item in stored)
    assert not (tmp_path / "errors.jsonl").exists()


def test_manifests_csv_and_jsonl_with_bad_rows(stack, ukbench_images, tmp_path):
    collection = "ingest_manifest"
    shop = tmp_path / "shop"
    a, b, c, d, e, f = copy_images(ukbench_images[0:24:4], shop / "images")  # six different objects
    csv_manifest = shop / "catalog.csv"
    csv_manifest.write_text(
        "path,uri,id,category,price,title,brand\n"
        "images/ukbench00000.jpg,,,shoes,49.5,Red shoe,acme\n"
        f"images/{b.name},,sku-b,shoes,120,Blue shoe,\n"
        f",{c.as_uri()},,bags,30,Tote,\n"
        "images/missing.jpg,,,shoes,10,Ghost,\n"
        f"images/{d.name},,,shoes,cheap,Bad price,\n"
    )
    summary = stack.index_json("--manifest", str(csv_manifest), "--collection", collection, cwd=tmp_path)
    assert (summary["indexed"], summary["failed"]) == (3, 2), summary
    errors_file = shop / "catalog.errors.jsonl"
    assert summary["errors_file"] == str(errors_file)
    errors = read_jsonl(errors_file)
    assert [(error["line"], error["code"]) for error in errors] == [(5, "NOT_FOUND"), (6, "INVALID_ARGUMENT")]
    assert errors[0]["path"] == str(shop / "images" / "missing.jpg")
    assert "price 'cheap' is not a number" in errors[1]["message"]
    assert set(errors[0]) >= {"path", "id", "code", "message"}

    hits = stack.search(a.read_bytes(), collection, category=(search_pb2.EQ, "shoes"), price=(search_pb2.LT, 100))
    assert [hit.id for hit in hits] == [sha256_hex(a)]
    assert hits[0].image_uri == a.resolve().as_uri()
    assert json_format.MessageToDict(hits[0].metadata) == {"category": "shoes", "price": 49.5, "title": "Red shoe", "brand": "acme"}
    [sku_b] = stack.stored(["sku-b"], collection)
    assert sku_b.metadata["price"] == 120.0 and "brand" not in sku_b.metadata  # empty cell dropped

    jsonl_manifest = shop / "more.jsonl"
    jsonl_manifest.write_text("\n".join([
        json.dumps({"path": f"images/{e.name}", "category": "hats", "price": 15,
                    "metadata": {"title": "Straw hat", "colour": "beige"}}),
        json.dumps({"uri": f.as_uri(), "id": "sku-f", "category": "hats", "price": 25.0, "title": "Wool hat"}),
        "{not json",
        json.dumps({"category": "hats"}),
    ]) + "\n")
    summary = stack.index_json("--manifest", str(jsonl_manifest), "--collection", collection,
                               "--errors", str(tmp_path / "elsewhere.jsonl"), cwd=tmp_path)
    assert (summary["indexed"], summary["failed"]) == (2, 2), summary
    assert [error["line"] for error in read_jsonl(tmp_path / "elsewhere.jsonl")] == [3, 4]
    hits = stack.search(e.read_bytes(), collection, category=(search_pb2.EQ, "hats"))
    assert {hit.metadata["title"]: hit.id for hit in hits} == {"Straw hat": sha256_hex(e), "Wool hat": "sku-f"}
    assert stack.count(collection) == 5


def test_delete_by_id_and_by_manifest(stack, ukbench_images, tmp_path):
    collection = "ingest_delete"
    images = copy_images(ukbench_images[:6], tmp_path / "images")
    assert stack.index_json(str(tmp_path / "images"), "--collection", collection, cwd=tmp_path)["indexed"] == 6

    result = stack.cli("delete", sha256_hex(images[0]), sha256_hex(images[1]), "no-such-id",
                       "--collection", collection, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deleted 2 of 3 ids (1 did not exist)"
    assert stack.count(collection) == 4

    manifest = tmp_path / "images" / "remove.csv"
    manifest.write_text(f"path\n{images[2].name}\n{images[3].name}\nmissing.jpg\n")
    result = stack.cli("delete", "--manifest", str(manifest), "--collection", collection, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["requested"], summary["deleted"], summary["failed"]) == (2, 2, 1)
    assert stack.count(collection) == 2
    assert {item.id for item in stack.stored([sha256_hex(path) for path in images], collection)} == {
        sha256_hex(images[4]), sha256_hex(images[5])}


def test_a_run_whose_gateway_dies_stops_within_its_retry_budget_lists_what_it_did_not_index_and_resumes(
        shared_dir, tmp_path):
    """kill -9 of the gateway mid-run: the run gives up after its retry budget (not a 300 s deadline),
    exits non-zero, counts and lists every file it did not index, and the same command, run again on
    a stack brought back on the same data, indexes each of them exactly once."""
    collection = "ingest_gateway_dies"
    folder = tmp_path / "catalog"
    folder.mkdir()
    originals = sorted((shared_dir / "datasets/caltech101/101_ObjectCategories").rglob("*.jpg"))[::30][:300]
    images = []
    for n, source in enumerate(originals):
        images.append(folder / f"{n:04d}-{source.parent.name}-{source.name}")
        images[-1].write_bytes(source.read_bytes())
    ids = [sha256_hex(path) for path in images]
    assert len(set(ids)) == len(images) == 300
    id_of = {str(path): item_id for path, item_id in zip(images, ids)}
    errors = tmp_path / "errors.jsonl"
    # Small chunks, one at a time: most of the catalog is still to be sent when the gateway dies.
    command = [*VSEARCH, "index", str(folder), "--collection", collection, "--json", "--errors", str(errors),
               "--chunk-size", "16", "--concurrency", "1"]
    data_dir = tmp_path / "stack"

    with vsearch_up(data_dir, "--no-redis") as up:
        stack = Stack(up.gateway, up.search)
        children = list(children_of(up.process.pid))
        [gateway_pid] = [pid for pid in children if "\0-m\0gateway" in Path(f"/proc/{pid}/cmdline").read_text()]
        run = subprocess.Popen([*command, "--gateway", up.gateway], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: run.poll() is not None or stack.count(collection) >= 32, 60, "two chunks indexed")
            assert run.poll() is None, "the run finished before the gateway could be killed"
            # `up` stopped first, so that nothing restarts the gateway; it dies after it (SIGKILL), and
            # its other children get SIGTERM as it does.
            up.process.send_signal(signal.SIGSTOP)
            os.kill(gateway_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            up.process.kill()
            up.process.wait(10)
            out, err = run.communicate(timeout=DEFAULT_RETRY_FOR_S + 120)
            took = time.monotonic() - killed_at
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
            stack.close()
        wait_for(lambda: all(process_gone(pid) for pid in children), 30, "the stack's processes to exit")

    assert run.returncode == 1, err
    assert took < DEFAULT_RETRY_FOR_S + 20, f"took {took:.0f}s to give up"
    summary = json.loads(out)
    assert summary["found"] == len(images)
    assert (summary["failed"], summary["duplicates"], summary["unchanged"]) == (0, 0, 0)
    assert summary["not_indexed"] > 0 and summary["indexed"] >= 32
    assert summary["indexed"] + summary["unchanged"] + summary["failed"] + summary["duplicates"] \
        + summary["not_indexed"] == summary["found"]
    assert summary["errors_file"] == str(errors)
    listed = read_jsonl(errors)
    assert len(listed) == len({line["path"] for line in listed}) == summary["not_indexed"]
    for line in listed:
        assert (line["code"], line["not_indexed"]) == ("UNAVAILABLE", True)
        assert line["message"].startswith("gateway unavailable: ")
        assert line["id"] in ("", id_of[line["path"]])
    assert f"{summary['not_indexed']} of {len(images)} items were not indexed" in err
    assert "Run the same command again to resume" in err

    with vsearch_up(data_dir, "--no-redis") as up:
        stack = Stack(up.gateway, up.search)
        try:
            stored = {item.id for item in stack.stored(ids, collection)}
            listed_ids = {id_of[line["path"]] for line in listed}
            # Every file the summary counts as indexed is stored, and every file not stored is listed;
            # a listed file may be stored only from the one chunk in flight when the gateway died.
            assert set(ids) - listed_ids <= stored
            assert len(stored & listed_ids) <= 16
            assert len(stored) == summary["indexed"] + len(stored & listed_ids)

            rerun = subprocess.run([*command, "--gateway", up.gateway], cwd=tmp_path, capture_output=True,
                                   text=True, timeout=120)
            assert rerun.returncode == 0, rerun.stderr
            again = json.loads(rerun.stdout)
            assert (again["found"], again["failed"], again["duplicates"], again["not_indexed"]) == (300, 0, 0, 0)
            assert (again["indexed"], again["unchanged"]) == (len(images) - len(stored), len(stored))
            assert stack.count(collection) == len(images)
            assert sorted(item.id for item in stack.stored(ids, collection)) == sorted(ids)  # each exactly once
            assert not errors.exists()
        finally:
            stack.close()
