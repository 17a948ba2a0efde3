"""Property-based fuzzing of both front doors of a real `vsearch up` stack: image bytes (mutated
JPEGs, and well-formed images of any shape), filters, crops, ids, metadata, k and the search mode (copy
mode included) through gRPC and HTTP, search and add. Whatever comes in,
no answer is INTERNAL, UNKNOWN or an HTTP 5xx, and every service stays SERVING.

Bounded and reproducible by default (hypothesis with a fixed seed, `FUZZ_EXAMPLES` examples per test);
`VSEARCH_FUZZ_EXAMPLES=2000 VSEARCH_FUZZ_RANDOM=1 make test` (or pytest on this file) fuzzes longer with
fresh examples."""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import vsearch_up
from vsearch.v1 import embedder_pb2, gateway_pb2, gateway_pb2_grpc, search_pb2

FUZZ_EXAMPLES = int(os.environ.get("VSEARCH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not os.environ.get("VSEARCH_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAILURES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
FUZZ_COLLECTION = "fuzz_adds"


# ---- strategies ---------------------------------------------------------------------------------

texts = st.text(max_size=40) | st.sampled_from(["category", "price", "", "a\x00b", "ÿ" * 3, "'; DROP TABLE x; --"])
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**64)
json_scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


def proto_value(value: Any) -> struct_pb2.Value:
    """A Struct Value from JSON-like data, NaN and infinities included (json_format would refuse them)."""
    result = struct_pb2.Value()
    if value is None:
        result.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        result.bool_value = value
    elif isinstance(value, (int, float)):
        result.number_value = float(value)
    elif isinstance(value, str):
        result.string_value = value
    elif isinstance(value, list):
        result.list_value.values.extend(proto_value(item) for item in value)
    else:
        for key, item in value.items():
            result.struct_value.fields[key].CopyFrom(proto_value(item))
    return result


# Mostly well-formed, so that a request gets past its first check and the later ones are fuzzed too.
conditions = st.builds(
    lambda field, op, value: search_pb2.Condition(field=field, op=op, value=proto_value(value)),
    st.sampled_from(["category", "price"]) | st.sampled_from(["category", "price", "colour"]) | texts,
    st.integers(1, 8) | st.integers(0, 12),
    numbers | st.lists(numbers | texts, max_size=4) | json_values,
)
filters = st.builds(lambda items: search_pb2.Filter(conditions=items), st.lists(conditions, max_size=6))
uint32 = st.integers(0, 2**32 - 1)
ks = st.none() | st.integers(1, 50) | uint32
crops = st.none() | st.none() | st.builds(embedder_pb2.CropBox, x=uint32 | st.integers(0, 600), y=uint32 | st.integers(0, 600),
                              width=uint32 | st.integers(0, 600), height=uint32 | st.integers(0, 600))
# Unset, similar, copy (verified against the stored items' copy features), or no such mode.
modes = st.sampled_from([gateway_pb2.SEARCH_MODE_UNSPECIFIED, gateway_pb2.SEARCH_MODE_SIMILAR, gateway_pb2.SEARCH_MODE_COPY,
                         gateway_pb2.SEARCH_MODE_COPY]) | st.integers(0, 2**31 - 1)
ids = st.just("item-0") | st.text(max_size=300) | st.sampled_from(["item-1", "", "x" * 257, "a/b c", "%2F", "\x7f"])


@st.composite
def mutated_images(draw, source: bytes) -> bytes:
    """The catalog's JPEG as it is, or with a few bytes flipped, or cut short; sometimes random bytes, or a
    well-formed image of any shape (a strip a pixel across, a single pixel)."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return source
    if choice == 1:
        return draw(st.binary(max_size=2048))
    if choice == 4:
        sides = st.integers(1, 4) | st.integers(1, 1200)
        width, height = draw(sides), draw(sides)
        pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, draw(st.sampled_from(["PNG", "JPEG"])))
        return encoded.getvalue()
    data = bytearray(source)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


# ---- the stack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ukbench_images: list[Path]):
    with vsearch_up(tmp_path_factory.mktemp("fuzz")) as up:
        channel = grpc.insecure_channel(up.gateway)
        stub = gateway_pb2_grpc.VisualSearchStub(channel)
        http = httpx.Client(base_url=f"http://127.0.0.1:{up.http_port}", timeout=60)
        stub.AddImages(iter([gateway_pb2.AddImageRequest(id=f"item-{n}", image=path.read_bytes())
                             for n, path in enumerate(ukbench_images[:4])]), timeout=120)
        yield up, stub, http
        addresses = {"gateway": up.gateway, "embedder": up.embedder, "search": up.search}
        for name, address in addresses.items():
            with grpc.insecure_channel(address) as health_channel:
                reply = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name} is not SERVING after the fuzzing"
        http.close()
        channel.close()


@pytest.fixture(scope="module")
def jpeg(ukbench_images: list[Path]) -> bytes:
    return ukbench_images[0].read_bytes()


def assert_not_a_failure(call) -> None:
    try:
        call()
    except grpc.RpcError as error:
        assert error.code().name not in FAILURES, f"{error.code().name}: {error.details()}"


def json_safe(value: Any) -> Any:
    """What JSON can carry: NaN and infinities become strings (HTTP clients cannot send them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value


# ---- gRPC ---------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), k=ks, search_filter=filters, crop=crops,
       min_score=st.none() | st.floats(allow_nan=True, allow_infinity=True, width=32), mode=modes)
def test_grpc_search_by_image_never_fails_internally(stack, jpeg, data, k, search_filter, crop, min_score, mode):
    _up, stub, _http = stack
    request = gateway_pb2.VisualSearchRequest(image=data.draw(mutated_images(jpeg)), filter=search_filter, mode=mode)
    if k is not None:
        request.k = k
    if crop is not None:
        request.crop.CopyFrom(crop)
    if min_score is not None:
        request.min_score = min_score
    assert_not_a_failure(lambda: stub.Search(request, timeout=30))


@FUZZ
@given(item_id=ids, k=ks, search_filter=filters, collection=st.sampled_from(["", "", "fuzz_adds"]) | texts, mode=modes)
def test_grpc_search_by_item_never_fails_internally(stack, item_id, k, search_filter, collection, mode):
    _up, stub, _http = stack
    request = gateway_pb2.VisualSearchRequest(item_id=item_id, filter=search_filter, collection=collection, mode=mode)
    if k is not None:
        request.k = k
    assert_not_a_failure(lambda: stub.Search(request, timeout=30))


@FUZZ
@given(data=st.data(), items=st.lists(st.tuples(ids, json_values, st.text(max_size=80)), min_size=1, max_size=3))
def test_grpc_add_never_fails_internally(stack, jpeg, data, items):
    _up, stub, _http = stack
    requests = []
    for item_id, metadata, image_uri in items:
        request = gateway_pb2.AddImageRequest(id=item_id, image=data.draw(mutated_images(jpeg)), image_uri=image_uri,
                                              collection=FUZZ_COLLECTION)
        if isinstance(metadata, dict):
            request.metadata.CopyFrom(proto_value(metadata).struct_value)
        requests.append(request)
    try:
        summary = stub.AddImages(iter(requests), timeout=60)
    except grpc.RpcError as error:
        pytest.fail(f"the stream failed as a whole: {error.code().name}: {error.details()}")
    assert summary.received == len(requests)
    for failure in summary.failures:
        code = next(code for code in grpc.StatusCode if code.value[0] == failure.code)
        assert code.name not in FAILURES, f"item {failure.index}: {code.name}: {failure.message}"


@FUZZ
@given(payload=st.binary(max_size=512), method=st.sampled_from(["Search", "Stats", "DeleteImages", "DropCollection"]))
def test_grpc_garbage_payloads_never_fail_internally(stack, payload, method):
    up, _stub, _http = stack
    with grpc.insecure_channel(up.gateway) as channel:
        raw = channel.unary_unary(f"/vsearch.v1.VisualSearch/{method}", request_serializer=None,
                                  response_deserializer=None)
        assert_not_a_failure(lambda: raw(payload, timeout=30))


# ---- HTTP ---------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), body=st.fixed_dictionaries({}, optional={
    "k": json_values, "min_score": json_values, "crop": json_values, "filter": json_values,
    "collection": json_values, "item_id": json_values, "mode": st.sampled_from(["similar", "copy"]) | json_values,
}), with_image=st.booleans())
def test_http_json_search_never_answers_5xx(stack, jpeg, data, body, with_image):
    _up, _stub, http = stack
    body = json_safe(body)
    if with_image:
        body["image_base64"] = base64.b64encode(data.draw(mutated_images(jpeg))).decode()
    elif "item_id" not in body:
        body["item_id"] = "item-0"
    response = http.post("/v1/search", json=body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


@FUZZ
@given(data=st.data(), fields=st.dictionaries(st.sampled_from(["k", "min_score", "crop", "filter", "collection",
                                                                "item_id", "colour"]), st.text(max_size=60), max_size=4))
def test_http_multipart_search_never_answers_5xx(stack, jpeg, data, fields):
    _up, _stub, http = stack
    response = http.post("/v1/search", data=fields, files={"image": ("q.jpg", data.draw(mutated_images(jpeg)), "image/jpeg")})
    assert response.status_code < 500, response.text


@FUZZ
@given(data=st.data(), items=st.lists(st.fixed_dictionaries({}, optional={
    "id": json_values, "metadata": json_values, "image_uri": json_values}), min_size=1, max_size=3))
def test_http_add_never_answers_5xx(stack, jpeg, data, items):
    _up, _stub, http = stack
    for item in items:
        item.update(json_safe(dict(item)))
        item["image_base64"] = base64.b64encode(data.draw(mutated_images(jpeg))).decode()
    response = http.post("/v1/images", json={"images": items})
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        for failure in response.json()["failures"]:
            assert failure["code"] not in FAILURES, failure
