"""SearchBatch (gRPC) and POST /v1/search/batch through the real stack: each query answered as Search answers
it, in order, a bad one failing alone; the batch's own limits; every query charged to the caller's search
rate limit; and the scopes of the new calls (SearchBatch, ListCollections, DELETE /v1/collections/{name})."""

from __future__ import annotations

import base64
import math

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import SEARCH_BACKENDS, in_process_stack
from gateway.api_keys import new_key
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

INDEXED = 8
OK, INVALID, NOT_FOUND = (code.value[0] for code in (
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND))


async def index(stub: gateway_pb2_grpc.VisualSearchStub, ukbench_bytes: list[bytes]) -> None:
    summary = await stub.AddImages(
        iter([gateway_pb2.AddImageRequest(id=f"b-{n}", image=ukbench_bytes[n]) for n in range(INDEXED)]), timeout=120)
    assert summary.indexed == INDEXED, summary


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, ukbench_bytes):
    async with in_process_stack(tmp_path_factory.mktemp(f"batch-{request.param}"), mobilenet_dir,
                                backend=request.param) as stack:
        await index(stack.stub, ukbench_bytes)
        yield stack


def ids(response: gateway_pb2.VisualSearchResponse) -> list[str]:
    return [hit.id for hit in response.hits]


async def test_grpc_batch_answers_each_query_as_search_does_and_a_bad_one_alone(stack, ukbench_bytes):
    unknown_field = search_pb2.Filter(conditions=[search_pb2.Condition(field="colour", op=search_pb2.EQ)])
    unknown_field.conditions[0].value.string_value = "red"
    queries = [
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[1], k=3),
        gateway_pb2.VisualSearchRequest(item_id="nope", k=3),
        gateway_pb2.VisualSearchRequest(item_id="b-2", k=3, filter=unknown_field),
        gateway_pb2.VisualSearchRequest(item_id="b-5", k=4),
        gateway_pb2.VisualSearchRequest(image=b"not an image", k=3),
    ]
    reply = await stack.stub.SearchBatch(gateway_pb2.VisualSearchBatchRequest(queries=queries), timeout=60)
    assert [result.code for result in reply.results] == [OK, NOT_FOUND, INVALID, OK, INVALID]
    assert "nope" in reply.results[1].message and "colour" in reply.results[2].message
    assert not reply.results[1].HasField("response") and reply.results[4].message
    for position in (0, 3):
        alone = await stack.stub.Search(queries[position], timeout=60)
        assert ids(reply.results[position].response) == ids(alone)
    # A query of a batch pages as Search does.
    token = reply.results[3].response.next_page_token
    assert token
    paged = await stack.stub.SearchBatch(gateway_pb2.VisualSearchBatchRequest(queries=[
        gateway_pb2.VisualSearchRequest(item_id="b-5", k=4, page_token=token)]), timeout=60)
    whole = await stack.stub.Search(gateway_pb2.VisualSearchRequest(item_id="b-5", k=8), timeout=60)
    assert ids(reply.results[3].response) + ids(paged.results[0].response) == ids(whole)


async def test_a_batch_of_none_or_too_many_queries_is_refused_whole(stack):
    for count in (0, 33):
        batch = gateway_pb2.VisualSearchBatchRequest(
            queries=[gateway_pb2.VisualSearchRequest(item_id="b-0", k=1)] * count)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.SearchBatch(batch, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "queries" in caught.value.details()
        refused = await stack.http.post("/v1/search/batch", json={"queries": [{"item_id": "b-0"}] * count})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_ARGUMENT", refused.text
        assert "GATEWAY_MAX_BATCH_QUERIES" in refused.json()["error"]["message"] or count == 0
    assert len((await stack.stub.SearchBatch(gateway_pb2.VisualSearchBatchRequest(
        queries=[gateway_pb2.VisualSearchRequest(item_id="b-0", k=1)] * 32), timeout=120)).results) == 32
    for body, word in (({"queries": "b-0"}, "queries"), ({"query": []}, "query"), ({}, "queries")):
        refused = await stack.http.post("/v1/search/batch", json=body)
        assert refused.status_code == 400 and word in refused.json()["error"]["message"], refused.text
    # A multipart batch takes its query images as `images`; `image` is search's field, not the batch's.
    refused = await stack.http.post("/v1/search/batch", files={"image": ("q.jpg", b"x", "image/jpeg")})
    assert refused.status_code == 400 and "unknown form field(s) image" in refused.json()["error"]["message"]
    refused = await stack.http.post("/v1/search/batch", data={"k": "3"}, files={"x": ("q.jpg", b"x", "image/jpeg")})
    assert refused.status_code == 400 and "unknown form field(s) x" in refused.json()["error"]["message"]
    refused = await stack.http.post("/v1/search/batch", files=[("images", ("q.jpg", b"x", "image/jpeg"))] * 33)
    assert refused.status_code == 400 and "GATEWAY_MAX_BATCH_QUERIES" in refused.json()["error"]["message"]
    refused = await stack.http.post("/v1/search/batch", content=b"queries", headers={"content-type": "text/plain"})
    assert refused.status_code == 400 and "application/json or multipart/form-data" in refused.json()["error"]["message"]


async def test_http_multipart_batch_searches_each_image_with_the_same_options(stack, ukbench_bytes):
    files = [("images", (f"q{n}.jpg", ukbench_bytes[n], "image/jpeg")) for n in (0, 4)]
    files.append(("images", ("bad.jpg", b"not an image", "image/jpeg")))
    reply = await stack.http.post("/v1/search/batch", data={"k": "2", "mode": "similar"}, files=files)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [set(result) for result in results] == [{"response"}, {"response"}, {"error"}]
    for n, result in zip((0, 4), results):
        alone = (await stack.http.post("/v1/search", data={"k": "2"},
                                       files={"image": ("q.jpg", ukbench_bytes[n], "image/jpeg")})).json()
        assert [hit["id"] for hit in result["response"]["hits"]] == [hit["id"] for hit in alone["hits"]]
        assert len(alone["hits"]) == 2
    assert results[2]["error"]["code"] == "INVALID_ARGUMENT"


async def test_http_batch_results_hold_a_response_or_an_error_each(stack, ukbench_bytes):
    good = {"image_base64": base64.b64encode(ukbench_bytes[6]).decode(), "k": 3}
    reply = await stack.http.post("/v1/search/batch", json={"queries": [
        good, {"image_base64": "!!not base64"}, {"item_id": "nope"}, {"item_id": "b-1", "k": "three"},
        {"item_id": "b-1", "k": 2, "filter": {"category": "none"}}, 5,
    ]})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [set(result) for result in results] == [{"response"}, {"error"}, {"error"}, {"error"}, {"response"}, {"error"}]
    alone = (await stack.http.post("/v1/search", json=good)).json()
    assert [hit["id"] for hit in results[0]["response"]["hits"]] == [hit["id"] for hit in alone["hits"]]
    assert set(results[0]["response"]) == set(alone)  # the very shape of /v1/search's answer
    assert results[1]["error"]["code"] == "INVALID_ARGUMENT" and "queries[1]" in results[1]["error"]["message"]
    assert results[2]["error"]["code"] == "NOT_FOUND" and "nope" in results[2]["error"]["message"]
    assert results[3]["error"]["code"] == "INVALID_ARGUMENT" and "queries[3].k" in results[3]["error"]["message"]
    assert results[4]["response"]["hits"] == []  # nothing has that category
    assert results[5]["error"]["code"] == "INVALID_ARGUMENT"


async def test_openapi_documents_the_new_routes(stack):
    spec = (await stack.http.get("/openapi.json")).json()
    assert {"/v1/search/batch", "/v1/collections", "/v1/collections/{name}"} <= set(spec["paths"])
    batch = spec["paths"]["/v1/search/batch"]["post"]["requestBody"]["content"]
    assert set(batch) == {"application/json", "multipart/form-data"}
    assert "images" in batch["multipart/form-data"]["schema"]["properties"]
    assert batch["application/json"]["schema"]["$ref"] == "#/components/schemas/SearchBatchBody"
    schemas = spec["components"]["schemas"]
    assert {"SearchBatchBody", "SearchBatchResponseBody", "CollectionsResponseBody", "FieldSummaryBody"} <= set(schemas)
    assert "page_token" in schemas["SearchBody"]["properties"]
    assert "next_page_token" in schemas["SearchResponseBody"]["properties"]
    assert {"collection", "on_copy", "regions"} <= set(schemas["AddImagesBody"]["properties"])


# ---- API keys: scopes and rate limits -------------------------------------------------------------

SEARCHES_PER_S = 0.2  # a token every 5 s: nothing refills while a test runs
BURST = 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A keys file as `vsearch keys create` writes it (gateway/api_keys.py's format), and its keys by name."""
    path = tmp_path_factory.mktemp("keys") / "api-keys.jsonl"
    scopes = {"alice": "search", "bob": "search", "carol": "search", "writer": "write", "operator": "admin"}
    made = {name: new_key(name, [scope]) for name, scope in scopes.items()}
    path.write_text("".join(entry.json_line() + "\n" for _, entry in made.values()))
    return path, {name: key for name, (key, _) in made.items()}


@pytest.fixture(scope="module")
async def keyed(tmp_path_factory, mobilenet_dir, ukbench_bytes, keys):
    keys_file, _ = keys
    async with in_process_stack(
        tmp_path_factory.mktemp("batch-keys"), mobilenet_dir, internal_port=0, auth={"keys_file": keys_file},
        rate_limit={"search_per_s": SEARCHES_PER_S, "burst": BURST},
    ) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
            await index(gateway_pb2_grpc.VisualSearchStub(channel), ukbench_bytes)
        yield stack


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def batch_of(count: int) -> gateway_pb2.VisualSearchBatchRequest:
    return gateway_pb2.VisualSearchBatchRequest(queries=[gateway_pb2.VisualSearchRequest(item_id="b-0", k=1)] * count)


async def test_each_query_of_a_batch_is_charged_to_the_search_limit(keyed, keys):
    _, made = keys
    reply = await keyed.stub.SearchBatch(batch_of(2), timeout=60, metadata=bearer(made["alice"]))
    assert [result.code for result in reply.results] == [OK, OK]
    # One search left in the bucket: the second query is refused, alone.
    reply = await keyed.stub.SearchBatch(batch_of(2), timeout=60, metadata=bearer(made["alice"]))
    assert [result.code for result in reply.results] == [OK, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert "over its search limit" in reply.results[1].message
    # None left: the call itself is refused, as Search is, with when to retry.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keyed.stub.SearchBatch(batch_of(1), timeout=60, metadata=bearer(made["alice"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert rpc_status.from_call(caught.value).details[0].Unpack(retry) and retry.retry_delay.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keyed.stub.Search(gateway_pb2.VisualSearchRequest(item_id="b-0"), timeout=60, metadata=bearer(made["alice"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    headers = {"X-API-Key": made["bob"]}
    body = {"queries": [{"item_id": "b-1", "k": 1}] * 2}
    assert [set(result) for result in (await keyed.http.post("/v1/search/batch", json=body, headers=headers)).json()[
        "results"]] == [{"response"}] * 2
    results = (await keyed.http.post("/v1/search/batch", json=body, headers=headers)).json()["results"]
    assert set(results[0]) == {"response"} and results[1]["error"]["code"] == "RESOURCE_EXHAUSTED"
    refused = await keyed.http.post("/v1/search/batch", json=body, headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert 1 <= int(refused.headers["retry-after"]) <= math.ceil(1 / SEARCHES_PER_S)


async def rpc_code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_scopes_of_batch_and_collections(keyed, keys):
    _, made = keys
    searcher, writer, operator = made["carol"], made["writer"], made["operator"]
    collections = search_pb2.ListCollectionsRequest()
    assert await rpc_code(keyed.stub.SearchBatch(batch_of(1), timeout=60, metadata=bearer(searcher))) == grpc.StatusCode.OK
    assert await rpc_code(keyed.stub.ListCollections(collections, timeout=60, metadata=bearer(searcher))) == grpc.StatusCode.OK
    for call in (keyed.stub.SearchBatch(batch_of(1), timeout=60, metadata=bearer(writer)),
                 keyed.stub.ListCollections(collections, timeout=60, metadata=bearer(writer)),
                 keyed.stub.DropCollection(search_pb2.DropCollectionRequest(collection="x"), timeout=60,
                                           metadata=bearer(searcher))):
        assert await rpc_code(call) == grpc.StatusCode.PERMISSION_DENIED
    assert await rpc_code(keyed.stub.ListCollections(collections, timeout=60)) == grpc.StatusCode.UNAUTHENTICATED

    def http(key: str | None):
        return {"X-API-Key": key} if key else {}

    assert (await keyed.http.get("/v1/collections", headers=http(searcher))).status_code == 200
    for method, path, key, status in [
        ("GET", "/v1/collections", writer, 403), ("GET", "/v1/collections", None, 401),
        ("POST", "/v1/search/batch", writer, 403), ("DELETE", "/v1/collections/x", searcher, 403),
        ("DELETE", "/v1/collections/x", writer, 403), ("DELETE", "/v1/collections/x", operator, 404),
    ]:
        response = await keyed.http.request(method, path, headers=http(key),
                                            json={"queries": [{"item_id": "b-0"}]} if method == "POST" else None)
        assert response.status_code == status, (method, path, response.text)
