"""How the command line reaches the gateway: its address and API key (`--gateway` / `--api-key`, or
VSEARCH_GATEWAY / VSEARCH_API_KEY), and a gRPC channel that sends the key with every call."""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import grpc

DEFAULT_GATEWAY = "127.0.0.1:50051"


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("VSEARCH_GATEWAY") or DEFAULT_GATEWAY,
                        help=f"the gateway's gRPC address (default $VSEARCH_GATEWAY or {DEFAULT_GATEWAY})")
    parser.add_argument("--api-key", default=os.environ.get("VSEARCH_API_KEY") or None,
                        help="the API key for a gateway that checks keys (default $VSEARCH_API_KEY)")


def _with_header(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# Two classes: a grpc.aio channel files each interceptor under one kind of call only.
class _KeyOnUnaryCalls(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_header(details, self._header), request)


class _KeyOnClientStreams(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_stream_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_header(details, self._header), request_iterator)


def gateway_channel(address: str, api_key: str | None = None,
                    options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An insecure (loopback or in-cluster) channel to the gateway, carrying `api_key` when given."""
    header = ("authorization", f"Bearer {api_key}")
    interceptors = [_KeyOnUnaryCalls(header), _KeyOnClientStreams(header)] if api_key else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
