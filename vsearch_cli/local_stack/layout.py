"""Where each service of the local stack listens and what it is configured with.

One gateway and one search_svc by default (children "gateway" and "search"). With `replicas` N > 1
(`vsearch up --replicas N`): N gateways ("gateway-0".."gateway-{N-1}", gRPC on gateway_port + i, HTTP on
http_port + i) and N search_svc replicas ("search-0"..) over one Milvus server ("milvus": Milvus Lite in
server mode on a loopback port, the file DATA_DIR/milvus.db), one Redis and one embedder. Gateway i
talks to search replica i only: a write through one gateway and a search through another then always
go through different replicas, so what the replicas must share (the index in Milvus, the cache and its
index generation in Redis) is exercised by every such pair, never by chance."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from vsearch_cli.local_stack.ports import free_port

MILVUS_DB_FILE = "milvus.db"


def milvus_lite_bin_dir() -> Path | None:
    """Where milvus-lite keeps its `milvus` server binary and libraries; None when it is not installed."""
    spec = importlib.util.find_spec("milvus_lite")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return bin_dir if (bin_dir / "milvus").is_file() else None


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
    # The Redis cache's memory cap (redis-server --maxmemory: "256mb", "1gb", "0" for none); the least
    # recently used keys are evicted beyond it, so the cache never grows without bound.
    redis_maxmemory: str = "256mb"
    # Set when the embedder runs its model on Triton: that server's gRPC address and model name.
    triton_url: str | None = None
    triton_model_name: str | None = None
    # SEARCH_DIMENSION: the model card's; None leaves search_svc's default (or the environment's).
    search_dimension: int | None = None
    # SEARCH_BACKEND ("faiss" or "milvus"); None leaves search_svc's default (faiss). Replicas: milvus.
    search_backend: str | None = None
    # Gateways and search_svc replicas (see the module's notes); above 1, over a Milvus server.
    replicas: int = 1
    # The Milvus server's port (replicas > 1; a free one unless given) and search replicas 1..N-1's ports.
    milvus_port: int | None = None
    extra_search_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.replicas > 1:
            self.search_backend = "milvus"
            if self.milvus_port is None:
                self.milvus_port = free_port()
            while len(self.extra_search_ports) < self.replicas - 1:
                self.extra_search_ports.append(free_port())

    # ---- children and their ports -----------------------------------------------------------------

    def _named(self, service: str) -> list[str]:
        return [service] if self.replicas == 1 else [f"{service}-{index}" for index in range(self.replicas)]

    @property
    def gateway_names(self) -> list[str]:
        return self._named("gateway")

    @property
    def search_names(self) -> list[str]:
        return self._named("search")

    @property
    def search_ports(self) -> list[int]:
        return [self.search_port, *self.extra_search_ports[: self.replicas - 1]]

    def gateway_ports(self, index: int) -> tuple[int, int]:
        """Gateway `index`'s gRPC and HTTP ports."""
        return self.gateway_port + index, self.http_port + index

    def port_of(self, name: str) -> int:
        """The gRPC port of a service child (embedder, search[-i], gateway[-i])."""
        service, _, index = name.partition("-")
        position = int(index) if index else 0
        if service == "embedder":
            return self.embedder_port
        if service == "search":
            return self.search_ports[position]
        if service == "gateway":
            return self.gateway_ports(position)[0]
        raise KeyError(name)

    @property
    def milvus_uri(self) -> str | None:
        """The Milvus server search_svc replicas share, when there is one."""
        return f"http://127.0.0.1:{self.milvus_port}" if self.milvus_port else None

    def milvus_command(self, bin_dir: Path) -> tuple[list[str], dict[str, str]]:
        """Milvus Lite in server mode on the loopback port, over DATA_DIR/milvus.db (what milvus_lite's
        own `Server` runs): its command line and the environment it needs besides ours."""
        assert self.milvus_port is not None
        return (
            [str(bin_dir / "milvus"), str(self.data_dir / MILVUS_DB_FILE), f"127.0.0.1:{self.milvus_port}", "ERROR"],
            {"LD_LIBRARY_PATH": str(bin_dir)},
        )

    @property
    def redis_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_port else None

    def redis_arguments(self) -> list[str]:
        """redis-server's arguments: loopback only, nothing saved, memory capped with LRU eviction."""
        return [
            "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", self.redis_maxmemory, "--maxmemory-policy", "allkeys-lru",
        ]

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
        envs = {"embedder": embedder}
        for index, name in enumerate(self.search_names):
            search = {
                "SEARCH_PORT": str(self.search_ports[index]),
                "SEARCH_MILVUS__URI": self.milvus_uri or str(self.data_dir / MILVUS_DB_FILE),
                "SEARCH_FAISS__DATA_DIR": str(self.data_dir / "faiss"),
            }
            if self.search_backend is not None:
                search["SEARCH_BACKEND"] = self.search_backend
            if self.search_dimension is not None:
                search["SEARCH_DIMENSION"] = str(self.search_dimension)
            envs[name] = search
        for index, name in enumerate(self.gateway_names):
            grpc_port, http_port = self.gateway_ports(index)
            gateway = {
                "GATEWAY_PORT": str(grpc_port),
                "GATEWAY_HTTP_PORT": str(http_port),
                "GATEWAY_EMBEDDER_ADDRESS": f"127.0.0.1:{self.embedder_port}",
                "GATEWAY_SEARCH_ADDRESS": f"127.0.0.1:{self.search_ports[index]}",
            }
            if self.redis_url:
                gateway["GATEWAY_REDIS_URL"] = self.redis_url
            if self.image_roots:
                gateway["GATEWAY_IMAGE_ROOTS"] = json.dumps([str(root.resolve()) for root in self.image_roots])
            envs[name] = gateway
        for name, env in envs.items():
            prefix = name.partition("-")[0].upper() + "_"
            env.update({prefix + key: value for key, value in common.items()})
            # A quick local stop: nothing routes around a local process, so no drain period.
            env[prefix + "DRAIN_SECONDS"] = "0"
            env[prefix + "GRACE_SECONDS"] = "3"
        return envs
