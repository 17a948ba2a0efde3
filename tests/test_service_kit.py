"""The shared plumbing: channels spread calls over every address, settings refuse with one line."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from service_kit.channels import create_channel
from service_kit.server import ManagedServer
from service_kit.settings import ServiceSettings, load_settings


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
