"""Copy features and copy verification: is one image a copy of (a part of) another?

A global embedding cannot tell a copy from a look-alike (a true copy's cosine overlaps the best
non-copy's), so a copy is decided on local features: ORB keypoints with their binary descriptors,
extracted from the image and from its mirror image, matched pairwise (nearest neighbour with a ratio
test) and checked by a similarity transform (rotation, scale, translation) fitted by RANSAC. Enough
matches agreeing on one plausible transform make a copy, whatever was cropped, recompressed, greyed,
rescaled or slightly rotated; the transform also says where the query lies in the candidate.

`extract` runs once per catalog image at ingest and once per query; its blob is stored with the item
(search_svc keeps it as opaque bytes), so verification never needs the catalog image again. Blocking
(OpenCV): run both in the decode executor, never on the event loop.

Blob layout (little-endian), version 1:
  header  magic b"VCF", version u8, keypoints n u16, mirrored keypoints m u16,
          working width u16, working height u16, original width u32, original height u32
  points  (n + m) x 2 float16, in working-image pixels (the mirrored set in the mirror image's)
  descriptors (n + m) x 32 uint8 (ORB)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

_MAGIC = b"VCF"
_VERSION = 1
_HEADER = struct.Struct("<3sBHHHHII")
_DESCRIPTOR_BYTES = 32
# OpenCV's own thread pool would compete with the decode executor's threads, which already run
# extractions and verifications side by side.
cv2.setNumThreads(1)


class CopyFeaturesInvalid(ValueError):
    """A blob that is not copy features of this format (corrupt, truncated, or another version)."""


class CopyFeatureSettings(BaseModel):
    """``EMBEDDER_COPY_SEARCH__*``. Defaults measured on transformed copies of Caltech-101 photos against
    no-copy queries from other classes and ukbench (docs/copy-search.md)."""

    model_config = ConfigDict(frozen=True)

    # Keypoints kept per catalog image: what the index stores, 36 bytes each (plus a 20-byte header).
    # A query's: its own, and its mirror image's (never stored).
    keypoints: int = Field(256, ge=8, le=1000)
    query_keypoints: int = Field(192, ge=8, le=1000)
    mirrored_query_keypoints: int = Field(96, ge=0, le=1000)
    # A query's keypoints found again on its working image shrunk `query_zoom` times (0 keypoints: none),
    # added to its own. A copy cropped to half the side reaches the working side at twice the catalog
    # image's scale, and ORB's pyramid only shrinks from there, so the crop's coarse keypoints, those
    # that match the catalog image's finest, would otherwise be missing.
    zoomed_query_keypoints: int = Field(64, ge=0, le=1000)
    query_zoom: float = Field(2.0, gt=1, le=8)
    # Keypoints are found `oversample` times over, then `keypoints` of them kept, spread over a
    # grid x grid partition (see _spread).
    oversample: int = Field(3, ge=1, le=10)
    grid: int = Field(4, ge=1, le=16)
    # ORB's scale pyramid: levels, each this much smaller than the one before (they span the rescaling
    # a copy may have undergone beyond what working_side evens out).
    pyramid_levels: int = Field(8, ge=1, le=16)
    pyramid_scale: float = Field(1.2, gt=1, le=2)
    # Longer side of the working image the keypoints are found on (larger images are shrunk, smaller
    # ones enlarged, so that keypoint scales of query and catalog image are comparable).
    working_side: int = Field(512, ge=64, le=2048)
    # Matches that must agree on one transform for a copy verdict.
    min_inliers: int = Field(12, ge=4)
    # RANSAC's reprojection tolerance, in working-image pixels of the candidate.
    ransac_pixels: float = Field(6.0, gt=0)
    # Lowe's ratio test: a match counts only when its nearest descriptor is clearly nearer than the
    # second nearest.
    ratio: float = Field(0.8, gt=0, le=1)
    # Plausible copies: rescaled within [1/max_scale, max_scale], rotated by at most this.
    max_scale: float = Field(6.0, ge=1)
    max_rotation_degrees: float = Field(30.0, ge=0, le=180)


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


@dataclass(frozen=True)
class Verdict:
    is_copy: bool
    copy_score: float
    inliers: int
    mirrored: bool = False
    # (x, y, width, height) in the candidate's original pixels; None without a copy.
    matched_box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ExtractedSet:
    features: FeatureSet
    working_size: tuple[int, int]
    original_size: tuple[int, int]


_EMPTY = FeatureSet(np.zeros((0, 2), np.float32), np.zeros((0, _DESCRIPTOR_BYTES), np.uint8))
NO_COPY = Verdict(is_copy=False, copy_score=0.0, inliers=0)


class CopyFeatureExtractor:
    def __init__(self, settings: CopyFeatureSettings) -> None:
        self.settings = settings

    def extract(self, image: Image.Image, for_query: bool = False) -> bytes:
        """The copy features of an image (RGB or L) as a blob: for the index, or for a query (those of
        the mirror image too)."""
        working, original_size = self._working_image(image)
        plain = self._feature_set(working, original_size, mirrored=False, for_query=for_query)
        mirrored = self._feature_set(working, original_size, mirrored=True, for_query=True) if for_query else None
        return self.combine(plain, mirrored)

    def feature_set(self, image: Image.Image, mirrored: bool, for_query: bool) -> "ExtractedSet":
        """One of an image's two feature sets (a query's are extracted side by side, see the engine)."""
        return self._feature_set(*self._working_image(image), mirrored=mirrored, for_query=for_query)

    def _working_image(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """The greyscale working image, and the original's (width, height)."""
        grey = np.asarray(image.convert("L"))
        original_height, original_width = grey.shape
        return _resize_longer_side(grey, self.settings.working_side), (original_width, original_height)

    def _feature_set(
        self, working: np.ndarray, original_size: tuple[int, int], mirrored: bool, for_query: bool
    ) -> "ExtractedSet":
        height, width = working.shape
        if mirrored:
            features = self._detect(np.ascontiguousarray(working[:, ::-1]), self.settings.mirrored_query_keypoints)
        elif for_query:
            features = _joined(self._detect(working, self.settings.query_keypoints), self._zoomed(working))
        else:
            features = self._detect(working, self.settings.keypoints)
        return ExtractedSet(features, (width, height), original_size)

    def _zoomed(self, working: np.ndarray) -> FeatureSet:
        """Keypoints of the working image shrunk `query_zoom` times, positioned in the working image."""
        if self.settings.zoomed_query_keypoints == 0:
            return _EMPTY
        height, width = working.shape
        zoom = self.settings.query_zoom
        size = (max(1, round(width / zoom)), max(1, round(height / zoom)))
        found = self._detect(cv2.resize(working, size, interpolation=cv2.INTER_AREA), self.settings.zoomed_query_keypoints)
        return FeatureSet(found.points * np.float32(zoom), found.descriptors)

    @staticmethod
    def combine(plain: "ExtractedSet", mirrored: "ExtractedSet | None") -> bytes:
        return encode_copy_features(CopyFeatures(
            plain.features, mirrored.features if mirrored is not None else _EMPTY, plain.working_size,
            plain.original_size,
        ))

    def _detect(self, grey: np.ndarray, keypoints: int) -> FeatureSet:
        # A fresh detector per call: ORB objects are not safe to share between threads.
        orb = cv2.ORB_create(
            nfeatures=keypoints * self.settings.oversample, scaleFactor=self.settings.pyramid_scale,
            nlevels=self.settings.pyramid_levels, fastThreshold=5,
        )
        found = orb.detect(grey, None)
        if not found:
            return _EMPTY
        found = _spread(found, keypoints, grey.shape, self.settings.grid)
        found, descriptors = orb.compute(grey, found)
        if descriptors is None or not found:
            return _EMPTY
        points = np.array([keypoint.pt for keypoint in found], dtype=np.float32)
        return FeatureSet(points, descriptors)


def _joined(first: FeatureSet, second: FeatureSet) -> FeatureSet:
    return FeatureSet(np.concatenate([first.points, second.points]), np.concatenate([first.descriptors, second.descriptors]))


def _spread(found: list, keypoints: int, shape: tuple[int, int], grid: int) -> list:
    """The strongest `keypoints` of `found`, spread over a grid x grid partition of the image: each
    cell first gives its strongest share, the rest go to the strongest left anywhere. Keypoints
    bunch on the most textured part of an image, and a crop of another part would find none."""
    if len(found) <= keypoints or grid <= 1:
        return sorted(found, key=lambda keypoint: -keypoint.response)[:keypoints]
    height, width = shape
    order = sorted(range(len(found)), key=lambda index: -found[index].response)
    share = keypoints // (grid * grid)
    taken_per_cell: dict[int, int] = {}
    chosen, rest = [], []
    for index in order:
        x, y = found[index].pt
        cell = min(grid - 1, int(y * grid / height)) * grid + min(grid - 1, int(x * grid / width))
        if taken_per_cell.get(cell, 0) < share:
            taken_per_cell[cell] = taken_per_cell.get(cell, 0) + 1
            chosen.append(index)
        else:
            rest.append(index)
    chosen += rest[: keypoints - len(chosen)]
    return [found[index] for index in chosen]


def _resize_longer_side(grey: np.ndarray, side: int) -> np.ndarray:
    height, width = grey.shape
    scale = side / max(height, width)
    if abs(scale - 1.0) < 1e-3:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(grey, size, interpolation=interpolation)


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
    expected = _HEADER.size + count * (4 + _DESCRIPTOR_BYTES)
    if len(blob) != expected or min(width, height, original_width, original_height) == 0:
        raise CopyFeaturesInvalid(f"copy features of {len(blob)} bytes; their header says {expected}")
    points = np.frombuffer(blob, "<f2", count * 2, _HEADER.size).astype(np.float32).reshape(count, 2)
    descriptors = np.frombuffer(blob, np.uint8, count * _DESCRIPTOR_BYTES, _HEADER.size + count * 4).reshape(
        count, _DESCRIPTOR_BYTES
    )
    if not np.isfinite(points).all():
        raise CopyFeaturesInvalid("copy features with non-finite keypoint positions")
    return CopyFeatures(
        plain=FeatureSet(points[:plain_count], descriptors[:plain_count]),
        mirrored=FeatureSet(points[plain_count:], descriptors[plain_count:]),
        working_size=(width, height),
        original_size=(original_width, original_height),
    )


class CopyVerifier:
    def __init__(self, settings: CopyFeatureSettings) -> None:
        self.settings = settings
        # Bounds of a plausible transform's scale (the norm of its first column).
        self._min_scale, self._max_scale = 1.0 / settings.max_scale, settings.max_scale
        self._max_rotation = math.radians(settings.max_rotation_degrees)

    def verify(self, query: CopyFeatures, candidate: CopyFeatures, check_mirrored: bool = True) -> Verdict:
        """Is `query` a copy of (a part of) `candidate`, as it is or (when `check_mirrored`) mirrored?"""
        plain = self._match(query.plain, candidate.plain)
        mirrored = self._match(query.mirrored, candidate.plain) if check_mirrored else (0, None)
        best, is_mirrored = (mirrored, True) if mirrored[0] > plain[0] else (plain, False)
        inliers, transform = best
        score = inliers / (inliers + self.settings.min_inliers)
        if inliers < self.settings.min_inliers or transform is None:
            return Verdict(is_copy=False, copy_score=score, inliers=inliers, mirrored=is_mirrored)
        box = _matched_box(transform, query.working_size, candidate)
        return Verdict(is_copy=True, copy_score=score, inliers=inliers, mirrored=is_mirrored, matched_box=box)

    def _match(self, query: FeatureSet, candidate: FeatureSet) -> tuple[int, np.ndarray | None]:
        """Agreeing matches of the best plausible transform query -> candidate, and the transform."""
        if len(query.points) < 4 or len(candidate.points) < 4:
            return 0, None
        distances, indices = cv2.batchDistance(
            query.descriptors, candidate.descriptors, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2
        )
        good = distances[:, 0] < self.settings.ratio * distances[:, 1]
        if int(good.sum()) < 4:
            return 0, None
        source = query.points[good]
        target = candidate.points[indices[good, 0]]
        transform, inlier_mask = cv2.estimateAffinePartial2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=self.settings.ransac_pixels,
            maxIters=500, confidence=0.99,
        )
        if transform is None or inlier_mask is None or not self._plausible(transform):
            return 0, None
        return int(inlier_mask.sum()), transform

    def _plausible(self, transform: np.ndarray) -> bool:
        scale = math.hypot(transform[0, 0], transform[1, 0])
        rotation = abs(math.atan2(transform[1, 0], transform[0, 0]))
        return self._min_scale <= scale <= self._max_scale and rotation <= self._max_rotation


def _matched_box(transform: np.ndarray, query_size: tuple[int, int], candidate: CopyFeatures) -> tuple[int, int, int, int]:
    """The query's outline mapped into the candidate, clipped to it, in the candidate's original pixels."""
    width, height = query_size
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], dtype=np.float64)
    mapped = corners @ transform.T
    working_width, working_height = candidate.working_size
    original_width, original_height = candidate.original_size
    scale_x, scale_y = original_width / working_width, original_height / working_height
    left = int(np.clip(mapped[:, 0].min() * scale_x, 0, original_width))
    right = int(np.clip(math.ceil(mapped[:, 0].max() * scale_x), 0, original_width))
    top = int(np.clip(mapped[:, 1].min() * scale_y, 0, original_height))
    bottom = int(np.clip(math.ceil(mapped[:, 1].max() * scale_y), 0, original_height))
    return left, top, max(0, right - left), max(0, bottom - top)
