"""`vsearch up`: the whole stack on loopback as separate processes, with embedded defaults."""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


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


@dataclass
class StackLayout:
    data_dir: Path
    model_dir: Path
    gateway_port: int
    http_port: int
    embedder_port: int = field(default_factory=free_port)
    search_port: int = field(default_factory=free_port)
    redis_port: int | None = None

    @property
    def redis_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_port else None

    def environments(self) -> dict[str, dict[str, str]]:
        """Each service's settings, as the environment it reads them from."""
        common = {"LOG_FORMAT": "text"}
        embedder = {
            "EMBEDDER_PORT": str(self.embedder_port),
            "EMBEDDER_MODEL_DIR": str(self.model_dir),
        }
        search = {
            "SEARCH_PORT": str(self.search_port),
            "SEARCH_MILVUS__URI": str(self.data_dir / "milvus.db"),
        }
        gateway = {
            "GATEWAY_PORT": str(self.gateway_port),
            "GATEWAY_HTTP_PORT": str(self.http_port),
            "GATEWAY_EMBEDDER_ADDRESS": f"127.0.0.1:{self.embedder_port}",
            "GATEWAY_SEARCH_ADDRESS": f"127.0.0.1:{self.search_port}",
        }
        if self.redis_url:
            gateway["GATEWAY_REDIS_URL"] = self.redis_url
        envs = {"embedder": embedder, "search": search, "gateway": gateway}
        for name, env in envs.items():
            prefix = name.upper() + "_"
            env.update({prefix + key: value for key, value in common.items()})
            # A quick local stop: nothing routes around a local process, so no drain period.
            env[prefix + "DRAIN_SECONDS"] = "0"
            env[prefix + "GRACE_SECONDS"] = "3"
        return envs


def _die_with_parent() -> None:
    """Runs in the child before exec: if `vsearch up` itself is killed (even by SIGKILL), the kernel
    sends the child SIGTERM, so no service outlives the launcher."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def wait_serving(address: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Waits until the gRPC health service at `address` says SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process for {address} exited with code {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.1)


class LocalStack:
    """Starts redis-server (when installed), embedder, search and gateway as child processes."""

    def __init__(self, layout: StackLayout, log_dir: Path) -> None:
        self.layout = layout
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.processes[name] = process
        return process

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None or self.layout.redis_port is None:
            self.layout.redis_port = None
            return
        self._spawn("redis", [binary, "--port", str(self.layout.redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], {})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.layout.redis_port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not open its port")

    async def start(self, timeout: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        envs = self.layout.environments()
        services = {
            "embedder": ("embedder_svc", self.layout.embedder_port),
            "search": ("search_svc", self.layout.search_port),
            "gateway": ("gateway", self.layout.gateway_port),
        }
        for name, (module, _port) in services.items():
            self._spawn(name, [sys.executable, "-m", module], envs[name])
        await asyncio.gather(*(
            wait_serving(f"127.0.0.1:{port}", timeout, self.processes[name])
            for name, (_module, port) in services.items()
        ))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order (gateway first), then SIGKILL whatever is left."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
