"""Copy search (SEARCH_MODE_COPY) through the real stack: the embedder (ONNX, copy features and
VerifyCopies), search_svc (FAISS, and a Milvus Lite file) behind the gateway, a real redis-server; over
gRPC, HTTP, the web page and the CLI. And at ingest: copy features stored with every item, and an item
stored without them embedded again. The ranking and the cache key are also checked alone, where the
real stack cannot make the case happen on demand (ties, a shortlist deeper than k)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image, ImageOps

from conftest import (
    CHROMIUM_FLAGS, SEARCH_BACKENDS, encode, in_process_stack, metric_value, repeat_until_cached, run_cli_async,
    second_gateway,
)
from gateway.copy_ranking import rank_copies
from gateway.search_query import SearchQuery
from gateway.settings import MAX_COPY_CANDIDATES, GatewaySettings
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, search_pb2, search_pb2_grpc

VIEWS = 4
CATALOG = 16  # ukbench objects 0..3, four views each
ORIGINAL = 5  # object 1: its copies are searched for
OUTSIDER = 40  # object 10: not in the catalog
# The crop copy: x0, y0, x1, y1 in the original's pixels (640x480): a bit over 30% of it.
CROP = (200, 120, 520, 420)
COPY_MODE = gateway_pb2.SEARCH_MODE_COPY


def item_id(position: int) -> str:
    return f"ukb-{position:02d}"


def jpeg(image: Image.Image) -> bytes:
    return encode(image, "JPEG", quality=90)


@pytest.fixture(scope="module")
def original(ukbench_images: list[Path]) -> Image.Image:
    return Image.open(ukbench_images[ORIGINAL]).convert("RGB")


@pytest.fixture(scope="module")
def copies(original: Image.Image) -> dict[str, bytes]:
    """Copies of the original as people make them: a crop, a mirror image, a greyscale one."""
    return {
        "crop": jpeg(original.crop(CROP)),
        "mirror": jpeg(ImageOps.mirror(original)),
        "greyscale": jpeg(ImageOps.grayscale(original).convert("RGB")),
    }


def add_requests(images: list[Path], positions: range, collection: str = "", regions: bool = False):
    for position in positions:
        metadata = struct_pb2.Struct()
        metadata.update({"category": f"object-{position // VIEWS}"})
        yield gateway_pb2.AddImageRequest(
            id=item_id(position), image=images[position].read_bytes(), metadata=metadata,
            image_uri=images[position].resolve().as_uri(), collection=collection, regions=regions,
        )


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, ukbench_images):
    async with in_process_stack(
        tmp_path_factory.mktemp(f"copy-search-{request.param}"), mobilenet_dir, backend=request.param,
        image_roots=[ukbench_images[0].parent],
    ) as stack:
        summary = await stack.stub.AddImages(add_requests(ukbench_images, range(CATALOG)), timeout=120)
        assert (summary.received, summary.indexed, summary.failed) == (CATALOG, CATALOG, 0), summary
        yield stack


@pytest.fixture(scope="module")
async def regions_stack(tmp_path_factory, mobilenet_dir, ukbench_images):
    """The same catalog, its default collection (the one the web page searches) indexed with regions."""
    async with in_process_stack(tmp_path_factory.mktemp("copy-search-regions"), mobilenet_dir,
                                image_roots=[ukbench_images[0].parent]) as stack:
        summary = await stack.stub.AddImages(add_requests(ukbench_images, range(CATALOG), regions=True), timeout=300)
        assert (summary.received, summary.indexed, summary.failed) == (CATALOG, CATALOG, 0), summary
        yield stack


async def copy_search(stack, k: int = 5, **fields) -> gateway_pb2.VisualSearchResponse:
    return await stack.stub.Search(gateway_pb2.VisualSearchRequest(k=k, mode=COPY_MODE, **fields), timeout=60)


def box_tuple(box) -> tuple[int, int, int, int]:
    return box.x, box.y, box.width, box.height


def overlap(box: tuple[int, int, int, int], corners: tuple[int, int, int, int]) -> float:
    """Intersection over union of an x, y, width, height box and an x0, y0, x1, y1 one."""
    x, y, width, height = box
    x0, y0, x1, y1 = corners
    inner = max(0, min(x + width, x1) - max(x, x0)) * max(0, min(y + height, y1) - max(y, y0))
    return inner / (width * height + (x1 - x0) * (y1 - y0) - inner)


def assert_copy_answer(reply: gateway_pb2.VisualSearchResponse, original_id: str, size: tuple[int, int]) -> None:
    """The original comes first as a verified copy, with a box inside it; every hit has a verdict, the
    copies come first by copy_score, and only copies have a box."""
    first = reply.hits[0]
    assert first.id == original_id and first.is_copy and first.copy_score >= 0.5, reply
    assert first.HasField("matched_box"), first
    x, y, width, height = box_tuple(first.matched_box)
    assert width > 0 and height > 0 and x + width <= size[0] and y + height <= size[1], first.matched_box
    assert all(hit.HasField("is_copy") and hit.HasField("copy_score") for hit in reply.hits)
    verdicts = [hit.is_copy for hit in reply.hits]
    assert verdicts == sorted(verdicts, reverse=True), verdicts  # copies first
    copy_scores = [hit.copy_score for hit in reply.hits if hit.is_copy]
    assert copy_scores == sorted(copy_scores, reverse=True)
    assert all(hit.HasField("matched_box") == hit.is_copy for hit in reply.hits)
    assert not reply.no_good_match


# ---- gRPC ------------------------------------------------------------------------------------------


async def test_crop_mirror_and_greyscale_copies_find_their_original_first(stack, copies, original):
    for name, image in copies.items():
        reply = await copy_search(stack, image=image)
        assert len(reply.hits) == 5, name
        assert_copy_answer(reply, item_id(ORIGINAL), original.size)
        box = box_tuple(reply.hits[0].matched_box)
        if name == "crop":
            assert overlap(box, CROP) > 0.6, box  # where the crop was taken from
        else:
            assert overlap(box, (0, 0, *original.size)) > 0.6, (name, box)  # the whole picture


async def test_a_second_look_finds_an_original_ranked_after_the_shortlist(stack, copies):
    """The crop copy's original ranks third by similarity (two other views of the object come first), so
    a shortlist of 2 cannot verify it. With a second look the gateway verifies the hits after the
    shortlist once it holds no copy, and puts the original first; asking those hits for more agreeing
    features than the original has (second_look_min_inliers) leaves it no copy."""
    similar = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=CATALOG), timeout=60)
    rank = [hit.id for hit in similar.hits].index(item_id(ORIGINAL))
    assert rank >= 2, [hit.id for hit in similar.hits]  # the case this test is about
    shortlist_only = {"shortlist": 2, "second_look": 0, "feature_candidates": 0}
    async with second_gateway(stack, copy_search=shortlist_only) as gateway:
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=2, mode=COPY_MODE), timeout=60)
        assert item_id(ORIGINAL) not in [hit.id for hit in reply.hits] and not any(hit.is_copy for hit in reply.hits)
    async with second_gateway(stack, copy_search={"shortlist": 2, "second_look": CATALOG, "feature_candidates": 0}) as gateway:
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=2, mode=COPY_MODE), timeout=60)
        first = reply.hits[0]
        assert first.id == item_id(ORIGINAL) and first.is_copy and first.copy_score >= 0.5, reply
        assert overlap(box_tuple(first.matched_box), CROP) > 0.6, first.matched_box
    # Below the embedder's own count (12), its own count applies: the original is still found.
    lenient = {"shortlist": 2, "second_look": CATALOG, "second_look_min_inliers": 1, "feature_candidates": 0}
    async with second_gateway(stack, copy_search=lenient) as gateway:
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=2, mode=COPY_MODE), timeout=60)
        assert reply.hits[0].id == item_id(ORIGINAL) and reply.hits[0].is_copy, reply
    strict = {"shortlist": 2, "second_look": CATALOG, "second_look_min_inliers": 1000, "feature_candidates": 0}
    async with second_gateway(stack, copy_search=strict) as gateway:
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=2, mode=COPY_MODE), timeout=60)
        assert not any(hit.is_copy for hit in reply.hits), reply


async def test_items_sharing_the_querys_features_are_verified_beyond_the_shortlist(stack, copies):
    """The crop's original ranks after a 2-deep shortlist, but it shares the most local descriptors with
    the crop: search_svc's feature index hands it to the gateway beside the shortlist, and it is
    verified and put first without a second look. Candidates found so that are not copies are left out."""
    similar = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=CATALOG), timeout=60)
    shortlist = [hit.id for hit in similar.hits][:2]
    assert item_id(ORIGINAL) not in shortlist  # the case this test is about
    async with second_gateway(stack, copy_search={"shortlist": 2, "second_look": 0, "feature_candidates": 3}) as gateway:
        # k 2: the shortlist is as deep as k when k is deeper.
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], k=2, mode=COPY_MODE), timeout=60)
    ids = [hit.id for hit in reply.hits]
    first = reply.hits[0]
    assert first.id == item_id(ORIGINAL) and first.is_copy and first.copy_score >= 0.5, reply
    assert overlap(box_tuple(first.matched_box), CROP) > 0.6, first.matched_box
    # Then the shortlist: the other feature candidates were no copies, so they are left out.
    assert ids[1:] == shortlist[:1] and not reply.hits[1].is_copy, reply


async def test_the_mirror_check_reaches_the_shortlist_behind_the_feature_candidates(stack, copies):
    """The feature candidates and the shortlist are verified in one VerifyCopies call, the feature
    candidates first: the shortlist's first mirror_depth hits are still checked against the query's
    mirror image, so with a mirror depth of 1 a mirror image finds its original heading the shortlist."""
    # The case: the original heads the mirror image's shortlist, and search_svc hands the gateway feature
    # candidates beside it, which take the call's first places.
    async with grpc.aio.insecure_channel(stack.embedder_server.address) as channel:
        embedded = await embedder_pb2_grpc.EmbedderStub(channel).EmbedImages(embedder_pb2.EmbedImagesRequest(
            images=[embedder_pb2.ImageInput(data=copies["mirror"])], with_copy_features=True,
            copy_features_for_query=True), timeout=60)
    query = embedded.results[0]
    async with grpc.aio.insecure_channel(stack.search_server.address) as channel:
        found = await search_pb2_grpc.VectorSearchStub(channel).Search(search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=query.embedding.values)], k=2,
            copy_query_features=query.copy_features, feature_candidates=3), timeout=60)
    assert found.results[0].hits[0].id == item_id(ORIGINAL) and found.results[0].feature_matches, found
    settings = {"shortlist": 2, "second_look": 0, "feature_candidates": 3, "mirror_depth": 1}
    async with second_gateway(stack, copy_search=settings) as gateway:
        reply = await gateway.Search(gateway_pb2.VisualSearchRequest(image=copies["mirror"], k=2, mode=COPY_MODE),
                                     timeout=60)
    assert reply.hits[0].id == item_id(ORIGINAL) and reply.hits[0].is_copy, reply


async def test_the_copy_check_at_ingest_verifies_the_feature_candidates_too(stack, copies):
    """`on_copy` checks a new image as a copy search does: with a 2-deep shortlist the crop's original
    is found among the feature candidates, so the crop is left out as its copy; without them it
    is not recognised and is written (and deleted again after each try)."""
    async def add_crop(copy_search: dict) -> gateway_pb2.AddImagesSummary:
        request = gateway_pb2.AddImageRequest(id="crop-upload", image=copies["crop"], on_copy=gateway_pb2.ON_COPY_SKIP)
        try:
            async with second_gateway(stack, copy_search=copy_search) as gateway:
                return await gateway.AddImages(iter([request]), timeout=60)
        finally:
            await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["crop-upload"]), timeout=30)

    summary = await add_crop({"shortlist": 2, "second_look": 0, "feature_candidates": 3})
    assert [(found.id, found.copy_of, found.skipped) for found in summary.copies] == [
        ("crop-upload", item_id(ORIGINAL), True)], summary
    assert (summary.indexed, summary.skipped_copies) == (0, 1)
    summary = await add_crop({"shortlist": 2, "second_look": 0, "feature_candidates": 0})
    assert (summary.indexed, summary.skipped_copies, len(summary.copies)) == (1, 0, 0), summary


async def test_an_image_without_local_features_is_a_copy_of_the_same_bytes(stack):
    """A plain swatch and a strip a pixel or two across have no keypoints, so verification cannot call
    anything a copy of them: the item stored from the same bytes is one all the same (copy_score 1, over
    the whole image), by an image query, an item_id query and the check at ingest; another plain colour,
    or a crop of the strip, is not. The strip failed the embedder outright before (INTERNAL)."""
    collection = "plain_copies"
    swatch = encode(Image.new("RGB", (120, 80), (200, 30, 40)), "PNG")
    other_swatch = encode(Image.new("RGB", (120, 80), (30, 200, 40)), "PNG")
    pixels = np.random.default_rng(5).integers(0, 256, (900, 2, 3), dtype=np.uint8)
    strip = encode(Image.fromarray(pixels), "PNG")

    def add(*items: tuple[str, bytes], on_copy: int = gateway_pb2.ON_COPY_KEEP):
        for added_id, data in items:
            yield gateway_pb2.AddImageRequest(id=added_id, image=data, collection=collection, on_copy=on_copy)

    summary = await stack.stub.AddImages(add(("swatch", swatch), ("other-swatch", other_swatch), ("strip", strip)),
                                         timeout=60)
    assert (summary.indexed, summary.failed) == (3, 0), summary
    try:
        expected = {"swatch": (True, (0, 0, 120, 80)), "strip": (True, (0, 0, 2, 900))}
        for name, data in (("swatch", swatch), ("strip", strip)):
            reply = await copy_search(stack, k=3, image=data, collection=collection)
            assert reply.hits[0].id == name and reply.hits[0].is_copy and reply.hits[0].copy_score == 1.0, reply
            assert box_tuple(reply.hits[0].matched_box) == expected[name][1]
            assert not any(hit.is_copy for hit in reply.hits[1:]), reply
        reply = await copy_search(stack, k=3, image=strip, crop=embedder_pb2.CropBox(x=0, y=0, width=2, height=450),
                                  collection=collection)
        assert len(reply.hits) == 3 and not any(hit.is_copy for hit in reply.hits), reply  # a crop: other bytes

        # The same bytes under another id: the ingest check flags it, and an item_id search finds both.
        summary = await stack.stub.AddImages(add(("swatch-again", swatch), ("other-again", other_swatch),
                                                 on_copy=gateway_pb2.ON_COPY_FLAG), timeout=60)
        assert sorted((found.id, found.copy_of, found.copy_score) for found in summary.copies) == [
            ("other-again", "other-swatch", 1.0), ("swatch-again", "swatch", 1.0)], summary
        reply = await copy_search(stack, k=5, item_id="swatch", collection=collection)
        assert {hit.id for hit in reply.hits if hit.is_copy} == {"swatch", "swatch-again"}, reply
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_similar_mode_hits_carry_no_copy_fields(stack, copies):
    for mode in (gateway_pb2.SEARCH_MODE_UNSPECIFIED, gateway_pb2.SEARCH_MODE_SIMILAR):
        reply = await stack.search(copies["mirror"], k=6, mode=mode)
        assert len(reply.hits) == 6
        assert not any(hit.HasField("is_copy") or hit.HasField("copy_score") or hit.HasField("matched_box")
                       for hit in reply.hits)


async def test_an_image_not_in_the_catalog_is_no_copy(stack, ukbench_images):
    reply = await copy_search(stack, image=ukbench_images[OUTSIDER].read_bytes())
    assert len(reply.hits) == 5
    assert all(hit.HasField("is_copy") and not hit.is_copy and hit.copy_score < 0.5 for hit in reply.hits)
    assert not any(hit.HasField("matched_box") for hit in reply.hits)
    scores = [hit.score for hit in reply.hits]
    assert scores == sorted(scores, reverse=True)  # no copy: the similar order


async def test_min_score_drops_only_the_hits_that_are_not_copies(stack, copies):
    similar = await stack.search(copies["crop"], k=5, min_score=0.99)
    assert item_id(ORIGINAL) not in [hit.id for hit in similar.hits]  # its cosine is below 0.99 ...
    reply = await copy_search(stack, image=copies["crop"], min_score=0.99)
    assert reply.hits and reply.hits[0].id == item_id(ORIGINAL)  # ... but it is a copy, so it is kept
    assert reply.hits[0].score < 0.99
    assert all(hit.is_copy or hit.score >= 0.99 for hit in reply.hits)


async def test_the_filter_applies_to_the_shortlist(stack, copies):
    condition = search_pb2.Condition(field="category", op=search_pb2.NE, value=struct_pb2.Value(string_value="object-1"))
    reply = await copy_search(stack, image=copies["crop"], filter=search_pb2.Filter(conditions=[condition]))
    assert len(reply.hits) == 5
    assert not any(hit.metadata["category"] == "object-1" for hit in reply.hits)
    assert not any(hit.is_copy for hit in reply.hits)


async def test_item_id_copy_search_uses_the_stored_features(stack, original):
    reply = await copy_search(stack, item_id=item_id(ORIGINAL))
    assert_copy_answer(reply, item_id(ORIGINAL), original.size)
    assert overlap(box_tuple(reply.hits[0].matched_box), (0, 0, *original.size)) > 0.8  # itself, whole
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await copy_search(stack, item_id="no-such-item")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'no-such-item'" in missing.value.details()


async def test_an_item_finds_its_mirrored_copy_by_id(stack, copies, original):
    """Stored features carry the image's mirror-image keypoints, so a copy search by item_id (and so
    `vsearch duplicates`) finds a mirrored copy stored as an ordinary item."""
    collection = "mirrored_pair"

    def pair():
        for item, data in (("photo", jpeg(original)), ("photo-mirrored", copies["mirror"])):
            yield gateway_pb2.AddImageRequest(id=item, image=data, collection=collection)

    summary = await stack.stub.AddImages(pair(), timeout=60)
    assert summary.indexed == 2, summary
    try:
        for item, other in (("photo", "photo-mirrored"), ("photo-mirrored", "photo")):
            reply = await copy_search(stack, k=2, item_id=item, collection=collection)
            verdicts = {hit.id: hit.is_copy for hit in reply.hits}
            assert verdicts == {item: True, other: True}, reply
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


async def test_copy_mode_with_text_or_an_unknown_mode_is_invalid(stack, copies):
    with pytest.raises(grpc.aio.AioRpcError) as text:
        await copy_search(stack, text="a red sports car")
    assert text.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "copy mode" in text.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=copies["crop"], mode=7), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mode 7" in unknown.value.details()


async def test_the_result_cache_keeps_modes_apart(stack, copies):
    k = 7  # no other test searches with it: nothing of theirs is cached
    similar = await stack.search(copies["greyscale"], k=k)
    assert similar.hits and not similar.hits[0].HasField("is_copy")
    await repeat_until_cached(lambda: stack.search(copies["greyscale"], k=k))
    verified_before = metric_value(stack.registry, "vsearch_gateway_copy_candidates_total", verdict="no_copy")
    first = await copy_search(stack, k=k, image=copies["greyscale"])
    assert not first.from_cache and first.hits[0].is_copy  # not the similar answer
    assert metric_value(stack.registry, "vsearch_gateway_copy_candidates_total", verdict="no_copy") > verified_before
    again = await repeat_until_cached(lambda: copy_search(stack, k=k, image=copies["greyscale"]))
    assert list(again.hits) == list(first.hits)
    assert not (await stack.search(copies["greyscale"], k=k)).hits[0].HasField("is_copy")  # nor the other way


# ---- ingest: copy features stored, items without them embedded again ------------------------------


async def test_items_stored_without_copy_features_are_embedded_again_to_get_them(stack, ukbench_images, copies):
    collection = "copy_features_later"
    items = range(ORIGINAL - 1, ORIGINAL + 2)
    try:
        async with second_gateway(stack, redis_url=stack.redis.url, copy_search={"features_at_ingest": False}) as plain:
            added = await plain.AddImages(add_requests(ukbench_images, items, collection), timeout=60)
            assert (added.indexed, added.unchanged, added.failed) == (3, 0, 0), added
            # Stored without features: no copy can be verified, and an item_id copy search says why.
            reply = await copy_search(stack, k=3, image=copies["crop"], collection=collection)
            assert {hit.id for hit in reply.hits} == {item_id(position) for position in items}
            assert not any(hit.is_copy for hit in reply.hits)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await copy_search(stack, item_id=item_id(ORIGINAL), collection=collection)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"'{item_id(ORIGINAL)}'" in refused.value.details() and "copy features" in refused.value.details()
            # With features off, the same items again are unchanged.
            again = await plain.AddImages(add_requests(ukbench_images, items, collection), timeout=60)
            assert (again.indexed, again.unchanged) == (0, 3), again

        # With features on (the default), the same content is embedded again, now with its features ...
        refreshed = await stack.stub.AddImages(add_requests(ukbench_images, items, collection), timeout=60)
        assert (refreshed.indexed, refreshed.unchanged, refreshed.failed) == (3, 0, 0), refreshed
        reply = await copy_search(stack, k=3, image=copies["crop"], collection=collection)
        assert reply.hits[0].id == item_id(ORIGINAL) and reply.hits[0].is_copy
        by_item = await copy_search(stack, k=3, item_id=item_id(ORIGINAL), collection=collection)
        assert by_item.hits[0].id == item_id(ORIGINAL) and by_item.hits[0].is_copy
        # ... and only once.
        again = await stack.stub.AddImages(add_requests(ukbench_images, items, collection), timeout=60)
        assert (again.indexed, again.unchanged) == (0, 3), again
    finally:
        await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=30)


# ---- HTTP ------------------------------------------------------------------------------------------


def assert_http_copy_hits(body: dict, original: Image.Image) -> None:
    first = body["hits"][0]
    assert first["id"] == item_id(ORIGINAL) and first["is_copy"] is True and first["copy_score"] >= 0.5, body
    box = first["matched_box"]
    assert set(box) == {"x", "y", "width", "height"}
    assert box["width"] > 0 and box["x"] + box["width"] <= original.width
    assert box["height"] > 0 and box["y"] + box["height"] <= original.height
    for hit in body["hits"]:
        assert isinstance(hit["is_copy"], bool) and isinstance(hit["copy_score"], float)
        assert (hit["matched_box"] is not None) == hit["is_copy"]
    assert body["no_good_match"] is False


async def test_http_copy_mode_over_multipart_and_json(stack, copies, original):
    response = await stack.search_file(copies["crop"], mode="copy", k="5")
    assert response.status_code == 200, response.text
    assert_http_copy_hits(response.json(), original)

    encoded = base64.b64encode(copies["mirror"]).decode()
    response = await stack.http.post("/v1/search", json={"image_base64": encoded, "mode": "copy", "k": 5})
    assert response.status_code == 200, response.text
    assert_http_copy_hits(response.json(), original)

    response = await stack.http.post("/v1/search", json={"item_id": item_id(ORIGINAL), "mode": "copy", "k": 3})
    assert response.status_code == 200, response.text
    assert_http_copy_hits(response.json(), original)

    for similar in (await stack.search_file(copies["crop"], k="5"),
                    await stack.http.post("/v1/search", json={"image_base64": encoded, "mode": "similar"})):
        assert similar.status_code == 200, similar.text
        assert not any({"is_copy", "copy_score", "matched_box"} & set(hit) for hit in similar.json()["hits"])


async def test_http_copy_mode_refuses_text_and_an_unknown_mode(stack, copies):
    refusals = [
        await stack.http.post("/v1/search", json={"text": "a red sports car", "mode": "copy"}),
        await stack.http.post("/v1/search", data={"text": "a red sports car", "mode": "copy"}),
    ]
    for response in refusals:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT" and "copy mode" in error["message"]
    unknown = [
        await stack.http.post("/v1/search", json={"image_base64": base64.b64encode(copies["crop"]).decode(),
                                                  "mode": "copies"}),
        await stack.search_file(copies["crop"], mode="copies"),
    ]
    for response in unknown:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT" and "mode" in error["message"], error


# ---- the web page and the CLI --------------------------------------------------------------------


async def displayed_box(image, box: dict) -> dict:
    """Where `box` (in the image's pixels) lies on the page, as the contained thumbnail shows the image."""
    shown = await image.evaluate(
        "img => { const s = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);"
        " const r = img.getBoundingClientRect();"
        " return {left: r.left + (r.width - img.naturalWidth * s) / 2,"
        " top: r.top + (r.height - img.naturalHeight * s) / 2, scale: s}; }")
    return {"x": shown["left"] + box["x"] * shown["scale"], "y": shown["top"] + box["y"] * shown["scale"],
            "width": box["width"] * shown["scale"], "height": box["height"] * shown["scale"]}


def assert_drawn_at(drawn: dict, expected: dict) -> None:
    """Within a pixel or two (the border), as the page scales it."""
    assert abs(drawn["x"] - expected["x"]) < 3 and abs(drawn["y"] - expected["y"]) < 3, (drawn, expected)
    assert abs(drawn["width"] - expected["width"]) < 5 and abs(drawn["height"] - expected["height"]) < 5, (drawn, expected)


async def test_the_page_marks_copies_with_a_badge_and_their_matched_box(stack, regions_stack, copies, original,
                                                                       tmp_path):
    from playwright.async_api import async_playwright, expect

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed (scripts/setup installs Debian's chromium)")
    query = tmp_path / "crop.jpg"
    query.write_bytes(copies["crop"])
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
            await expect(page.locator("#model")).to_contain_text(f"{CATALOG} images")
            await page.set_input_files("#file", str(query))
            await page.fill("#k", "5")
            await page.click("#go")  # similar mode: no verdicts
            await expect(page.locator(".hit")).to_have_count(5)
            await expect(page.locator(".hit .badge")).to_have_count(0)
            await expect(page.locator(".hit .matched-region")).to_have_count(0)  # a collection without regions

            await page.check("#copies")
            await page.click("#go")
            first = page.locator(".hit").first
            await expect(first.locator(".badge")).to_have_text(re.compile(r"^copy (0\.[5-9]\d|1\.00)$"))
            await expect(first.locator(".id")).to_have_text(item_id(ORIGINAL))
            await expect(page.locator("#status")).to_contain_text("cop")
            marker = first.locator(".matched-box")
            await expect(marker).to_be_visible()
            response = await stack.search_file(copies["crop"], mode="copy", k="5")
            box = response.json()["hits"][0]["matched_box"]
            # The box is drawn where the match is, scaled to the displayed image.
            assert_drawn_at(await marker.bounding_box(), await displayed_box(first.locator(".thumb img"), box))
            await expect(page.locator(".hit .matched-region")).to_have_count(0)
            await page.screenshot(path=str(tmp_path / "copies.png"), full_page=True)

            # A collection with regions: the crop's original is found by a region, outlined and labelled where
            # it lies; hits found by their full view get no outline.
            await page.goto(f"http://127.0.0.1:{regions_stack.gateway_server.http_port}/")
            await expect(page.locator("#model")).to_contain_text(f"{CATALOG} images")
            await page.set_input_files("#file", str(query))
            await page.fill("#k", "5")
            await page.click("#go")
            await expect(page.locator(".hit")).to_have_count(5)
            hits = (await regions_stack.search_file(copies["crop"], k="5")).json()["hits"]
            found = next(hit for hit in hits if hit["id"] == item_id(ORIGINAL))
            assert found["matched_region"] is not None, hits
            card = page.locator(".hit", has=page.locator(".id", has_text=item_id(ORIGINAL)))
            outline = card.locator(".matched-region")
            await expect(outline).to_be_visible()
            await expect(outline).to_have_text("region")
            assert_drawn_at(await outline.bounding_box(),
                            await displayed_box(card.locator(".thumb img"), found["matched_region"]))
            # Exactly the hits with a region have an outline.
            outlined = await page.locator(".hit").evaluate_all(
                "cards => cards.map(card => card.querySelector('.matched-region') !== null)")
            assert outlined == [hit["matched_region"] is not None for hit in hits], (outlined, hits)
            await page.screenshot(path=str(tmp_path / "regions.png"), full_page=True)

            whole = tmp_path / "whole.jpg"
            whole.write_bytes(jpeg(original))
            await page.set_input_files("#file", str(whole))
            await page.click("#go")
            await expect(page.locator(".hit").first.locator(".id")).to_have_text(item_id(ORIGINAL))
            hits = (await regions_stack.search_file(whole.read_bytes(), k="5")).json()["hits"]
            assert hits[0]["id"] == item_id(ORIGINAL) and hits[0]["matched_region"] is None, hits
            await expect(page.locator(".hit").first.locator(".matched-region")).to_have_count(0)
        finally:
            await browser.close()


async def test_cli_copies_prints_verdicts_and_refuses_text(stack, copies, tmp_path):
    query = tmp_path / "mirror.jpg"
    query.write_bytes(copies["mirror"])
    gateway = stack.gateway_server.address
    code, out, err = await run_cli_async("search", str(query), "--copies", "-k", "4", "--json", "--gateway", gateway)
    assert code == 0, err
    reply = json.loads(out)
    first = reply["hits"][0]
    assert first["id"] == item_id(ORIGINAL) and first["is_copy"] is True and first["copy_score"] >= 0.5
    assert set(first["matched_box"]) >= {"width", "height"}
    assert all("is_copy" in hit and "copy_score" in hit for hit in reply["hits"])

    code, out, err = await run_cli_async("search", str(query), "--copies", "-k", "4", "--gateway", gateway)
    assert code == 0, err
    first_line = out.splitlines()[1]  # after the "N hits in ..." line
    assert item_id(ORIGINAL) in first_line and " COPY " in first_line, out

    code, _out, err = await run_cli_async("search", "--text", "a red car", "--copies", "--gateway", gateway)
    assert code == 2 and "--copies" in err and "--text" in err, err


# ---- alone: the ranking and the cache key ----------------------------------------------------------


def test_copies_rank_first_by_copy_score_then_score_and_min_score_spares_them():
    candidates = [search_pb2.Hit(id=f"h{n}", score=score) for n, score in enumerate([0.9, 0.8, 0.7, 0.6, 0.5])]
    verdicts = [
        embedder_pb2.CopyVerdict(),
        embedder_pb2.CopyVerdict(is_copy=True, copy_score=0.7, matched_box=embedder_pb2.CropBox(width=5, height=5)),
        embedder_pb2.CopyVerdict(copy_score=0.2),
        embedder_pb2.CopyVerdict(is_copy=True, copy_score=0.9, matched_box=embedder_pb2.CropBox(width=3, height=3)),
        embedder_pb2.CopyVerdict(is_copy=True, copy_score=0.7, matched_box=embedder_pb2.CropBox(width=4, height=4)),
    ]
    ranked = rank_copies(candidates, verdicts, k=4, min_score=None)
    # h3 (0.9), then h1 and h4 tied at 0.7 by score, then the best other hit.
    assert [hit.id for hit in ranked] == ["h3", "h1", "h4", "h0"]
    assert [hit.is_copy for hit in ranked] == [True, True, True, False]
    assert ranked[0].matched_box.width == 3 and not ranked[3].HasField("matched_box")
    assert all(hit.HasField("is_copy") and hit.HasField("copy_score") for hit in ranked)
    # min_score 0.85 drops h2 (0.7) but no copy, even h4 at 0.5.
    assert [hit.id for hit in rank_copies(candidates, verdicts, k=10, min_score=0.85)] == ["h3", "h1", "h4", "h0"]


def test_copy_mode_has_its_own_result_key_and_a_shortlist_of_at_least_k():
    settings = GatewaySettings(embedder_address="e:1", search_address="s:1", copy_search={"shortlist": 30})
    image = b"\xff\xd8 some image bytes"
    similar = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=10), settings, "m@1")
    copy = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=10, mode=COPY_MODE), settings, "m@1")
    assert similar.result_key != copy.result_key and similar.embedding_key == copy.embedding_key
    assert not similar.copy_mode and copy.copy_shortlist == 30
    deep = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=50, mode=COPY_MODE), settings, "m@1")
    assert deep.copy_shortlist == 50
    vector = np.ones(4, dtype=np.float32)
    request = deep.copy_candidates_request(vector)
    assert request.k == 50 and request.include_copy_features and not request.HasField("min_score")
    assert not similar.index_request(vector).include_copy_features  # similar mode fetches no features
    looking_twice = GatewaySettings(
        embedder_address="e:1", search_address="s:1", copy_search={"shortlist": 30, "second_look": 70})
    twice = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=50, mode=COPY_MODE), looking_twice, "m@1")
    assert twice.copy_candidates_request(vector).k == 50
    assert twice.copy_candidates_request(vector, second_look=True).k == 120
    again = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=10, mode=COPY_MODE), looking_twice, "m@1")
    assert again.result_key != copy.result_key  # another second look, other copies
    # However deep the page's shortlist, both looks fit in one search's hits.
    widest = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=990, mode=COPY_MODE), looking_twice, "m@1")
    assert widest.copy_candidates_request(vector, second_look=True).k == MAX_COPY_CANDIDATES
    explicit = SearchQuery.parse(
        gateway_pb2.VisualSearchRequest(image=image, k=10, mode=gateway_pb2.SEARCH_MODE_SIMILAR), settings, "m@1")
    assert explicit.result_key == similar.result_key  # SIMILAR and UNSPECIFIED are one mode
    # The query's copy features go with the first look only, asking for the setting's feature candidates.
    with_features = copy.copy_candidates_request(vector, b"features")
    assert (with_features.copy_query_features, with_features.feature_candidates) == (b"features", 5)
    assert not copy.copy_candidates_request(vector).feature_candidates  # no features (none in the image)
    assert not twice.copy_candidates_request(vector, b"features", second_look=True).feature_candidates
    fewer = GatewaySettings(embedder_address="e:1", search_address="s:1",
                            copy_search={"shortlist": 30, "feature_candidates": 0})
    shortlist_only = SearchQuery.parse(gateway_pb2.VisualSearchRequest(image=image, k=10, mode=COPY_MODE), fewer, "m@1")
    assert not shortlist_only.copy_candidates_request(vector, b"features").feature_candidates
    assert shortlist_only.result_key != copy.result_key  # other candidates, other copies
