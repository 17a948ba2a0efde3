"""Shared pieces of `vsearch bench`: latency statistics, the machine's description, sampling images,
the embedder's own pipeline run in this process, and tables for the terminal."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedder_svc.backends import InferenceBackend, create_backend
from embedder_svc.image_decoding import ImageDecoder
from embedder_svc.model_card import ModelCard, read_model_card
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.settings import EmbedderSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# gRPC message limit of the bench's own channels: an ANN upsert of 1000 x 1280 floats is ~5 MB.
CLIENT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_VERSIONED_PACKAGES = ("onnxruntime", "pymilvus", "milvus-lite", "numpy", "pillow", "grpcio", "faiss-cpu")


class BenchError(Exception):
    """The bench cannot run as asked (missing data set, unreachable stack, ...): one line for the user."""


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Percentiles of per-request latencies, in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "count": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "min_ms": round(float(ms.min()), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def rate(count: float, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load: how busy the machine was around a measurement (others' work is noise)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def list_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise BenchError(f"image folder {root} not found (give --images DIR)")
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BenchError(f"no images under {root}")
    return files


def sample_images(root: Path, counts: Sequence[int], seed: int) -> list[list[Path]]:
    """Disjoint random samples of the given sizes, the same for the same seed."""
    files = list_images(root)
    wanted = sum(counts)
    if wanted > len(files):
        raise BenchError(f"asked for {wanted} distinct images but {root} holds {len(files)}")
    chosen = random.Random(seed).sample(files, wanted)
    samples, start = [], 0
    for count in counts:
        samples.append(chosen[start:start + count])
        start += count
    return samples


def read_all(paths: Sequence[Path]) -> list[bytes]:
    """Read up front, so file system speed and page cache state stay out of every measurement."""
    return [path.read_bytes() for path in paths]


@dataclass
class ModelRig:
    """The embedder's own decode, preprocess and inference pieces, built from the same settings class
    (EMBEDDER_* variables apply here too), for the "alone" figures and the naive loop."""

    model_dir: Path
    settings: EmbedderSettings
    card: ModelCard
    decoder: ImageDecoder
    preprocessor: Preprocessor
    backend: InferenceBackend

    @classmethod
    async def load(cls, model_dir: Path) -> ModelRig:
        settings = EmbedderSettings(model_dir=model_dir)
        card = read_model_card(model_dir)
        backend = create_backend(settings, model_dir, card)
        await backend.load()
        rig = cls(
            model_dir=model_dir,
            settings=settings,
            card=card,
            decoder=ImageDecoder(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
            preprocessor=Preprocessor(card),
            backend=backend,
        )
        await rig.infer(np.stack([rig.zero_tensor()]))  # first run allocates and picks kernels
        return rig

    def zero_tensor(self) -> np.ndarray:
        dtype = np.float16 if self.card.input.dtype == "float16" else np.float32
        return np.zeros((3, self.card.input.height, self.card.input.width), dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.card.name,
            "version": self.card.version,
            "dimension": self.card.output.dimension,
            "dir": str(self.model_dir),
            "backend": self.backend.describe(),
            "inference_threads": self.settings.inference_threads,
            "decode_workers": self.settings.decode_workers,
            "max_batch_size": self.settings.max_batch_size,
        }

    def prepare(self, data: bytes) -> np.ndarray:
        """Bytes -> model input tensor, exactly as the embedder's decode executor does it."""
        return self.preprocessor(self.decoder.decode(data, None))

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        output = await self.backend.infer(batch)
        if not self.card.output.l2_normalized:
            output = output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return output

    async def embed(self, data: bytes) -> np.ndarray:
        return (await self.infer(np.stack([self.prepare(data)])))[0]

    def prepare_all(self, images: Sequence[bytes], workers: int) -> tuple[list[np.ndarray], float]:
        """Every image decoded and preprocessed on `workers` threads (Pillow and numpy release the
        GIL, as in the embedder's decode executor); returns the tensors and the seconds it took."""
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode") as pool:
            started = time.perf_counter()
            tensors = list(pool.map(self.prepare, images))
            return tensors, time.perf_counter() - started

    async def close(self) -> None:
        await self.backend.close()


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return text == "-"
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in text_rows)) if text_rows else len(str(header))
              for i, header in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(str(header).ljust(width) for header, width in zip(headers, widths)))
    lines.append("  ".join("-" * width for width in widths))
    for row in text_rows:
        # Numbers right-aligned, words left-aligned.
        lines.append("  ".join(
            value.rjust(width) if _looks_numeric(value) else value.ljust(width)
            for value, width in zip(row, widths)
        ))
    return "\n".join(lines)

