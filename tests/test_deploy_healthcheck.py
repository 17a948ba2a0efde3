"""deploy/docker/healthcheck.py, the images' HEALTHCHECK and compose's health checks: exit 0 only
when the service's grpc.health.v1 status is SERVING, on the port its own setting names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "docker" / "healthcheck.py"


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_serving_passes_and_not_serving_fails(health_server):
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_check("TEST_SERVICE_PORT", "1", env={"TEST_SERVICE_PORT": str(port)})
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_check("TEST_SERVICE_PORT", "1", env={"TEST_SERVICE_PORT": str(port)}).returncode == 0


def test_default_port_is_used_when_the_setting_is_absent(health_server):
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    env = {k: v for k, v in os.environ.items() if k != "TEST_SERVICE_PORT"}
    result = subprocess.run([sys.executable, str(SCRIPT), "TEST_SERVICE_PORT", str(port)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0


def test_nothing_listening_fails():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    result = run_check("TEST_SERVICE_PORT", str(free_port), env={"TEST_SERVICE_PORT": ""})
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_usage():
    assert run_check().returncode == 2
