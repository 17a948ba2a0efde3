"""Untrusted bytes in, an RGB Pillow image out (or `ImageRejected` with a message saying what is
wrong). Blocking: run it in the decode executor, never on the event loop.

A JPEG much larger than its consumers need (a phone's 12-megapixel photo, for a model that sees 256
pixels) is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling (Pillow's `draft`), never
below what `ResolutionNeed` asks for: under a third of the CPU, and a sixteenth of the memory or less, of
decoding every pixel and then shrinking them (docs/benchmarks.md#large-photos). Coordinates stay those of
the full picture: crop boxes in, region boxes and copy features' sizes out.

The decompression-bomb guard (`max_pixels`) counts the pixels that will be decoded, from the header,
before any is: so a 50-megapixel JPEG whose consumers need 1/8 of it (0.8 megapixels) is taken, while a
PNG of as many pixels, or the same JPEG asked for at full size (a small crop of it, reduced decoding
off), is refused. Except a progressive JPEG: libjpeg holds all of its coefficients whatever the scale
(measured: 192 megapixels decoded at 1/8 took 577 MB and 0.8 s progressive, 15 MB and 0.07 s baseline),
so its full size is weighed. Cameras and phones write baseline JPEGs."""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow format names, in the order Image.open tries them.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
_SUPPORTED_TEXT = "JPEG, PNG, WebP, AVIF, GIF, BMP or TIFF"
_BACKGROUND = (255, 255, 255)
# Errors Pillow's plugins raise on malformed data, besides OSError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
# The image's size in Pillow's DecompressionBombError message, which also quotes Pillow's own limit
# (far above ours), so it is not passed on as it is.
_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")
# The most DCT scaling shrinks a JPEG by (per side).
LARGEST_REDUCTION = 8


class ImageRejected(Exception):
    """The bytes are not an image this service accepts; the message says why (for the caller)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class CropBox:
    """Pixels of the image as displayed, i.e. after EXIF orientation."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class ResolutionNeed:
    """The least resolution the consumers of a decoded picture need, in its own pixels: its shorter side
    at least `shorter` and its longer side at least `longer` (0: no need)."""

    shorter: int = 0
    longer: int = 0

    def combined(self, other: "ResolutionNeed") -> "ResolutionNeed":
        return ResolutionNeed(max(self.shorter, other.shorter), max(self.longer, other.longer))

    def reduction(self, width: int, height: int) -> int:
        """The largest factor (8, 4, 2, or 1) a width x height picture may shrink by and still meet it."""
        room = min(
            min(width, height) / self.shorter if self.shorter else math.inf,
            max(width, height) / self.longer if self.longer else math.inf,
        )
        return next((factor for factor in (8, 4, 2) if factor <= room), 1)


@dataclass(frozen=True)
class DecodedImage:
    """A picture (the image, or its crop) decoded at full resolution or reduced by `reduction`, and its
    size at full resolution: the pixels every box a caller sends or receives is counted in."""

    image: Image.Image
    size: tuple[int, int]
    reduction: int = 1

    def part(self, box: CropBox) -> Image.Image:
        """The pixels of `box` (full-resolution pixels of the picture)."""
        return _reduced_crop(self.image, box, self.reduction)


class ImageDecoder:
    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        # Pillow's own bomb guard is process-wide and only a backstop (it raises at twice its limit), set
        # where a JPEG decoded at 1/8 could still be within ours; `decode_for` checks the pixels it will
        # decode against this decoder's limit before decoding any.
        Image.MAX_IMAGE_PIXELS = max_pixels * LARGEST_REDUCTION**2
        # Pillow warns between its limit and twice it; `decode_for` refuses those images anyway.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        # A truncated file must fail, not decode into grey padding.
        ImageFile.LOAD_TRUNCATED_IMAGES = False

    def decode(self, data: bytes, crop: CropBox | None = None) -> Image.Image:
        """The picture at full resolution."""
        return self.decode_for(data, crop, None).image

    def decode_for(self, data: bytes, crop: CropBox | None, need: ResolutionNeed | None) -> DecodedImage:
        """The picture (the image, or `crop` of it) at the least resolution that meets `need` that DCT
        scaling gives (JPEG only); at full resolution when `need` is None or the format cannot scale."""
        if not data:
            raise ImageRejected("empty image data")
        if len(data) > self.max_bytes:
            raise ImageRejected(f"image is {len(data)} bytes, over the limit of {self.max_bytes} bytes")
        image = self._open(data)
        width, height = image.size
        # Sides only (which is shorter): the same whatever the EXIF orientation.
        sides = (width, height) if crop is None else (crop.width, crop.height)
        reduction = need.reduction(*sides) if need is not None and image.format == "JPEG" else 1
        if reduction > 1:
            # Pillow may scale by less than asked (it divides with the remainder dropped), or not at all;
            # what it chose is in the box it returns, (0, 0, width / factor, height / factor).
            drafted = image.draft(None, (math.ceil(width / reduction), math.ceil(height / reduction)))
            reduction = round(width / drafted[1][2]) if drafted is not None else 1
        progressive = image.format == "JPEG" and bool(image.info.get("progression"))
        weighed = width * height if progressive else image.size[0] * image.size[1]  # the drafted size
        if weighed > self.max_pixels:
            detail = f"image is {width}x{height} = {width * height} pixels"
            if progressive:
                detail += " (a progressive JPEG is weighed at its full size, however small it is decoded)"
            elif reduction > 1:
                detail += f", {weighed} decoded at 1/{reduction} of its size"
            raise ImageRejected(self._too_many_pixels(detail))
        try:
            image.load()  # decode every pixel now, so truncation shows here and not later
        except Image.DecompressionBombError as error:
            raise ImageRejected(self._too_many_pixels(_bomb_size(error))) from None
        except _DECODE_ERRORS as error:
            raise ImageRejected(f"truncated or corrupt {image.format} data: {error}") from None
        stored_size = image.size
        image = _apply_exif_orientation(image)
        full_size = (height, width) if image.size != stored_size else (width, height)
        if crop is not None:
            _check_crop(crop, full_size)
            image = _reduced_crop(image, crop, reduction)
        picture_size = full_size if crop is None else (crop.width, crop.height)
        return DecodedImage(_to_rgb(image), picture_size, reduction)

    def _too_many_pixels(self, detail: str) -> str:
        return f"image too large: over the limit of {self.max_pixels} pixels (decompression bomb guard): {detail}"

    def _open(self, data: bytes) -> Image.Image:
        try:
            return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except Image.DecompressionBombError as error:
            # Pillow's backstop fired first (over twice its limit); its message carries the size.
            raise ImageRejected(self._too_many_pixels(_bomb_size(error))) from None
        except UnidentifiedImageError:
            raise ImageRejected(_unsupported_message(data)) from None
        except _DECODE_ERRORS as error:
            raise ImageRejected(f"corrupt image header: {error}") from None


def _bomb_size(error: Image.DecompressionBombError) -> str:
    found = _PILLOW_BOMB_SIZE.search(str(error))
    return f"image is {found.group(1)} pixels" if found else "image has more pixels than that"


def _unsupported_message(data: bytes) -> str:
    """Names the format when Pillow knows it but this service does not take it."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:  # noqa: BLE001 - only used to word the message
        found = None
    if found:
        return f"unsupported image format {found} (supported: {_SUPPORTED_TEXT})"
    return f"not an image: the data is not {_SUPPORTED_TEXT}"


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - unreadable EXIF is no reason to refuse decodable pixels
        return image
    return rotated if rotated is not None else image


def _check_crop(crop: CropBox, size: tuple[int, int]) -> None:
    width, height = size
    box = f"x={crop.x} y={crop.y} width={crop.width} height={crop.height}"
    if crop.width == 0 or crop.height == 0:
        raise ImageRejected(f"crop box has zero size ({box})")
    if crop.x + crop.width > width or crop.y + crop.height > height:
        raise ImageRejected(f"crop box ({box}) lies outside the {width}x{height} image")


def _reduced_crop(image: Image.Image, box: CropBox, reduction: int) -> Image.Image:
    """`box` (full-resolution pixels) cut from `image`, decoded `reduction` times smaller: the reduced
    pixels that cover it, at least one."""
    if reduction == 1:
        return image.crop((box.x, box.y, box.x + box.width, box.y + box.height))
    left, top = box.x // reduction, box.y // reduction
    right = min(image.width, max(left + 1, math.ceil((box.x + box.width) / reduction)))
    bottom = min(image.height, max(top + 1, math.ceil((box.y + box.height) / reduction)))
    return image.crop((left, top, right, bottom))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:  # e.g. a colour mode Pillow cannot convert
        raise ImageRejected(f"unsupported colour mode {image.mode}: {error}") from None


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale: Pillow's convert would clip to 255, so rescale to 8 bits."""
    pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise ImageRejected(f"unsupported colour mode {image.mode}")
    if image.mode == "F":
        values = pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels
    else:  # I;16*, and I (which holds 16-bit data from PNG/TIFF)
        values = pixels.astype(np.float32) / 257.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
