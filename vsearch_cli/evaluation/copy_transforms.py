"""Transformed copies of an image, as people and platforms make them: crops, recompression, rescaling,
rotation, mirroring, greyscale, brightness and an overlaid caption. `vsearch eval --copies` queries a
catalog with them to measure copy detection (issue 13).

Every transform is deterministic given its `random.Random`, and the result is encoded as JPEG
(quality 90, except `jpeg20`), as a copy found on the web would be."""

from __future__ import annotations

import io
import random
from typing import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

COPY_JPEG_QUALITY = 90


def _crop(image: Image.Image, rng: random.Random, side: float) -> Image.Image:
    """A `side` fraction of each side, at a random position."""
    width, height = max(1, round(image.width * side)), max(1, round(image.height * side))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _recompressed(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _rotated(image: Image.Image, rng: random.Random) -> Image.Image:
    """5 to 15 degrees either way, the canvas grown to hold it (black corners, as editors leave them)."""
    angle = rng.uniform(5.0, 15.0) * rng.choice((-1, 1))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)


def _captioned(image: Image.Image, rng: random.Random) -> Image.Image:
    """A dark band over the bottom sixth with white text in it."""
    copy = image.copy()
    draw = ImageDraw.Draw(copy)
    band = max(8, copy.height // 6)
    draw.rectangle((0, copy.height - band, copy.width, copy.height), fill=(20, 20, 20))
    caption = rng.choice(("SALE -50% today only", "www.example.com", "(c) someone else 2026", "FOR SALE"))
    draw.text((max(2, copy.width // 20), copy.height - band + band // 4), caption, fill=(255, 255, 255))
    return copy


TRANSFORMS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop70": lambda image, rng: _crop(image, rng, 0.7),
    "crop50": lambda image, rng: _crop(image, rng, 0.5),
    "jpeg20": lambda image, rng: _recompressed(image, 20),
    "half_size": lambda image, rng: image.resize((max(1, image.width // 2), max(1, image.height // 2)),
                                                 Image.Resampling.BILINEAR),
    "rotate": _rotated,
    "mirror": lambda image, rng: ImageOps.mirror(image),
    "greyscale": lambda image, rng: ImageOps.grayscale(image).convert("RGB"),
    "brightness": lambda image, rng: ImageEnhance.Brightness(image).enhance(rng.choice((0.6, 1.5))),
    "caption": _captioned,
}


def transformed_copy(image: Image.Image, transform: str, rng: random.Random) -> bytes:
    """`image` (RGB) under `transform`, as JPEG bytes."""
    copy = TRANSFORMS[transform](image, rng)
    buffer = io.BytesIO()
    copy.convert("RGB").save(buffer, "JPEG", quality=COPY_JPEG_QUALITY)
    return buffer.getvalue()
