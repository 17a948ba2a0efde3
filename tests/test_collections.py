"""Collections and what their filterable fields hold: search_svc's ListCollections and Stats field summaries
on both backends (FAISS over SQLite files, a Milvus Lite file), then the gateway's ListCollections, Stats
and DropCollection over gRPC and HTTP (GET /v1/collections, GET /v1/stats?field_summaries=true,
DELETE /v1/collections/{name}) and POST /v1/images into a named collection, over the real stack."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from conftest import SEARCH_BACKENDS, ManualClock, in_process_stack
from search_svc.field_summaries import TOP_VALUES, FieldSummary, FieldSummaryCache
from search_svc.server import create_server as create_search
from search_svc.settings import FaissSettings, MilvusSettings, SearchSettings
from vsearch.v1 import gateway_pb2, search_pb2, search_pb2_grpc

DIM = 8
FIELDS = {"category": "string", "price": "float", "stock": "int", "in_stock": "bool"}
DEFAULT = "vsearch_images"


@contextlib.asynccontextmanager
async def search_service(location: Path, backend: str) -> AsyncIterator[search_pb2_grpc.VectorSearchStub]:
    server, port = await create_search(SearchSettings(
        port=0, dimension=DIM, backend=backend, log_format="text", filter_fields=FIELDS,
        milvus=MilvusSettings(uri=str(location / "milvus.db"), timeout_s=20), faiss=FaissSettings(data_dir=location),
    ))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await server.wait_ready(timeout=60)
        yield search_pb2_grpc.VectorSearchStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=1)


def vector(seed: int) -> list[float]:
    values = np.random.default_rng(seed).normal(size=DIM)
    return (values / np.linalg.norm(values)).astype(np.float32).tolist()


def item(item_id: str, seed: int, regions: bool = False, **metadata: object) -> search_pb2.Item:
    message = search_pb2.Item(id=item_id, vector=search_pb2.Vector(values=vector(seed)))
    message.metadata.update(metadata)
    if regions:
        message.regions.append(search_pb2.Region(
            box=search_pb2.RegionBox(x=0, y=0, width=4, height=4), vector=search_pb2.Vector(values=vector(seed + 1000))))
    return message


def listed(response: search_pb2.ListCollectionsResponse) -> list[tuple[str, int, bool, bool]]:
    return [(summary.name, summary.count, summary.is_default, summary.regions) for summary in response.collections]


@pytest.fixture(params=SEARCH_BACKENDS)
def backend(request) -> str:
    return request.param


async def test_list_collections_names_each_with_its_count_the_default_always_and_no_regions_sibling(tmp_path, backend):
    async with search_service(tmp_path / "store", backend) as stub:
        assert listed(await stub.ListCollections(search_pb2.ListCollectionsRequest())) == [(DEFAULT, 0, True, False)]
        await stub.Upsert(search_pb2.UpsertRequest(collection="zebra", items=[item("z1", 1), item("z2", 2)]))
        # Regions: Milvus keeps them in a collection of its own, `Aardvark__regions`, which is no catalog.
        await stub.Upsert(search_pb2.UpsertRequest(collection="Aardvark", items=[item("a1", 3, regions=True)]))
        await stub.Upsert(search_pb2.UpsertRequest(items=[item("d1", 4)]))
        await stub.Upsert(search_pb2.UpsertRequest(collection="_tmp", items=[item("t1", 5)]))
        # Ordered by name (code points: upper case, then '_', then lower case).
        assert listed(await stub.ListCollections(search_pb2.ListCollectionsRequest())) == [
            ("Aardvark", 1, False, True), ("_tmp", 1, False, False), (DEFAULT, 1, True, False), ("zebra", 2, False, False),
        ]
        await stub.DropCollection(search_pb2.DropCollectionRequest(collection="zebra"))
        await stub.DropCollection(search_pb2.DropCollectionRequest(collection="Aardvark"))
        assert [name for name, *_ in listed(await stub.ListCollections(search_pb2.ListCollectionsRequest()))] == [
            "_tmp", DEFAULT]

    # A collection not loaded since a restart is listed from its file (FAISS) or Milvus as it was.
    async with search_service(tmp_path / "store", backend) as stub:
        assert listed(await stub.ListCollections(search_pb2.ListCollectionsRequest())) == [
            ("_tmp", 1, False, False), (DEFAULT, 1, True, False)]


def summaries(response: search_pb2.StatsResponse) -> dict[str, dict]:
    return {summary.name: json_format.MessageToDict(summary, always_print_fields_with_no_presence=True)
            for summary in response.field_summaries}


async def test_field_summaries_count_values_and_ranges_of_every_filterable_field(tmp_path, backend):
    categories = ["shoes"] * 5 + ["bags"] * 3 + ["hats"] * 3 + ["Zips"] * 1  # hats and bags tie: by value
    items = [
        item(f"i{n}", n, category=category, price=float(10 + n) * 1.5, stock=n - 4, in_stock=n % 3 != 0)
        for n, category in enumerate(categories)
    ]
    items += [item("bare", 99), item("only-price", 98, price=-2.25)]  # without the other fields
    async with search_service(tmp_path / "store", backend) as stub:
        empty = await stub.Stats(search_pb2.StatsRequest(with_field_summaries=True))
        assert [summary.name for summary in empty.field_summaries] == list(FIELDS)
        assert summaries(empty)["price"] == {"name": "price", "type": "float", "present": "0", "topValues": [],
                                             "moreValues": False}  # no min, no max: unset
        await stub.Upsert(search_pb2.UpsertRequest(collection="shop", items=items, ))
        plain = await stub.Stats(search_pb2.StatsRequest(collection="shop"))
        assert plain.count == 14 and not plain.field_summaries  # only when asked

        response = await stub.Stats(search_pb2.StatsRequest(collection="shop", with_field_summaries=True))
        assert response.count == 14
        found = summaries(response)
        assert list(found) == list(FIELDS)  # in filterable_fields' order
        assert found["category"] == {
            "name": "category", "type": "string", "present": "12", "moreValues": False,
            "topValues": [{"value": "shoes", "count": "5"}, {"value": "bags", "count": "3"},
                          {"value": "hats", "count": "3"}, {"value": "Zips", "count": "1"}],
        }
        assert found["price"]["present"] == "13" and (found["price"]["min"], found["price"]["max"]) == (-2.25, 31.5)
        assert found["stock"]["present"] == "12" and (found["stock"]["min"], found["stock"]["max"]) == (-4.0, 7.0)
        assert found["stock"]["topValues"] == [] and "min" not in found["category"]
        assert found["in_stock"]["topValues"] == [{"value": "true", "count": "8"}, {"value": "false", "count": "4"}]
        # A write shows at once (the summaries are kept only while the generation holds).
        await stub.Upsert(search_pb2.UpsertRequest(collection="shop", items=[item("i-new", 77, category="bags")]))
        again = summaries(await stub.Stats(search_pb2.StatsRequest(collection="shop", with_field_summaries=True)))
        assert again["category"]["topValues"][:2] == [{"value": "shoes", "count": "5"}, {"value": "bags", "count": "4"}]

        # More distinct values than are listed: the most frequent TOP_VALUES, then more_values.
        many = [item(f"m{n}", 200 + n, category=f"c{n:03d}") for n in range(TOP_VALUES + 5)]
        many += [item(f"m-extra{n}", 400 + n, category="c054") for n in range(2)]
        await stub.Upsert(search_pb2.UpsertRequest(collection="many", items=many))
        category = summaries(await stub.Stats(search_pb2.StatsRequest(collection="many", with_field_summaries=True)))["category"]
        assert category["moreValues"] is True and len(category["topValues"]) == TOP_VALUES
        assert category["topValues"][0] == {"value": "c054", "count": "3"}
        assert [entry["value"] for entry in category["topValues"][1:4]] == ["c000", "c001", "c002"]

        # The regions of a collection with regions are not items: they are not counted.
        await stub.Upsert(search_pb2.UpsertRequest(collection="regions", items=[
            item("r1", 1, regions=True, category="x"), item("r2", 2, regions=True, category="x")]))
        response = await stub.Stats(search_pb2.StatsRequest(collection="regions", with_field_summaries=True))
        assert summaries(response)["category"]["topValues"] == [{"value": "x", "count": "2"}]

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stats(search_pb2.StatsRequest(collection="nowhere", with_field_summaries=True))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nowhere" in caught.value.details()


def test_field_summaries_are_scanned_again_only_after_a_write_or_when_old() -> None:
    """The web page asks for them on every load; a scan of 1M items' filter columns must not follow."""
    clock, scans = ManualClock(), []
    cache = FieldSummaryCache(max_age_s=60, clock=clock)

    def scan() -> list[FieldSummary]:
        scans.append(clock())
        return [FieldSummary("category", "string", len(scans))]

    assert cache.get("shop", 7, scan)[0].present == 1
    clock.now += 59
    assert cache.get("shop", 7, scan)[0].present == 1 and len(scans) == 1  # kept
    assert cache.get("other", 7, scan)[0].present == 2  # per collection
    assert cache.get("shop", 8, scan)[0].present == 3  # a write through this process
    clock.now += 60
    assert cache.get("shop", 8, scan)[0].present == 4  # old: another replica may have written
    assert len(scans) == 4


# ---- through the gateway ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir):
    async with in_process_stack(tmp_path_factory.mktemp(f"collections-{request.param}"), mobilenet_dir,
                                backend=request.param) as stack:
        yield stack


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_images_into_a_named_collection_over_http_are_found_there_only(stack, ukbench_bytes):
    # JSON: the body's collection.
    added = await stack.http.post("/v1/images", json={"collection": "shoes", "images": [
        {"id": f"shoe-{n}", "image_base64": b64(ukbench_bytes[n]), "metadata": {"category": "shoes", "price": 10.0 * n}}
        for n in range(3)
    ]})
    assert added.status_code == 200 and added.json()["indexed"] == 3, added.text
    # Multipart: the form's collection field.
    files = [("images", (f"{n}.jpg", ukbench_bytes[n], "image/jpeg")) for n in (3, 8)]
    added = await stack.http.post("/v1/images", files=files, data={
        "collection": "shoes", "ids": json.dumps(["shoe-3", "boot-8"]),
        "metadata": json.dumps([{"category": "shoes", "price": 30.0}, {"category": "boots"}]),
    })
    assert added.status_code == 200 and added.json()["indexed"] == 2, added.text

    found = await stack.http.post("/v1/search", json={"item_id": "shoe-1", "collection": "shoes", "k": 10})
    assert found.status_code == 200, found.text
    assert {hit["id"] for hit in found.json()["hits"]} == {"shoe-0", "shoe-1", "shoe-2", "shoe-3", "boot-8"}
    by_image = await stack.search_file(ukbench_bytes[1], k="3")  # the default collection
    assert by_image.status_code == 200 and not any(hit["id"].startswith(("shoe", "boot")) for hit in by_image.json()["hits"])
    missing = await stack.http.post("/v1/search", json={"item_id": "shoe-1", "k": 3})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"

    stats = (await stack.http.get("/v1/stats", params={"collection": "shoes"})).json()
    assert stats["count"] == 5 and "field_summaries" not in stats  # only when asked
    stats = await stack.http.get("/v1/stats", params={"collection": "shoes", "field_summaries": "true"})
    assert stats.status_code == 200, stats.text
    assert stats.json()["field_summaries"] == [
        {"name": "category", "type": "string", "present": 5, "top_values": [{"value": "shoes", "count": 4},
         {"value": "boots", "count": 1}], "more_values": False, "min": None, "max": None},
        {"name": "price", "type": "float", "present": 4, "top_values": [], "more_values": False, "min": 0.0,
         "max": 30.0},
    ]
    grpc_stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection="shoes", with_field_summaries=True),
                                        timeout=30)
    assert [(summary.name, summary.present) for summary in grpc_stats.field_summaries] == [("category", 5), ("price", 4)]
    bad = await stack.http.get("/v1/stats", params={"field_summaries": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_ARGUMENT"


async def test_collections_are_listed_and_dropped_on_both_protocols(stack, ukbench_bytes):
    for name in ("drop_me", "grpc_drop"):
        summary = await stack.stub.AddImages(iter([gateway_pb2.AddImageRequest(
            id=f"{name}-0", image=ukbench_bytes[20], collection=name)]), timeout=60)
        assert summary.indexed == 1, summary
    listing = await stack.http.get("/v1/collections")
    assert listing.status_code == 200, listing.text
    collections = {entry["name"]: entry for entry in listing.json()["collections"]}
    assert [entry["name"] for entry in listing.json()["collections"]] == sorted(collections)
    assert collections["drop_me"] == {"name": "drop_me", "count": 1, "is_default": False, "regions": False}
    assert collections[DEFAULT]["is_default"] and not any(entry["is_default"] for name, entry in collections.items()
                                                           if name != DEFAULT)
    over_grpc = await stack.stub.ListCollections(search_pb2.ListCollectionsRequest(), timeout=30)
    assert [(entry.name, entry.count) for entry in over_grpc.collections] == [
        (entry["name"], entry["count"]) for entry in listing.json()["collections"]]

    dropped = await stack.http.delete("/v1/collections/drop_me")
    assert dropped.status_code == 200, dropped.text
    assert dropped.json()["dropped"] is True and dropped.json()["index_generation"] > 0
    again = await stack.http.delete("/v1/collections/drop_me")
    assert again.status_code == 404 and again.json() == {
        "error": {"code": "NOT_FOUND", "message": "no collection named 'drop_me'"}}
    default = await stack.http.delete(f"/v1/collections/{DEFAULT}")
    assert default.status_code == 400 and default.json()["error"]["code"] == "FAILED_PRECONDITION"
    assert "default collection" in default.json()["error"]["message"]
    invalid = await stack.http.delete("/v1/collections/no-dashes")
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "INVALID_ARGUMENT"

    reply = await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection="grpc_drop"), timeout=30)
    assert reply.dropped
    names = [entry.name for entry in (await stack.stub.ListCollections(search_pb2.ListCollectionsRequest(),
                                                                          timeout=30)).collections]
    assert "drop_me" not in names and "grpc_drop" not in names and DEFAULT in names


async def test_images_json_takes_on_copy_and_regions_for_the_whole_request(stack, ukbench_bytes):
    original = {"id": "orig", "image_base64": b64(ukbench_bytes[30])}
    added = await stack.http.post("/v1/images", json={"collection": "copies", "regions": True, "images": [original]})
    assert added.status_code == 200 and added.json()["indexed"] == 1, added.text
    assert (await stack.http.get("/v1/stats", params={"collection": "copies"})).json()["regions"] is True
    # The same picture under another id is a copy: flagged, and the next one of this request skipped.
    flagged = await stack.http.post("/v1/images", json={"collection": "copies", "on_copy": "flag", "images": [
        {"id": "again", "image_base64": b64(ukbench_bytes[30])}]})
    assert flagged.status_code == 200, flagged.text
    body = flagged.json()
    assert body["indexed"] == 1 and body["skipped_copies"] == 0
    assert [(copy["id"], copy["copy_of"], copy["skipped"]) for copy in body["copies"]] == [("again", "orig", False)]
    files = [("images", ("copy.jpg", ukbench_bytes[30], "image/jpeg"))]
    skipped = await stack.http.post("/v1/images", files=files, data={
        "collection": "copies", "on_copy": "skip", "ids": json.dumps(["third"])})
    assert skipped.status_code == 200, skipped.text
    assert (skipped.json()["indexed"], skipped.json()["skipped_copies"]) == (0, 1)
    assert (await stack.http.get("/v1/stats", params={"collection": "copies"})).json()["count"] == 2
    bad = await stack.http.post("/v1/images", files=files, data={"on_copy": "maybe"})
    assert bad.status_code == 400 and "on_copy" in bad.json()["error"]["message"]
    bad = await stack.http.post("/v1/images", json={"on_copy": "sometimes", "images": []})
    assert bad.status_code == 400 and "on_copy" in bad.json()["error"]["message"]
