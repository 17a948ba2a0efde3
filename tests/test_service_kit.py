"""The shared plumbing: channels spread calls over every address, settings refuse with one line, the
wire-format reader finds what makes a message unparsable, Struct nesting is measured, spans reach an
OTLP collector and log lines carry trace ids. (Unparsable requests through real servers:
test_grpc_bad_payloads; traces through the whole stack: test_tracing.)"""

from __future__ import annotations

import io
import json
import logging
import random
import sys

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic_settings import SettingsConfigDict

from service_kit.channels import create_channel
from service_kit.server import ManagedServer
from service_kit.settings import ServiceSettings, TracingSettings, load_settings
from service_kit.structured_logging import JsonFormatter, TextFormatter
from service_kit.tracing import exporting_also_to
from service_kit.struct_nesting import struct_depth
from service_kit.wire_format import find_problem, split_field
from vsearch.v1 import gateway_pb2, search_pb2


async def test_a_channel_spreads_calls_over_every_resolved_address():
    servers = [ManagedServer(f"peer{n}", ServiceSettings(), ["vsearch.test.Peer"]) for n in range(2)]
    for server in servers:
        await server.start()
        await server.wait_ready(5)
    try:
        # As a headless Kubernetes Service resolves to every pod.
        target = "ipv4:" + ",".join(server.address for server in servers)
        async with create_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
        calls = [
            server.metrics.registry.get_sample_value(
                "vsearch_grpc_requests_total", {"service": server.name, "method": "Check", "code": "OK"}
            ) or 0.0
            for server in servers
        ]
        assert sum(calls) == 20 and min(calls) >= 5, calls
    finally:
        for server in servers:
            await server.stop(grace=0)


class NeedsThings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="THING_")
    model_dir: str
    workers: int = 2


def test_missing_and_invalid_settings_are_named_on_one_line(monkeypatch, capsys):
    monkeypatch.delenv("THING_MODEL_DIR", raising=False)
    monkeypatch.setenv("THING_WORKERS", "many")
    with pytest.raises(SystemExit) as exited:
        load_settings(NeedsThings, "thing")
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "missing required setting THING_MODEL_DIR" in lines[0] and "THING_WORKERS" in lines[0]


def struct_of(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def test_struct_depth_counts_objects_and_lists_and_gives_up_past_the_limit():
    assert struct_depth(struct_pb2.Struct()) == 1
    assert struct_depth(struct_of({"a": 1, "b": "x"})) == 1
    assert struct_depth(struct_of({"a": {"b": [1, {"c": []}]}, "d": [2]})) == 5
    deep: object = 1
    for _ in range(30):
        deep = {"a": deep}
    assert struct_depth(struct_of({"a": deep}), give_up_after=20) == 21


def test_find_problem_names_the_field_and_tells_too_deep_from_malformed():
    request = search_pb2.UpsertRequest(items=[
        search_pb2.Item(id="a"), search_pb2.Item(id="b", metadata=struct_of({"x": {"y": {"z": 1}}})),
    ])
    data = request.SerializeToString()
    descriptor = search_pb2.UpsertRequest.DESCRIPTOR
    assert find_problem(data, descriptor) is None

    # UpsertRequest, Item, then Struct, map entry, Value for each of x, y and z: 11 deep.
    deep = find_problem(data, descriptor, max_depth=6)
    assert deep is not None and deep.too_deep and deep.top_field == "items"
    assert deep.path == "items[1].metadata.fields[0]...fields[0]" and deep.detail == "messages nested more than 6 deep"
    assert find_problem(data, descriptor, max_depth=11) is None
    assert find_problem(data, descriptor, max_depth=10) is not None

    cut = find_problem(data[:-3], descriptor)  # the second item's length now overruns the message
    assert cut is not None and not cut.too_deep and cut.top_field is None
    assert str(cut) == "malformed: field 1 runs past the end of its message at byte 5"

    not_utf8 = find_problem(b"\x0a\x03\x0a\x01\xff", descriptor)  # items[0].id = b"\xff"
    assert not_utf8 is not None and (not_utf8.path, not_utf8.top_field) == ("items[0].id", "items")
    assert "not valid UTF-8" in not_utf8.detail

    garbage = find_problem(b"\xff\xff", descriptor)
    assert garbage is not None and garbage.top_field is None and str(garbage) == "malformed: truncated varint at byte 2"


def test_split_field_separates_one_field_from_the_rest():
    metadata = struct_of({"k": [1, "v"]})
    message = gateway_pb2.AddImageRequest(id="x", image=b"y", metadata=metadata, collection="c")
    rest, values = split_field(message.SerializeToString(), 3)
    assert gateway_pb2.AddImageRequest.FromString(rest) == gateway_pb2.AddImageRequest(id="x", image=b"y", collection="c")
    assert [struct_pb2.Struct.FromString(value) for value in values] == [metadata]


# ---- traces and the ids in log lines --------------------------------------------------------------

ECHO_SERVICE = "vsearch.test.Echo"
echo_logger = logging.getLogger("vsearch.test.echo")


def echo_handler() -> grpc.GenericRpcHandler:
    """A raw-bytes unary RPC that logs one line: something a traced server does."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        echo_logger.warning("echoing %d bytes", len(request))
        return request

    return grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})


async def start_echo_server(settings: ServiceSettings) -> ManagedServer:
    server = ManagedServer("echo", settings, [ECHO_SERVICE])
    server.grpc_server.add_generic_rpc_handlers((echo_handler(),))
    await server.start()
    await server.wait_ready(5)
    return server


async def call_echo(server: ManagedServer, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        assert await channel.unary_unary(f"/{ECHO_SERVICE}/Echo")(b"hi", timeout=5, metadata=metadata) == b"hi"
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC receiver, as an OpenTelemetry collector runs one: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):  # noqa: N802 - the proto's name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_a_service_exports_its_spans_to_the_otlp_collector_its_settings_name():
    collector = OtlpCollector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    receiver_port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    try:
        tracing = TracingSettings(exporter="otlp", otlp_endpoint=f"http://127.0.0.1:{receiver_port}")
        server = await start_echo_server(ServiceSettings(tracing=tracing))
        trace_id, caller_span = random.getrandbits(128), random.getrandbits(64)
        try:
            await call_echo(server, (("traceparent", f"00-{trace_id:032x}-{caller_span:016x}-01"),))
        finally:
            await server.stop(grace=0)  # exports the spans still queued
    finally:
        await receiver.stop(0)
    exported = [
        (resource_spans.resource, span)
        for request in collector.requests for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans for span in scope_spans.spans
    ]
    # The echo call, and not the health check beside it.
    assert [span.name for _resource, span in exported] == [f"{ECHO_SERVICE}/Echo"]
    resource, span = exported[0]
    assert {attribute.key: attribute.value.string_value for attribute in resource.attributes}["service.name"] == "echo"
    assert span.trace_id == trace_id.to_bytes(16, "big") and span.parent_span_id == caller_span.to_bytes(8, "big")


async def test_an_unsampled_request_records_no_span_and_its_log_lines_still_carry_its_trace_id():
    exporter = InMemorySpanExporter()
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter("echo"))
    echo_logger.addHandler(handler)
    try:
        with exporting_also_to(SimpleSpanProcessor(exporter)):
            server = await start_echo_server(ServiceSettings(tracing=TracingSettings(sample_ratio=0.0)))
        try:
            await call_echo(server)
        finally:
            await server.stop(grace=0)
    finally:
        echo_logger.removeHandler(handler)
    assert exporter.get_finished_spans() == ()
    [entry] = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert entry["msg"] == "echoing 2 bytes" and len(entry["trace_id"]) == 32 and len(entry["span_id"]) == 16
    assert int(entry["trace_id"], 16) != 0


def test_a_json_log_line_carries_the_ids_of_the_span_it_was_logged_in():
    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter("svc")

    def line() -> dict:
        return json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)))

    assert "trace_id" not in line() and "span_id" not in line()
    with tracer.start_as_current_span("step") as step:
        entry = line()
    assert entry["trace_id"] == f"{step.get_span_context().trace_id:032x}"
    assert entry["span_id"] == f"{step.get_span_context().span_id:016x}"


def test_a_text_log_line_carries_the_ids_of_the_span_it_was_logged_in():
    tracer = TracerProvider().get_tracer("test")
    formatter = TextFormatter("svc")

    def line(exc_info=None) -> str:
        return formatter.format(logging.LogRecord("x", logging.ERROR, __file__, 1, "hello %s", ("there",), exc_info))

    assert line().endswith("ERROR svc x: hello there") and "trace_id" not in line()
    with tracer.start_as_current_span("step") as step:
        plain = line()
        try:
            raise ValueError("boom")
        except ValueError:
            with_traceback = line(sys.exc_info())
    ids = f"trace_id={step.get_span_context().trace_id:032x} span_id={step.get_span_context().span_id:016x}"
    assert plain.endswith(f"ERROR svc x: hello there {ids}")
    first, *traceback = with_traceback.splitlines()
    assert first.endswith(f"hello there {ids}") and traceback[-1] == "ValueError: boom"


def test_tracing_is_off_by_default_and_set_from_the_environment(monkeypatch, capsys):
    assert ServiceSettings().tracing.exporter == "none"
    monkeypatch.setenv("THING_MODEL_DIR", "/models/m")
    monkeypatch.setenv("THING_TRACING__EXPORTER", "otlp")
    monkeypatch.setenv("THING_TRACING__OTLP_ENDPOINT", "http://otel-collector:4317")
    monkeypatch.setenv("THING_TRACING__SAMPLE_RATIO", "0.25")
    assert load_settings(NeedsThings, "thing").tracing == TracingSettings(
        exporter="otlp", otlp_endpoint="http://otel-collector:4317", sample_ratio=0.25
    )
    monkeypatch.setenv("THING_TRACING__EXPORTER", "jaeger")
    monkeypatch.setenv("THING_TRACING__SAMPLE_RATIO", "2")
    with pytest.raises(SystemExit):
        load_settings(NeedsThings, "thing")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "THING_TRACING__EXPORTER" in line and "THING_TRACING__SAMPLE_RATIO" in line
