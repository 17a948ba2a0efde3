"""Starts and stops the local stack's processes: redis-server, tritonserver (optional), the embedder,
search_svc and the gateway."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vsearch_cli.local_stack.child_processes import die_with_parent, wait_serving
from vsearch_cli.local_stack.layout import StackLayout
from vsearch_cli.local_stack.triton import TritonServerProcess


class LocalStack:
    """Starts redis-server (when installed), embedder, search and gateway as child processes, and
    tritonserver first when `triton` is given (the layout's embedder environment then points at it)."""

    def __init__(self, layout: StackLayout, log_dir: Path, triton: TritonServerProcess | None = None) -> None:
        self.layout = layout
        self.log_dir = log_dir
        self.triton = triton
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            preexec_fn=die_with_parent,
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

    async def start_triton(self, timeout: float) -> None:
        if self.triton is None:
            return
        # Spawned from this (the main) thread: the child's parent-death signal follows the thread
        # that started it, and a worker thread ends long before `vsearch up` does.
        self.processes["triton"] = self.triton.start()
        models = [self.layout.triton_model_name] if self.layout.triton_model_name else []
        await asyncio.to_thread(self.triton.wait_ready, timeout, models)

    async def start(self, timeout: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        await self.start_triton(timeout)
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
        if self.triton is not None:
            self.triton.stop()
