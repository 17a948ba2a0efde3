"""Validates a structured `Filter` into typed conditions, which each backend renders in its own
language (`milvus_expressions` for Milvus, `faiss_store.sql_where` for the FAISS backend's SQLite).

Semantics (the same on both backends; the service tests run on both):
- conditions are ANDed; an empty filter matches everything;
- an item without the field (or with null) matches no condition, NE and NOT_IN included;
- LT/LE/GT/GE on a string field compare by code point (Milvus compares UTF-8 bytes, same order);
  on a bool field they are refused;
- IN / NOT_IN take a non-empty list (Milvus refuses an empty one) of values of the field's type;
- a number for an int field must be integral and within +-2**53 (exact in a protobuf Value);
- a string value with a control character is refused: Milvus Lite cannot match it in a literal
  (see `milvus_expressions`), and the item codec refuses to store one, so it could never match;
- a filter has at most MAX_CONDITIONS conditions and a list at most MAX_LIST_VALUES values.

Why these caps (measured on Milvus Lite 2.5.1 and SQLite 3.40): Milvus fails a search whose filter
has 49 NOT_IN conditions, or 50 of the others ("unsupported expr proto node": its query plan nests a
level per condition, seemingly past what it can parse); SQLite fails one with 999 ("Expression tree
is too large", its depth limit being 1000). One list of 100,000 values works on both; every list
value is bound as an SQL parameter, and 32 lists of 1,000 stay under 32,766, SQLite's default limit
on parameters (Debian's build allows 250,000)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from google.protobuf import struct_pb2

from search_svc.settings import FieldType
from service_kit.status import invalid_argument
from vsearch.v1 import search_pb2

MAX_CONDITIONS = 32
MAX_LIST_VALUES = 1000
MAX_EXACT_INT = 2**53

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

FilterValue = str | float | int | bool


@dataclass(frozen=True)
class FilterCondition:
    """One validated condition: `field operator value`, or `field in/not in values`."""

    field: str
    operator: str  # ==, !=, <, <=, >, >=, in, not in
    values: tuple[FilterValue, ...]  # one value, or the non-empty list of in / not in


_COMPARISONS = {
    search_pb2.EQ: "==",
    search_pb2.NE: "!=",
    search_pb2.LT: "<",
    search_pb2.LE: "<=",
    search_pb2.GT: ">",
    search_pb2.GE: ">=",
}
_MEMBERSHIP = {search_pb2.IN: "in", search_pb2.NOT_IN: "not in"}
_ORDERING = {search_pb2.LT, search_pb2.LE, search_pb2.GT, search_pb2.GE}

_KIND_NAMES = {
    "null_value": "null",
    "number_value": "a number",
    "string_value": "a string",
    "bool_value": "a bool",
    "struct_value": "an object",
    "list_value": "a list",
    None: "no value",
}


def has_control_chars(text: str) -> bool:
    return _CONTROL_CHARS.search(text) is not None


def parse_filter(search_filter: search_pb2.Filter, fields: Mapping[str, FieldType]) -> list[FilterCondition]:
    """The filter's conditions, validated and typed; INVALID_ARGUMENT naming the culprit for an
    unknown field, an operator that does not apply, a mistyped value, or too many conditions."""
    if len(search_filter.conditions) > MAX_CONDITIONS:
        raise invalid_argument(
            f"a filter takes at most {MAX_CONDITIONS} conditions, got {len(search_filter.conditions)}"
        )
    return [_parse_condition(condition, fields) for condition in search_filter.conditions]


def _operator_name(op: int) -> str:
    try:
        return search_pb2.Operator.Name(op)
    except ValueError:
        return str(op)


def _parse_condition(condition: search_pb2.Condition, fields: Mapping[str, FieldType]) -> FilterCondition:
    field = condition.field
    field_type = fields.get(field)
    if field_type is None:
        raise invalid_argument(
            f"unknown filter field {field!r}; filterable fields: {', '.join(fields) or '(none)'}"
        )
    op = condition.op
    if op in _MEMBERSHIP:
        if condition.value.WhichOneof("kind") != "list_value":
            raise invalid_argument(
                f"{_operator_name(op)} on {field!r} needs a list value, got {_KIND_NAMES[condition.value.WhichOneof('kind')]}"
            )
        values = condition.value.list_value.values
        if not values:
            raise invalid_argument(f"{_operator_name(op)} on {field!r} needs a non-empty list")
        if len(values) > MAX_LIST_VALUES:
            raise invalid_argument(
                f"{_operator_name(op)} on {field!r} takes at most {MAX_LIST_VALUES} values, got {len(values)}"
            )
        return FilterCondition(field, _MEMBERSHIP[op], tuple(_typed_value(value, field, field_type) for value in values))
    if op not in _COMPARISONS:
        raise invalid_argument(f"condition on {field!r} has no valid operator ({_operator_name(op)})")
    if op in _ORDERING and field_type == "bool":
        raise invalid_argument(f"{_operator_name(op)} does not apply to bool field {field!r}; use EQ, NE, IN or NOT_IN")
    return FilterCondition(field, _COMPARISONS[op], (_typed_value(condition.value, field, field_type),))


def _typed_value(value: struct_pb2.Value, field: str, field_type: FieldType) -> FilterValue:
    kind = value.WhichOneof("kind")
    if field_type == "string":
        if kind != "string_value":
            raise invalid_argument(f"filter value for string field {field!r} must be a string, got {_KIND_NAMES[kind]}")
        if has_control_chars(value.string_value):
            raise invalid_argument(f"filter value for {field!r} contains a control character")
        return value.string_value
    if field_type == "bool":
        if kind != "bool_value":
            raise invalid_argument(f"filter value for bool field {field!r} must be a bool, got {_KIND_NAMES[kind]}")
        return value.bool_value
    if kind != "number_value":
        raise invalid_argument(f"filter value for {field_type} field {field!r} must be a number, got {_KIND_NAMES[kind]}")
    number = value.number_value
    if not math.isfinite(number):
        raise invalid_argument(f"filter value for {field!r} must be finite, got {number}")
    if field_type == "float":
        return float(number)
    if not number.is_integer() or abs(number) > MAX_EXACT_INT:
        raise invalid_argument(f"filter value for int field {field!r} must be an integer within +-2**53, got {number!r}")
    return int(number)
