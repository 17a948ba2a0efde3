"""Loopback ports for the local stack and the tests."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_port() -> int:
    """A loopback port nothing listens on now, and one this process has not handed out before: once the
    probing socket is closed the kernel may give the same port to the next probe, and a stack's services
    get their ports before any of them binds (two of them were once given one port)."""
    with _handing_out:
        for _ in range(1000):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("found no loopback port this process has not handed out already")


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
