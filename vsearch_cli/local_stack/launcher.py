"""Starts, restarts and stops the local stack's processes: redis-server, the Milvus server (with
replicas), tritonserver (optional), the embedder, search_svc and the gateway (each replicated with
replicas, see `layout`). What to do when one dies is `supervisor.Supervisor`'s business."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from vsearch_cli.local_stack.child_processes import (
    die_with_parent,
    grpc_serving,
    how_it_ended,
    port_accepts,
    redis_answers,
)
from vsearch_cli.local_stack.layout import StackLayout, milvus_lite_bin_dir
from vsearch_cli.local_stack.triton import TritonServerProcess

# The three services: service -> the module `python -m` runs (replicas are "search-0", "gateway-1", ...).
SERVICE_MODULES = {"embedder": "embedder_svc", "search": "search_svc", "gateway": "gateway"}
REDIS_START_TIMEOUT_S = 10.0
MILVUS_START_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20


class ChildFailed(RuntimeError):
    """A child exited before it was ready. The message names it, says how it ended and quotes its log."""


class StartInterrupted(RuntimeError):
    """A stop was asked for (Ctrl-C, SIGTERM) before every child was ready."""


def service_of(name: str) -> str:
    """The service a child runs: "search" for "search" and "search-1"."""
    return name.partition("-")[0]


class LocalStack:
    """Starts redis-server (when installed), the Milvus server (when the layout has one), embedder,
    search and gateway (their replicas) as child processes, and tritonserver first when `triton` is given
    (the layout's embedder environment then points at it). `spawn(name)` starts a child again the same
    way, on the same port, after it died."""

    def __init__(self, layout: StackLayout, log_dir: Path, triton: TritonServerProcess | None = None) -> None:
        self.layout = layout
        self.log_dir = log_dir
        self.triton = triton
        # In start order; `stop` goes the other way.
        self.processes: dict[str, subprocess.Popen] = {}
        # When each child's current process was started (time.monotonic).
        self.started_at: dict[str, float] = {}
        self._redis_binary: str | None = None
        self._milvus_bin_dir: Path | None = None
        self._environments: dict[str, dict[str, str]] = {}

    @property
    def service_names(self) -> list[str]:
        """The service children, in start order."""
        return ["embedder", *self.layout.search_names, *self.layout.gateway_names]

    # ---- one child ------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.triton.log_path if name == "triton" and self.triton else self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return "    (no log)"
        return "\n".join(f"    {line}" for line in text.splitlines()[-lines:]) or "    (empty log)"

    def spawn(self, name: str) -> subprocess.Popen:
        """Starts child `name`, the first time or again after it died: the same command, environment
        and port each time, its output appended to its log. Call it from the main thread: a child's
        parent-death signal follows the thread that started it (see `die_with_parent`)."""
        if name == "triton":
            assert self.triton is not None
            self.triton.kill()  # a dead server's python backend stubs and shared memory, if any
            process = self.triton.start()
        else:
            cwd = None
            if name == "redis":
                assert self._redis_binary is not None
                args, env = [self._redis_binary, *self.layout.redis_arguments()], {}
            elif name == "milvus":
                assert self._milvus_bin_dir is not None
                args, env = self.layout.milvus_command(self._milvus_bin_dir)
                cwd = self.layout.data_dir  # where milvus-lite keeps its working files, beside the db
            else:
                args, env = [sys.executable, "-m", SERVICE_MODULES[service_of(name)]], self._environments[name]
            with open(self.log_path(name), "ab") as log:
                process = subprocess.Popen(
                    args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=cwd,
                    start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
                    preexec_fn=die_with_parent,
                )
        self.processes[name] = process
        self.started_at[name] = time.monotonic()
        return process

    def is_ready(self, name: str) -> bool:
        """One quick look: Redis answers PING, Milvus accepts connections, Triton has the model ready, a
        service's health says SERVING."""
        if name == "redis":
            assert self.layout.redis_port is not None
            return redis_answers(self.layout.redis_port)
        if name == "milvus":
            assert self.layout.milvus_port is not None
            return port_accepts(self.layout.milvus_port)
        if name == "triton":
            assert self.triton is not None
            return self.triton.is_ready([self.layout.triton_model_name] if self.layout.triton_model_name else [])
        return grpc_serving(f"127.0.0.1:{self.layout.port_of(name)}")

    def failure_report(self, name: str) -> str:
        """The end of a child's log, to quote when it failed."""
        return f"the last lines of {self.log_path(name)}:\n{self.log_tail(name)}"

    def wait_ready(self, names: list[str], timeout: float, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Polls until every child in `names` is ready; `ChildFailed` as soon as one exits,
        TimeoutError naming those still not ready after `timeout`, `StartInterrupted` once
        `stop_requested()`."""
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            if stop_requested():
                raise StartInterrupted(f"stopped while waiting for {', '.join(waiting)} to be ready")
            for name in list(waiting):
                process = self.processes[name]
                if process.poll() is not None:
                    raise ChildFailed(f"{name} {how_it_ended(process.returncode)} before it was ready; "
                                      f"{self.failure_report(name)}")
                if self.is_ready(name):
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"{', '.join(waiting)} not ready after {timeout:.0f}s; "
                                   f"{self.failure_report(waiting[0])}")
            if waiting:
                time.sleep(0.1)

    # ---- the whole stack ------------------------------------------------------------------------

    async def start(self, timeout: float = 120.0, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Redis, Milvus and Triton first (each ready before the next starts), then the services (every
        replica) at once; returns when all are ready, raises as `wait_ready` does. Children are spawned
        on this (the calling) thread and only waited for in another."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._redis_binary = shutil.which("redis-server")
        if self._redis_binary is None:
            self.layout.redis_port = None
        if self.layout.milvus_port is not None:
            self._milvus_bin_dir = milvus_lite_bin_dir()
            if self._milvus_bin_dir is None:
                raise RuntimeError("the Milvus server needs milvus-lite (pip install milvus-lite)")
        self._environments = self.layout.environments()
        if self.layout.redis_port is not None:
            self.spawn("redis")
            await asyncio.to_thread(self.wait_ready, ["redis"], REDIS_START_TIMEOUT_S, stop_requested)
        if self.layout.milvus_port is not None:
            self.spawn("milvus")
            await asyncio.to_thread(self.wait_ready, ["milvus"], MILVUS_START_TIMEOUT_S, stop_requested)
        if self.triton is not None:
            self.spawn("triton")
            await asyncio.to_thread(self.wait_ready, ["triton"], timeout, stop_requested)
        for name in self.service_names:
            self.spawn(name)
        await asyncio.to_thread(self.wait_ready, self.service_names, timeout, stop_requested)

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
