"""Bad input, class by class, through both front doors of a real `vsearch up` stack: gRPC and HTTP,
search and add (and delete). For every class: the precise status (never INTERNAL, UNKNOWN or 500),
a message that names the problem, every service still SERVING afterwards, and the catalog as it was.

Each row of `CLASSES` is one kind of bad input; a row may have a gRPC form, an HTTP form, or both."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import length_delimited, nested_struct_bytes, single_colour_png, vsearch_up
from vsearch.v1 import embedder_pb2, gateway_pb2, gateway_pb2_grpc, search_pb2

CATALOG = 8
INDEXED_ID = "item-0"
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
               "RESOURCE_EXHAUSTED": 413}
NEVER = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"}


# ---- building blocks of bad requests ------------------------------------------------------------


def condition(field: str, op: int, value: Any) -> search_pb2.Condition:
    proto_value = struct_pb2.Value()
    if isinstance(value, float):
        proto_value.number_value = value  # NaN and infinities pass through as they are
    elif isinstance(value, list):
        proto_value.list_value.extend(value)
    elif isinstance(value, dict):
        proto_value.struct_value.update(value)
    elif value is None:
        proto_value.null_value = struct_pb2.NULL_VALUE
    else:
        proto_value.string_value = value
    return search_pb2.Condition(field=field, op=op, value=proto_value)


def a_filter(*conditions: search_pb2.Condition) -> search_pb2.Filter:
    return search_pb2.Filter(conditions=list(conditions))


def crop(x: int, y: int, width: int, height: int) -> embedder_pb2.CropBox:
    return embedder_pb2.CropBox(x=x, y=y, width=width, height=height)


@dataclass(frozen=True)
class Images:
    jpeg: bytes
    truncated: bytes
    bomb: bytes
    oversized: bytes


@dataclass(frozen=True)
class BadInput:
    """One class of bad input. `grpc_search`: a VisualSearchRequest's fields; `grpc_add`: one
    AddImageRequest's fields, or its bytes; `grpc_raw`: (method path, raw request bytes); `http`: (method, path,
    httpx keyword arguments). `code` is the gRPC code expected (the HTTP status follows from it)."""

    name: str
    code: str
    word: str
    grpc_search: Callable[[Images], dict] | None = None
    grpc_add: Callable[[Images], dict | bytes] | None = None
    grpc_delete: Callable[[Images], dict] | None = None
    grpc_raw: tuple[str, bytes] | None = None
    http: Callable[[Images], tuple[str, str, dict]] | None = None


def search_json(**body: Any) -> Callable[[Images], tuple[str, str, dict]]:
    return lambda images: ("POST", "/v1/search", {"json": body})


def jpeg_b64(images: Images) -> str:
    return base64.b64encode(images.jpeg).decode()


EQ, LT, IN, NOT_IN = search_pb2.EQ, search_pb2.LT, search_pb2.IN, search_pb2.NOT_IN

CLASSES: list[BadInput] = [
    # ---- what to search with
    BadInput("no query", "INVALID_ARGUMENT", "image",
             grpc_search=lambda i: {}, http=search_json(k=3)),
    BadInput("empty image", "INVALID_ARGUMENT", "empty",
             grpc_search=lambda i: {"image": b""}),
    BadInput("not an image", "INVALID_ARGUMENT", "image",
             grpc_search=lambda i: {"image": b"this is plain text, not an image"},
             http=lambda i: ("POST", "/v1/search", {"files": {"image": ("q.jpg", b"plain text", "image/jpeg")}})),
    BadInput("truncated jpeg", "INVALID_ARGUMENT", "truncated",
             grpc_search=lambda i: {"image": i.truncated},
             http=lambda i: ("POST", "/v1/search", {"json": {"image_base64": base64.b64encode(i.truncated).decode()}})),
    BadInput("decompression bomb", "INVALID_ARGUMENT", "pixels",
             grpc_search=lambda i: {"image": i.bomb},
             http=lambda i: ("POST", "/v1/search", {"files": {"image": ("q.png", i.bomb, "image/png")}})),
    BadInput("image over the byte limit", "INVALID_ARGUMENT", "bytes",
             grpc_search=lambda i: {"image": i.oversized}),
    BadInput("image and item_id together", "INVALID_ARGUMENT", "both",
             http=lambda i: ("POST", "/v1/search", {"json": {"image_base64": jpeg_b64(i), "item_id": INDEXED_ID}})),
    BadInput("bad base64", "INVALID_ARGUMENT", "base64", http=search_json(image_base64="***not base64***")),
    BadInput("two image files", "INVALID_ARGUMENT", "image",
             http=lambda i: ("POST", "/v1/search", {"files": [("image", ("a.jpg", i.jpeg, "image/jpeg")),
                                                              ("image", ("b.jpg", i.jpeg, "image/jpeg"))]})),
    # ---- item_id queries
    BadInput("empty item_id", "INVALID_ARGUMENT", "item_id", grpc_search=lambda i: {"item_id": ""}),
    BadInput("unknown item_id", "NOT_FOUND", "nobody-has-this-id",
             grpc_search=lambda i: {"item_id": "nobody-has-this-id"}, http=search_json(item_id="nobody-has-this-id")),
    BadInput("item_id with control characters", "INVALID_ARGUMENT", "control",
             grpc_search=lambda i: {"item_id": "bad\x00id"}, http=search_json(item_id="bad\x07id")),
    BadInput("item_id too long", "INVALID_ARGUMENT", "characters",
             grpc_search=lambda i: {"item_id": "x" * 5000}),
    BadInput("crop with item_id", "INVALID_ARGUMENT", "crop",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "crop": crop(0, 0, 10, 10)}),
    # ---- k, min_score, crop
    BadInput("k = 0", "INVALID_ARGUMENT", "k", grpc_search=lambda i: {"image": i.jpeg, "k": 0},
             http=search_json(item_id=INDEXED_ID, k=0)),
    BadInput("k over max_k", "INVALID_ARGUMENT", "k", grpc_search=lambda i: {"image": i.jpeg, "k": 100_000},
             http=search_json(item_id=INDEXED_ID, k=100_000)),
    BadInput("k negative", "INVALID_ARGUMENT", "k", http=search_json(item_id=INDEXED_ID, k=-1)),
    BadInput("k a boolean", "INVALID_ARGUMENT", "k", http=search_json(item_id=INDEXED_ID, k=True)),
    BadInput("k a string", "INVALID_ARGUMENT", "k", http=search_json(item_id=INDEXED_ID, k="ten")),
    BadInput("min_score NaN", "INVALID_ARGUMENT", "min_score",
             grpc_search=lambda i: {"image": i.jpeg, "min_score": float("nan")}),
    BadInput("min_score infinite", "INVALID_ARGUMENT", "min_score",
             grpc_search=lambda i: {"image": i.jpeg, "min_score": float("inf")}),
    BadInput("crop of zero width", "INVALID_ARGUMENT", "crop",
             grpc_search=lambda i: {"image": i.jpeg, "crop": crop(0, 0, 0, 10)}),
    BadInput("crop outside the image", "INVALID_ARGUMENT", "crop",
             grpc_search=lambda i: {"image": i.jpeg, "crop": crop(100_000, 100_000, 10, 10)},
             http=lambda i: ("POST", "/v1/search", {"json": {"image_base64": jpeg_b64(i),
                                                             "crop": {"x": 100_000, "y": 0, "width": 5, "height": 5}}})),
    BadInput("crop with negative numbers", "INVALID_ARGUMENT", "crop",
             http=lambda i: ("POST", "/v1/search", {"json": {"image_base64": jpeg_b64(i),
                                                             "crop": {"x": -1, "y": 0, "width": 5, "height": 5}}})),
    # ---- filters
    BadInput("filter on an unknown field", "INVALID_ARGUMENT", "colour",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("colour", EQ, "red"))},
             http=search_json(item_id=INDEXED_ID, filter=[{"field": "colour", "op": "==", "value": "red"}])),
    BadInput("filter value of the wrong type", "INVALID_ARGUMENT", "price",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("price", LT, "cheap"))},
             http=search_json(item_id=INDEXED_ID, filter=[{"field": "price", "op": "<", "value": "cheap"}])),
    BadInput("filter operator unknown", "INVALID_ARGUMENT", "op",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("price", 99, 1.0))},
             http=search_json(item_id=INDEXED_ID, filter=[{"field": "price", "op": "~", "value": 1}])),
    BadInput("filter operator unset", "INVALID_ARGUMENT", "op",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("price", 0, 1.0))}),
    BadInput("filter value NaN", "INVALID_ARGUMENT", "finite",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("price", LT, float("nan")))}),
    BadInput("filter value infinite", "INVALID_ARGUMENT", "finite",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("price", LT, float("inf")))}),
    BadInput("filter IN with NaN", "INVALID_ARGUMENT", "finite",
             grpc_search=lambda i: {"item_id": INDEXED_ID,
                                    "filter": a_filter(condition("price", IN, [1.0, float("nan")]))}),
    BadInput("filter IN without a list", "INVALID_ARGUMENT", "list",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("category", IN, "shoes"))},
             http=search_json(item_id=INDEXED_ID, filter=[{"field": "category", "op": "in", "value": "shoes"}])),
    BadInput("filter value null", "INVALID_ARGUMENT", "category",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("category", EQ, None))}),
    BadInput("filter value an object", "INVALID_ARGUMENT", "category",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "filter": a_filter(condition("category", EQ, {"a": 1}))}),
    BadInput("filter of 1,000 conditions", "INVALID_ARGUMENT", "conditions",
             grpc_search=lambda i: {"item_id": INDEXED_ID,
                                    "filter": a_filter(*[condition("price", LT, float(n)) for n in range(1000)])},
             http=search_json(item_id=INDEXED_ID, filter=[{"field": "price", "op": "<", "value": n} for n in range(1000)])),
    BadInput("filter IN list of 20,000 values", "INVALID_ARGUMENT", "values",
             grpc_search=lambda i: {"item_id": INDEXED_ID,
                                    "filter": a_filter(condition("category", NOT_IN, [str(n) for n in range(20_000)]))}),
    BadInput("filter of the wrong shape", "INVALID_ARGUMENT", "filter",
             http=search_json(item_id=INDEXED_ID, filter="category")),
    # ---- collections
    BadInput("collection name invalid", "INVALID_ARGUMENT", "collection",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "collection": "no spaces; or quotes'"},
             http=search_json(item_id=INDEXED_ID, collection="../etc")),
    BadInput("collection unknown", "NOT_FOUND", "no_such_collection",
             grpc_search=lambda i: {"item_id": INDEXED_ID, "collection": "no_such_collection"}),
    # ---- HTTP framing
    BadInput("malformed JSON body", "INVALID_ARGUMENT", "JSON",
             http=lambda i: ("POST", "/v1/search", {"content": b"{not json", "headers": {"content-type": "application/json"}})),
    BadInput("unknown JSON field", "INVALID_ARGUMENT", "colour", http=search_json(item_id=INDEXED_ID, colour="red")),
    BadInput("unsupported content type", "INVALID_ARGUMENT", "content",
             http=lambda i: ("POST", "/v1/search", {"content": b"k=3", "headers": {"content-type": "text/plain"}})),
    BadInput("body over the limit", "RESOURCE_EXHAUSTED", "bytes",
             http=lambda i: ("POST", "/v1/search", {"content": b"{" + b" " * (80 * 1024 * 1024) + b"}",
                                                    "headers": {"content-type": "application/json"}})),
    # ---- add: each bad item fails alone, the stream goes on
    BadInput("add: empty image", "INVALID_ARGUMENT", "empty", grpc_add=lambda i: {"id": "a1", "image": b""},
             http=lambda i: ("POST", "/v1/images", {"json": {"images": [{"image_base64": "", "id": "a1"}]}})),
    BadInput("add: not an image", "INVALID_ARGUMENT", "image", grpc_add=lambda i: {"id": "a2", "image": b"text"},
             http=lambda i: ("POST", "/v1/images", {"files": [("images", ("a.jpg", b"text", "image/jpeg"))]})),
    BadInput("add: id too long", "INVALID_ARGUMENT", "id", grpc_add=lambda i: {"id": "x" * 5000, "image": i.jpeg}),
    BadInput("add: id with control characters", "INVALID_ARGUMENT", "control",
             grpc_add=lambda i: {"id": "tab\there", "image": i.jpeg},
             http=lambda i: ("POST", "/v1/images", {"json": {"images": [{"image_base64": jpeg_b64(i), "id": "nl\nid"}]}})),
    BadInput("add: metadata nested 60 deep", "INVALID_ARGUMENT", "deep",
             # As bytes: Python's protobuf will not build a message this deep.
             grpc_add=lambda i: gateway_pb2.AddImageRequest(id="deep", image=i.jpeg).SerializeToString()
             + length_delimited(3, nested_struct_bytes(60))),
    BadInput("add: metadata over 64 KiB", "INVALID_ARGUMENT", "metadata",
             grpc_add=lambda i: {"id": "big-meta", "image": i.jpeg, "metadata": struct_pb2.Struct(
                 fields={"blob": struct_pb2.Value(string_value="x" * 70_000)})}),
    BadInput("add: filter field of the wrong type", "INVALID_ARGUMENT", "price",
             grpc_add=lambda i: {"id": "typed", "image": i.jpeg, "metadata": struct_pb2.Struct(
                 fields={"price": struct_pb2.Value(string_value="cheap")})},
             http=lambda i: ("POST", "/v1/images", {"json": {"images": [
                 {"image_base64": jpeg_b64(i), "id": "typed", "metadata": {"price": "cheap"}}]}})),
    BadInput("add: image_uri too long", "INVALID_ARGUMENT", "image_uri",
             grpc_add=lambda i: {"id": "uri", "image": i.jpeg, "image_uri": "file:///" + "x" * 5000}),
    BadInput("add: images not a list", "INVALID_ARGUMENT", "images",
             http=lambda i: ("POST", "/v1/images", {"json": {"images": {"image_base64": jpeg_b64(i)}}})),
    BadInput("add: ids not matching the files", "INVALID_ARGUMENT", "ids",
             http=lambda i: ("POST", "/v1/images", {"files": [("images", ("a.jpg", i.jpeg, "image/jpeg"))],
                                                    "data": {"ids": json.dumps(["one", "two"])}})),
    BadInput("add: metadata not JSON", "INVALID_ARGUMENT", "metadata",
             http=lambda i: ("POST", "/v1/images", {"files": [("images", ("a.jpg", i.jpeg, "image/jpeg"))],
                                                    "data": {"metadata": "{not json"}})),
    # ---- delete
    BadInput("delete: id with control characters", "INVALID_ARGUMENT", "control",
             grpc_delete=lambda i: {"ids": ["bad\x01id"]}),
    BadInput("delete: id too long", "INVALID_ARGUMENT", "characters",
             grpc_delete=lambda i: {"ids": ["y" * 5000]},
             http=lambda i: ("DELETE", "/v1/images/" + "y" * 5000, {})),
    # ---- not protobuf at all
    BadInput("garbage instead of a Search message", "INVALID_ARGUMENT", "VisualSearchRequest",
             grpc_raw=("/vsearch.v1.VisualSearch/Search", b"\xff\xff\xff\xff\x0f garbage")),
    BadInput("garbage instead of a Stats message", "INVALID_ARGUMENT", "VisualStatsRequest",
             grpc_raw=("/vsearch.v1.VisualSearch/Stats", b"\x0a\xff\xff\xff")),
]


# ---- the stack and how each form is sent --------------------------------------------------------


@dataclass
class Stack:
    gateway: str
    http_port: int
    children: dict[str, str]  # name -> gRPC address
    channel: grpc.Channel
    stub: gateway_pb2_grpc.VisualSearchStub
    http: httpx.Client

    def count(self) -> int:
        return self.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10).count

    def all_serving(self) -> dict[str, str]:
        statuses = {}
        for name, address in self.children.items():
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return statuses


@pytest.fixture(scope="module")
def images(ukbench_images: list[Path]) -> Images:
    jpeg = ukbench_images[0].read_bytes()
    # Over the gateway's 20 MiB default (GATEWAY_MAX_IMAGE_BYTES): refused before anything decodes it.
    oversized = jpeg + b"\0" * (21 * 1024 * 1024)
    # 48 M pixels, over the embedder's 40 M default (EMBEDDER_MAX_IMAGE_PIXELS), in a few kB.
    return Images(jpeg=jpeg, truncated=jpeg[: len(jpeg) // 3], bomb=single_colour_png(8000, 6000),
                  oversized=oversized)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ukbench_images):
    with vsearch_up(tmp_path_factory.mktemp("bad-input")) as up:
        channel = grpc.insecure_channel(up.gateway, options=[("grpc.max_send_message_length", 128 * 1024 * 1024)])
        stack = Stack(up.gateway, up.http_port, {"gateway": up.gateway, "embedder": up.embedder, "search": up.search},
                      channel, gateway_pb2_grpc.VisualSearchStub(channel),
                      httpx.Client(base_url=f"http://127.0.0.1:{up.http_port}", timeout=60))
        summary = stack.stub.AddImages(iter([
            gateway_pb2.AddImageRequest(id=f"item-{n}", image=path.read_bytes(), metadata=struct_pb2.Struct(
                fields={"category": struct_pb2.Value(string_value=f"object-{n // 4}"),
                        "price": struct_pb2.Value(number_value=float(n))}))
            for n, path in enumerate(ukbench_images[:CATALOG])
        ]), timeout=120)
        assert summary.indexed == CATALOG, summary
        yield stack
        stack.http.close()
        channel.close()


def grpc_outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def sent_grpc_forms(case: BadInput, stack: Stack, images: Images) -> list[tuple[str, str, str]]:
    """(form, code, message) of each gRPC form of the case."""
    outcomes = []
    if case.grpc_search:
        request = gateway_pb2.VisualSearchRequest(**case.grpc_search(images))
        outcomes.append(("grpc search", *grpc_outcome(lambda: stack.stub.Search(request, timeout=30))))
    if case.grpc_delete:
        request = gateway_pb2.DeleteImagesRequest(**case.grpc_delete(images))
        outcomes.append(("grpc delete", *grpc_outcome(lambda: stack.stub.DeleteImages(request, timeout=30))))
    if case.grpc_raw:
        method, payload = case.grpc_raw
        raw = stack.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        outcomes.append(("grpc raw", *grpc_outcome(lambda: raw(payload, timeout=30))))
    if case.grpc_add:
        # The bad item between two that are already stored: it fails alone and the stream goes on.
        stored = gateway_pb2.AddImageRequest(id=INDEXED_ID, image=images.jpeg, metadata=struct_pb2.Struct(
            fields={"category": struct_pb2.Value(string_value="object-0"), "price": struct_pb2.Value(number_value=0.0)}))
        bad = case.grpc_add(images)
        if isinstance(bad, dict):
            bad = gateway_pb2.AddImageRequest(**bad).SerializeToString()
        add_raw = stack.channel.stream_unary("/vsearch.v1.VisualSearch/AddImages", request_serializer=None,
                                             response_deserializer=gateway_pb2.AddImagesSummary.FromString)
        summary = add_raw(iter([stored.SerializeToString(), bad, stored.SerializeToString()]), timeout=60)
        assert (summary.received, summary.failed) == (3, 1), summary
        assert summary.unchanged + summary.indexed == 2, summary
        (failure,) = summary.failures
        assert failure.index == 1, summary
        outcomes.append(("grpc add item", grpc.StatusCode(_code_tuple(failure.code)).name, failure.message))
    return outcomes


def _code_tuple(value: int) -> tuple[int, str]:
    return next(code.value for code in grpc.StatusCode if code.value[0] == value)


def sent_http_form(case: BadInput, stack: Stack, images: Images) -> tuple[str, int, dict]:
    method, path, options = case.http(images)
    response = stack.http.request(method, path, **options)
    try:
        body = response.json()
    except ValueError:
        body = {"not json": response.text[:200]}
    if path == "/v1/images" and response.status_code == 200:
        # A multi-item add answers 200 with per-item failures: the bad item's failure is the status.
        failures = body.get("failures", [])
        assert len(failures) == 1, body
        return "http add item", HTTP_STATUS.get(failures[0]["code"], 500), {
            "error": {"code": failures[0]["code"], "message": failures[0]["message"]}}
    return "http", response.status_code, body


@pytest.mark.parametrize("case", CLASSES, ids=[case.name for case in CLASSES])
def test_bad_input_gets_a_precise_status_and_harms_nothing(case: BadInput, stack: Stack, images: Images):
    count_before = stack.count()
    for form, code, message in sent_grpc_forms(case, stack, images):
        assert code not in NEVER, f"{form}: {code} {message}"
        assert code == case.code, f"{form}: {code} {message}"
        assert case.word.lower() in message.lower(), f"{form}: {message!r} does not name {case.word!r}"
    if case.http:
        form, status, body = sent_http_form(case, stack, images)
        assert status < 500, f"{form}: {status} {body}"
        assert status == HTTP_STATUS[case.code], f"{form}: {status} {body}"
        assert body.get("error", {}).get("code") == case.code, f"{form}: {body}"
        assert case.word.lower() in body["error"]["message"].lower(), f"{form}: {body}"
    assert stack.all_serving() == {"gateway": "SERVING", "embedder": "SERVING", "search": "SERVING"}
    assert stack.count() == count_before == CATALOG


def test_the_table_covers_at_least_forty_classes_on_both_apis():
    assert len(CLASSES) >= 40
    assert sum(1 for case in CLASSES if case.grpc_search or case.grpc_add or case.grpc_raw or case.grpc_delete) >= 30
    assert sum(1 for case in CLASSES if case.http) >= 25
    assert any(case.grpc_add for case in CLASSES) and any(case.http and "add" in case.name for case in CLASSES)
