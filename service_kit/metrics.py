"""Prometheus metrics for gRPC servers, and the interceptor every server runs (metrics, status codes,
lenient request parsing). Each server gets its own registry, so several services can run in one
process (as the tests do) without clashing names."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from service_kit.request_parsing import UnparsableMessage, lenient_deserializer
from service_kit.status import ServiceError

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "vsearch_grpc_requests", "gRPC calls handled, by method and status code.",
            ["service", "method", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "vsearch_grpc_latency_seconds", "gRPC call latency, by method.",
            ["service", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._requests_by_label: dict[tuple[str, str], Any] = {}
        self._latency_by_method: dict[str, Any] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        # The labelled children are looked up once each (labels() takes a lock and builds a key per call).
        requests = self._requests_by_label.get((method, code))
        if requests is None:
            requests = self._requests_by_label[(method, code)] = self.requests.labels(self.service, method, code)
        latency = self._latency_by_method.get(method)
        if latency is None:
            latency = self._latency_by_method[method] = self.latency.labels(self.service, method)
        requests.inc()
        latency.observe(seconds)

    def serve_http(self, host: str, port: int) -> Any:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def _status_name(context: grpc.aio.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call, turns `ServiceError` into its status, and turns any other
    exception into INTERNAL with the traceback logged (a bug, never the caller's fault).

    Requests are parsed leniently (`request_parsing`): a request that cannot be parsed is answered
    with INVALID_ARGUMENT saying what is wrong where, on every RPC of every service (health and
    reflection included), except that a client-streaming handler receives an `UnparsableMessage` in
    place of each message that could not be parsed, and decides (gateway AddImages reports it as that
    item's failure and goes on)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics
        # The wrapped handler of each method, made on its first call: the service's handler for a method
        # is one object, and wrapping it again on every call cost a cache hit a good part of its time.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        deserializer = lenient_deserializer(handler.request_deserializer)
        if handler.unary_stream or handler.stream_stream:
            # Streaming responses (health Watch, reflection) are neither counted nor timed.
            return _refusing_unparsable_requests(handler, deserializer)
        method = full_method.rsplit("/", 1)[-1]
        kind = "unary_unary" if handler.unary_unary else "stream_unary"
        behavior = handler.unary_unary or handler.stream_unary

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            failed = False
            try:
                if isinstance(request, UnparsableMessage):
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
                return await behavior(request, context)
            except ServiceError as error:
                failed = True
                await context.abort(error.code, error.message)
            except grpc.aio.AbortError:
                failed = True
                raise
            except Exception:
                failed = True
                logger.exception("unhandled error in %s", full_method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
            finally:
                self.metrics.observe(method, _status_name(context, failed), time.perf_counter() - start)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


async def _abort_if_unparsable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, UnparsableMessage):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())


def _refusing_unparsable_requests(handler: grpc.RpcMethodHandler, deserializer: Any) -> grpc.RpcMethodHandler:
    """The streaming-response handler, answering INVALID_ARGUMENT for a request that cannot be parsed
    instead of passing it on. The wrapper has the handler's shape (an async generator, or a coroutine
    that writes its responses), which is how grpc.aio tells how to run it; a plain generator (a sync
    handler, which these servers never have) is left as it is."""
    behavior = handler.unary_stream or handler.stream_stream
    streaming_requests = handler.stream_stream is not None

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            await _abort_if_unparsable(request, context)
            yield request

    async def prepared(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if streaming_requests:
            return checked(request, context)
        await _abort_if_unparsable(request, context)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(await prepared(request, context), context):
                yield response
    elif inspect.iscoroutinefunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            return await behavior(await prepared(request, context), context)
    else:
        return handler
    factory = grpc.stream_stream_rpc_method_handler if streaming_requests else grpc.unary_stream_rpc_method_handler
    return factory(wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer)
