"""Traces: one trace per request across the gateway, the embedder and search_svc.

W3C trace context (`traceparent`, `tracestate`) travels in gRPC metadata and HTTP headers: a server
continues its caller's trace (or starts one), its outbound calls carry it on. Each service has its own
tracer (`ServiceTracing`, built by `ManagedServer` from `*_TRACING__*`), with its own `service.name`
resource: one per process in a deployment, three when the tests run the stack in one process. What
makes spans:

- a server span per RPC (`ServerTracingInterceptor`, first in `ManagedServer`'s chain) and per HTTP
  request under /v1/ (`TracingAsgiMiddleware`);
- a client span per outbound call made inside a traced request (`ClientTracingInterceptor`, on
  `create_channel`'s channels); background calls (health checks, startup) make none;
- `span(name)` for a step inside a request, and `record_span` for one already over (a queue wait).

Off (`exporter="none"`, the default) no interceptor or middleware is installed and `span()` returns a
shared no-op, so the request path is as it was. The tracer travels in the OpenTelemetry context beside
the current span, so code deep in a request (or in an executor thread it was `carried` into) finds it
without being handed it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from typing import Any, Awaitable, Callable, ContextManager, Iterator, Mapping, Sequence, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service_kit.settings import TracingSettings

ResultT = TypeVar("ResultT")
Attributes = Mapping[str, str | int | float | bool]

_TRACER_KEY = otel_context.create_key("vsearch-tracer")
# W3C trace context only, whatever OTEL_PROPAGATORS says: it is what the services speak to each other.
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: ContextManager[None] = contextlib.nullcontext()
# Long-lived or constant-noise RPCs (probes every second) that would bury the requests' traces.
_UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# gRPC codes that make a server span an error (OpenTelemetry's RPC conventions); a client span is an
# error on any code but OK.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

_processors_for_new_tracers: list[SpanProcessor] = []


@contextlib.contextmanager
def exporting_also_to(processor: SpanProcessor) -> Iterator[None]:
    """Every service tracer created inside the block also hands its spans to `processor`, and traces
    even when its settings say "none": how a test records the spans of real services in memory. The
    services keep doing so after the block; shutting them down leaves `processor` running."""
    _processors_for_new_tracers.append(processor)
    try:
        yield
    finally:
        _processors_for_new_tracers.remove(processor)


class _SharedProcessor(SpanProcessor):
    """Forwards spans to a processor that several tracers share, and leaves its shutdown to its owner."""

    def __init__(self, processor: SpanProcessor) -> None:
        self._processor = processor

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)


def _exporting_processors(settings: TracingSettings) -> list[SpanProcessor]:
    if settings.exporter == "otlp":
        # Imported only when used: it brings its own gRPC channel and protobuf modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return [BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))]
    if settings.exporter == "console":
        return [BatchSpanProcessor(ConsoleSpanExporter())]
    return []


class ServiceTracing:
    """One service's tracer, or none when tracing is off; and what it installs on the service's
    server, channels and HTTP app."""

    def __init__(self, service: str, settings: TracingSettings) -> None:
        processors = _exporting_processors(settings)
        processors += [_SharedProcessor(processor) for processor in _processors_for_new_tracers]
        self._provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        if processors:
            self._provider = TracerProvider(
                resource=Resource.create({"service.name": service, "service.namespace": "vsearch"}),
                # A caller's decision stands, so a trace is recorded whole or not at all.
                sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            )
            for processor in processors:
                self._provider.add_span_processor(processor)
            self.tracer = self._provider.get_tracer("vsearch." + service)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tracer is None else [ServerTracingInterceptor(self.tracer)]

    def client_interceptors(self, target: str) -> list[grpc.aio.ClientInterceptor]:
        return [] if self.tracer is None else [ClientTracingInterceptor(self.tracer, target)]

    def asgi(self, app: Any) -> Any:
        """`app` with a server span per HTTP request under /v1/, or `app` itself when off."""
        return app if self.tracer is None else TracingAsgiMiddleware(app, self.tracer)

    def shutdown(self) -> None:
        """Exports what is still queued (blocking: call it off the event loop) and stops exporting."""
        if self._provider is not None:
            self._provider.shutdown()


# ---- inside a request ----------------------------------------------------------------------------


def span(name: str, attributes: Attributes | None = None) -> ContextManager[Any]:
    """`with span("cache lookup"):` a child span of the current one, when the current request is
    traced; otherwise a shared no-op (a context lookup, nothing else)."""
    tracer = otel_context.get_value(_TRACER_KEY)
    if tracer is None:
        return _NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)  # type: ignore[attr-defined]


def current_trace() -> Context | None:
    """The current request's trace context when it is traced (to record spans for it later, from
    elsewhere: `record_span(..., context=...)`); None otherwise."""
    current = otel_context.get_current()
    return current if current.get(_TRACER_KEY) is not None else None


def record_span(
    name: str, start_ns: int, end_ns: int | None = None, *, context: Context | None = None,
    attributes: Attributes | None = None, error: BaseException | None = None,
) -> None:
    """A span for a step that is already over (a queue wait measured by its caller), from `start_ns`
    to `end_ns` (default now), both `time.time_ns()`, child of the current span or of `context`'s."""
    parent = otel_context.get_current() if context is None else context
    tracer: Tracer | None = parent.get(_TRACER_KEY)  # type: ignore[assignment]
    if tracer is None:
        return
    recorded = tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    if error is not None:
        recorded.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    recorded.end(end_time=end_ns)


def carried(function: Callable[..., ResultT]) -> Callable[..., ResultT]:
    """`function`, made to run in the current context when the request is traced, for an executor
    (`run_in_executor` does not carry context): its spans and log lines then belong to the request."""
    if otel_context.get_value(_TRACER_KEY) is None:
        return function
    return functools.partial(contextvars.copy_context().run, function)


# ---- gRPC ------------------------------------------------------------------------------------------


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [value for name, value in carrier if name == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [name for name, _value in carrier]


class _ListSetter(Setter[list[tuple[str, str]]]):
    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


_METADATA_GETTER = _MetadataGetter()
_LIST_SETTER = _ListSetter()


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _server_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, int):
        code = _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class ServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """A server span per unary-response RPC, continuing the trace in the call's metadata. First in the
    chain, so the span covers the other interceptors and their log lines carry its ids."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNTRACED_METHODS):
            return handler
        behavior = handler.unary_unary or handler.stream_unary
        if behavior is None:  # streaming responses: health Watch, reflection
            return handler
        tracer, name = self._tracer, details.method.lstrip("/")
        attributes = _rpc_attributes(details.method)
        metadata = details.invocation_metadata or ()

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            parent = otel_context.set_value(_TRACER_KEY, tracer, _PROPAGATOR.extract(metadata, getter=_METADATA_GETTER))
            token = otel_context.attach(parent)
            try:
                with tracer.start_as_current_span(
                    name, kind=SpanKind.SERVER, attributes=attributes,
                    record_exception=False, set_status_on_exception=False,
                ) as server_span:
                    error: BaseException | None = None
                    try:
                        return await behavior(request, context)
                    except BaseException as raised:
                        error = raised
                        raise
                    finally:
                        code = _server_code(context, error)
                        server_span.set_attribute("rpc.grpc.status_code", code.value[0])
                        if code in _SERVER_ERRORS:
                            server_span.set_status(Status(StatusCode.ERROR, code.name))
            finally:
                otel_context.detach(token)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(
            traced, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class ClientTracingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A client span per unary call made inside a traced request, with the trace context in the call's
    metadata. Calls outside any request (health checks, startup) pass untouched."""

    def __init__(self, tracer: Tracer, target: str) -> None:
        self._tracer = tracer
        self._target = target
        self._attributes: dict[str, dict[str, str]] = {}  # by method: a channel calls only a few

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        if not trace.get_current_span().get_span_context().is_valid:
            return await continuation(client_call_details, request)
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        attributes = self._attributes.get(method)
        if attributes is None:
            attributes = self._attributes[method] = {**_rpc_attributes(method), "server.address": self._target}
        with self._tracer.start_as_current_span(
            method.lstrip("/"), kind=SpanKind.CLIENT, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as client_span:
            carrier: list[tuple[str, str]] = []
            _PROPAGATOR.inject(carrier, setter=_LIST_SETTER)
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carrier)
            call = await continuation(client_call_details._replace(metadata=metadata), request)
            # The span lasts until the answer (retries included); the caller still gets the call.
            try:
                code = await call.code()
            except asyncio.CancelledError:  # the caller gave up: so does the call
                call.cancel()
                raise
            client_span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                client_span.set_status(Status(StatusCode.ERROR, code.name))
            return call


# ---- HTTP (ASGI) -----------------------------------------------------------------------------------


class _AsgiHeaderGetter(Getter[Sequence[tuple[bytes, bytes]]]):
    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.encode()
        values = [value.decode("latin-1") for name, value in carrier if name == wanted]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _value in carrier]


_ASGI_GETTER = _AsgiHeaderGetter()


class TracingAsgiMiddleware:
    """A server span per HTTP request under /v1/ (the page, docs, probes and scrapes are left out),
    continuing the caller's `traceparent`. Outermost, so every log line of the request carries its ids."""

    def __init__(self, app: Any, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parent = otel_context.set_value(
            _TRACER_KEY, self._tracer, _PROPAGATOR.extract(scope.get("headers") or (), getter=_ASGI_GETTER)
        )
        token = otel_context.attach(parent)
        try:
            with self._tracer.start_as_current_span(
                method, kind=SpanKind.SERVER, attributes={"http.request.method": method, "url.path": scope["path"]},
                record_exception=False, set_status_on_exception=False,
            ) as server_span:
                status = 500

                async def recording_send(message: dict) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, recording_send)
                finally:
                    # The route template, known once the router has matched (the raw path may hold ids).
                    route = getattr(scope.get("route"), "path", None)
                    if route is not None:
                        server_span.update_name(f"{method} {route}")
                        server_span.set_attribute("http.route", route)
                    server_span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        server_span.set_status(Status(StatusCode.ERROR, str(status)))
        finally:
            otel_context.detach(token)
