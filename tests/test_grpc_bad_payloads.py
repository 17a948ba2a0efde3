"""Requests that are not what their message type says, sent as raw bytes to real servers: garbage on
every RPC of every service, and metadata nested deeper than protobuf can parse. The answer is
INVALID_ARGUMENT naming what could not be parsed, never UNKNOWN or INTERNAL (what gRPC answers by
itself); in a client stream a bad message is handed to the handler, so gateway AddImages reports it as
that item's failure and goes on with the others."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conftest import in_process_stack, length_delimited, metric_value, nested_struct_bytes
from service_kit.request_parsing import UnparsableMessage
from service_kit.server import ManagedServer
from service_kit.settings import ServiceSettings
from service_kit.struct_nesting import MAX_STRUCT_DEPTH
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

# Neither parses as any message: a tag cut short, and a field longer than what follows it.
GARBAGE = {"truncated tag": b"\xff\xff\xff", "field past the end": b"\x0a\x05ab"}
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def add_image_bytes(item_id: str, image: bytes, metadata: bytes | None = None) -> bytes:
    message = gateway_pb2.AddImageRequest(id=item_id, image=image).SerializeToString()
    return message if metadata is None else message + length_delimited(3, metadata)


async def raw_unary(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method)(payload, timeout=30)
    return caught.value


def assert_refused(error: grpc.RpcError, *fragments: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())


# ---- service_kit: every kind of RPC of a ManagedServer ------------------------------------------

async def echo(request: gateway_pb2.AddImageRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.AddImagesSummary:
    return gateway_pb2.AddImagesSummary(received=1)


async def tally(
    messages: AsyncIterator[gateway_pb2.AddImageRequest | UnparsableMessage], context: grpc.aio.ServicerContext
) -> gateway_pb2.AddImagesSummary:
    """Reports each message that could not be parsed, with the id salvaged from it, and goes on."""
    summary = gateway_pb2.AddImagesSummary()
    async for message in messages:
        if isinstance(message, UnparsableMessage):
            salvaged_id = message.salvaged.id if message.salvaged is not None else ""
            summary.failures.add(id=salvaged_id, message=message.describe(), index=summary.received)
        else:
            summary.indexed += 1
        summary.received += 1
    return summary


@pytest.fixture
async def probe_server() -> AsyncIterator[ManagedServer]:
    server = ManagedServer("probe", ServiceSettings(log_format="text"), ["vsearch.test.Probe"])
    summary = gateway_pb2.AddImagesSummary.SerializeToString
    parse = gateway_pb2.AddImageRequest.FromString
    server.grpc_server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("vsearch.test.Probe", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=parse, response_serializer=summary),
        "Tally": grpc.stream_unary_rpc_method_handler(tally, request_deserializer=parse, response_serializer=summary),
    })])
    await server.start()
    await server.wait_ready(10)
    try:
        yield server
    finally:
        await server.stop(grace=0)


async def test_garbage_is_invalid_argument_on_every_kind_of_rpc(probe_server: ManagedServer) -> None:
    async with grpc.aio.insecure_channel(probe_server.address) as channel:
        for payload in GARBAGE.values():
            error = await raw_unary(channel, "/vsearch.test.Probe/Echo", payload)
            assert_refused(error, "request is not a valid vsearch.v1.AddImageRequest: malformed")
            error = await raw_unary(channel, "/grpc.health.v1.Health/Check", payload)
            assert_refused(error, "not a valid grpc.health.v1.HealthCheckRequest: malformed")

            with pytest.raises(grpc.aio.AioRpcError) as caught:  # server streaming: health Watch
                async for _ in channel.unary_stream("/grpc.health.v1.Health/Watch")(payload, timeout=10):
                    pass
            assert_refused(caught.value, "not a valid grpc.health.v1.HealthCheckRequest")

            with pytest.raises(grpc.aio.AioRpcError) as caught:  # both streaming: reflection
                method = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"
                async for _ in channel.stream_stream(method)(iter([payload]), timeout=10):
                    pass
            assert_refused(caught.value, "not a valid grpc.reflection.v1alpha.ServerReflectionRequest: malformed")

        assert metric_value(
            probe_server.metrics.registry, "vsearch_grpc_requests_total",
            service="probe", method="Echo", code="INVALID_ARGUMENT",
        ) == len(GARBAGE)
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_stream_handler_gets_each_bad_message_and_the_stream_goes_on(
    probe_server: ManagedServer,
) -> None:
    messages = [
        add_image_bytes("first", b"x"),
        GARBAGE["truncated tag"],
        # 40 levels of 3 messages each: past protobuf's limit of 100, yet the id can still be read.
        add_image_bytes("too-deep", b"x", nested_struct_bytes(40)),
        add_image_bytes("last", b"x"),
    ]
    async with grpc.aio.insecure_channel(probe_server.address) as channel:
        raw = await channel.stream_unary("/vsearch.test.Probe/Tally")(iter(messages), timeout=10)
    summary = gateway_pb2.AddImagesSummary.FromString(raw)
    assert (summary.received, summary.indexed) == (4, 2)
    garbage, deep = summary.failures
    assert (garbage.index, garbage.id) == (1, "")
    assert "not a valid vsearch.v1.AddImageRequest: malformed: truncated varint" in garbage.message
    assert (deep.index, deep.id) == (2, "too-deep")
    assert "metadata.fields[0].value" in deep.message and "nested more than 100 deep" in deep.message


# ---- the real services --------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, mobilenet_dir: Path):
    async with in_process_stack(tmp_path_factory.mktemp("bad-payloads"), mobilenet_dir) as stack:
        yield stack


SERVICES = {
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["VisualSearch"],
    "search": search_pb2.DESCRIPTOR.services_by_name["VectorSearch"],
    "embedder": embedder_pb2.DESCRIPTOR.services_by_name["Embedder"],
}


async def test_garbage_on_every_rpc_of_every_service_is_invalid_argument(stack) -> None:
    servers = {"gateway": stack.gateway_server, "search": stack.search_server, "embedder": stack.embedder_server}
    count_before = await stack.count()
    for service_name, service in SERVICES.items():
        async with grpc.aio.insecure_channel(servers[service_name].address) as channel:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                for payload in GARBAGE.values():
                    if method.client_streaming:
                        with pytest.raises(grpc.aio.AioRpcError) as caught:
                            await channel.stream_unary(path)(iter([payload]), timeout=30)
                        error = caught.value
                    else:
                        error = await raw_unary(channel, path, payload)
                    assert_refused(error, method.input_type.full_name, "malformed")
    assert await stack.all_serving()
    assert await stack.count() == count_before


async def test_metadata_deeper_than_protobuf_parses_is_refused_by_search_svc(stack) -> None:
    image_free_item = (
        length_delimited(1, b"deep-item")
        + length_delimited(2, b"")
        + length_delimited(4, nested_struct_bytes(40))
    )
    async with grpc.aio.insecure_channel(stack.search_server.address) as channel:
        error = await raw_unary(
            channel, "/vsearch.v1.VectorSearch/Upsert", length_delimited(1, image_free_item)
        )
    assert_refused(error, "not a valid vsearch.v1.UpsertRequest", "items[0].metadata", "nested more than 100 deep")


async def test_add_images_reports_unparsable_and_too_deep_items_and_goes_on(stack, ukbench_bytes) -> None:
    count_before = await stack.count()
    deep_but_parsable = gateway_pb2.AddImageRequest(id="deep-21", image=ukbench_bytes[3])
    deep_but_parsable.metadata.ParseFromString(nested_struct_bytes(MAX_STRUCT_DEPTH + 1))  # protobuf parses 33
    messages = [
        add_image_bytes("bad-payload-0", ukbench_bytes[0]),
        add_image_bytes("deep-60", ukbench_bytes[1], nested_struct_bytes(60)),  # fails the whole stream today
        GARBAGE["field past the end"],
        deep_but_parsable.SerializeToString(),
        add_image_bytes("at-the-limit", ukbench_bytes[4], nested_struct_bytes(MAX_STRUCT_DEPTH)),
        add_image_bytes("bad-payload-5", ukbench_bytes[5]),
    ]
    raw = await stack.channel.stream_unary("/vsearch.v1.VisualSearch/AddImages")(iter(messages), timeout=120)
    summary = gateway_pb2.AddImagesSummary.FromString(raw)
    try:
        assert (summary.received, summary.indexed, summary.unchanged, summary.failed) == (6, 3, 0, 3), summary
        deep, garbage, deep_parsed = summary.failures
        assert (deep.index, deep.id, deep.code) == (1, "deep-60", INVALID_ARGUMENT)
        assert deep.message == f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels"
        assert (garbage.index, garbage.id, garbage.code) == (2, "", INVALID_ARGUMENT)
        assert "not a valid vsearch.v1.AddImageRequest: malformed: field 1 runs past the end" in garbage.message
        assert (deep_parsed.index, deep_parsed.id) == (3, "deep-21")
        assert deep_parsed.message == f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels"
        assert await stack.count() == count_before + 3
        # An item at the limit comes back from a search whole: every message on the way parses.
        reply = await stack.search(ukbench_bytes[4], k=1)
        assert reply.hits[0].id == "at-the-limit"
        assert reply.hits[0].metadata == gateway_pb2.AddImageRequest.FromString(messages[4]).metadata
    finally:
        await stack.stub.DeleteImages(
            gateway_pb2.DeleteImagesRequest(ids=["bad-payload-0", "at-the-limit", "bad-payload-5"]), timeout=30
        )


def pipelined_stream_refusal(address: str, method: str, messages: list[bytes]) -> grpc.RpcError:
    """Sends every message of a client stream without waiting for the server, through grpc's sync API,
    and returns the error the call ended with. grpc.aio's client would sometimes report INTERNAL
    ("Internal error from Core") instead of the server's refusal when a write loses the race with it
    (grpc/grpc#36066; vsearch's own client waits for the gateway's admission before writing more)."""
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.stream_unary(method)(iter(messages), timeout=60)
    return caught.value


async def test_a_stream_whose_first_message_cannot_be_parsed_is_refused_whole(stack, ukbench_bytes) -> None:
    # The first message names the stream's collection; without it the items would land in the default one.
    messages = [GARBAGE["truncated tag"], add_image_bytes("never-added", ukbench_bytes[0])]
    refusal = await asyncio.to_thread(pipelined_stream_refusal, stack.gateway_server.address,
                                      "/vsearch.v1.VisualSearch/AddImages", messages)
    assert_refused(refusal, "first message is not a valid vsearch.v1.AddImageRequest", "truncated varint",
                   "collection is unknown")
    reply = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=ukbench_bytes[0], k=1), timeout=30)
    assert all(hit.id != "never-added" for hit in reply.hits)
