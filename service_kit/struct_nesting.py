"""How deep a `google.protobuf.Struct` (free-form metadata) nests, and the cap the services hold it to.

Why a cap: protobuf refuses to parse a message with more than 100 nested messages, and each level of a
Struct costs up to three (Struct, map entry, Value). Metadata nested 20 levels deep stays under that
limit in every message that carries it (AddImageRequest, UpsertRequest, SearchResponse, the gateway's
cached results), with room to spare; deeper metadata could be stored and then break every search
that returns it."""

from __future__ import annotations

from google.protobuf import struct_pb2

# Objects and lists inside each other, the metadata object itself included: {"a": {"b": [1]}} is 3.
MAX_STRUCT_DEPTH = 20


def struct_depth(struct: struct_pb2.Struct, give_up_after: int = MAX_STRUCT_DEPTH) -> int:
    """The nesting depth of `struct` (1 for a flat object), or `give_up_after + 1` as soon as it is
    known to be deeper than that. Iterative: no recursion however deep the input."""
    deepest = 1
    pending: list[tuple[struct_pb2.Value, int]] = [(value, 1) for value in struct.fields.values()]
    while pending:
        value, depth = pending.pop()
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            children = list(value.struct_value.fields.values())
        elif kind == "list_value":
            children = list(value.list_value.values)
        else:
            continue
        depth += 1
        if depth > give_up_after:
            return give_up_after + 1
        deepest = max(deepest, depth)
        pending.extend((child, depth) for child in children)
    return deepest
