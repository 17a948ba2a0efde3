"""Loopback ports for the local stack and the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of `count` consecutive free loopback ports (what `vsearch up --replicas N` gives its
    gateways)."""
    for _ in range(attempts):
        base = free_port()
        if base + count <= 65536 and all(port_is_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")
