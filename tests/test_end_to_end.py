"""One request through all three real services: gateway -> embedder (ONNX) -> search_svc, cached in a
real redis-server; every test runs on both search backends (the default FAISS store, and a Milvus Lite
file)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import shutil

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image

from conftest import CHROMIUM_FLAGS, SEARCH_BACKENDS, in_process_stack, metric_value, repeat_until_cached
from service_kit.struct_nesting import MAX_STRUCT_DEPTH
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

OBJECTS = 14
VIEWS = 4


async def add_images(stub, items: list[tuple[str, bytes, dict]]) -> gateway_pb2.AddImagesSummary:
    def requests():
        for item_id, data, metadata in items:
            struct = struct_pb2.Struct()
            struct.update(metadata)
            yield gateway_pb2.AddImageRequest(id=item_id, image=data, metadata=struct, image_uri=f"test://{item_id}")

    return await stub.AddImages(requests(), timeout=120)


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, ukbench_images):
    async with in_process_stack(
        tmp_path_factory.mktemp(f"e2e-{request.param}"), mobilenet_dir, backend=request.param,
        image_roots=[ukbench_images[0].parent],
    ) as stack:
        items = [
            (f"ukb-{i:02d}", path.read_bytes(), {"category": f"object-{i // VIEWS}", "price": float(i), "path": path.name})
            for i, path in enumerate(ukbench_images)
        ]
        summary = await add_images(stack.stub, items)
        assert (summary.received, summary.indexed, summary.failed) == (56, 56, 0), summary
        yield stack


async def test_ukbench_ns_score_through_the_whole_system(stack, ukbench_images):
    same_object_in_top4 = []
    for i, path in enumerate(ukbench_images):
        reply = await stack.search(path.read_bytes(), k=4)
        assert len(reply.hits) == 4
        scores = [hit.score for hit in reply.hits]
        assert scores == sorted(scores, reverse=True)
        same_object_in_top4.append(sum(int(hit.id[4:]) // VIEWS == i // VIEWS for hit in reply.hits))
        assert reply.hits[0].metadata["category"] in {f"object-{j}" for j in range(OBJECTS)}
    ns_score = float(np.mean(same_object_in_top4))
    assert ns_score >= 3.9, f"N-S score {ns_score:.2f} (per query: {same_object_in_top4})"


async def test_repeat_query_is_served_from_cache_until_the_index_changes(stack, ukbench_images):
    image = ukbench_images[5].read_bytes()
    hits_before = metric_value(stack.registry, "vsearch_gateway_cache_hits_total", cache="result")
    first = await stack.search(image, k=7)
    assert not first.from_cache
    second = await repeat_until_cached(lambda: stack.search(image, k=7))
    assert second.embedding_from_cache
    assert [h.id for h in second.hits] == [h.id for h in first.hits]
    assert metric_value(stack.registry, "vsearch_gateway_cache_hits_total", cache="result") == hits_before + 1

    # A write moves the index generation: the cached result must not be served again.
    flipped = Image.open(io.BytesIO(image)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    flipped.save(buffer, format="JPEG", quality=92)
    summary = await add_images(stack.stub, [("ukb-05-flipped", buffer.getvalue(), {"category": "object-1"})])
    assert summary.indexed == 1
    third = await stack.search(image, k=7)
    assert not third.from_cache
    assert third.embedding_from_cache  # the query embedding does not depend on the index
    assert "ukb-05-flipped" in [hit.id for hit in third.hits]
    await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["ukb-05-flipped"]), timeout=10)
    fourth = await stack.search(image, k=7)
    assert not fourth.from_cache
    assert "ukb-05-flipped" not in [hit.id for hit in fourth.hits]


def condition(field: str, op: int, value) -> search_pb2.Condition:
    struct_value = struct_pb2.Value()
    if isinstance(value, str):
        struct_value.string_value = value
    else:
        struct_value.number_value = value
    return search_pb2.Condition(field=field, op=op, value=struct_value)


async def test_filters_are_honoured(stack, ukbench_images):
    query = ukbench_images[0].read_bytes()
    wanted = search_pb2.Filter(conditions=[
        condition("category", search_pb2.EQ, "object-3"),
        condition("price", search_pb2.LT, 14.0),
    ])
    reply = await stack.search(query, k=10, filter=wanted)
    # object-3 holds prices 12..15; only 12 and 13 are below 14.
    assert sorted(hit.id for hit in reply.hits) == ["ukb-12", "ukb-13"]
    for hit in reply.hits:
        assert hit.metadata["category"] == "object-3" and hit.metadata["price"] < 14


async def test_concurrent_searches_share_downstream_calls_and_each_gets_its_own_answer(stack, ukbench_images):
    """Searches arriving while one is being embedded go to the embedder in one call, and those with the
    same collection, k and filter to search_svc in one call: each still gets exactly its own hits."""
    queries = []
    for i, path in enumerate(ukbench_images[:12]):
        width, height = Image.open(path).size
        search_filter = search_pb2.Filter(conditions=[condition("price", search_pb2.LT, 40.0)]) if i % 3 else None
        queries.append((path.read_bytes(), search_filter, embedder_pb2.CropBox(x=0, y=0, width=width, height=height)))
    # One at a time, uncropped: the whole image, as the full-size crop below (other cache keys).
    alone = [await stack.search(data, k=5, filter=search_filter) for data, search_filter, _crop in queries]
    embedder_registry = stack.embedder_server.metrics.registry
    embed_calls = {"service": "embedder", "method": "EmbedImages", "code": "OK"}
    calls_before = metric_value(embedder_registry, "vsearch_grpc_requests_total", embed_calls)
    together = await asyncio.gather(*(
        stack.search(data, k=5, filter=search_filter, crop=crop) for data, search_filter, crop in queries))
    calls = metric_value(embedder_registry, "vsearch_grpc_requests_total", embed_calls) - calls_before
    assert not any(reply.from_cache or reply.embedding_from_cache for reply in together)
    assert [[(hit.id, hit.score) for hit in reply.hits] for reply in together] == [
        [(hit.id, hit.score) for hit in reply.hits] for reply in alone]
    assert 1 < calls < len(queries)


async def test_filter_values_with_quotes_match_literally(stack, ukbench_images):
    tricky = 'shoes" or category != "'
    summary = await add_images(stack.stub, [("tricky-item", ukbench_images[1].read_bytes(), {"category": tricky})])
    assert summary.indexed == 1
    try:
        query = ukbench_images[0].read_bytes()
        exact = await stack.search(query, k=50, filter=search_pb2.Filter(conditions=[
            condition("category", search_pb2.EQ, tricky)]))
        assert [hit.id for hit in exact.hits] == ["tricky-item"]
        for injection in ['object-1" or category != "', "object-1' or 1==1 or '", 'object-1") || (1==1', "\\"]:
            widened = await stack.search(query, k=50, filter=search_pb2.Filter(conditions=[
                condition("category", search_pb2.EQ, injection)]))
            assert list(widened.hits) == [], injection
    finally:
        await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["tricky-item"]), timeout=10)


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def filter_of(*conditions: search_pb2.Condition) -> search_pb2.Filter:
    return search_pb2.Filter(conditions=list(conditions))


def price_in(*values: float) -> search_pb2.Condition:
    listed = search_pb2.Condition(field="price", op=search_pb2.IN)
    for value in values:
        listed.value.list_value.values.add().number_value = value
    return listed


def bad_requests(jpeg: bytes) -> dict[str, tuple[dict, str]]:
    """name -> (VisualSearchRequest fields, a word the error message must contain)."""
    too_many = [condition("price", search_pb2.LT, 100.0 + n) for n in range(1000)]
    return {
        "empty bytes": ({"image": b""}, "empty"),
        "truncated jpeg": ({"image": jpeg[: len(jpeg) // 3]}, "truncated"),
        "text file": ({"image": b"just some text, not an image\n" * 20}, "image"),
        "20000x20000 png": ({"image": png_bytes(20000, 20000)}, "pixels"),
        "crop outside image": ({"image": jpeg, "crop": embedder_pb2.CropBox(x=600, y=400, width=200, height=200)},
                               "crop"),
        "k = 0": ({"image": jpeg, "k": 0}, "k"),
        "k = 100000": ({"image": jpeg, "k": 100000}, "k"),
        "unknown filter field": ({"image": jpeg, "filter": search_pb2.Filter(conditions=[
            condition("colour", search_pb2.EQ, "red")])}, "colour"),
        # NaN and infinities broke the result cache's key: INTERNAL.
        "price < NaN": ({"image": jpeg, "filter": filter_of(condition("price", search_pb2.LT, math.nan))},
                        "'price' must be finite"),
        "price < +inf": ({"image": jpeg, "filter": filter_of(condition("price", search_pb2.LT, math.inf))},
                         "'price' must be finite"),
        "price in [1, NaN]": ({"image": jpeg, "filter": filter_of(price_in(1.0, math.nan))}, "'price' must be finite"),
        "by item, price < NaN": ({"item_id": "ukb-00", "filter": filter_of(condition("price", search_pb2.LT, math.nan))},
                                 "'price' must be finite"),
        # 1000 conditions made SQLite fail ("Expression tree is too large"): INTERNAL.
        "1000 conditions": ({"image": jpeg, "filter": filter_of(*too_many)}, "at most 32 conditions, got 1000"),
        "by item, 1000 conditions": ({"item_id": "ukb-00", "filter": filter_of(*too_many)}, "at most 32 conditions"),
        "item_id with a newline": ({"item_id": "ukb-00\n"}, "item_id 'ukb-00\\n' contains a control character"),
    }


async def test_bad_inputs_are_invalid_argument_and_harm_nothing(stack, ukbench_images):
    jpeg = ukbench_images[0].read_bytes()
    count_before = await stack.count()
    for name, (fields, word) in bad_requests(jpeg).items():
        fields = {"k": 4, **fields}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Search(gateway_pb2.VisualSearchRequest(**fields), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value.details())
        assert word.lower() in caught.value.details().lower(), (name, caught.value.details())
    assert await stack.all_serving()
    assert await stack.count() == count_before
    assert len((await stack.search(jpeg, k=4)).hits) == 4


async def test_bad_inputs_over_http_are_400_with_a_json_body(stack, ukbench_images):
    jpeg = ukbench_images[0].read_bytes()
    count_before = await stack.count()
    cases = {
        "empty bytes": ({"image": ("empty.jpg", b"", "image/jpeg")}, {}, "empty"),
        "truncated jpeg": ({"image": ("t.jpg", jpeg[:4000], "image/jpeg")}, {}, "truncated"),
        "text file": ({"image": ("t.txt", b"hello " * 100, "text/plain")}, {}, "image"),
        "20000x20000 png": ({"image": ("big.png", png_bytes(20000, 20000), "image/png")}, {}, "pixels"),
        "bad crop": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"crop": "600,400,200,200"}, "crop"),
        "k = 0": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "0"}, "k"),
        "k = 100000": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "100000"}, "k"),
        "unknown filter field": ({"image": ("q.jpg", jpeg, "image/jpeg")},
                                 {"filter": '[{"field": "colour", "op": "==", "value": "red"}]'}, "colour"),
        # Was HTTP 500 "SQLITE_ERROR Expression tree is too large".
        "1000 conditions": ({"image": ("q.jpg", jpeg, "image/jpeg")},
                            {"filter": json.dumps([{"field": "price", "op": "<", "value": 100 + n} for n in range(1000)])},
                            "at most 32 conditions, got 1000"),
        "1001 values in a list": ({"image": ("q.jpg", jpeg, "image/jpeg")},
                                  {"filter": json.dumps([{"field": "price", "op": "in", "value": list(range(1001))}])},
                                  "at most 1000 values, got 1001"),
    }
    for name, (files, data, word) in cases.items():
        response = await stack.http.post("/v1/search", files=files, data=data)
        assert response.status_code == 400, (name, response.text)
        body = response.json()
        assert body["error"]["code"] == "INVALID_ARGUMENT", (name, body)
        assert word in body["error"]["message"].lower(), (name, body)
    assert await stack.all_serving()
    assert await stack.count() == count_before


async def test_bad_items_fail_alone_over_grpc_and_http(stack, ukbench_images):
    """Ids with control characters (they used to be indexed) and metadata nested deeper than the
    limit fail as items, with a message naming them; the items around them are indexed."""
    images = [path.read_bytes() for path in ukbench_images[:4]]
    too_deep = {"tree": nested(MAX_STRUCT_DEPTH)}
    count_before = await stack.count()
    summary = await add_images(stack.stub, [
        ("bad-items-0", images[0], {}), ("tab\there", images[1], {}), ("bad-items-2", images[2], too_deep),
        ("bad-items-3", images[3], {"tree": nested(MAX_STRUCT_DEPTH - 1)}),
    ])
    http_summary = None
    try:
        assert (summary.received, summary.indexed, summary.failed) == (4, 2, 2), summary
        control, deep = summary.failures
        assert (control.index, control.id) == (1, "tab\there")
        assert control.message == "id 'tab\\there' contains a control character"
        assert (deep.index, deep.id) == (2, "bad-items-2")
        assert deep.message == f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels"
        assert await stack.count() == count_before + 2

        response = await stack.http.post("/v1/images", json={"images": [
            {"id": "line\nbreak", "image_base64": base64.b64encode(images[1]).decode()},
            {"id": "bad-items-http", "image_base64": base64.b64encode(images[1]).decode(), "metadata": too_deep},
        ]})
        assert response.status_code == 200, response.text
        http_summary = response.json()
        assert (http_summary["received"], http_summary["indexed"], http_summary["failed"]) == (2, 0, 2)
        assert [failure["message"] for failure in http_summary["failures"]] == [
            "id 'line\\nbreak' contains a control character", f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels",
        ]
        response = await stack.http.post("/v1/search", json={"item_id": "line\nbreak"})
        assert response.status_code == 400 and "control character" in response.json()["error"]["message"]
        assert await stack.count() == count_before + 2
    finally:
        await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["bad-items-0", "bad-items-3"]), timeout=30)


def nested(depth: int) -> object:
    """A value `depth` levels of objects and lists deep."""
    value: object = "leaf"
    for level in range(depth):
        value = {"next": value} if level % 2 else [value]
    return value


async def test_re_adding_unchanged_items_writes_nothing_and_changed_ones_are_updated(stack, ukbench_images):
    items = [
        (f"ukb-{i:02d}", path.read_bytes(), {"category": f"object-{i // VIEWS}", "price": float(i), "path": path.name})
        for i, path in enumerate(ukbench_images[:6])
    ]
    generation_before = (await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)).index_generation
    again = await add_images(stack.stub, items)
    assert (again.received, again.indexed, again.unchanged, again.failed) == (6, 0, 6, 0)
    assert again.index_generation == generation_before  # nothing written, cached results stay valid

    renamed = [(item_id, data, {**metadata, "price": 99.5}) for item_id, data, metadata in items[:2]]
    updated = await add_images(stack.stub, renamed)
    try:
        assert (updated.indexed, updated.unchanged) == (2, 0)
        assert await stack.count() == 56
        reply = await stack.search(items[0][1], k=1)
        assert reply.hits[0].id == "ukb-00" and reply.hits[0].metadata["price"] == 99.5
    finally:
        await add_images(stack.stub, items[:2])


async def test_a_repeated_id_in_one_stream_keeps_the_last_item(stack, ukbench_images):
    # More items than one embedder batch, so batches are in flight together when the id repeats.
    images = [path.read_bytes() for path in ukbench_images[:40]]
    items = [(f"stream-{i}", data, {"n": i}) for i, data in enumerate(images[:39])]
    items.append(("stream-3", images[39], {"n": "last"}))
    count_before = await stack.count()
    summary = await add_images(stack.stub, items)
    try:
        # 39 distinct ids were stored; the first stream-3, overwritten by the last, changed nothing.
        assert (summary.received, summary.indexed, summary.unchanged, summary.failed) == (40, 39, 1, 0)
        assert await stack.count() == count_before + summary.indexed
        # ukb-39 holds the same image, so both score 1.0.
        reply = await stack.search(images[39], k=2)
        hit = next(hit for hit in reply.hits if hit.id == "stream-3")
        assert hit.metadata["n"] == "last" and hit.score > 0.999
    finally:
        await stack.stub.DeleteImages(
            gateway_pb2.DeleteImagesRequest(ids=[item_id for item_id, _, _ in items]), timeout=30)


async def test_collections_are_separate_catalogs_through_the_gateway(stack, ukbench_images):
    def requests():
        for i, path in enumerate(ukbench_images[:8]):
            yield gateway_pb2.AddImageRequest(
                id=f"c-{i}", image=path.read_bytes(), collection="gateway_test" if i == 0 else "")

    summary = await stack.stub.AddImages(requests(), timeout=60)
    assert summary.indexed == 8
    stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection="gateway_test"), timeout=10)
    assert stats.count == 8 and await stack.count() == 56
    reply = await stack.search(ukbench_images[0].read_bytes(), k=4, collection="gateway_test")
    assert {hit.id for hit in reply.hits} == {"c-0", "c-1", "c-2", "c-3"}
    by_id = await stack.stub.Search(
        gateway_pb2.VisualSearchRequest(item_id="c-0", k=1, collection="gateway_test"), timeout=10)
    assert by_id.hits[0].id == "c-0"
    dropped = await stack.stub.DropCollection(search_pb2.DropCollectionRequest(collection="gateway_test"), timeout=30)
    assert dropped.dropped
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.search(ukbench_images[0].read_bytes(), k=4, collection="gateway_test")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Search(
            gateway_pb2.VisualSearchRequest(item_id="c-0", k=1, collection="gateway_test"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no item with id 'c-0' in collection 'gateway_test'"
    response = await stack.http.get("/v1/stats", params={"collection": "gateway_test"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"
    assert await stack.count() == 56


async def test_web_page_searches_by_upload_and_shows_errors(stack, ukbench_images, tmp_path):
    from playwright.async_api import async_playwright, expect

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed (scripts/setup installs Debian's chromium)")
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image at all")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
            await expect(page.locator("#model")).to_contain_text("56 images")
            await page.set_input_files("#file", str(ukbench_images[4]))
            await page.click("#go")
            await expect(page.locator(".hit")).to_have_count(12)
            ids = await page.locator(".hit").evaluate_all("cards => cards.map(card => card.dataset.id)")
            assert set(ids[:4]) == {"ukb-04", "ukb-05", "ukb-06", "ukb-07"}
            await expect(page.locator("#status")).to_contain_text("12 hits")
            await page.screenshot(path=str(tmp_path / "results.png"), full_page=True)

            await page.set_input_files("#file", str(text_file))
            await page.click("#go")
            await expect(page.locator("#status.error")).to_contain_text("INVALID_ARGUMENT")
        finally:
            await browser.close()


async def test_gateway_serves_image_files_only_from_its_roots(stack, ukbench_images, tmp_path):
    image = ukbench_images[3]
    response = await stack.http.get("/v1/files", params={"uri": image.resolve().as_uri()})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == image.read_bytes()
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(image.read_bytes())
    escape = image.parent / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd"
    for uri in (outside.as_uri(), "file:///etc/passwd", escape.as_uri(), image.parent.as_uri(),
                (image.parent / "missing.jpg").as_uri()):
        response = await stack.http.get("/v1/files", params={"uri": uri})
        assert response.status_code == 404, uri
        assert response.json()["error"]["code"] == "NOT_FOUND"
    response = await stack.http.get("/v1/files", params={"uri": "https://example.com/a.jpg"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT"


async def test_searches_go_on_when_redis_is_killed(stack, ukbench_images):
    errors_before = metric_value(stack.registry, "vsearch_gateway_cache_errors_total")
    first = await stack.search(ukbench_images[8].read_bytes(), k=4)
    assert len(first.hits) == 4
    stack.redis.kill()
    for path in ukbench_images[8:16]:
        reply = await asyncio.wait_for(stack.search(path.read_bytes(), k=4), timeout=10)
        assert len(reply.hits) == 4
        assert not reply.from_cache
    again = await stack.search(ukbench_images[8].read_bytes(), k=4)
    assert [h.id for h in again.hits] == [h.id for h in first.hits]
    assert metric_value(stack.registry, "vsearch_gateway_cache_errors_total") > errors_before
    assert await stack.all_serving()
