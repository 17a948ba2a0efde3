"""The copy features blob: what the embedder makes of an image for copy verification, search_svc stores
with the item, and both read back (the embedder to verify a pair, search_svc to find the items whose
local descriptors a query's share). Made by embedder_svc/copy_features.py.

Layout (little-endian), version 1:
  header  magic b"VCF", version u8, keypoints n u16, mirrored keypoints m u16,
          working width u16, working height u16, original width u32, original height u32
  points  (n + m) x 2 float16, in working-image pixels (the mirrored set in the mirror image's)
  descriptors (n + m) x 32 uint8 (ORB)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_MAGIC = b"VCF"
_VERSION = 1
_HEADER = struct.Struct("<3sBHHHHII")
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


def encode_copy_features(features: CopyFeatures) -> bytes:
    plain, mirrored = features.plain, features.mirrored
    header = _HEADER.pack(
        _MAGIC, _VERSION, len(plain.points), len(mirrored.points), *features.working_size, *features.original_size
    )
    points = np.concatenate([plain.points, mirrored.points]).astype("<f2")
    descriptors = np.concatenate([plain.descriptors, mirrored.descriptors]).astype(np.uint8)
    return header + points.tobytes() + descriptors.tobytes()


def decode_copy_features(blob: bytes) -> CopyFeatures:
    if len(blob) < _HEADER.size:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes: shorter than their {_HEADER.size}-byte header")
    magic, version, plain_count, mirrored_count, width, height, original_width, original_height = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise CopyFeaturesInvalid("not copy features (wrong magic bytes)")
    if version != _VERSION:
        raise CopyFeaturesInvalid(f"copy features of version {version}; this embedder reads version {_VERSION}")
    count = plain_count + mirrored_count
    expected = _HEADER.size + count * (4 + DESCRIPTOR_BYTES)
    if len(blob) != expected or min(width, height, original_width, original_height) == 0:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes; their header says {expected}")
    points = np.frombuffer(blob, "<f2", count * 2, _HEADER.size).astype(np.float32).reshape(count, 2)
    descriptors = np.frombuffer(blob, np.uint8, count * DESCRIPTOR_BYTES, _HEADER.size + count * 4).reshape(
        count, DESCRIPTOR_BYTES
    )
    if not np.isfinite(points).all():
        raise CopyFeaturesInvalid("copy features with non-finite keypoint positions")
    return CopyFeatures(
        plain=FeatureSet(points[:plain_count], descriptors[:plain_count]),
        mirrored=FeatureSet(points[plain_count:], descriptors[plain_count:]),
        working_size=(width, height),
        original_size=(original_width, original_height),
    )
