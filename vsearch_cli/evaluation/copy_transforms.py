"""Transformed copies of an image, as people and platforms make them: crops, recompression, rescaling,
rotation, mirroring, greyscale, brightness and an overlaid caption (`TRANSFORMS`, issue 13's list),
15 more that copy search was not developed on (`MORE_TRANSFORMS`: blur, noise, borders, squeezing, tiny
and enlarged copies, harder recompression, contrast, saturation, a patch over the picture, a perspective
tilt, and crops combined with mirroring, greyscale or rotation), and 8 chains of two or three of the
issue's, as a copy reposted several times ends up (`CHAINED_TRANSFORMS`). `vsearch eval --copies`
queries a catalog with them to measure copy detection (`--transforms issue|more|chains|all`).

Every transform is deterministic given its `random.Random`, and the result is encoded as JPEG
(quality 90, except `jpeg20` and `jpeg10`), as a copy found on the web would be."""

from __future__ import annotations

import io
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

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


def _bordered(image: Image.Image, rng: random.Random) -> Image.Image:
    """Pasted on a plain canvas a quarter of its longer side wider on every side, off centre."""
    margin = max(1, image.width, image.height) // 4
    canvas = Image.new("RGB", (image.width + 2 * margin, image.height + 2 * margin),
                       rng.choice(((255, 255, 255), (0, 0, 0), (200, 30, 30))))
    canvas.paste(image, (margin + rng.randint(-margin // 2, margin // 2), margin + rng.randint(-margin // 2, margin // 2)))
    return canvas


def _noisy(image: Image.Image, rng: random.Random) -> Image.Image:
    """Gaussian noise of 18 grey levels on every channel."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(rng.randint(0, 2**30)).normal(0.0, 18.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _patched(image: Image.Image, rng: random.Random) -> Image.Image:
    """A box of one random colour over a twelfth of the picture (a third of the width, a quarter of the height)."""
    copy = image.copy()
    width, height = max(1, copy.width // 3), max(1, copy.height // 4)
    left, top = rng.randint(0, copy.width - width), rng.randint(0, copy.height - height)
    colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    ImageDraw.Draw(copy).rectangle((left, top, left + width, top + height), fill=colour)
    return copy


def _tilted(image: Image.Image, rng: random.Random) -> Image.Image:
    """A perspective tilt: the top edge pulled in and down, as a photo of a screen or a print."""
    width, height = image.size
    source = [(0, 0), (width, 0), (width, height), (0, height)]
    target = [(width * 0.12, height * 0.06), (width * 0.964, 0), (width, height), (0, height * 0.94)]
    rows = []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coefficients = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(target, dtype=np.float64).reshape(8))
    return image.transform(image.size, Image.Transform.PERSPECTIVE, coefficients.tolist(), Image.Resampling.BILINEAR)


MORE_TRANSFORMS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(2.0)),
    "noise": _noisy,
    "border": _bordered,
    "squeezed": lambda image, rng: image.resize((max(1, int(image.width * 0.7)), image.height), Image.Resampling.BILINEAR),
    "quarter_size": lambda image, rng: image.resize((max(1, image.width // 4), max(1, image.height // 4)),
                                                    Image.Resampling.BILINEAR),
    "jpeg10": lambda image, rng: _recompressed(image, 10),
    "contrast": lambda image, rng: ImageEnhance.Contrast(image).enhance(rng.choice((0.5, 1.6))),
    "saturation": lambda image, rng: ImageEnhance.Color(image).enhance(rng.choice((0.3, 2.0))),
    "crop50_mirror": lambda image, rng: ImageOps.mirror(_crop(image, rng, 0.5)),
    "crop70_greyscale": lambda image, rng: ImageOps.grayscale(_crop(image, rng, 0.7)).convert("RGB"),
    "crop70_rotate": lambda image, rng: _rotated(_crop(image, rng, 0.7), rng),
    "perspective": _tilted,
    "patch": _patched,
    "crop40": lambda image, rng: _crop(image, rng, 0.4),
    "double_size": lambda image, rng: image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC),
}


def _chained(*names: str) -> Callable[[Image.Image, random.Random], Image.Image]:
    """The issue's transforms `names`, applied in that order."""
    def chain(image: Image.Image, rng: random.Random) -> Image.Image:
        for name in names:
            image = TRANSFORMS[name](image, rng)
        return image
    return chain


# Each chain is named by its steps, in the order they are applied.
CHAINED_TRANSFORMS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "+".join(names): _chained(*names)
    for names in (
        ("crop70", "jpeg20"),
        ("half_size", "caption"),
        ("crop70", "mirror", "jpeg20"),
        ("rotate", "brightness"),
        ("crop70", "rotate", "caption"),
        ("greyscale", "half_size", "jpeg20"),
        ("crop50", "brightness"),
        ("mirror", "greyscale", "caption"),
    )
}

# `vsearch eval --copies --transforms`: issue 13's list (the default), the others, the chains, or all.
TRANSFORM_SETS: dict[str, dict[str, Callable[[Image.Image, random.Random], Image.Image]]] = {
    "issue": TRANSFORMS, "more": MORE_TRANSFORMS, "chains": CHAINED_TRANSFORMS,
    "all": {**TRANSFORMS, **MORE_TRANSFORMS, **CHAINED_TRANSFORMS},
}


def transformed_copy(image: Image.Image, transform: str, rng: random.Random) -> bytes:
    """`image` (RGB) under `transform` (of any set), as JPEG bytes."""
    copy = TRANSFORM_SETS["all"][transform](image, rng)
    buffer = io.BytesIO()
    copy.convert("RGB").save(buffer, "JPEG", quality=COPY_JPEG_QUALITY)
    return buffer.getvalue()
