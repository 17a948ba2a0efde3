"""Embedder throughput and latency, in-process onnxruntime against Triton, for the same model in one run.

Two levels, each for every backend:

- ``backend``: preprocessed tensors straight into the `InferenceBackend` (`OnnxRuntimeBackend` or
  `TritonBackend`, the classes the embedder uses): images/s at each batch size, and the latency of one
  call (p50/p95). The model and, for Triton, the transport; nothing else.
- ``service``: a real embedder (gRPC on loopback, decode, card preprocessing, micro-batcher) in front
  of that backend: latency of one single-image EmbedImages call after another, and images/s with
  `concurrency` single-image calls in flight (the micro-batcher fills batches).

Triton is either given (`triton_url`, serving the model under its card's name or `triton_model`) or,
with `local_triton=True`, started here from .venv-triton with a cpu-flavour repository (the same ONNX
file run by onnxruntime inside Triton's python backend). On one CPU machine Triton and this process
share the cores, so the comparison shows the cost of the hop, not a GPU's gain.

    python -m vsearch_cli.bench.embedder --model-dir .vsearch/models/squeezenet --local-triton
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from embedder_svc.backends import InferenceBackend
from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.model_card import MODEL_FILE_NAME, ModelCard, read_model_card
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.settings import EmbedderSettings, TritonSettings
from vsearch_cli.image_files import is_image_file

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_IMAGES = 256
DEFAULT_CONCURRENCY = 32


def default_image_dir() -> Path:
    from vsearch_cli.checkout import default_shared_dir

    return default_shared_dir() / "datasets" / "ukbench56" / "images"


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _load_images(image_dir: Path, limit: int = 64) -> list[bytes]:
    paths = sorted(path for path in image_dir.rglob("*") if is_image_file(path))[:limit]
    if not paths:
        raise ValueError(f"no images under {image_dir}")
    return [path.read_bytes() for path in paths]


def _tensors(images: list[bytes], card: ModelCard) -> np.ndarray:
    decoder = ImageDecoder(max_bytes=64 * 1024 * 1024, max_pixels=80_000_000)
    preprocessor = Preprocessor(card)
    return np.stack([preprocessor(decoder.decode(data)) for data in images])


async def _bench_backend(backend: InferenceBackend, tensors: np.ndarray, batch_sizes: Sequence[int], n: int) -> dict:
    await backend.load()
    try:
        await backend.infer(tensors[:1])
        results = {}
        for size in batch_sizes:
            batch = np.ascontiguousarray(tensors[np.arange(size) % len(tensors)])
            await backend.infer(batch)  # warm this shape
            calls = max(3, n // size)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                await backend.infer(batch)
                times.append(time.perf_counter() - started)
            results[str(size)] = {
                "images_per_s": round(size * calls / sum(times), 1),
                "call_ms_p50": round(_percentile(times, 50) * 1000, 2),
                "call_ms_p95": round(_percentile(times, 95) * 1000, 2),
                "calls": calls,
            }
        return results
    finally:
        await backend.close()


async def _bench_service(settings: EmbedderSettings, images: list[bytes], n: int, concurrency: int) -> dict:
    import grpc

    from embedder_svc.server import create_server
    from vsearch.v1 import embedder_pb2, embedder_pb2_grpc

    server, port = await create_server(settings)
    await server.start()
    try:
        await server.wait_ready(timeout=120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)

            async def embed(data: bytes) -> None:
                reply = await stub.EmbedImages(
                    embedder_pb2.EmbedImagesRequest(images=[embedder_pb2.ImageInput(data=data)]), timeout=60)
                if reply.results[0].WhichOneof("result") != "embedding":
                    raise RuntimeError(f"embedder error: {reply.results[0].error.message}")

            for data in images[:4]:
                await embed(data)
            latencies = []
            for index in range(min(n, 64)):
                started = time.perf_counter()
                await embed(images[index % len(images)])
                latencies.append(time.perf_counter() - started)
            gate = asyncio.Semaphore(concurrency)

            async def limited(index: int) -> None:
                async with gate:
                    await embed(images[index % len(images)])

            started = time.perf_counter()
            await asyncio.gather(*(limited(index) for index in range(n)))
            elapsed = time.perf_counter() - started
        return {
            "single_image_ms_p50": round(_percentile(latencies, 50) * 1000, 2),
            "single_image_ms_p95": round(_percentile(latencies, 95) * 1000, 2),
            "images_per_s": round(n / elapsed, 1),
            "concurrency": concurrency,
        }
    finally:
        await server.stop(grace=1.0)


async def _bench(
    model_dir: Path, triton_url: str | None, batch_sizes: Sequence[int], n: int, *, triton_model: str | None,
    image_dir: Path, concurrency: int, service: bool,
) -> dict:
    from embedder_svc.onnx_backend import OnnxRuntimeBackend
    from embedder_svc.triton_backend import TritonBackend

    card = read_model_card(model_dir)
    images = _load_images(image_dir)
    tensors = _tensors(images, card)
    report: dict = {
        "model": card.name, "model_version": card.version, "batch_sizes": list(batch_sizes), "images": n,
        "cpu_count": os.cpu_count(), "backends": {},
    }
    backends: dict[str, tuple[InferenceBackend, EmbedderSettings]] = {}
    base = {"model_dir": model_dir, "host": "127.0.0.1", "port": 0, "log_format": "text", "log_level": "WARNING",
            "max_batch_size": max(batch_sizes)}
    backends["onnxruntime"] = (
        OnnxRuntimeBackend(model_dir / MODEL_FILE_NAME, card.input.name, card.output.name),
        EmbedderSettings(**base),
    )
    if triton_url:
        triton_settings = TritonSettings(url=triton_url, model_name=triton_model)
        backends["triton"] = (TritonBackend(triton_settings, card),
                              EmbedderSettings(**base, backend="triton", triton=triton_settings))
    for name, (backend, settings) in backends.items():
        entry: dict = {"backend": await _bench_backend(backend, tensors, batch_sizes, n)}
        if "1" in entry["backend"]:
            entry["batch1_latency_ms"] = entry["backend"]["1"]["call_ms_p50"]
        entry["max_images_per_s"] = max(result["images_per_s"] for result in entry["backend"].values())
        if service:
            entry["service"] = await _bench_service(settings, images, n, concurrency)
        report["backends"][name] = entry
    return report


def bench_embedder(
    model_dir: Path,
    triton_url: str | None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    n: int = DEFAULT_IMAGES,
    *,
    triton_model: str | None = None,
    local_triton: bool = False,
    image_dir: Path | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    service: bool = True,
) -> dict:
    """Throughput (images/s) per batch size and batch-1 latency of the model through the in-process
    onnxruntime backend and, when `triton_url` is given (or `local_triton`), through Triton; plus the
    same through a real embedder service unless `service` is False. Returns a JSON-able dict:
    ``backends.<name>.backend.<batch>.{images_per_s, call_ms_p50, call_ms_p95}``,
    ``backends.<name>.batch1_latency_ms``, ``backends.<name>.max_images_per_s`` and
    ``backends.<name>.service.{single_image_ms_p50, single_image_ms_p95, images_per_s}``."""
    image_dir = image_dir or default_image_dir()
    if not local_triton:
        return asyncio.run(_bench(model_dir, triton_url, batch_sizes, n, triton_model=triton_model,
                                  image_dir=image_dir, concurrency=concurrency, service=service))

    from vsearch_cli.model_tools.triton_repo import TritonRepoOptions, write_triton_repo
    from vsearch_cli.local_stack.triton import TritonServerProcess, ensure_triton

    install = ensure_triton()
    with tempfile.TemporaryDirectory(prefix="vsearch-bench-triton-") as scratch:
        repo = Path(scratch) / "repo"
        written = write_triton_repo(model_dir, repo, TritonRepoOptions(flavour="cpu", max_batch_size=max(batch_sizes)))
        server = TritonServerProcess(install, repo, Path(scratch) / "triton.log")
        server.start()
        try:
            server.wait_ready(timeout=120, models=[written.model_name])
            report = asyncio.run(_bench(model_dir, server.grpc_url, batch_sizes, n, triton_model=written.model_name,
                                        image_dir=image_dir, concurrency=concurrency, service=service))
        finally:
            server.stop()
    report["triton"] = "local cpu tritonserver (nvidia-pytriton), python backend + onnxruntime"
    return report


def format_report(report: dict) -> str:
    sizes = [str(size) for size in report["batch_sizes"]]
    lines = [f"model {report['model']} version {report['model_version']}, {report['cpu_count']} CPUs, "
             f"{report['images']} images per figure",
             "| backend | " + " | ".join(f"batch {size} img/s" for size in sizes)
             + " | batch-1 call p50 ms | service 1-image p50 ms | service img/s |",
             "|---|" + "---:|" * (len(sizes) + 3)]
    for name, entry in report["backends"].items():
        service = entry.get("service", {})
        lines.append(
            f"| {name} | " + " | ".join(f"{entry['backend'][size]['images_per_s']:.1f}" for size in sizes)
            + f" | {entry.get('batch1_latency_ms', float('nan')):.2f} | {service.get('single_image_ms_p50', float('nan')):.2f}"
            f" | {service.get('images_per_s', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def _batch_sizes(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark, for a `vsearch bench embedder` subcommand (run with `run`)."""
    parser.add_argument("--model-dir", type=Path, required=True, help="prepared model (model.onnx + model_card.json)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--triton-url", help="a Triton gRPC endpoint serving the model (host:port)")
    target.add_argument("--local-triton", action="store_true",
                        help="start a local CPU tritonserver from .venv-triton with a cpu-flavour repository")
    parser.add_argument("--triton-model", help="the model's name on Triton (default: the card's name)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=DEFAULT_BATCH_SIZES, help="default 1,8,32")
    parser.add_argument("-n", "--images", type=int, default=DEFAULT_IMAGES, help="images per figure (default 256)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="single-image calls in flight for the service throughput (default 32)")
    parser.add_argument("--image-dir", type=Path, help="images to embed (default: the shared ukbench56)")
    parser.add_argument("--no-service", action="store_true", help="backends only, no embedder service")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=Path(".bench/bench-embedder.json"),
                        help="also write the report here (default .bench/bench-embedder.json)")


def run(args: argparse.Namespace) -> int:
    try:
        report = bench_embedder(
            args.model_dir, args.triton_url, args.batch_sizes, args.images, triton_model=args.triton_model,
            local_triton=args.local_triton, image_dir=args.image_dir, concurrency=args.concurrency,
            service=not args.no_service,
        )
    except Exception as error:  # noqa: BLE001 - one line for any failure of the run
        print(f"vsearch bench embedder: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsearch_cli.bench.embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
