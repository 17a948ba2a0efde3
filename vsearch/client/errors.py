"""The client's errors: every non-OK status a call ends with is raised as a `VsearchError` carrying the
status code and the gateway's message, as one of the subclasses below for the codes a caller handles."""

from __future__ import annotations

import grpc
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2

# How the gateway sends a rate limit's delay (gateway/servicer.py): a google.rpc.RetryInfo in the rich
# status, and the same delay in milliseconds for clients without the google.rpc protos.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_MS_KEY = "retry-after-ms"
# A health check failing with one of these got no answer from the gateway; any other answer, a refusal
# included, means it is there.
NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """A google.rpc.Code number (as in VisualSearchResult.code or ItemFailure.code) as a grpc.StatusCode;
    UNKNOWN for a number gRPC does not define."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class VsearchError(Exception):
    """A call the gateway (or the transport) ended with a non-OK status.

    `code` is the grpc.StatusCode and `message` the status message, as the gateway wrote it. `attempts`
    is how many times the call was made (more than 1 when UNAVAILABLE was retried)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, attempts: int = 1) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.attempts = attempts

    def __str__(self) -> str:
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.code.name}: {self.message}{tries}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, attempts={self.attempts})"


class InvalidArgument(VsearchError):
    """INVALID_ARGUMENT: the request is wrong (a bad filter, image, id, page token...); the message names it."""


class NotFound(VsearchError):
    """NOT_FOUND: e.g. a collection that does not exist, or an item_id that is not indexed."""


class FailedPrecondition(VsearchError):
    """FAILED_PRECONDITION: the request is valid but the system is not in a state to answer it (e.g. a page
    token after the index changed, min_probability on an uncalibrated model)."""


class Unauthenticated(VsearchError):
    """UNAUTHENTICATED: no API key, or one the gateway does not know."""


class PermissionDenied(VsearchError):
    """PERMISSION_DENIED: the API key lacks the scope the call needs."""


class RateLimited(VsearchError):
    """RESOURCE_EXHAUSTED: over a rate limit. `retry_after_s` is how long the gateway asks the caller to
    wait, when the status carries it (None otherwise)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, attempts: int = 1,
                 retry_after_s: float | None = None) -> None:
        super().__init__(code, message, attempts=attempts)
        self.retry_after_s = retry_after_s


class Unavailable(VsearchError):
    """UNAVAILABLE: the gateway (or a service behind it) could not be reached; retried by the client
    (see RetryPolicy) before it is raised."""


class DeadlineExceeded(VsearchError):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout."""


ERROR_CLASSES: dict[grpc.StatusCode, type[VsearchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(code: grpc.StatusCode, message: str, *, attempts: int = 1,
              retry_after_s: float | None = None) -> VsearchError:
    """The exception for `code`: its subclass where there is one, else VsearchError itself."""
    cls = ERROR_CLASSES.get(code, VsearchError)
    if cls is RateLimited:
        return RateLimited(code, message, attempts=attempts, retry_after_s=retry_after_s)
    return cls(code, message, attempts=attempts)


def retry_delay_of(trailing_metadata: object) -> float | None:
    """The delay a RESOURCE_EXHAUSTED status asks for: its google.rpc.RetryInfo, else `retry-after-ms`."""
    values = dict(trailing_metadata or ())  # type: ignore[arg-type]
    details = values.get(STATUS_DETAILS_KEY)
    if isinstance(details, bytes):
        try:
            status = status_pb2.Status.FromString(details)
        except protobuf_message.DecodeError:
            status = status_pb2.Status()
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.ToNanoseconds() / 1e9
    milliseconds = values.get(RETRY_AFTER_MS_KEY)
    if isinstance(milliseconds, str) and milliseconds.isdigit():
        return int(milliseconds) / 1000.0
    return None


def error_from_rpc(error: grpc.RpcError, attempts: int = 1) -> VsearchError:
    """A failed call (grpc.RpcError of the sync API, or grpc.aio.AioRpcError) as a VsearchError."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    retry_after = retry_delay_of(error.trailing_metadata()) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None  # type: ignore[attr-defined]
    converted = error_for(code, message, attempts=attempts, retry_after_s=retry_after)
    converted.__cause__ = error
    return converted
