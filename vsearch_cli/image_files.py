"""Which files the CLI takes for images: by suffix, the formats the embedder decodes
(embedder_svc/image_decoding.py SUPPORTED_FORMATS)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
