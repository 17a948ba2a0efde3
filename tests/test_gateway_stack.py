"""The gateway's HTTP/JSON API and web page over the real stack, in-process: embedder (ONNX) -> search_svc
behind the gateway, with a real redis-server as the cache; every test runs on both search backends (the
default FAISS store, and a Milvus Lite file)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from conftest import SEARCH_BACKENDS, encode, in_process_stack, metric_value, repeat_until_cached, wait_until
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc

VIEWS = 4
INDEXED = 12  # ukbench objects 0..2, four views each


def image_id(position: int) -> str:
    return f"g-{position:02d}"


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, ukbench_bytes):
    # Generous for a loaded 2-core test machine; the timeout's effect is tested in test_gateway_cache.
    async with in_process_stack(
        tmp_path_factory.mktemp(f"gateway-stack-{request.param}"), mobilenet_dir, backend=request.param,
        cache={"redis_timeout_s": 0.5},
    ) as stack:
        # Indexed through the HTTP multipart endpoint itself.
        files = [("images", (f"{n}.jpg", ukbench_bytes[n], "image/jpeg")) for n in range(INDEXED)]
        response = await stack.http.post("/v1/images", files=files, data={
            "ids": json.dumps([image_id(n) for n in range(INDEXED)]),
            "metadata": json.dumps([{"category": f"object-{n // VIEWS}", "price": float(n)} for n in range(INDEXED)]),
            "image_uris": json.dumps([f"https://images.example/{n}.jpg" for n in range(INDEXED)]),
        })
        assert response.status_code == 200, response.text
        summary = response.json()
        assert (summary["received"], summary["indexed"], summary["failed"]) == (INDEXED, INDEXED, 0), summary
        yield stack


def assert_error(response: httpx.Response, status: int, code: str, word: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert word in body["error"]["message"].lower(), body


async def test_health_page_docs_and_openapi(stack):
    health = await stack.http.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})
    page = await stack.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>vsearch</title>" in page.text and "/v1/search" in page.text
    assert "<script src" not in page.text and "<link" not in page.text  # self-contained: nothing fetched
    assert (await stack.http.get("/docs")).status_code == 200
    spec = (await stack.http.get("/openapi.json")).json()
    paths = {"/v1/search", "/v1/images", "/v1/images/{image_id}", "/v1/stats", "/healthz", "/metrics"}
    assert paths <= set(spec["paths"])
    search_body = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(search_body)
    assert "SearchBody" in spec["components"]["schemas"] and "ConditionBody" in spec["components"]["schemas"]
    assert all("422" not in op["responses"] for ops in spec["paths"].values() for op in ops.values())


async def test_multipart_search_finds_the_other_views_of_the_object(stack, ukbench_bytes):
    response = await stack.search_file(ukbench_bytes[5], k="4")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [hit["id"] for hit in body["hits"]][0] == image_id(5)
    assert {hit["id"] for hit in body["hits"]} == {image_id(n) for n in range(4, 8)}
    scores = [hit["score"] for hit in body["hits"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99
    first = body["hits"][0]
    assert first["image_uri"] == "https://images.example/5.jpg"
    assert first["metadata"] == {"category": "object-1", "price": 5.0}
    assert body["model_version"] and body["index_generation"] > 0
    assert set(body["timing"]) == {"embed_ms", "search_ms", "total_ms"} and body["timing"]["total_ms"] > 0


async def test_base64_json_search_with_crop_filter_and_min_score(stack, ukbench_bytes):
    image = Image.open(io.BytesIO(ukbench_bytes[9]))
    response = await stack.http.post("/v1/search", json={
        "image_base64": base64.b64encode(ukbench_bytes[9]).decode(),
        "k": 10,
        "crop": {"x": 0, "y": 0, "width": image.width * 3 // 4, "height": image.height * 3 // 4},
        "filter": [{"field": "category", "op": "in", "value": ["object-2", "object-0"]},
                   {"field": "price", "op": ">=", "value": 8}],
        "min_score": 0.2,
    })
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert hits and hits[0]["id"] == image_id(9)
    assert all(hit["metadata"]["category"] == "object-2" and hit["score"] >= 0.2 for hit in hits)

    shorthand = await stack.http.post("/v1/search", json={
        "image_base64": base64.b64encode(ukbench_bytes[9]).decode(), "filter": {"category": "object-0"},
    })
    assert shorthand.status_code == 200, shorthand.text
    assert {hit["id"] for hit in shorthand.json()["hits"]} == {image_id(n) for n in range(4)}


async def test_item_id_search_uses_the_stored_vector(stack):
    response = await stack.http.post("/v1/search", json={"item_id": image_id(2), "k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hits"][0]["id"] == image_id(2) and body["embedding_from_cache"] is True
    assert {hit["id"] for hit in body["hits"]} == {image_id(n) for n in range(4)}
    by_form = await stack.http.post("/v1/search", data={"item_id": image_id(2), "k": "4"})
    assert [hit["id"] for hit in by_form.json()["hits"]] == [hit["id"] for hit in body["hits"]]
    unknown = await stack.http.post("/v1/search", json={"item_id": "no-such-item"})
    assert_error(unknown, 404, "NOT_FOUND", "no-such-item")


async def test_repeat_is_cached_until_an_add_or_delete_through_http(stack, ukbench_bytes):
    query = ukbench_bytes[10]
    hits_before = metric_value(stack.registry, "vsearch_gateway_cache_hits_total", cache="result")

    async def search_k6() -> dict:
        return (await stack.search_file(query, k="6")).json()

    first = await search_k6()
    assert not first["from_cache"] and not first["embedding_from_cache"]
    second = await repeat_until_cached(search_k6, cached=lambda body: body["from_cache"])
    assert second["embedding_from_cache"]
    assert second["hits"] == first["hits"] and second["index_generation"] == first["index_generation"]
    assert metric_value(stack.registry, "vsearch_gateway_cache_hits_total", cache="result") == hits_before + 1
    # A different k is a different result.
    assert not (await stack.search_file(query, k="5")).json()["from_cache"]

    mirrored = encode(Image.open(io.BytesIO(query)).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=90)
    added = await stack.http.post("/v1/images", json={"images": [
        {"image_base64": base64.b64encode(mirrored).decode(), "id": "mirrored-10",
         "metadata": {"category": "object-2"}},
        {"image_base64": base64.b64encode(b"not an image at all").decode(), "id": "junk"},
    ]})
    assert added.status_code == 200, added.text
    summary = added.json()
    assert (summary["received"], summary["indexed"], summary["failed"]) == (2, 1, 1)
    assert summary["failures"][0]["id"] == "junk" and summary["failures"][0]["code"] == "INVALID_ARGUMENT"
    assert summary["failures"][0]["index"] == 1 and "image" in summary["failures"][0]["message"]
    assert summary["index_generation"] != first["index_generation"]

    third = (await stack.search_file(query, k="6")).json()
    assert not third["from_cache"] and third["embedding_from_cache"]
    assert "mirrored-10" in [hit["id"] for hit in third["hits"]]
    assert third["index_generation"] == summary["index_generation"]

    deleted = await stack.http.delete("/v1/images/mirrored-10")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == 1
    assert_error(await stack.http.delete("/v1/images/mirrored-10"), 404, "NOT_FOUND", "mirrored-10")
    fourth = (await stack.search_file(query, k="6")).json()
    assert not fourth["from_cache"]
    assert [hit["id"] for hit in fourth["hits"]] == [hit["id"] for hit in first["hits"]]


async def test_ids_with_slashes_and_spaces_round_trip(stack, ukbench_bytes):
    item_id = "catalog/shoes/red 1.jpg"
    added = await stack.http.post("/v1/images", json={"images": [
        {"image_base64": base64.b64encode(ukbench_bytes[20]).decode(), "id": item_id, "metadata": {"category": "x"}},
    ]})
    assert added.status_code == 200 and added.json()["indexed"] == 1, added.text
    found = await stack.http.post("/v1/search", json={"item_id": item_id, "k": 1})
    assert [hit["id"] for hit in found.json()["hits"]] == [item_id]
    deleted = await stack.http.delete("/v1/images/catalog%2Fshoes%2Fred%201.jpg")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == 1, deleted.text


async def test_bad_input_is_400_with_a_json_error(stack, ukbench_bytes):
    jpeg = ukbench_bytes[0]
    as_form = {
        "empty image": ({"image": ("e.jpg", b"", "image/jpeg")}, {}, "empty"),
        "text file": ({"image": ("t.txt", b"hello, not an image\n" * 50, "text/plain")}, {}, "image"),
        "k = 0": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "0"}, "k"),
        "k = 100000": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "100000"}, "k"),
        "k not a number": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "ten"}, "k"),
        "zero-width crop": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"crop": "0,0,0,10"}, "crop"),
        "crop outside image": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"crop": "5000,5000,10,10"}, "crop"),
        "malformed crop": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"crop": "1,2,3"}, "crop"),
        "unknown filter field": ({"image": ("q.jpg", jpeg, "image/jpeg")},
                                 {"filter": '[{"field": "colour", "op": "==", "value": "red"}]'}, "colour"),
        "unknown filter op": ({"image": ("q.jpg", jpeg, "image/jpeg")},
                              {"filter": '[{"field": "category", "op": "~", "value": "x"}]'}, "op"),
        "malformed filter JSON": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"filter": "[{"}, "json"),
        "unknown form field": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"colour": "red"}, "colour"),
        "no image": ({}, {"k": "3"}, "image"),
        "k with underscores": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": "1_0"}, "k"),
        "min_score not finite": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"min_score": "nan"}, "min_score"),
        "two images": ([("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", ukbench_bytes[1], "image/jpeg"))],
                       {}, "'image' was sent 2 times"),
        "k twice": ({"image": ("q.jpg", jpeg, "image/jpeg")}, {"k": ["3", "4"]}, "'k' was sent 2 times"),
    }
    for name, (files, data, word) in as_form.items():
        response = await stack.http.post("/v1/search", files=files or None, data=data)
        assert response.status_code == 400, (name, response.text)
        assert_error(response, 400, "INVALID_ARGUMENT", word)

    as_json = {
        "malformed JSON": (b'{"image_base64": ', "malformed json"),
        "bad base64": (json.dumps({"image_base64": "***"}).encode(), "base64"),
        "unknown field": (json.dumps({"item_id": "g-00", "colour": "red"}).encode(), "colour"),
        "k = 0": (json.dumps({"item_id": "g-00", "k": 0}).encode(), "k"),
        "negative crop": (
            json.dumps({"image_base64": "aGk=", "crop": {"x": -1, "width": 5, "height": 5}}).encode(), "crop"
        ),
        "image and item_id": (json.dumps({"image_base64": "aGk=", "item_id": "g-00"}).encode(), "not both"),
        "neither": (b"{}", "image"),
        "not an object": (b"[1, 2]", "request body"),
        "filter of the wrong shape": (json.dumps({"item_id": "g-00", "filter": "category"}).encode(), "filter"),
        # Booleans, strings and fractions are not integers (pydantic's lax mode reads `true` as 1).
        "k true": (json.dumps({"item_id": "g-00", "k": True}).encode(), "k: input should be a valid integer"),
        "k as text": (json.dumps({"item_id": "g-00", "k": "3"}).encode(), "k: input should be a valid integer"),
        "k fractional": (json.dumps({"item_id": "g-00", "k": 2.5}).encode(), "k: input should be a valid integer"),
        "min_score true": (json.dumps({"item_id": "g-00", "min_score": True}).encode(), "min_score"),
        "min_score NaN": (b'{"item_id": "g-00", "min_score": NaN}', "min_score"),
        "crop width true": (
            json.dumps({"image_base64": "aGk=", "crop": {"width": True, "height": 5}}).encode(), "crop.width"
        ),
        "crop x as text": (
            json.dumps({"image_base64": "aGk=", "crop": {"x": "1", "width": 5, "height": 5}}).encode(), "crop.x"
        ),
    }
    for name, (content, word) in as_json.items():
        response = await stack.http.post("/v1/search", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (name, response.text)
        assert_error(response, 400, "INVALID_ARGUMENT", word)

    assert_error(await stack.http.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}),
                 400, "INVALID_ARGUMENT", "multipart")
    no_image = await stack.http.post("/v1/images", json={"images": [{"id": "x"}]})
    assert_error(no_image, 400, "INVALID_ARGUMENT", "image_base64")
    bad_base64 = await stack.http.post("/v1/images", json={"images": [{"image_base64": "%%"}]})
    assert_error(bad_base64, 400, "INVALID_ARGUMENT", "images[0].image_base64")
    ids_twice = await stack.http.post("/v1/images", files=[("images", ("a.jpg", jpeg, "image/jpeg"))],
                                      data={"ids": ['["x"]', '["y"]']})
    assert_error(ids_twice, 400, "INVALID_ARGUMENT", "'ids' was sent 2 times")
    assert_error(await stack.http.get("/v1/nothing-here"), 404, "NOT_FOUND", "not found")
    # Nothing above reached the index.
    assert (await stack.http.get("/v1/stats")).json()["count"] == INDEXED


async def test_stats_and_metrics(stack):
    stats = (await stack.http.get("/v1/stats")).json()
    assert stats["count"] == INDEXED
    assert stats["dimension"] == 1280 and stats["model_name"] == "mobilenetv2-12-int8" and stats["model_version"]
    assert "category" in stats["filterable_fields"] and stats["index_generation"] > 0
    metrics = await stack.http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("vsearch_gateway_cache_hits_total", "vsearch_gateway_cache_misses_total",
                 "vsearch_gateway_cache_errors_total", 'vsearch_http_requests_total{method="POST",route="/v1/search"'):
        assert name in metrics.text, name


async def test_body_limit_and_drain_of_a_second_gateway(stack, ukbench_bytes):
    gateway, _ = await create_gateway(GatewaySettings(
        embedder_address=stack.embedder_server.address, search_address=stack.search_server.address, port=0, http_port=0,
        http_max_body_bytes=4096,
    ))
    await gateway.start()
    await gateway.wait_ready(30)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
        small = await http.post("/v1/search", json={"item_id": image_id(0), "k": 2})
        assert small.status_code == 200 and not small.json()["from_cache"]  # its own, in-process cache
        big = base64.b64encode(ukbench_bytes[0]).decode()
        assert_error(await http.post("/v1/search", json={"image_base64": big}), 413, "RESOURCE_EXHAUSTED", "4096")

        async def chunked():  # no Content-Length: counted while it is read
            for _ in range(10):
                yield b" " * 1000

        assert_error(await http.post("/v1/search", content=chunked(), headers={"content-type": "application/json"}),
                     413, "RESOURCE_EXHAUSTED", "4096")

        # A drain long enough for the checks below on a slow machine; the stop waits it out.
        stopping = asyncio.create_task(gateway.stop(grace=1, drain=3.0))

        async def healthz_unready() -> bool:
            return (await http.get("/healthz")).status_code == 503

        async def grpc_not_serving() -> bool:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        # Draining: both still answer (a refused connection raises), neither says ready.
        await wait_until(healthz_unready, 3, "/healthz 503 while draining")
        await wait_until(grpc_not_serving, 3, "gRPC health NOT_SERVING while draining")
        await stopping
        with pytest.raises(httpx.TransportError):
            await http.get("/healthz")


async def test_an_api_key_guards_the_http_api_and_grpc_but_not_probes(stack):
    """GATEWAY_API_KEY alone: one key with every scope, on both protocols (scoped keys from a keys file:
    tests/test_gateway_auth.py)."""
    gateway, _ = await create_gateway(GatewaySettings(
        embedder_address=stack.embedder_server.address, search_address=stack.search_server.address, port=0, http_port=0,
        api_key="s3cret-key",
    ))
    await gateway.start()
    try:
        await gateway.wait_ready(30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
            assert_error(await http.get("/v1/stats"), 401, "UNAUTHENTICATED", "missing")
            assert_error(await http.get("/v1/stats", headers={"X-API-Key": "s3cret-kez"}), 401, "UNAUTHENTICATED", "wrong")
            assert_error(await http.post("/v1/search", json={"item_id": image_id(0)}), 401, "UNAUTHENTICATED", "key")
            assert (await http.get("/v1/stats", headers={"X-API-Key": "s3cret-key"})).status_code == 200
            bearer = await http.post("/v1/search", json={"item_id": image_id(0), "k": 2},
                                     headers={"Authorization": "Bearer s3cret-key"})
            assert bearer.status_code == 200 and len(bearer.json()["hits"]) == 2
            for open_path in ("/healthz", "/metrics", "/", "/openapi.json"):
                assert (await http.get(open_path)).status_code == 200, open_path
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.VisualSearchStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing" in caught.value.details()
            for metadata in ((("authorization", "Bearer s3cret-key"),), (("x-api-key", "s3cret-key"),)):
                assert (await stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10, metadata=metadata)).count
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gateway.stop(grace=1)
