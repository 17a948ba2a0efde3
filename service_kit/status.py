"""Errors carried as precise gRPC status codes, in both directions."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Raise inside a servicer to answer with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid_argument(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Codes a caller should see unchanged when a downstream service returns them.
_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def downstream_error(service: str, error: grpc.aio.AioRpcError) -> ServiceError:
    """Maps a failed outbound call to the status we answer with, naming the service that failed.
    CANCELLED (the connection broke) reads as UNAVAILABLE; anything unexpected downstream is an
    internal fault of ours to report, not the caller's."""
    code = error.code()
    if code in _PASSED_THROUGH:
        mapped = code
    elif code == grpc.StatusCode.CANCELLED:
        mapped = grpc.StatusCode.UNAVAILABLE
    else:
        mapped = grpc.StatusCode.INTERNAL
    return ServiceError(mapped, f"{service}: {error.details() or code.name}")


def code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
