"""What every child process of the local stack needs: to die with its parent, a quick look at whether
it is ready (Redis answers PING; Milvus accepts connections; a gRPC service's health says SERVING), and
words for how it ended."""

from __future__ import annotations

import ctypes
import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PR_SET_PDEATHSIG = 1
# Looked up here, once: between fork and exec the child should do as little as it can (no dlopen).
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl


def die_with_parent() -> None:
    """Runs in the child before exec: if `vsearch up` itself is killed (even by SIGKILL), the kernel
    sends the child SIGTERM, so no service outlives the launcher. The kernel sends it when the *thread*
    that spawned the child ends, so children must be spawned from the main thread."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def redis_answers(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis on this loopback port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on this loopback port (the Milvus server)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def grpc_serving(address: str, timeout: float = 0.5) -> bool:
    """Whether the gRPC health service at `address` says SERVING now (no waiting for a connection)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def how_it_ended(returncode: int) -> str:
    """A process's end in words: "exited with code 1", "was killed by SIGKILL"."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"
