"""What every child process of the local stack needs: to die with its parent, and to be waited for
until its gRPC health says SERVING."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def die_with_parent() -> None:
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
