"""Near-duplicate groups (`vsearch duplicates`) and the copy check at ingest (`on_copy`, `vsearch index
--on-copy`), through the real stack: the embedder (ONNX, copy features, VerifyCopies), search_svc (FAISS,
and a Milvus Lite file) behind the gateway, a real redis-server. The catalog is a handful of Caltech-101
images with copies made of them: an exact byte duplicate under another id, a crop, a greyscale copy, and
images of one class that look alike without being copies."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import SEARCH_BACKENDS, in_process_stack, run_cli_async
from vsearch.v1 import gateway_pb2, search_pb2
from vsearch_cli.evaluation.copy_transforms import transformed_copy

CALTECH = "datasets/caltech101/101_ObjectCategories"
ORIGINALS = {"lily": "water_lilly/image_0001.jpg", "llama": "llama/image_0001.jpg"}
# Same class, alike (cosine above 0.9 with the default model), not copies of each other.
LOOKALIKES = {"soccer-2": "soccer_ball/image_0002.jpg", "soccer-4": "soccer_ball/image_0004.jpg"}
# Unrelated to everything else.
FILLERS = {f"filler-{name.split('/')[0]}": name for name in (
    "accordion/image_0001.jpg", "brain/image_0001.jpg", "camera/image_0001.jpg", "dolphin/image_0001.jpg",
    "ketch/image_0001.jpg")}


def summary_id(path: Path) -> str:
    """The id `vsearch index` gives a file: the sha256 of its bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_of(path: Path, transform: str) -> bytes:
    return transformed_copy(Image.open(path).convert("RGB"), transform, random.Random(13))


@pytest.fixture(scope="module")
def catalog_files(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """id -> image file: the originals, their copies (written as files, so the page can show them), the
    look-alikes and the fillers."""
    folder = tmp_path_factory.mktemp("duplicates-catalog")
    files = {item_id: shared_dir / CALTECH / name for item_id, name in {**ORIGINALS, **LOOKALIKES, **FILLERS}.items()}
    made = {
        "lily-same-bytes": files["lily"].read_bytes(),
        "lily-crop": copy_of(files["lily"], "crop70"),
        "llama-grey": copy_of(files["llama"], "greyscale"),
    }
    for item_id, data in made.items():
        (folder / f"{item_id}.jpg").write_bytes(data)
        files[item_id] = folder / f"{item_id}.jpg"
    return files


def add_requests(files: dict[str, Path], collection: str = "", on_copy: int = 0):
    for item_id, path in files.items():
        yield gateway_pb2.AddImageRequest(id=item_id, image=path.read_bytes(), image_uri=path.resolve().as_uri(),
                                          collection=collection, on_copy=on_copy)


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, catalog_files):
    async with in_process_stack(tmp_path_factory.mktemp(f"duplicates-{request.param}"), mobilenet_dir,
                                backend=request.param) as stack:
        summary = await stack.stub.AddImages(add_requests(catalog_files), timeout=120)
        assert (summary.indexed, summary.failed) == (len(catalog_files), 0), summary
        yield stack


# ---- ListImages -----------------------------------------------------------------------------------


async def test_list_images_pages_through_the_catalog_in_id_order(stack, catalog_files):
    listed, token, pages = [], "", 0
    while True:
        page = await stack.stub.ListImages(gateway_pb2.ListImagesRequest(page_size=4, page_token=token), timeout=30)
        listed.extend(page.images)
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert len(page.images) == 4
    assert [image.id for image in listed] == sorted(catalog_files)
    assert pages == -(-len(catalog_files) // 4)
    by_id = {image.id: image for image in listed}
    assert by_id["lily"].content_sha256 == by_id["lily-same-bytes"].content_sha256 != by_id["lily-crop"].content_sha256
    assert by_id["lily-crop"].image_uri == catalog_files["lily-crop"].resolve().as_uri()


async def test_list_images_refuses_a_bad_token_or_size_naming_the_field(stack):
    for request, field in [(gateway_pb2.ListImagesRequest(page_token="bm90IGEgdG9rZW4="), "page_token"),
                           (gateway_pb2.ListImagesRequest(page_size=1001), "page_size")]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.ListImages(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stack.stub.ListImages(gateway_pb2.ListImagesRequest(collection="no_such_catalog"), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# ---- vsearch duplicates ---------------------------------------------------------------------------


def members(group: dict) -> set[str]:
    return {member["id"] for member in group["members"]}


async def test_duplicates_finds_the_three_tiers(stack):
    code, out, err = await run_cli_async("duplicates", "--json", "--gateway", stack.gateway_server.address)
    assert code == 0, err
    assert re.search(r"\d+ items in [\d.]+ s \([\d.]+ items/s\)", err), err  # progress and rate on stderr
    report = json.loads(out)
    assert report["items"] == report["searched"] == 12 and report["without_copy_features"] == 0
    assert report["similar_threshold"] == {"kind": "cosine", "value": 0.9, "chosen_by": "default"}
    by_tier = {tier: [members(group) for group in report["groups"] if group["tier"] == tier]
               for tier in ("exact", "copy", "similar")}
    assert by_tier["exact"] == [{"lily", "lily-same-bytes"}]
    assert sorted(by_tier["copy"], key=len) == [{"llama", "llama-grey"}, {"lily", "lily-same-bytes", "lily-crop"}]
    assert {"soccer-2", "soccer-4"} in by_tier["similar"]
    grouped = set().union(*(members(group) for group in report["groups"]))
    assert not any(item_id.startswith("filler-") for item_id in grouped), report["groups"]
    for group in report["groups"]:
        assert group["size"] == len(group["members"])
        assert group["representative"] == {key: group["members"][0][key] for key in ("id", "image_uri")}
        assert group["representative"]["image_uri"].startswith("file://")
    assert report["tiers"]["copy"] == {"groups": 2, "items": 5}

    # A threshold above every look-alike's cosine: no similar group, the same exact and copy groups.
    code, out, err = await run_cli_async("duplicates", "--json", "--similar-above", "0.999",
                                         "--gateway", stack.gateway_server.address)
    assert code == 0, err
    strict = json.loads(out)
    assert strict["tiers"]["similar"]["groups"] == 0 and strict["tiers"]["copy"] == report["tiers"]["copy"]


async def test_duplicates_text_and_html_outputs(stack, tmp_path):
    gateway = stack.gateway_server.address
    code, out, err = await run_cli_async("duplicates", "--gateway", gateway)
    assert code == 0, err
    assert "exact: exact byte duplicates: 1 groups, 2 items" in out
    assert re.search(r"copy: .*: 2 groups, 5 items", out), out
    page = tmp_path / "duplicates.html"
    code, out, err = await run_cli_async("duplicates", "--html", str(page), "--gateway", gateway)
    assert code == 0 and not out, err
    html = page.read_text()
    groups = re.findall(r'<div class="group" data-tier="(\w+)" data-size="(\d+)">', html)
    assert ("exact", "2") in groups and ("copy", "3") in groups and ("copy", "2") in groups
    # Every member of every group shown as an embedded thumbnail (local files): self-contained.
    shown = sum(int(size) for _tier, size in groups)
    assert html.count('<img src="data:image/jpeg;base64,') == shown
    assert "http://" not in html and "https://" not in html


async def test_duplicates_refuses_bad_arguments_and_a_missing_collection(stack):
    gateway = stack.gateway_server.address
    code, _out, err = await run_cli_async("duplicates", "--similar-above", "1.5", "--gateway", gateway)
    assert code == 2 and "--similar-above" in err
    code, _out, err = await run_cli_async("duplicates", "--collection", "no_such_catalog", "--gateway", gateway)
    assert code == 1 and "NOT_FOUND" in err, err


# ---- the copy check at ingest ---------------------------------------------------------------------


async def copy_check_stream(stack, catalog_files, collection: str, on_copy: int) -> gateway_pb2.AddImagesSummary:
    """The originals first, then a stream of their copies, a new image, and a crop of that new image
    sent in the same stream right after it."""
    originals = {item_id: catalog_files[item_id] for item_id in ORIGINALS}
    first = await stack.stub.AddImages(add_requests(originals, collection), timeout=120)
    assert first.indexed + first.unchanged == 2 and not first.copies
    newcomers = {item_id: catalog_files[item_id] for item_id in ("lily-crop", "llama-grey", "filler-ketch")}
    crop = Path(str(catalog_files["lily-crop"]).replace("lily-crop", "ketch-crop"))
    crop.write_bytes(copy_of(catalog_files["filler-ketch"], "crop70"))
    newcomers["ketch-crop"] = crop
    return await stack.stub.AddImages(add_requests(newcomers, collection, on_copy), timeout=120)


async def listed_metadata(stack, collection: str) -> dict[str, dict]:
    page = await stack.stub.ListImages(gateway_pb2.ListImagesRequest(collection=collection), timeout=30)
    return {image.id: dict(image.metadata) for image in page.images}


EXPECTED_COPIES = [("lily-crop", 0, "lily"), ("llama-grey", 1, "llama"), ("ketch-crop", 3, "filler-ketch")]


async def test_on_copy_skip_leaves_copies_out_and_reports_them(stack, catalog_files):
    collection = "on_copy_skip"
    try:
        summary = await copy_check_stream(stack, catalog_files, collection, gateway_pb2.ON_COPY_SKIP)
        assert [(found.id, found.index, found.copy_of) for found in summary.copies] == EXPECTED_COPIES
        assert all(found.skipped and found.copy_score >= 0.5 for found in summary.copies)
        assert (summary.received, summary.indexed, summary.skipped_copies, summary.failed) == (4, 1, 3, 0)
        assert summary.received == summary.indexed + summary.unchanged + summary.failed + summary.skipped_copies
        assert set(await listed_metadata(stack, collection)) == {"lily", "llama", "filler-ketch"}
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_on_copy_flag_writes_copy_of_and_a_second_run_changes_nothing(stack, catalog_files):
    collection = "on_copy_flag"
    try:
        summary = await copy_check_stream(stack, catalog_files, collection, gateway_pb2.ON_COPY_FLAG)
        assert [(found.id, found.index, found.copy_of) for found in summary.copies] == EXPECTED_COPIES
        assert not any(found.skipped for found in summary.copies)
        assert (summary.indexed, summary.skipped_copies) == (4, 0)
        metadata = await listed_metadata(stack, collection)
        assert {item_id: fields.get("copy_of") for item_id, fields in metadata.items()} == {
            "lily": None, "llama": None, "filler-ketch": None,
            "lily-crop": "lily", "llama-grey": "llama", "ketch-crop": "filler-ketch"}
        again = await copy_check_stream(stack, catalog_files, collection, gateway_pb2.ON_COPY_FLAG)
        assert (again.indexed, again.unchanged, len(again.copies)) == (0, 4, 0), again  # the flag is no change
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_on_copy_catches_a_mirror_image_of_an_item_earlier_in_its_batch(stack, catalog_files, shared_dir):
    """The batch's earlier items are checked against a new item's mirror image too, however many stored
    items its shortlist holds: here 12, more than the 10 first of a shortlist that a copy search checks
    mirrored, behind which they used to come."""
    collection = "on_copy_mirrored"
    original = shared_dir / CALTECH / "pagoda/image_0005.jpg"
    try:
        stored = await stack.stub.AddImages(add_requests(catalog_files, collection), timeout=120)
        assert stored.indexed == len(catalog_files) > 10
        stream = iter([
            gateway_pb2.AddImageRequest(id="pagoda", image=original.read_bytes(), collection=collection,
                                        on_copy=gateway_pb2.ON_COPY_FLAG),
            gateway_pb2.AddImageRequest(id="pagoda-mirrored", image=copy_of(original, "mirror")),
        ])
        summary = await stack.stub.AddImages(stream, timeout=120)
        assert [(found.id, found.copy_of) for found in summary.copies] == [("pagoda-mirrored", "pagoda")]
        assert summary.indexed == 2
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_on_copy_keep_checks_nothing_and_an_unknown_policy_is_refused(stack, catalog_files):
    collection = "on_copy_keep"
    try:
        summary = await copy_check_stream(stack, catalog_files, collection, gateway_pb2.ON_COPY_UNSPECIFIED)
        assert (summary.indexed, summary.skipped_copies, len(summary.copies)) == (4, 0, 0)
        assert not any("copy_of" in fields for fields in (await listed_metadata(stack, collection)).values())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.AddImages(add_requests({"lily": catalog_files["lily"]}, collection, on_copy=9), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "on_copy 9" in refused.value.details()
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_cli_index_on_copy_skip(stack, catalog_files, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    # Files are sent in name order: the crop after its original, in the same run.
    for name, item_id in (("1-lily", "lily"), ("2-lily-crop", "lily-crop"), ("3-dolphin", "filler-dolphin")):
        (folder / f"{name}.jpg").write_bytes(catalog_files[item_id].read_bytes())
    collection = "on_copy_cli"
    try:
        code, out, err = await run_cli_async("index", str(folder), "--on-copy", "skip", "--json", "--collection",
                                             collection, "--errors", str(tmp_path / "errors.jsonl"),
                                             "--gateway", stack.gateway_server.address)
        assert code == 0, err
        summary = json.loads(out)
        assert (summary["indexed"], summary["skipped_copies"]) == (2, 1), summary
        [found] = summary["copies"]
        assert found["path"].endswith("2-lily-crop.jpg") and found["skipped"]
        assert found["copy_of"] == summary_id(folder / "1-lily.jpg")
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)
