"""A small reader of protobuf's wire format, for what the parser does not say: where in a message that
failed to parse the trouble lies, and whether the bytes are malformed or only nested deeper than the
parser's recursion limit. Used on the failure path only (`request_parsing`); a message that parses
never comes here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = range(6)
# protobuf's default recursion limit (upb, the C++ and the pure-Python parsers alike): a message with
# more nested messages than this fails to parse, however well-formed.
PARSER_MAX_DEPTH = 100
# A path to a problem longer than this is shown as its first fields, "...", and its last one.
_PATH_SHOWN = 4


class WireFormatError(ValueError):
    def __init__(self, offset: int, what: str) -> None:
        super().__init__(f"{what} at byte {offset}")
        self.offset = offset
        self.what = what


@dataclass(frozen=True)
class WireField:
    number: int
    wire_type: int
    # Offsets into the data: the tag's first byte, the value's first byte (after the length prefix of a
    # length-delimited field) and the byte after the value.
    start: int
    value_start: int
    end: int


def read_varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    """The varint at `position` and the offset after it."""
    value = shift = 0
    while True:
        if position >= end:
            raise WireFormatError(position, "truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            raise WireFormatError(position, "varint longer than 10 bytes")


def wire_fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[WireField]:
    """The fields of the message encoded in data[start:end], in order, without interpreting them."""
    end = len(data) if end is None else end
    position = start
    while position < end:
        tag_start = position
        tag, position = read_varint(data, position, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireFormatError(tag_start, "field number 0")
        value_start = position
        if wire_type == VARINT:
            _, position = read_varint(data, position, end)
        elif wire_type == FIXED64:
            position += 8
        elif wire_type == FIXED32:
            position += 4
        elif wire_type == LENGTH_DELIMITED:
            length, value_start = read_varint(data, position, end)
            position = value_start + length
        else:  # groups: proto3 has none, and nothing here sends them
            raise WireFormatError(tag_start, f"unsupported wire type {wire_type} in field {number}")
        if position > end:
            raise WireFormatError(tag_start, f"field {number} runs past the end of its message")
        yield WireField(number, wire_type, tag_start, value_start, position)


def split_field(data: bytes, number: int) -> tuple[bytes, list[bytes]]:
    """The message without its length-delimited field `number`, and that field's values in order."""
    rest = bytearray()
    values: list[bytes] = []
    for field in wire_fields(data):
        if field.number == number and field.wire_type == LENGTH_DELIMITED:
            values.append(data[field.value_start:field.end])
        else:
            rest += data[field.start:field.end]
    return bytes(rest), values


@dataclass(frozen=True)
class WireProblem:
    """Where a message is not what its type says, and why."""

    # Field names from the top, e.g. "items[2].metadata"; "" for the message itself.
    path: str
    # The top-level field holding the problem; None when it is the message itself.
    top_field: str | None
    # Nested deeper than the parser allows (else malformed).
    too_deep: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail


def _shown_path(parts: list[str]) -> str:
    if len(parts) > _PATH_SHOWN:
        return ".".join(parts[:_PATH_SHOWN - 1]) + "..." + parts[-1]
    return ".".join(parts)


def find_problem(data: bytes, descriptor: Descriptor, max_depth: int = PARSER_MAX_DEPTH) -> WireProblem | None:
    """The first place where `data` is not a valid `descriptor` message: bytes that are not wire
    format, a string field that is not UTF-8, or messages nested more than `max_depth` deep. None when
    it finds none (the parser may refuse for a reason it does not look for, e.g. a bad packed field).
    Iterative, so hostile nesting cannot exhaust Python's stack either."""
    # One frame per message being read: its type, its fields, its path, its repeated fields' counts.
    stack: list[tuple[Descriptor, Iterator[WireField], list[str], dict[int, int]]] = [
        (descriptor, wire_fields(data), [], {})
    ]

    def problem(parts: list[str], too_deep: bool, detail: str) -> WireProblem:
        top = parts[0].split("[", 1)[0] if parts else None
        return WireProblem(_shown_path(parts), top, too_deep, detail)

    while stack:
        message_type, fields, parts, seen = stack[-1]
        try:
            field = next(fields, None)
        except WireFormatError as error:
            return problem(parts, False, f"malformed: {error}")
        if field is None:
            stack.pop()
            continue
        declared = message_type.fields_by_number.get(field.number)
        # Unknown fields, and known ones sent with another wire type, are skipped by the parser too.
        if declared is None or field.wire_type != LENGTH_DELIMITED:
            continue
        name = declared.name
        if declared.is_repeated:
            name = f"{name}[{seen.get(field.number, 0)}]"
            seen[field.number] = seen.get(field.number, 0) + 1
        if declared.type == FieldDescriptor.TYPE_STRING:
            try:
                data[field.value_start:field.end].decode("utf-8")
            except UnicodeDecodeError:
                return problem([*parts, name], False, "a string that is not valid UTF-8")
        elif declared.type == FieldDescriptor.TYPE_MESSAGE:
            if len(stack) >= max_depth:
                return problem([*parts, name], True, f"messages nested more than {max_depth} deep")
            stack.append((declared.message_type, wire_fields(data, field.value_start, field.end), [*parts, name], {}))
    return None
