"""The shared plumbing: channels spread calls over every address, settings refuse with one line, the
wire-format reader finds what makes a message unparsable, and Struct nesting is measured. (Unparsable
requests through real servers: test_grpc_bad_payloads.)"""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from service_kit.channels import create_channel
from service_kit.server import ManagedServer
from service_kit.settings import ServiceSettings, load_settings
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
