"""Where each service of the local stack listens and what it is configured with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vsearch_cli.local_stack.ports import free_port


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
    # SEARCH_BACKEND ("faiss" or "milvus"); None leaves search_svc's default (faiss).
    search_backend: str | None = None

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
