"""The HTTP API's request parsing (filters, crops, base64, JSON bodies) and its error shape and status
mapping, without any server."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from google.protobuf import json_format
from pydantic import ValidationError

from gateway.http_models import (
    SearchBody,
    code_for_http_status,
    decode_base64,
    describe_validation_error,
    error_body,
    filter_to_proto,
    http_status,
    parse_crop_text,
    parse_filter_json,
    parse_float,
    parse_int,
    search_body_to_proto,
    search_response_json,
    summary_json,
)
from service_kit.status import ServiceError
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2


def as_tuples(search_filter: search_pb2.Filter) -> list[tuple[str, int, object]]:
    return [(c.field, c.op, json_format.MessageToDict(c.value)) for c in search_filter.conditions]


@pytest.mark.parametrize("op, expected", [
    ("==", search_pb2.EQ), ("!=", search_pb2.NE), ("<", search_pb2.LT), ("<=", search_pb2.LE),
    (">", search_pb2.GT), (">=", search_pb2.GE), ("EQ", search_pb2.EQ), ("ne", search_pb2.NE),
    ("LT", search_pb2.LT), ("GE", search_pb2.GE), (" le ", search_pb2.LE),
])
def test_scalar_operators_by_symbol_or_name(op, expected):
    parsed = parse_filter_json(f'[{{"field": "price", "op": "{op}", "value": 12.5}}]')
    assert as_tuples(parsed) == [("price", expected, 12.5)]


@pytest.mark.parametrize("op, expected", [
    ("in", search_pb2.IN), ("IN", search_pb2.IN), ("not_in", search_pb2.NOT_IN), ("NOT_IN", search_pb2.NOT_IN),
])
def test_list_operators(op, expected):
    parsed = parse_filter_json(f'[{{"field": "category", "op": "{op}", "value": ["a", "b"]}}]')
    assert as_tuples(parsed) == [("category", expected, ["a", "b"])]


def test_several_conditions_and_the_object_shorthand():
    parsed = parse_filter_json(
        '[{"field": "category", "op": "==", "value": "shoes"}, {"field": "price", "op": "<", "value": 50}]'
    )
    assert as_tuples(parsed) == [("category", search_pb2.EQ, "shoes"), ("price", search_pb2.LT, 50.0)]
    shorthand = parse_filter_json('{"category": "shoes", "brand": ["x", "y"], "in_stock": true}')
    assert as_tuples(shorthand) == [
        ("category", search_pb2.EQ, "shoes"), ("brand", search_pb2.IN, ["x", "y"]), ("in_stock", search_pb2.EQ, True),
    ]
    assert as_tuples(parse_filter_json("")) == []
    assert as_tuples(parse_filter_json("[]")) == []


def test_quotes_in_values_stay_data():
    parsed = parse_filter_json('[{"field": "category", "op": "==", "value": "a\\" or 1==1 or \\""}]')
    assert as_tuples(parsed) == [("category", search_pb2.EQ, 'a" or 1==1 or "')]


@pytest.mark.parametrize("text, word", [
    ('[{"field": "category", "op": "like", "value": "x"}]', "unknown filter op"),
    ('[{"field": "category", "op": "in", "value": "x"}]', "list"),
    ('[{"field": "category", "op": "==", "value": ["x"]}]', "string, number or boolean"),
    ('[{"field": "category", "op": "==", "value": null}]', "string, number or boolean"),
    ('[{"field": "category", "op": "=="}]', "value"),
    ('[{"field": "category", "op": "==", "value": "x", "extra": 1}]', "extra"),
    ('[{"field": "category", "op": "==", "value": "x"]', "malformed json"),
    ('"category"', "filter"),
    ("42", "filter"),
])
def test_bad_filters_are_invalid_argument(text, word):
    with pytest.raises(ServiceError) as caught:
        parse_filter_json(text)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert word in caught.value.message.lower(), caught.value.message


def test_crop_text():
    crop = parse_crop_text(" 10, 20,300 ,400")
    assert (crop.x, crop.y, crop.width, crop.height) == (10, 20, 300, 400)
    assert parse_crop_text("") is None
    for bad in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "-1,0,10,10", "0,0,10.5,10"):
        with pytest.raises(ServiceError) as caught:
            parse_crop_text(bad)
        assert "crop" in caught.value.message


def test_base64_accepts_plain_and_data_urls_and_rejects_garbage():
    data = b"\x89PNG\r\n\x1a\n binary"
    encoded = base64.b64encode(data).decode()
    assert decode_base64(encoded, "image_base64") == data
    assert decode_base64(f"data:image/png;base64,{encoded}", "image_base64") == data
    assert decode_base64(encoded[:8] + "\n" + encoded[8:], "image_base64") == data
    for bad in ("not base64!", "abc"):
        with pytest.raises(ServiceError) as caught:
            decode_base64(bad, "image_base64")
        assert caught.value.message == "image_base64 is not valid base64"


def test_json_search_body_to_request():
    body = SearchBody.model_validate({
        "image_base64": base64.b64encode(b"img").decode(), "k": 5, "min_score": 0.25,
        "crop": {"x": 1, "y": 2, "width": 3, "height": 4},
        "filter": [{"field": "category", "op": "==", "value": "shoes"}],
    })
    request = search_body_to_proto(body)
    assert request.image == b"img" and request.k == 5 and request.min_score == 0.25
    assert (request.crop.x, request.crop.y, request.crop.width, request.crop.height) == (1, 2, 3, 4)
    assert as_tuples(request.filter) == [("category", search_pb2.EQ, "shoes")]

    by_id = search_body_to_proto(SearchBody.model_validate({"item_id": "abc"}))
    assert by_id.WhichOneof("query") == "item_id" and not by_id.HasField("k") and not by_id.HasField("min_score")
    assert search_body_to_proto(SearchBody.model_validate({"item_id": "abc", "k": 0})).HasField("k")

    with pytest.raises(ServiceError, match="not both"):
        search_body_to_proto(SearchBody.model_validate({"item_id": "a", "image_base64": "aW1n"}))
    with pytest.raises(ServiceError, match="k must be"):
        search_body_to_proto(SearchBody.model_validate({"item_id": "a", "k": 2**40}))


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.OUT_OF_RANGE, 400), (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.UNIMPLEMENTED, 501), (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
])
def test_grpc_codes_map_to_http_statuses(code, status):
    assert http_status(code) == status


def test_error_shape_and_codes_for_http_layer_errors():
    assert error_body(grpc.StatusCode.NOT_FOUND, "no image with id 'x'") == {
        "error": {"code": "NOT_FOUND", "message": "no image with id 'x'"}
    }
    assert code_for_http_status(404) == grpc.StatusCode.NOT_FOUND
    assert code_for_http_status(405) == grpc.StatusCode.UNIMPLEMENTED
    assert code_for_http_status(418) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_for_http_status(502) == grpc.StatusCode.INTERNAL


def test_responses_as_json():
    response = gateway_pb2.VisualSearchResponse(from_cache=True, index_generation=2**60, model_version="m@1")
    hit = response.hits.add(id="a", score=0.9, image_uri="https://x/a.jpg")
    hit.metadata.update({"category": "shoes", "price": 12})
    response.timing.total_ms = 1.5
    as_json = search_response_json(response)
    # An uncalibrated model's hit: match_probability null, never made up; the whole image matched.
    assert as_json["hits"] == [{"id": "a", "score": 0.9, "image_uri": "https://x/a.jpg",
                                "metadata": {"category": "shoes", "price": 12.0}, "match_probability": None,
                                "matched_region": None}]
    hit.matched_region.CopyFrom(embedder_pb2.CropBox(x=1, y=2, width=30, height=40))
    assert search_response_json(response)["hits"][0]["matched_region"] == {"x": 1, "y": 2, "width": 30, "height": 40}
    assert as_json["no_good_match"] is False
    response.hits.add(id="b", score=0.5, match_probability=0.25)
    response.no_good_match = True
    as_json = search_response_json(response)
    assert as_json["hits"][1]["match_probability"] == 0.25 and as_json["no_good_match"] is True
    assert as_json["from_cache"] is True and as_json["index_generation"] == 2**60
    assert as_json["timing"] == {"embed_ms": 0.0, "search_ms": 0.0, "total_ms": 1.5}

    summary = gateway_pb2.AddImagesSummary(received=2, indexed=1, failed=1, index_generation=3)
    summary.failures.add(id="b", code=3, message="image 0: not an image", index=1)
    assert summary_json(summary)["failures"] == [
        {"id": "b", "code": "INVALID_ARGUMENT", "message": "image 0: not an image", "index": 1}
    ]


def test_filter_body_none_is_empty():
    assert as_tuples(filter_to_proto(None)) == []


def test_http_layer_statuses_carry_the_code_grpc_would_give():
    # 413 and 431: gRPC answers a message over its size limit RESOURCE_EXHAUSTED; 408: the request did
    # not arrive in time; 499: the client went away.
    assert code_for_http_status(413) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_for_http_status(431) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_for_http_status(408) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert code_for_http_status(499) == grpc.StatusCode.CANCELLED
    assert code_for_http_status(503) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("body, field", [
    ({"item_id": "a", "k": True}, "k"), ({"item_id": "a", "k": False}, "k"), ({"item_id": "a", "k": "5"}, "k"),
    ({"item_id": "a", "k": 5.0}, "k"), ({"item_id": "a", "min_score": True}, "min_score"),
    ({"item_id": "a", "min_score": "0.5"}, "min_score"), ({"item_id": "a", "min_score": float("nan")}, "min_score"),
    ({"item_id": "a", "min_score": float("inf")}, "min_score"),
    ({"image_base64": "aGk=", "crop": {"width": True, "height": 1}}, "crop.width"),
    ({"image_base64": "aGk=", "crop": {"x": 1.5, "width": 1, "height": 1}}, "crop.x"),
    ({"image_base64": "aGk=", "crop": {"y": "2", "width": 1, "height": 1}}, "crop.y"),
])
def test_json_numbers_are_strict(body, field):
    with pytest.raises(ValidationError) as caught:
        SearchBody.model_validate_json(json.dumps(body))
    assert describe_validation_error(caught.value).startswith(f"{field}:"), describe_validation_error(caught.value)


def test_json_numbers_that_are_numbers_pass():
    body = SearchBody.model_validate_json('{"item_id": "a", "k": 7, "min_score": 1, "crop": {"width": 3, "height": 4}}')
    assert (body.k, body.min_score, body.crop.width) == (7, 1.0, 3)


@pytest.mark.parametrize("text", ["1_000", "٣", "1.0", "0x10", " ", "9" * 5000])
def test_form_integers_are_plain_decimal_digits(text):
    with pytest.raises(ServiceError) as caught:
        parse_int(text, "k")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.message.startswith("k ")
    assert len(caught.value.message) < 120  # the caller's text is quoted, cut short


@pytest.mark.parametrize("text", ["1_0", "nan", "inf", "-Infinity", "1e999", "0x1p3", ""])
def test_form_numbers_are_plain_and_finite(text):
    with pytest.raises(ServiceError, match="min_score must be a finite number"):
        parse_float(text, "min_score")


def test_form_numbers_in_the_usual_notations():
    assert parse_int(" +12 ", "k") == 12 and parse_int("-3", "k") == -3
    assert [parse_float(text, "m") for text in ("0.5", ".5", "5.", "-1e-3", "2E2")] == [0.5, 0.5, 5.0, -0.001, 200.0]
