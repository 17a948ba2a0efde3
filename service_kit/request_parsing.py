"""Lenient request parsing for the gRPC servers. gRPC answers a request that fails to parse with
UNKNOWN (a unary call) or ends a client stream with INTERNAL at the first bad message; here such a
message becomes an `UnparsableMessage` saying what is wrong where, and `metrics.ServiceInterceptor`
answers the call with INVALID_ARGUMENT, except in a client stream, whose handler receives the marker
in place of the message so one bad message need not end the stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf.message import Message

from service_kit.wire_format import WireProblem, find_problem, split_field

logger = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class UnparsableMessage:
    """Stands in for a request message that could not be parsed."""

    type_name: str
    # Where and why, when the wire-format reader could tell; else the parser's own words are all.
    problem: WireProblem | None
    parser_error: str
    # The message without the top-level field at fault, when the rest parses: an AddImageRequest whose
    # metadata is nested too deeply still says which item it was.
    salvaged: Message | None

    @property
    def reason(self) -> str:
        return str(self.problem) if self.problem is not None else self.parser_error

    def describe(self) -> str:
        return f"request is not a valid {self.type_name}: {self.reason}"


def lenient_deserializer(deserializer: Deserializer | None) -> Deserializer | None:
    """`deserializer`, except that a message it cannot parse becomes an `UnparsableMessage`."""
    if deserializer is None:  # the handler takes raw bytes: nothing to parse
        return None
    message_class = getattr(deserializer, "__self__", None)  # Message.FromString is a bound classmethod
    if not (isinstance(message_class, type) and issubclass(message_class, Message)):
        message_class = None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the caller's malformed request
            try:
                return unparsable(data, message_class, error)
            except Exception:  # noqa: BLE001 - a bug in the diagnosis must not cost the caller the answer
                logger.exception("diagnosing an unparsable request failed")
                return UnparsableMessage("request message", None, str(error), None)

    return deserialize


def unparsable(data: bytes, message_class: type[Message] | None, error: Exception) -> UnparsableMessage:
    if message_class is None:
        return UnparsableMessage("request message", None, str(error), None)
    descriptor = message_class.DESCRIPTOR
    problem = find_problem(data, descriptor)
    salvaged = None
    if problem is not None and problem.top_field is not None:
        salvaged = _without_field(data, message_class, descriptor.fields_by_name[problem.top_field].number)
    parser_error = str(error) or type(error).__name__
    return UnparsableMessage(descriptor.full_name, problem, parser_error, salvaged)


def _without_field(data: bytes, message_class: type[Message], number: int) -> Message | None:
    try:
        rest, _values = split_field(data, number)
        return message_class.FromString(rest)
    except Exception:  # noqa: BLE001 - nothing salvageable: the caller reports the message as a whole
        return None
