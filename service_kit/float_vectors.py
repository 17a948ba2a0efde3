"""Float vectors into protobuf messages without a Python float per value.

A `repeated float` field of proto3 is packed on the wire: its tag, the byte length, then the values as
little-endian float32. So a message holding only such a field can be parsed from those bytes, built
straight from a numpy array: 1.5 us for 1280 values, where `Message(values=array.tolist())` takes 35.
(Reading goes the other way already fast: `np.asarray(message.values)` uses the buffer protocol.)"""

from __future__ import annotations

import functools
from typing import TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

MessageT = TypeVar("MessageT", bound=Message)
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


@functools.cache
def _tag(message_class: type[Message], field_name: str) -> bytes:
    field = message_class.DESCRIPTOR.fields_by_name[field_name]
    if field.type != FieldDescriptor.TYPE_FLOAT or not field.is_repeated or not field.is_packed:
        raise TypeError(f"{message_class.DESCRIPTOR.full_name}.{field_name} is not a packed repeated float")
    return _varint(field.number << 3 | _LENGTH_DELIMITED)


def float_message(message_class: type[MessageT], values: np.ndarray, field_name: str = "values") -> MessageT:
    """A new `message_class` whose `field_name` (a repeated float) holds `values`, and nothing else set."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return message_class.FromString(_tag(message_class, field_name) + _varint(len(data)) + data)
