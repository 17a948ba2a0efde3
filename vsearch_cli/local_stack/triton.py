"""A local CPU Triton Inference Server (the tritonserver binary that scripts/setup-triton installs into
.venv-triton) for `vsearch up --triton`, the Triton tests and `vsearch bench embedder`."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vsearch_cli.checkout import REPO_ROOT
from vsearch_cli.local_stack.child_processes import die_with_parent
from vsearch_cli.local_stack.ports import free_port

DEFAULT_TRITON_VENV = REPO_ROOT / ".venv-triton"
SETUP_TRITON = REPO_ROOT / "scripts" / "setup-triton"
# setup-triton's exit status when the nvidia-pytriton wheel cannot be installed on this machine.
TRITON_NOT_INSTALLABLE = 3


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
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
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


def prepare_local_triton(data_dir: Path, model_dir: Path, venv: Path = DEFAULT_TRITON_VENV) -> tuple[TritonServerProcess, str]:
    """For `vsearch up --triton`: installs the CPU tritonserver if needed (scripts/setup-triton),
    writes a cpu-flavour model repository for `model_dir` into `data_dir`/triton-repo, and returns
    the (not yet started) server and the model's name there."""
    from vsearch_cli.model_tools.triton_repo import TritonRepoOptions, write_triton_repo

    install = ensure_triton(venv)
    repo_dir = data_dir / "triton-repo"
    written = write_triton_repo(model_dir, repo_dir, TritonRepoOptions(flavour="cpu", max_batch_size=32))
    return TritonServerProcess(install, repo_dir, data_dir / "logs" / "triton.log"), written.model_name
