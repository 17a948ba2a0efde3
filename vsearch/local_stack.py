"""`vsearch up`: the whole stack on loopback as separate processes, with embedded defaults; with
`--triton`, the model runs on a local CPU Triton Inference Server (`TritonServerProcess`) that the
embedder talks to."""

from __future__ import annotations

import asyncio
import ctypes
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRITON_VENV = REPO_ROOT / ".venv-triton"
SETUP_TRITON = REPO_ROOT / "scripts" / "setup-triton"
# setup-triton's exit status when the nvidia-pytriton wheel cannot be installed on this machine.
TRITON_NOT_INSTALLABLE = 3


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
    # Directories whose images the gateway may serve to the web page (GATEWAY_IMAGE_ROOTS).
    image_roots: list[Path] = field(default_factory=list)
    redis_port: int | None = None
    # Set when the embedder runs its model on Triton: that server's gRPC address and model name.
    triton_url: str | None = None
    triton_model_name: str | None = None
    # SEARCH_DIMENSION: the model card's; None leaves search_svc's default (or the environment's).
    search_dimension: int | None = None
    # SEARCH_BACKEND ("faiss" or "milvus"); None leaves search_svc's default (faiss).
    search_backend: str | None = None

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
        if self.triton_url:
            embedder["EMBEDDER_BACKEND"] = "triton"
            embedder["EMBEDDER_TRITON__URL"] = self.triton_url
            if self.triton_model_name:
                embedder["EMBEDDER_TRITON__MODEL_NAME"] = self.triton_model_name
        search = {
            "SEARCH_PORT": str(self.search_port),
            "SEARCH_MILVUS__URI": str(self.data_dir / "milvus.db"),
            "SEARCH_FAISS__DATA_DIR": str(self.data_dir / "faiss"),
        }
        if self.search_backend is not None:
            search["SEARCH_BACKEND"] = self.search_backend
        if self.search_dimension is not None:
            search["SEARCH_DIMENSION"] = str(self.search_dimension)
        gateway = {
            "GATEWAY_PORT": str(self.gateway_port),
            "GATEWAY_HTTP_PORT": str(self.http_port),
            "GATEWAY_EMBEDDER_ADDRESS": f"127.0.0.1:{self.embedder_port}",
            "GATEWAY_SEARCH_ADDRESS": f"127.0.0.1:{self.search_port}",
        }
        if self.redis_url:
            gateway["GATEWAY_REDIS_URL"] = self.redis_url
        if self.image_roots:
            gateway["GATEWAY_IMAGE_ROOTS"] = json.dumps([str(root.resolve()) for root in self.image_roots])
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


# ---- Triton -------------------------------------------------------------------------------------


class TritonNotInstallable(RuntimeError):
    """The nvidia-pytriton wheel (the tritonserver binary) cannot be installed on this machine."""


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver laid out by scripts/setup-triton (read from <venv>/triton.json)."""

    venv: Path
    tritonserver: Path
    backend_directory: Path
    cache_directory: Path
    library_path: tuple[str, ...]
    bin_directory: Path

    @classmethod
    def read(cls, venv: Path = DEFAULT_TRITON_VENV) -> TritonInstall:
        info = json.loads((venv / "triton.json").read_text())
        return cls(
            venv=venv, tritonserver=Path(info["tritonserver"]), backend_directory=Path(info["backend_directory"]),
            cache_directory=Path(info["cache_directory"]), library_path=tuple(info["library_path"]),
            bin_directory=Path(info["bin_directory"]),
        )


def ensure_triton(venv: Path = DEFAULT_TRITON_VENV) -> TritonInstall:
    """Runs scripts/setup-triton (instant once installed) and returns the install. Raises
    `TritonNotInstallable` when the wheel cannot be installed here, RuntimeError on other failures."""
    result = subprocess.run([str(SETUP_TRITON), str(venv)], capture_output=True, text=True)
    if result.returncode == TRITON_NOT_INSTALLABLE:
        raise TritonNotInstallable(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "setup-triton: exit 3")
    if result.returncode != 0:
        raise RuntimeError(f"scripts/setup-triton failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return TritonInstall.read(venv)


class TritonServerProcess:
    """The tritonserver binary of `install` serving `repo_dir` on loopback ports (free ones unless
    given), with GPU features off. Its python backend runs models with the install's venv Python."""

    def __init__(
        self,
        install: TritonInstall,
        repo_dir: Path,
        log_path: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        shm_default_bytes: int = 64 * 1024 * 1024,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.install = install
        self.repo_dir = repo_dir
        self.log_path = log_path
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.shm_default_bytes = shm_default_bytes
        self.extra_args = list(extra_args)
        # Shared-memory regions of the python backend carry this prefix, so a killed server's
        # leftovers in /dev/shm can be removed (and never collide with another server's).
        self.shm_prefix = f"vsearch_triton_{os.getpid()}_{self.grpc_port}_"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(self.install.tritonserver),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={self.install.backend_directory}",
            f"--cache-directory={self.install.cache_directory}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-timeout-secs=5",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join([*self.install.library_path, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["PATH"] = f"{self.install.bin_directory}:{env.get('PATH', '')}"
        # The python backend must not pick up the caller's virtualenv or paths.
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        return env

    def start(self) -> subprocess.Popen:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("tritonserver is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        return self.process

    def _get(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self, models: Sequence[str] = ()) -> bool:
        return self._get("/v2/health/ready") and all(
            self._get(f"/v2/models/{urllib.parse.quote(model, safe='')}/ready") for model in models
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0, models: Sequence[str] = ()) -> None:
        """Polls Triton's readiness (server, then each model) until it says ready."""
        deadline = time.monotonic() + timeout
        while not self.is_ready(models):
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"tritonserver exited (code {code}) before it was ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _wait_exit(self, timeout: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would, to the server and its python backend stubs (its process
        group: a stub whose server died does not always notice). Leftover shared memory is removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._kill_leftovers()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after `timeout`; then whatever of
        its process group is left."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._wait_exit(timeout)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        if self.process is not None:
            try:  # the server leads its own process group (start_new_session)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._remove_shared_memory()

    def _remove_shared_memory(self) -> None:
        for path in glob.glob(f"/dev/shm/{glob.escape(self.shm_prefix)}*"):
            try:
                os.unlink(path)
            except OSError:
                pass


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


def prepare_local_triton(data_dir: Path, model_dir: Path, venv: Path = DEFAULT_TRITON_VENV) -> tuple[TritonServerProcess, str]:
    """For `vsearch up --triton`: installs the CPU tritonserver if needed (scripts/setup-triton),
    writes a cpu-flavour model repository for `model_dir` into `data_dir`/triton-repo, and returns
    the (not yet started) server and the model's name there."""
    from embedder_svc.triton_repo import TritonRepoOptions, write_triton_repo

    install = ensure_triton(venv)
    repo_dir = data_dir / "triton-repo"
    written = write_triton_repo(model_dir, repo_dir, TritonRepoOptions(flavour="cpu", max_batch_size=32))
    return TritonServerProcess(install, repo_dir, data_dir / "logs" / "triton.log"), written.model_name
