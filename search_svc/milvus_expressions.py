"""Milvus boolean expressions: validated filter conditions (`filters.FilterCondition`) and id lists,
rendered for the Milvus backend's `filter=` arguments.

Caller text never reaches the expression language except as an escaped, typed literal: field names
come from the declared filter fields only, operators from a fixed table, and values are rendered from
their type (a string as a double-quoted literal, a number as a Python float/int repr, a bool as
true/false).

Why escaping and not Milvus's filter templates (`filter="category == {c}"`, `filter_params=`): Milvus
Lite 2.5.1 cannot parse templates (the call fails with an unexpected server error), and one code path
for Lite and servers is what the tests can prove. Within a double-quoted literal only backslash and
double quote need escaping, and those two escapes are the only ones Milvus Lite decodes (\\n, \\t,
\\xNN and \\uNNNN match nothing there), so string values with control characters are refused rather
than mangled (by `filters.parse_filter`); the item codec refuses to store such values, so none could
ever match."""

from __future__ import annotations

from typing import Iterable, Sequence

from search_svc.columns import ID, REGION_ITEM_ID, presence_column
from search_svc.filters import FilterCondition, FilterValue, has_control_chars


def string_literal(text: str) -> str:
    """A double-quoted Milvus string literal that matches exactly `text` (which has no control
    characters; see the module docstring)."""
    if has_control_chars(text):
        raise ValueError("control characters cannot be written as a Milvus Lite string literal")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ids_expression(stored_ids: Iterable[str]) -> str:
    return f"{ID} in [{', '.join(string_literal(item_id) for item_id in stored_ids)}]"


def item_ids_expression(stored_ids: Iterable[str]) -> str:
    """The region rows of these items (a regions collection's rows)."""
    return f"{REGION_ITEM_ID} in [{', '.join(string_literal(item_id) for item_id in stored_ids)}]"


def filter_expression(conditions: Sequence[FilterCondition]) -> str:
    """The conditions ANDed ("" when there are none, which Milvus takes as no filter)."""
    return " and ".join(_condition(condition) for condition in conditions)


def _condition(condition: FilterCondition) -> str:
    presence = f"{presence_column(condition.field)} == true"
    literals = [_literal(value) for value in condition.values]
    if condition.operator in ("in", "not in"):
        return f"({presence} and {condition.field} {condition.operator} [{', '.join(literals)}])"
    return f"({presence} and {condition.field} {condition.operator} {literals[0]})"


def _literal(value: FilterValue) -> str:
    if isinstance(value, str):
        return string_literal(value)
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
