"""search_svc without a Milvus: filter validation and its Milvus rendering, id encoding, item
validation, the mapping of Milvus errors to status codes, the search params an index is asked with,
and the generation."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2
from pymilvus.exceptions import ConnectError, MilvusException, ParamError

from search_svc.filters import parse_filter
from search_svc.generation import IndexGeneration
from search_svc.item_codec import ItemCodec, decode_id, encode_id
from search_svc.milvus_expressions import filter_expression, ids_expression, string_literal
from search_svc.milvus_store import DEFAULT_HNSW_EF, ann_search_params, milvus_service_error
from service_kit.status import ServiceError
from vsearch.v1 import search_pb2

FIELDS = {"category": "string", "price": "float", "stock": "int", "in_stock": "bool"}


def value(python_value: object) -> struct_pb2.Value:
    wrapper = struct_pb2.Struct()
    wrapper.update({"v": python_value})
    return wrapper.fields["v"]


def condition(field: str, op: int, python_value: object) -> search_pb2.Condition:
    return search_pb2.Condition(field=field, op=op, value=value(python_value))


def compile_conditions(*conditions: search_pb2.Condition) -> str:
    return filter_expression(parse_filter(search_pb2.Filter(conditions=list(conditions)), FIELDS))


def refused(*conditions: search_pb2.Condition) -> str:
    with pytest.raises(ServiceError) as caught:
        compile_conditions(*conditions)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.message


def test_empty_filter_is_empty_expression():
    assert compile_conditions() == ""


def test_conditions_are_anded_and_require_presence():
    expression = compile_conditions(
        condition("category", search_pb2.EQ, "shoes"), condition("price", search_pb2.LT, 20)
    )
    assert expression == (
        '(_has_category == true and category == "shoes") and (_has_price == true and price < 20.0)'
    )


@pytest.mark.parametrize(
    ("op", "symbol"),
    [(search_pb2.EQ, "=="), (search_pb2.NE, "!="), (search_pb2.LT, "<"), (search_pb2.LE, "<="),
     (search_pb2.GT, ">"), (search_pb2.GE, ">=")],
)
def test_comparisons(op: int, symbol: str):
    assert compile_conditions(condition("stock", op, 3)) == f"(_has_stock == true and stock {symbol} 3)"


def test_typed_literals():
    assert compile_conditions(condition("price", search_pb2.GE, -0.5)).endswith("price >= -0.5)")
    assert compile_conditions(condition("price", search_pb2.GE, 1e16)).endswith("price >= 1e+16)")
    assert compile_conditions(condition("stock", search_pb2.EQ, 2.0)).endswith("stock == 2)")
    assert compile_conditions(condition("in_stock", search_pb2.EQ, True)).endswith("in_stock == true)")
    assert compile_conditions(condition("in_stock", search_pb2.NE, False)).endswith("in_stock != false)")


def test_membership():
    assert compile_conditions(condition("category", search_pb2.IN, ["a", "b"])) == (
        '(_has_category == true and category in ["a", "b"])'
    )
    assert compile_conditions(condition("price", search_pb2.NOT_IN, [1, 2.5])) == (
        "(_has_price == true and price not in [1.0, 2.5])"
    )


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ('a" or category != "', r'"a\" or category != \""'),
        ("x' or 1==1 or '", "\"x' or 1==1 or '\""),
        ("x') || (1==1", "\"x') || (1==1\""),
        ("back\\slash", r'"back\\slash"'),
        ('\\"', r'"\\\""'),
        ("{c}", '"{c}"'),
        ("é ✓ 😀", '"é ✓ 😀"'),
    ],
)
def test_string_literals_escape_backslash_and_double_quote(text: str, literal: str):
    assert string_literal(text) == literal
    expression = compile_conditions(condition("category", search_pb2.EQ, text))
    assert expression == f"(_has_category == true and category == {literal})"


def test_string_literal_refuses_control_characters():
    with pytest.raises(ValueError):
        string_literal("a\nb")
    assert "control character" in refused(condition("category", search_pb2.EQ, "a\nb"))
    assert "control character" in refused(condition("category", search_pb2.IN, ["ok", "a\x00b"]))


def test_ids_expression():
    assert ids_expression(["a", 'b"c']) == r'id in ["a", "b\"c"]'


def test_unknown_field_names_it_and_the_filterable_fields():
    message = refused(condition("colour", search_pb2.EQ, "red"))
    assert message == "unknown filter field 'colour'; filterable fields: category, price, stock, in_stock"


def test_field_name_is_never_caller_text():
    assert "unknown filter field" in refused(condition("category == \"x\" or id", search_pb2.EQ, "x"))


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        (search_pb2.Condition(field="price", value=value(1)), "no valid operator (OPERATOR_UNSPECIFIED)"),
        (search_pb2.Condition(field="price", op=99, value=value(1)), "no valid operator (99)"),
        (condition("in_stock", search_pb2.LT, True), "LT does not apply to bool field 'in_stock'"),
        (condition("price", search_pb2.EQ, "10"), "must be a number, got a string"),
        (condition("price", search_pb2.EQ, True), "must be a number, got a bool"),
        (condition("category", search_pb2.EQ, 3), "must be a string, got a number"),
        (condition("category", search_pb2.EQ, None), "must be a string, got null"),
        (search_pb2.Condition(field="category", op=search_pb2.EQ), "must be a string, got no value"),
        (condition("category", search_pb2.EQ, ["a"]), "must be a string, got a list"),
        (condition("in_stock", search_pb2.EQ, 1), "must be a bool, got a number"),
        (condition("stock", search_pb2.EQ, 1.5), "must be an integer"),
        (condition("stock", search_pb2.EQ, 2.0**60), "must be an integer"),
        (condition("price", search_pb2.LT, math.nan), "must be finite"),
        (condition("price", search_pb2.LT, math.inf), "must be finite"),
        (condition("category", search_pb2.IN, "a"), "IN on 'category' needs a list value, got a string"),
        (condition("category", search_pb2.NOT_IN, []), "NOT_IN on 'category' needs a non-empty list"),
        (condition("category", search_pb2.IN, ["a", 1]), "must be a string, got a number"),
        (condition("price", search_pb2.IN, [1, math.nan]), "must be finite"),
    ],
)
def test_invalid_conditions(cond: search_pb2.Condition, expected: str):
    assert expected in refused(cond)


def test_ids_are_encoded_reversibly_and_only_where_needed():
    for item_id in ["plain-id_1.jpg", "x'y", "100%", "%27", "a\nb\x00c\x7f", "é✓😀", 'q"\\']:
        stored = encode_id(item_id)
        assert "'" not in stored and not any(ord(ch) < 32 or ord(ch) == 127 for ch in stored)
        assert decode_id(stored) == item_id
    assert encode_id("plain-id_1.jpg") == "plain-id_1.jpg"
    assert encode_id("x'y%") == "x%27y%25"


def item(item_id: str, vector: list[float], **metadata: object) -> search_pb2.Item:
    message = search_pb2.Item(id=item_id, image_uri=f"file:///{item_id}.jpg")
    message.vector.values.extend(vector)
    message.metadata.update(metadata)
    return message


def test_rows_keep_typed_columns_and_presence():
    codec = ItemCodec(2, FIELDS)
    [with_fields, without] = codec.rows([
        item("a", [1, 0], category="shoes", price=10, stock=3, in_stock=True, note={"k": [1, None]}),
        item("b", [0, 1], category=None),
    ])
    assert with_fields["category"] == "shoes" and with_fields["_has_category"] is True
    assert with_fields["price"] == 10.0 and with_fields["stock"] == 3 and with_fields["in_stock"] is True
    assert '"note":{"k":[1' in with_fields["metadata"]
    assert without["_has_category"] is False and without["category"] == ""
    assert without["_has_price"] is False and without["_has_in_stock"] is False


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([item("", [1, 0])], "must not be empty"),
        ([item("x" * 257, [1, 0])], "257 characters; at most 256"),
        ([item("a", [1, 0]), item("a", [0, 1])], "'a' appears more than once"),
        ([item("a", [1, 0, 0])], "vector of item 'a' has 3 dimensions; expected 2"),
        ([item("a", [math.nan, 0])], "vector of item 'a' contains NaN or infinity"),
        ([item("a", [1, 0], category=5)], "metadata field 'category' of item 'a' must be a string"),
        ([item("a", [1, 0], price=True)], "metadata field 'price' of item 'a' must be a number"),
        ([item("a", [1, 0], price="3")], "metadata field 'price' of item 'a' must be a number"),
        ([item("a", [1, 0], price=math.inf)], "'price' of item 'a' must be finite"),
        ([item("a", [1, 0], stock=1.5)], "'stock' of item 'a' must be an integer"),
        ([item("a", [1, 0], in_stock=1)], "'in_stock' of item 'a' must be a bool"),
        ([item("a", [1, 0], category="a\tb")], "'category' of item 'a' contains a control character"),
        ([item("a", [1, 0], category="x" * 1025)], "'category' of item 'a' is longer than 1024 bytes"),
        ([item("a", [1, 0], other=math.nan)], "metadata of item 'a' contains NaN or infinity"),
        ([item("a", [1, 0], blob="x" * 70000)], "metadata of item 'a' is 70011 bytes as JSON; at most 65536"),
    ],
)
def test_invalid_items(items: list[search_pb2.Item], expected: str):
    with pytest.raises(ServiceError) as caught:
        ItemCodec(2, FIELDS).rows(items)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.message


def test_image_uri_length_is_checked():
    too_long = item("a", [1, 0])
    too_long.image_uri = "x" * 2049
    with pytest.raises(ServiceError, match="image_uri of item 'a' is longer than 2048 bytes"):
        ItemCodec(2, FIELDS).rows([too_long])


def test_generation_never_repeats_even_when_the_clock_stalls_or_steps_back():
    now = [1_000]
    generation = IndexGeneration(clock_us=lambda: now[0])
    assert generation.current == 1_000
    assert generation.advance() == 1_001
    now[0] = 500  # clock stepped back
    assert generation.advance() == 1_002
    now[0] = 5_000
    assert generation.advance() == 5_000
    # A value seen elsewhere (another replica's clock, ahead): the next one exceeds it; a smaller one is no step back.
    generation.advance_to(9_000)
    generation.advance_to(7_000)
    assert generation.advance() == 9_001


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MilvusException(1100, "invalid parameter"), grpc.StatusCode.INVALID_ARGUMENT),
        (ParamError(message="bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (MilvusException(100, "collection not found"), grpc.StatusCode.FAILED_PRECONDITION),
        (MilvusException(8, "rate limit exceeded"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (MilvusException(2, "service unavailable"), grpc.StatusCode.UNAVAILABLE),
        (ConnectError(message="no channel"), grpc.StatusCode.UNAVAILABLE),
        (MilvusException(5, "internal error"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_milvus_errors_map_to_precise_codes(error: MilvusException, code: grpc.StatusCode):
    assert milvus_service_error("search", error, 10.0).code == code


def test_milvus_error_message_drops_the_retry_preamble():
    wrapped = MilvusException(1100, "[query] Retry run out of 0 retry times, message=Invalid expr: x")
    assert milvus_service_error("query", wrapped, 10.0).message == "milvus query: Invalid expr: x"


def test_hnsw_searches_at_least_its_default_breadth_and_never_below_the_hits_asked():
    assert ann_search_params("HNSW", {}, 10) == {"ef": DEFAULT_HNSW_EF}  # not Milvus's ef = k
    assert ann_search_params("HNSW", {"ef": 64}, 10) == {"ef": 64}
    # A region search asks for k x 16 rows: an ef below them would be refused by Milvus.
    assert ann_search_params("HNSW", {"ef": 64}, 480) == {"ef": 480}
    assert ann_search_params("HNSW_SQ", {}, 1000) == {"ef": 1000}
    assert ann_search_params("IVF_FLAT", {"nprobe": 32}, 480) == {"nprobe": 32}
    assert ann_search_params("FLAT", {}, 10) == {}
