"""The copy features blob: what the embedder makes of an image for copy verification, search_svc stores
with the item, and both read back (the embedder to verify a pair, search_svc to find the items whose
local descriptors a query's share). Made by embedder_svc/copy_features.py.

Layout (little-endian), version 2:
  header  magic b"VCF", version u8, keypoints n u16, mirrored keypoints m u16,
          working width u16, working height u16, original width u32, original height u32,
          thumbnail width w u16, thumbnail height h u16
  points  (n + m) x 2 float16, in working-image pixels (the mirrored set in the mirror image's)
  descriptors (n + m) x 32 uint8 (ORB)
  thumbnail w x h uint8: the working image in greyscale, scaled down (0 x 0: none)
Version 1 (stored before thumbnails) is the same without the thumbnail's fields; it still decodes, with
no thumbnail.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_MAGIC = b"VCF"
_VERSION = 2
_HEADER_V1 = struct.Struct("<3sBHHHHII")
_HEADER = struct.Struct("<3sBHHHHIIHH")
DESCRIPTOR_BYTES = 32


class CopyFeaturesInvalid(ValueError):
    """A blob that is not copy features of this format (corrupt, truncated, or another version)."""


@dataclass(frozen=True)
class FeatureSet:
    points: np.ndarray  # [n, 2] float32, working-image pixels
    descriptors: np.ndarray  # [n, 32] uint8


@dataclass(frozen=True)
class CopyFeatures:
    plain: FeatureSet
    mirrored: FeatureSet
    working_size: tuple[int, int]
    original_size: tuple[int, int]
    # The working image in greyscale, scaled down ([height, width] uint8), for the pixel check of
    # embedder_svc/pixel_agreement.py; None in features stored before it.
    thumbnail: np.ndarray | None = None


def encode_copy_features(features: CopyFeatures) -> bytes:
    plain, mirrored = features.plain, features.mirrored
    thumbnail = features.thumbnail if features.thumbnail is not None else np.zeros((0, 0), np.uint8)
    header = _HEADER.pack(
        _MAGIC, _VERSION, len(plain.points), len(mirrored.points), *features.working_size, *features.original_size,
        thumbnail.shape[1], thumbnail.shape[0],
    )
    points = np.concatenate([plain.points, mirrored.points]).astype("<f2")
    descriptors = np.concatenate([plain.descriptors, mirrored.descriptors]).astype(np.uint8)
    return header + points.tobytes() + descriptors.tobytes() + np.ascontiguousarray(thumbnail, np.uint8).tobytes()


@dataclass(frozen=True)
class _Layout:
    """Where a blob's parts lie, as its header says (checked against the blob's length)."""

    header: struct.Struct
    fields: tuple
    plain_count: int
    mirrored_count: int
    thumbnail_size: tuple[int, int]  # width, height

    @property
    def count(self) -> int:
        return self.plain_count + self.mirrored_count

    @property
    def descriptors_at(self) -> int:
        return self.header.size + self.count * 4

    @property
    def thumbnail_at(self) -> int:
        return self.descriptors_at + self.count * DESCRIPTOR_BYTES


def _layout(blob: bytes) -> _Layout:
    """The blob's layout; CopyFeaturesInvalid naming what is wrong when it is not copy features of a
    version read here, or its length is not what its header says."""
    if len(blob) < _HEADER_V1.size:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes: shorter than their {_HEADER_V1.size}-byte header")
    magic, version = _HEADER_V1.unpack_from(blob)[:2]
    if magic != _MAGIC:
        raise CopyFeaturesInvalid("not copy features (wrong magic bytes)")
    if version not in (1, _VERSION):
        raise CopyFeaturesInvalid(f"copy features of version {version}; this embedder reads versions 1 and {_VERSION}")
    header = _HEADER if version == _VERSION else _HEADER_V1
    if len(blob) < header.size:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes: shorter than their {header.size}-byte header")
    fields = header.unpack_from(blob)
    thumbnail_size = fields[8:] if version == _VERSION else (0, 0)
    layout = _Layout(header, fields, fields[2], fields[3], thumbnail_size)
    expected = layout.thumbnail_at + thumbnail_size[0] * thumbnail_size[1]
    if len(blob) != expected:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes; their header says {expected}")
    return layout


def decode_copy_features(blob: bytes) -> CopyFeatures:
    layout = _layout(blob)
    width, height, original_width, original_height = layout.fields[4:8]
    if min(width, height, original_width, original_height) == 0:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes; their header says {len(blob)}")
    count, plain_count = layout.count, layout.plain_count
    points = np.frombuffer(blob, "<f2", count * 2, layout.header.size).astype(np.float32).reshape(count, 2)
    descriptors = np.frombuffer(blob, np.uint8, count * DESCRIPTOR_BYTES, layout.descriptors_at).reshape(
        count, DESCRIPTOR_BYTES
    )
    if not np.isfinite(points).all():
        raise CopyFeaturesInvalid("copy features with non-finite keypoint positions")
    thumbnail_width, thumbnail_height = layout.thumbnail_size
    thumbnail = None
    if thumbnail_width and thumbnail_height:
        thumbnail = np.frombuffer(blob, np.uint8, thumbnail_width * thumbnail_height, layout.thumbnail_at).reshape(
            thumbnail_height, thumbnail_width
        )
    return CopyFeatures(
        plain=FeatureSet(points[:plain_count], descriptors[:plain_count]),
        mirrored=FeatureSet(points[plain_count:], descriptors[plain_count:]),
        working_size=(width, height),
        original_size=(original_width, original_height),
        thumbnail=thumbnail,
    )


def without_mirrored_set(blob: bytes) -> bytes:
    """`blob` less its mirror image's keypoints, in the same format (version and all): what verifying it as a
    candidate reads, since only a query is checked mirrored (about a fifth fewer bytes to move per
    candidate). A blob without a mirrored set, or that is not copy features of a version read here (stored
    all the same), comes back as it is."""
    try:
        layout = _layout(blob)
    except CopyFeaturesInvalid:
        return blob
    if layout.mirrored_count == 0:
        return blob
    fields = list(layout.fields)
    fields[3] = 0
    header_size, plain_count = layout.header.size, layout.plain_count
    return b"".join((
        layout.header.pack(*fields),
        blob[header_size:header_size + plain_count * 4],
        blob[layout.descriptors_at:layout.descriptors_at + plain_count * DESCRIPTOR_BYTES],
        blob[layout.thumbnail_at:],
    ))
