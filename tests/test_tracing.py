"""Traces through the whole stack in one process: gateway -> embedder -> search_svc, recorded by the
OpenTelemetry SDK's in-memory exporter (every service's tracer hands its spans to it too,
`service_kit.tracing.exporting_also_to`). One search over gRPC or HTTP is one trace across the three
services, with each service's spans under its own `service.name` and the inner steps (preprocess,
batch wait, inference, queue wait, store search, filter) under the right server span; an HTTP caller's
`traceparent` is continued, and one it did not sample is recorded nowhere; a refused call carries its
status code; a log line of the request carries its trace id; and with tracing off (the default)
nothing is traced, no log line carries ids, and everything works."""

from __future__ import annotations

import io
import json
import logging
import random
from typing import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import in_process_stack, wait_until
from service_kit.structured_logging import JsonFormatter
from service_kit.tracing import exporting_also_to
from vsearch.v1 import gateway_pb2

IMAGES = 8  # indexed, so that searches find something


def service_of(span: ReadableSpan) -> str:
    return span.resource.attributes["service.name"]


def only(spans: list[ReadableSpan], name: str, service: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name and service_of(span) == service]
    assert len(found) == 1, f"{len(found)} spans {name!r} of {service}; spans: {describe(spans)}"
    return found[0]


def describe(spans: list[ReadableSpan]) -> list[str]:
    return [f"{service_of(span)}:{span.name}" for span in spans]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> set[str]:
    return {span.name for span in spans if span.parent is not None and span.parent.span_id == parent.context.span_id}


def is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id \
        and span.context.trace_id == parent.context.trace_id


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What the process logs meanwhile, as the services' JSON lines."""
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


def logged(lines: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in lines.getvalue().splitlines() if line.strip()]


# ---- tracing off (the default) --------------------------------------------------------------------


async def test_with_tracing_off_nothing_is_traced_and_searches_work(tmp_path, mobilenet_dir, ukbench_bytes, json_logs):
    exporter = InMemorySpanExporter()
    async with in_process_stack(tmp_path, mobilenet_dir) as stack:
        # Installed only now: a service built with tracing off has no tracer to hand it anything.
        with exporting_also_to(SimpleSpanProcessor(exporter)):
            for server in (stack.gateway_server, stack.embedder_server, stack.search_server):
                assert not server.tracing.enabled
                assert server.tracing.server_interceptors() == []
            assert (await stack.search(ukbench_bytes[0], k=3)).model_version
            caller = traceparent(random.getrandbits(128), random.getrandbits(64))
            reply = await stack.http.post(
                "/v1/search", files={"image": ("q.jpg", ukbench_bytes[1], "image/jpeg")}, data={"k": "3"},
                headers={"traceparent": caller},
            )
            assert reply.status_code == 200, reply.text
            stack.redis.kill()  # a warning during the next search: logged, without ids
            assert (await stack.search(ukbench_bytes[2], k=3)).model_version
    assert exporter.get_finished_spans() == ()
    lines = logged(json_logs)
    assert any("cache" in line["msg"] for line in lines), lines
    assert not [line for line in lines if "trace_id" in line or "span_id" in line]


# ---- tracing on: the in-memory exporter sees all three services ------------------------------------


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    with exporting_also_to(SimpleSpanProcessor(exporter)):
        yield exporter
    exporter.shutdown()


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, mobilenet_dir, ukbench_bytes, spans):
    async with in_process_stack(tmp_path_factory.mktemp("tracing"), mobilenet_dir) as stack:
        items = (gateway_pb2.AddImageRequest(id=f"item-{n}", image=data) for n, data in enumerate(ukbench_bytes[:IMAGES]))
        summary = await stack.stub.AddImages(items, timeout=120)
        assert summary.indexed == IMAGES, summary
        yield stack


async def trace_of(exporter: InMemorySpanExporter, trace_id: int, root_name: str) -> list[ReadableSpan]:
    """The spans of one trace, once its root (the last to end: the HTTP span ends after its
    response went out) has been recorded."""
    def spans_of_trace() -> list[ReadableSpan]:
        return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id]

    await wait_until(lambda: any(span.name == root_name for span in spans_of_trace()), 10, f"the span {root_name}")
    return spans_of_trace()


def check_one_trace_across_the_services(trace: list[ReadableSpan], root: ReadableSpan) -> None:
    """gateway root -> client EmbedImages -> embedder server span (preprocess, batch wait, inference);
    gateway root -> client Search -> search_svc server span (queue wait, store search)."""
    assert root.kind == SpanKind.SERVER and service_of(root) == "gateway"
    embed_call = only(trace, "vsearch.v1.Embedder/EmbedImages", "gateway")
    embed = only(trace, "vsearch.v1.Embedder/EmbedImages", "embedder")
    search_call = only(trace, "vsearch.v1.VectorSearch/Search", "gateway")
    search = only(trace, "vsearch.v1.VectorSearch/Search", "search_svc")
    assert (embed_call.kind, search_call.kind) == (SpanKind.CLIENT, SpanKind.CLIENT)
    assert (embed.kind, search.kind) == (SpanKind.SERVER, SpanKind.SERVER)
    assert is_child(embed_call, root) and is_child(search_call, root)
    assert is_child(only(trace, "cache lookup", "gateway"), root)
    assert is_child(embed, embed_call) and is_child(search, search_call)
    assert embed.attributes["rpc.grpc.status_code"] == 0 and search_call.attributes["rpc.grpc.status_code"] == 0

    assert {"preprocess", "batch wait", "inference"} <= children(trace, embed)
    wait, inference = only(trace, "batch wait", "embedder"), only(trace, "inference", "embedder")
    assert wait.end_time == inference.start_time
    assert inference.attributes["vsearch.batch.id"] == wait.attributes["vsearch.batch.id"]
    assert inference.attributes["vsearch.batch.size"] >= 1

    assert {"queue wait", "store search"} <= children(trace, search)
    store = only(trace, "store search", "search_svc")
    # k 3, and one more hit to know whether a next page follows (gateway/search_paging.py).
    assert store.attributes["vsearch.store.backend"] == "faiss" and store.attributes["vsearch.search.k"] == 3 + 1
    # Every span of the trace is some service's, under the root: nothing is orphaned.
    ids = {span.context.span_id for span in trace}
    assert all(span is root or (span.parent is not None and span.parent.span_id in ids) for span in trace)


async def test_a_grpc_search_is_one_trace_across_the_three_services(stack, spans, ukbench_bytes):
    spans.clear()
    reply = await stack.search(ukbench_bytes[0], k=3)
    assert reply.hits and not reply.embedding_from_cache
    root = next(span for span in spans.get_finished_spans() if span.name == "vsearch.v1.VisualSearch/Search")
    assert root.parent is None  # the caller sent no trace context: the gateway starts the trace
    trace = await trace_of(spans, root.context.trace_id, root.name)
    check_one_trace_across_the_services(trace, root)
    assert root.attributes["rpc.grpc.status_code"] == 0
    # Health checks and other background calls are not traced: everything recorded is this search's.
    assert {span.context.trace_id for span in spans.get_finished_spans()} == {root.context.trace_id}


async def test_an_http_search_continues_the_callers_trace(stack, spans, ukbench_bytes):
    spans.clear()
    trace_id, caller_span = random.getrandbits(128), random.getrandbits(64)
    reply = await stack.http.post(
        "/v1/search", files={"image": ("q.jpg", ukbench_bytes[1], "image/jpeg")},
        data={"k": "3", "filter": json.dumps([{"field": "price", "op": ">=", "value": 0}])},
        headers={"traceparent": traceparent(trace_id, caller_span)},
    )
    assert reply.status_code == 200, reply.text
    trace = await trace_of(spans, trace_id, "POST /v1/search")
    root = only(trace, "POST /v1/search", "gateway")
    assert root.parent is not None and root.parent.is_remote and root.parent.span_id == caller_span
    assert root.attributes["http.route"] == "/v1/search" and root.attributes["http.response.status_code"] == 200
    check_one_trace_across_the_services(trace, root)
    # A filtered search: its SQL side has a span of its own.
    assert "filter" in children(trace, only(trace, "store search", "search_svc"))


async def test_a_trace_the_caller_did_not_sample_is_recorded_nowhere(stack, spans, ukbench_bytes):
    spans.clear()
    trace_id = random.getrandbits(128)
    reply = await stack.http.post(
        "/v1/search", files={"image": ("q.jpg", ukbench_bytes[2], "image/jpeg")}, data={"k": "3"},
        headers={"traceparent": traceparent(trace_id, random.getrandbits(64), sampled=False)},
    )
    assert reply.status_code == 200, reply.text
    # A sampled request after it, traced whole, shows the unsampled one had time to be recorded.
    marker = random.getrandbits(128)
    await stack.http.get("/v1/stats", headers={"traceparent": traceparent(marker, random.getrandbits(64))})
    await trace_of(spans, marker, "GET /v1/stats")
    assert [span.name for span in spans.get_finished_spans() if span.context.trace_id == trace_id] == []


async def test_a_log_line_of_a_request_carries_its_trace_id(stack, spans, ukbench_bytes, json_logs):
    """Redis dies: the search goes on uncached, and the gateway's warning about it names the trace."""
    stack.redis.kill()
    try:
        trace_id = random.getrandbits(128)
        reply = await stack.http.post(
            "/v1/search", files={"image": ("q.jpg", ukbench_bytes[3], "image/jpeg")}, data={"k": "3"},
            headers={"traceparent": traceparent(trace_id, random.getrandbits(64))},
        )
        assert reply.status_code == 200, reply.text
    finally:
        stack.redis.start()
    trace = await trace_of(spans, trace_id, "POST /v1/search")
    warnings = [line for line in logged(json_logs) if line["level"] == "warning" and "cache" in line["msg"]]
    assert warnings, logged(json_logs)
    assert {line.get("trace_id") for line in warnings} == {f"{trace_id:032x}"}
    span_ids = {f"{span.context.span_id:016x}" for span in trace}
    assert all(line["span_id"] in span_ids for line in warnings)


async def test_a_refused_call_is_traced_with_its_status_code(stack, spans):
    spans.clear()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.Search(gateway_pb2.VisualSearchRequest(), timeout=10)  # neither image nor item_id
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # context.abort sends the status before the server span ends: wait for it to be recorded.
    await wait_until(lambda: any(span.name == "vsearch.v1.VisualSearch/Search" for span in spans.get_finished_spans()),
                     10, "the gateway's server span")
    root = only(list(spans.get_finished_spans()), "vsearch.v1.VisualSearch/Search", "gateway")
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert root.status.status_code == StatusCode.UNSET  # the caller's mistake, not the server's error
