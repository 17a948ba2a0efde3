"""Shared pieces of `vsearch bench`: latency statistics, the machine's description, sampling images,
the embedder's own pipeline run in this process, and tables for the terminal."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vsearch_cli.image_files import is_image_file

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
    files = sorted(path for path in root.rglob("*") if path.is_file() and is_image_file(path))
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

