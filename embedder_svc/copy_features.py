"""Copy features and copy verification: is one image a copy of (a part of) another?

A global embedding cannot tell a copy from a look-alike (a true copy's cosine overlaps the best
non-copy's), so a copy is decided on local features: ORB keypoints with their binary descriptors,
extracted from the image and from its mirror image, matched pairwise (nearest neighbour with a ratio
test) and checked by a similarity transform (rotation, scale, translation) fitted by RANSAC. Enough
matches agreeing on one plausible transform make a copy, whatever was cropped, recompressed, greyed,
rescaled or slightly rotated; the transform also says where the query lies in the candidate. And they
must be a fair share of the features the two images show in their overlap: two photographs of one
product model on one studio backdrop, or of one airliner type at one airport, agree on dozens of
features, but on few of the ones they hold there (docs/copy-search.md, "Look-alikes"). Where that share
is small, the pixels must agree too (embedder_svc/pixel_agreement.py): another photograph of one flat
object passes the features but not its pixels; and the matches must show no perspective
(embedder_svc/perspective_evidence.py): a copy is an affine image of its original, another photograph
taken from a step aside a projective one.

`extract` runs once per catalog image at ingest and once per query; its blob is stored with the item
(search_svc stores it, and reads its descriptors to find copy candidates), so verification never needs the catalog image again. Blocking
(OpenCV): run both in the decode executor, never on the event loop.

The blob's layout and codec: service_kit/copy_feature_codec.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import faiss
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from embedder_svc.hamming_neighbours import Neighbours, nearest_two
from embedder_svc.perspective_evidence import perspective_evidence
from embedder_svc.pixel_agreement import pixel_agreement
from service_kit.copy_feature_codec import DESCRIPTOR_BYTES, CopyFeatures, FeatureSet, encode_copy_features

# OpenCV's and faiss's own thread pools would compete with the decode executor's threads, which
# already run extractions and verifications side by side.
cv2.setNumThreads(1)
faiss.omp_set_num_threads(1)


class CopyFeatureSettings(BaseModel):
    """``EMBEDDER_COPY_SEARCH__*``. Defaults measured on transformed copies of Caltech-101 photos against
    no-copy queries from other classes and ukbench (docs/copy-search.md)."""

    model_config = ConfigDict(frozen=True)

    # Keypoints kept per catalog image: what the index stores, 36 bytes each (plus a 20-byte header).
    # A query's: its own, and its mirror image's (never stored).
    keypoints: int = Field(256, ge=8, le=1000)
    query_keypoints: int = Field(192, ge=8, le=1000)
    mirrored_query_keypoints: int = Field(96, ge=0, le=1000)
    # A catalog image's mirror-image keypoints, stored beside its own (0: none, about 27 % fewer bytes):
    # its stored features are the query of a copy search by item_id and of `vsearch duplicates`, which
    # then see mirrored copies too. At most `keypoints`: its own detections, mirrored.
    mirrored_keypoints: int = Field(96, ge=0, le=1000)
    # A query's keypoints found again on its working image shrunk `query_zoom` times (0 keypoints: none),
    # added to its own, and mirrored to its mirror image's (when it has those). A copy cropped to half the
    # side reaches the working side at twice the catalog image's scale, and ORB's pyramid only shrinks from
    # there, so the crop's coarse keypoints, those that match the catalog image's finest, would otherwise
    # be missing (a mirrored half-side crop: 0.63 -> 0.80 found, docs/copy-search.md).
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
    # FAST's corner threshold (grey levels). Keypoints are found at `fast_threshold`, and found again at
    # `faint_fast_threshold` when fewer than `faint_below` x the keypoints to keep were: a low-contrast
    # image's corners are faint. Finding faint corners in every image (5 throughout) took 60% longer to
    # extract a catalog image's features for the same verdicts; never finding them (20 throughout) missed
    # low-contrast copies (docs/copy-search.md).
    fast_threshold: int = Field(20, ge=1, le=255)
    faint_fast_threshold: int = Field(5, ge=1, le=255)
    faint_below: float = Field(2.0, ge=0)
    # Longer side of the working image the keypoints are found on (larger images are shrunk, smaller
    # ones enlarged, so that keypoint scales of query and catalog image are comparable).
    working_side: int = Field(512, ge=64, le=2048)
    # Matches that must agree on one transform for a copy verdict.
    min_inliers: int = Field(12, ge=4)
    # ... and the least share of the overlap's keypoints they must be: agreeing matches / the keypoints
    # inside the overlap (the query's mapped into the candidate, or the candidate's in the query's
    # outline, whichever are fewer). Measured on Caltech-101: copies 0.14 at the 5th percentile (0.57 at
    # the median), photographs of the same model or scene verified as copies 0.08 at the median.
    min_matched_share: float = Field(0.1, ge=0, le=1)
    # Where the share is below `pixel_check_below_share`, a copy verdict also needs the two images' pixels
    # to agree where the transform lays one on the other (embedder_svc/pixel_agreement.py): at least
    # `min_pixel_agreement` (0: no pixel check). Another photograph of one flat object agrees on enough
    # features, with a share of 0.1-0.35, but its pixels agree below 0.6 in half of ukbench56's such pairs,
    # below 0.7 in 60 %; copies at 0.82-0.99 in their worst 1 %, by transform (docs/copy-search.md). Copies
    # sharing more need no such check.
    min_pixel_agreement: float = Field(0.7, ge=0, le=1)
    pixel_check_below_share: float = Field(0.3, ge=0, le=1)
    # Where the share is below `pixel_check_below_share`, a copy verdict also needs its agreeing matches to
    # show no perspective (embedder_svc/perspective_evidence.py): the F statistic of a homography over an
    # affine transform fitted to them at most this (0: no such check). A copy is an affine image of its
    # original: at most 25 in the 1,565 Caltech-101 copies of 22 transforms checked, below 16 for all but
    # one; another photograph of one flat object, from a step aside, is a projective one: over 30 for 14
    # of the 23 ukbench56 same-object pairs checked. A copy tilted in perspective is lost with them.
    max_perspective_evidence: float = Field(30.0, ge=0)
    # Longer side of the greyscale thumbnail stored with a catalog image's features for that check (0:
    # none; then its pairs get no pixel check): 64 is at most 4,096 bytes an item. A query's is twice as
    # large, since a crop of a catalog image covers only part of that image's thumbnail; at most 64, so
    # that a query's features (31,384 bytes at most), which an ingest checking copies stores, stay within
    # what search_svc stores of an item's (48,000).
    thumbnail_side: int = Field(64, ge=0, le=64)
    # RANSAC's reprojection tolerance, in working-image pixels of the candidate.
    ransac_pixels: float = Field(6.0, gt=0)
    # Lowe's ratio test: a match counts only when its nearest descriptor is clearly nearer than the
    # second nearest.
    ratio: float = Field(0.8, gt=0, le=1)
    # Plausible copies: rescaled within [1/max_scale, max_scale], rotated by at most this.
    max_scale: float = Field(6.0, ge=1)
    max_rotation_degrees: float = Field(30.0, ge=0, le=180)


@dataclass(frozen=True)
class Verdict:
    is_copy: bool
    copy_score: float
    inliers: int
    mirrored: bool = False
    # Agreeing matches / the keypoints in the overlap (see CopyFeatureSettings.min_matched_share).
    matched_share: float = 0.0
    # The pixel check's agreement (embedder_svc/pixel_agreement.py); None where it was not made.
    pixel_agreement: float | None = None
    # The perspective check's evidence (embedder_svc/perspective_evidence.py); None where it was not made.
    perspective_evidence: float | None = None
    # (x, y, width, height) in the candidate's original pixels; None without a copy.
    matched_box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Detections:
    """An image's keypoints as found on its working image, before they are chosen and described."""

    working: np.ndarray
    found: tuple
    # The found keypoints' positions ([n, 2], working-image pixels) and responses ([n]), read out once for
    # both the query's own set and its mirror image's.
    positions: np.ndarray
    responses: np.ndarray
    original_size: tuple[int, int]


_EMPTY = FeatureSet(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES), np.uint8))
NO_COPY = Verdict(is_copy=False, copy_score=0.0, inliers=0)


class CopyFeatureExtractor:
    """Extraction in parts, so that a lone query's can run on several threads (see the engine): its
    keypoints are detected once (`query_detections`), then described on the image and on its mirror
    image (`query_plain_set`, `query_mirrored_set`), beside those of its shrunk image and of that one's mirror
    image (`query_zoomed_sets`)."""

    def __init__(self, settings: CopyFeatureSettings) -> None:
        self.settings = settings

    def extract(self, image: Image.Image, for_query: bool = False, original_size: tuple[int, int] | None = None) -> bytes:
        """The copy features of an image (RGB or L) as a blob: for the index, or for a query (those of
        the mirror image too). `original_size`: the picture's full size, when `image` was decoded
        smaller (matched boxes are given in its pixels); default the image's own."""
        if for_query:
            detections = self.query_detections(image, original_size)
            return self.combine(
                detections, self.query_plain_set(detections), self.query_mirrored_set(detections),
                self.query_zoomed_sets(image),
            )
        detections = self._detections(self._working_image(image), original_size or image.size, self.settings.keypoints)
        own = self._chosen_set(detections, self.settings.keypoints)
        mirrored = self._mirrored_set(detections, min(self.settings.mirrored_keypoints, self.settings.keypoints))
        thumbnail = _thumbnail(detections.working, self.settings.thumbnail_side)
        return encode_copy_features(
            CopyFeatures(own, mirrored, _size(detections.working), detections.original_size, thumbnail)
        )

    def query_detections(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> "Detections":
        """A query's keypoints on its working image, not yet described: enough for its own set and its
        mirror image's."""
        keypoints = max(self.settings.query_keypoints, self.settings.mirrored_query_keypoints)
        return self._detections(self._working_image(image), original_size or image.size, keypoints)

    def query_plain_set(self, detections: "Detections") -> FeatureSet:
        return self._chosen_set(detections, self.settings.query_keypoints)

    def _detections(self, working: np.ndarray, original_size: tuple[int, int], keypoints: int) -> "Detections":
        """Keypoints found on `working` to choose `keypoints` of, not yet described."""
        found = tuple(self._found(working, keypoints))
        return Detections(working, found, *_positions_and_responses(found), original_size)

    def _chosen_set(self, detections: "Detections", keypoints: int) -> FeatureSet:
        """`keypoints` of the detections, spread over the image (see _spread), described."""
        chosen = _spread(detections.positions, detections.responses, keypoints, detections.working.shape,
                         self.settings.grid)
        return self._described(detections.working, [detections.found[index] for index in chosen])

    def query_mirrored_set(self, detections: "Detections") -> FeatureSet:
        return self._mirrored_set(detections, self.settings.mirrored_query_keypoints)

    def _mirrored_set(self, detections: "Detections", keypoints: int) -> FeatureSet:
        """The mirror image's keypoints: the image's detections mirrored, and described again on the
        mirror image. Detecting them anew would find the same corners (FAST, Harris and ORB's
        orientation are symmetric) at four times the cost of describing them."""
        if not (keypoints and detections.found):
            return _EMPTY
        working, found = detections.working, detections.found
        width = working.shape[1]
        # Mirrored within each keypoint's pyramid level: ORB's levels are the image resized to
        # round(width / scale), so the keypoint lands on the pixel the mirror image's level has there.
        scales = self.settings.pyramid_scale ** np.array([keypoint.octave for keypoint in found], dtype=np.float64)
        positions = detections.positions.copy()
        positions[:, 0] = (np.round(width / scales) - 1) * scales - positions[:, 0]
        chosen = _spread(positions, detections.responses, keypoints, working.shape, self.settings.grid)
        mirrored = [
            cv2.KeyPoint(float(positions[index, 0]), float(positions[index, 1]), found[index].size,
                         (180.0 - found[index].angle) % 360.0, found[index].response, found[index].octave,
                         found[index].class_id)
            for index in chosen
        ]
        return self._described(np.ascontiguousarray(working[:, ::-1]), mirrored)

    def query_zoomed_sets(self, image: Image.Image) -> tuple[FeatureSet, FeatureSet]:
        """A query's keypoints found on its working image shrunk `query_zoom` times, and the same on the
        shrunk image's mirror image (none without mirrored query keypoints), positioned in the working
        image and in its mirror image (see CopyFeatureSettings.zoomed_query_keypoints)."""
        keypoints = self.settings.zoomed_query_keypoints
        if keypoints == 0:
            return _EMPTY, _EMPTY
        working = self._working_image(image)
        height, width = working.shape
        zoom = self.settings.query_zoom
        shrunk = cv2.resize(working, (max(1, round(width / zoom)), max(1, round(height / zoom))), interpolation=cv2.INTER_AREA)
        detections = self._detections(shrunk, _size(shrunk), keypoints)
        found = self._chosen_set(detections, keypoints)
        mirrored = self._mirrored_set(detections, keypoints) if self.settings.mirrored_query_keypoints else _EMPTY
        scale = np.float32(zoom)
        return (FeatureSet(found.points * scale, found.descriptors),
                FeatureSet(mirrored.points * scale, mirrored.descriptors))

    def combine(self, detections: "Detections", plain: FeatureSet, mirrored: FeatureSet,
                zoomed: tuple[FeatureSet, FeatureSet]) -> bytes:
        """A query's blob: its own keypoints with the zoomed ones, and its mirror image's with theirs,
        and its thumbnail at twice a catalog image's side."""
        zoomed_plain, zoomed_mirrored = zoomed
        return encode_copy_features(CopyFeatures(
            _joined(plain, zoomed_plain), _joined(mirrored, zoomed_mirrored), _size(detections.working),
            detections.original_size, _thumbnail(detections.working, 2 * self.settings.thumbnail_side),
        ))

    def _working_image(self, image: Image.Image) -> np.ndarray:
        """The greyscale working image."""
        return _resize_longer_side(np.asarray(image.convert("L")), self.settings.working_side)

    def _orb(self, keypoints: int, fast_threshold: int | None = None) -> "cv2.ORB":
        # A fresh detector per call: ORB objects are not safe to share between threads.
        return cv2.ORB_create(
            nfeatures=keypoints * self.settings.oversample, scaleFactor=self.settings.pyramid_scale,
            nlevels=self.settings.pyramid_levels, fastThreshold=fast_threshold or self.settings.fast_threshold,
            edgeThreshold=ORB_BORDER, patchSize=ORB_BORDER,
        )

    def _found(self, grey: np.ndarray, keypoints: int) -> list:
        """Keypoints to choose `keypoints` of: found at the FAST threshold, or again at the faint one when
        too few were (see CopyFeatureSettings.fast_threshold). None in an image too narrow to hold one."""
        if min(grey.shape) <= 2 * ORB_BORDER:
            # Every pixel is within ORB's border of an edge, so no keypoint can be described there; and
            # ORB's pyramid fails outright (an OpenCV assertion) on a strip whose levels shrink to nothing.
            return []
        settings = self.settings
        found = self._orb(keypoints).detect(grey, None)
        if len(found) < settings.faint_below * keypoints and settings.faint_fast_threshold < settings.fast_threshold:
            found = self._orb(keypoints, settings.faint_fast_threshold).detect(grey, None)
        return found

    def _described(self, grey: np.ndarray, keypoints: list) -> FeatureSet:
        if not keypoints:
            return _EMPTY
        # Describing reads only the pyramid's shape (levels, scale), not how many keypoints to find.
        described, descriptors = self._orb(1).compute(grey, keypoints)
        if descriptors is None or not described:
            return _EMPTY
        return FeatureSet(np.array([keypoint.pt for keypoint in described], dtype=np.float32), descriptors)


def _thumbnail(working: np.ndarray, side: int) -> np.ndarray | None:
    """The greyscale working image with its longer side `side` (never enlarged; None for 0)."""
    if side == 0:
        return None
    return _resize_longer_side(working, min(side, max(working.shape)))


def _joined(first: FeatureSet, second: FeatureSet) -> FeatureSet:
    return FeatureSet(np.concatenate([first.points, second.points]), np.concatenate([first.descriptors, second.descriptors]))


def _size(grey: np.ndarray) -> tuple[int, int]:
    return grey.shape[1], grey.shape[0]


def _positions_and_responses(found: "tuple | list") -> tuple[np.ndarray, np.ndarray]:
    positions = np.array([keypoint.pt for keypoint in found], dtype=np.float64).reshape(-1, 2)
    return positions, np.array([keypoint.response for keypoint in found], dtype=np.float64)


def _spread(positions: np.ndarray, responses: np.ndarray, keypoints: int, shape: tuple[int, int], grid: int) -> np.ndarray:
    """Which `keypoints` of the found ones to keep (their indices): the strongest, spread over a
    grid x grid partition of the image. Each cell first gives its strongest share, the rest go to the
    strongest left anywhere. Keypoints bunch on the most textured part of an image, and a crop of
    another part would otherwise find none."""
    order = np.argsort(-responses, kind="stable")
    if len(order) <= keypoints or grid <= 1:
        return order[:keypoints]
    height, width = shape
    cells = (np.minimum(grid - 1, (positions[order, 1] * grid / height).astype(np.int64)) * grid
             + np.minimum(grid - 1, (positions[order, 0] * grid / width).astype(np.int64)))
    # Each keypoint's rank among the stronger ones of its cell: a stable sort by cell keeps the
    # strength order within each cell.
    by_cell = np.argsort(cells, kind="stable")
    sorted_cells = cells[by_cell]
    rank_in_cell = np.empty(len(order), dtype=np.int64)
    rank_in_cell[by_cell] = np.arange(len(order)) - np.searchsorted(sorted_cells, sorted_cells, side="left")
    in_share = rank_in_cell < keypoints // (grid * grid)
    chosen, rest = order[in_share], order[~in_share]
    return np.concatenate([chosen, rest[: keypoints - len(chosen)]])


def _resize_longer_side(grey: np.ndarray, side: int) -> np.ndarray:
    height, width = grey.shape
    scale = side / max(height, width)
    if abs(scale - 1.0) < 1e-3:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(grey, size, interpolation=interpolation)


class CopyVerifier:
    def __init__(self, settings: CopyFeatureSettings) -> None:
        self.settings = settings
        # Bounds of a plausible transform's scale (the norm of its first column).
        self._min_scale, self._max_scale = 1.0 / settings.max_scale, settings.max_scale
        self._max_rotation = math.radians(settings.max_rotation_degrees)

    def verify(
        self, query: CopyFeatures, candidate: CopyFeatures, check_mirrored: bool = True, min_inliers: int | None = None,
    ) -> Verdict:
        """Is `query` a copy of (a part of) `candidate`, as it is or (when `check_mirrored`) mirrored? With
        at least `min_inliers` agreeing matches (default: the settings' min_inliers), at least
        `min_matched_share` of the keypoints in the overlap; below `pixel_check_below_share`, pixels that
        agree and matches without perspective."""
        return self.verify_all(query, [candidate], [check_mirrored], min_inliers)[0]

    def verify_all(
        self, query: CopyFeatures, candidates: list[CopyFeatures], check_mirrored: list[bool],
        min_inliers: int | None = None,
    ) -> list[Verdict]:
        """`verify` of the query against each candidate (mirrored too where `check_mirrored` says so),
        with the descriptors' nearest neighbours found for all candidates at once
        (embedder_svc/hamming_neighbours.py): the same verdicts, in less time."""
        needed = min_inliers or self.settings.min_inliers
        plain = nearest_two(query.plain.descriptors, [candidate.plain.descriptors for candidate in candidates])
        to_mirror = [index for index, mirror in enumerate(check_mirrored) if mirror]
        mirrored = dict(zip(to_mirror, nearest_two(
            query.mirrored.descriptors, [candidates[index].plain.descriptors for index in to_mirror])))
        return [
            self._verdict(query, candidate, plain[index], mirrored.get(index), index in mirrored, needed)
            for index, candidate in enumerate(candidates)
        ]

    def _verdict(
        self, query: CopyFeatures, candidate: CopyFeatures, plain_neighbours: Neighbours | None,
        mirrored_neighbours: Neighbours | None, check_mirrored: bool, needed: int,
    ) -> Verdict:
        plain = self._match(query.plain, candidate.plain, plain_neighbours, query.working_size,
                            candidate.working_size, needed)
        mirrored = (self._match(query.mirrored, candidate.plain, mirrored_neighbours, query.working_size,
                                candidate.working_size, needed)
                    if check_mirrored else _NO_MATCH)
        best, is_mirrored = (mirrored, True) if mirrored.inliers > plain.inliers else (plain, False)
        inliers, transform, share = best.inliers, best.transform, best.share
        score = self._score(inliers, needed, share)
        agreement = evidence = None
        if score >= 0.5 and transform is not None and share < self.settings.pixel_check_below_share:
            agreement = self._pixel_agreement(query, candidate, best, is_mirrored)
            minimum = self.settings.min_pixel_agreement
            if agreement is not None and agreement < minimum:
                score = min(score, max(0.0, agreement) / (max(0.0, agreement) + minimum))
            evidence = self._perspective_evidence(best) if score >= 0.5 else None
            most = self.settings.max_perspective_evidence
            if evidence is not None and evidence > most:
                score = min(score, most / (evidence + most))
        if score < 0.5 or transform is None:
            return Verdict(is_copy=False, copy_score=score, inliers=inliers, mirrored=is_mirrored, matched_share=share,
                           pixel_agreement=agreement, perspective_evidence=evidence)
        box = _matched_box(transform, query.working_size, candidate)
        # A copy is scored by the matches the better of its two transforms lets agree: a copy squeezed to
        # another aspect ratio keeps few under the similarity transform, and another photograph of the
        # same object, which a similarity transform fits as well as it fits anything, ranked above it.
        inliers = max(inliers, self._stretched_count(best))
        return Verdict(is_copy=True, copy_score=inliers / (inliers + needed), inliers=inliers, mirrored=is_mirrored,
                       matched_box=box, matched_share=share, pixel_agreement=agreement, perspective_evidence=evidence)

    def _stretched_count(self, fit: "_Fit") -> int:
        """How many of the fit's matches agree on a plausible affine transform (0: none fits)."""
        stretched = fit.stretched if fit.stretch_tried else self._stretched(fit.source, fit.target)
        return stretched[1] if stretched else 0

    def _perspective_evidence(self, fit: "_Fit") -> float | None:
        """How strongly the fit's agreeing matches say the images were taken from different viewpoints;
        None when not checked (no check asked, too few matches)."""
        if self.settings.max_perspective_evidence == 0 or fit.agreeing is None:
            return None
        return perspective_evidence(fit.source[fit.agreeing], fit.target[fit.agreeing])

    def _pixel_agreement(
        self, query: CopyFeatures, candidate: CopyFeatures, fit: "_Fit", mirrored: bool,
    ) -> float | None:
        """The better agreement of the fit's similarity transform's alignment and (when a plausible one
        fits the matches) an affine one's: a squeezed copy lines up under the affine only. None: not
        checked (no check asked, a thumbnail missing, as in features stored before thumbnails, or too
        little overlap to judge)."""
        if self.settings.min_pixel_agreement == 0 or query.thumbnail is None or candidate.thumbnail is None:
            return None
        # Fitted here, for the one pair the check runs on, unless _match already did for the share.
        stretched = fit.stretched if fit.stretch_tried else self._stretched(fit.source, fit.target)
        transforms = (fit.transform, stretched[0] if stretched else None)
        # Features stored by an ingest that checked copies are a query's, with a thumbnail twice as large:
        # compared at the side the agreement was measured at.
        side = self.settings.thumbnail_side
        thumbnail = candidate.thumbnail
        if side and max(thumbnail.shape) > side:
            thumbnail = _resize_longer_side(thumbnail, side)
        agreements = [
            pixel_agreement(query.thumbnail, query.working_size, thumbnail, candidate.working_size,
                            transform, mirrored)
            for transform in transforms if transform is not None
        ]
        judged = [agreement for agreement in agreements if agreement is not None]
        return max(judged) if judged else None

    def _score(self, inliers: int, needed: int, share: float) -> float:
        """inliers / (inliers + needed), which ranks copies; below 0.5, the copy threshold, also when the
        share is below min_matched_share (then the lower of that and share / (share + min_matched_share))."""
        score = inliers / (inliers + needed)
        minimum = self.settings.min_matched_share
        if share < minimum:
            score = min(score, share / (share + minimum))
        return score

    def _match(
        self, query: FeatureSet, candidate: FeatureSet, neighbours: Neighbours | None, query_size: tuple[int, int],
        candidate_size: tuple[int, int], needed: int,
    ) -> "_Fit":
        """Agreeing matches of the best plausible transform query -> candidate, the transform, and the
        share of the overlap's keypoints the matches are. A copy stretched to another aspect ratio loses
        matches to the similarity transform: where enough agree but too small a share, a general affine
        transform is fitted too, and its share counts when it is higher (squeezed to 70 % of the width:
        119 -> 149 of 150 such copies verified; docs/copy-search.md)."""
        if len(query.points) < 4 or len(candidate.points) < 4 or neighbours is None:
            return _NO_MATCH
        good = neighbours.nearest < self.settings.ratio * neighbours.second
        if int(good.sum()) < 4:
            return _NO_MATCH
        source = query.points[good]
        nearest = neighbours.nearest_index[good]
        target = candidate.points[nearest]
        transform, inlier_mask = cv2.estimateAffinePartial2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=self.settings.ransac_pixels,
            maxIters=500, confidence=0.99,
        )
        if transform is None or inlier_mask is None or not self._plausible(transform):
            return _NO_MATCH
        agreeing = inlier_mask.ravel().astype(bool)
        # Several query keypoints may match one candidate keypoint (a corner found at several scales, in
        # a crop enlarged to the working side: half of a half-side crop's matches). But matches on only
        # two of the candidate's keypoints verify nothing, since any two fix a similarity transform: a
        # transform shrinking the query onto two of them (a carpet's texture) made 18 "agree".
        if len(np.unique(nearest[agreeing])) < MIN_DISTINCT_KEYPOINTS:
            return _NO_MATCH
        inliers = int(agreeing.sum())
        share = _share(inliers, query, candidate, transform, query_size, candidate_size)
        if inliers >= needed and share < self.settings.min_matched_share:
            stretched = self._stretched(source, target)
            if stretched:
                share = max(share, _share(stretched[1], query, candidate, stretched[0], query_size, candidate_size))
            return _Fit(inliers, transform, share, source, target, agreeing, stretch_tried=True, stretched=stretched)
        return _Fit(inliers, transform, share, source, target, agreeing)

    def _stretched(self, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
        """A plausible affine transform of the matches (see _plausible_stretch) and how many agree on it."""
        stretched, mask = cv2.estimateAffine2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=self.settings.ransac_pixels,
            maxIters=500, confidence=0.99,
        )
        if stretched is None or mask is None or not self._plausible_stretch(stretched):
            return None
        return stretched, int(mask.sum())

    def _plausible(self, transform: np.ndarray) -> bool:
        scale = math.hypot(transform[0, 0], transform[1, 0])
        rotation = abs(math.atan2(transform[1, 0], transform[0, 0]))
        return self._min_scale <= scale <= self._max_scale and rotation <= self._max_rotation

    def _plausible_stretch(self, transform: np.ndarray) -> bool:
        """An affine transform within the scales allowed, stretching one way at most MAX_STRETCH times
        the other (its singular values' ratio; shear counts too)."""
        larger, smaller = np.linalg.svd(transform[:, :2], compute_uv=False)
        return self._min_scale <= smaller and larger <= self._max_scale and larger <= MAX_STRETCH * smaller


@dataclass(frozen=True)
class _Fit:
    """What _match found: the agreeing matches, the similarity transform and the share, the matches
    themselves (query and candidate positions) and which of them agree, and the affine transform when
    _match fitted one."""

    inliers: int
    transform: np.ndarray | None
    share: float
    source: np.ndarray | None = None
    target: np.ndarray | None = None
    agreeing: np.ndarray | None = None
    stretch_tried: bool = False
    stretched: tuple[np.ndarray, int] | None = None


_NO_MATCH = _Fit(0, None, 0.0)
# ORB's border and patch size (its defaults): a keypoint lies at least this far inside its pyramid level,
# so an image whose shorter side is at most twice this holds none.
ORB_BORDER = 31
# The fewest of the candidate's keypoints the agreeing matches must land on: two fix the transform, so
# a third is the first that can agree with it or not.
MIN_DISTINCT_KEYPOINTS = 3
# The most a copy's aspect ratio may have been changed for its share of matches to be counted under an
# affine transform (squeezed to 70 % of the width: 1.43).
MAX_STRETCH = 1.6


def _share(
    inliers: int, query: FeatureSet, candidate: FeatureSet, transform: np.ndarray,
    query_size: tuple[int, int], candidate_size: tuple[int, int],
) -> float:
    """`inliers` / the keypoints in the overlap: the query's that `transform` maps into the candidate, or
    the candidate's that fall in the query's outline, whichever are fewer."""
    overlap = min(_inside(query.points, transform, candidate_size),
                  _inside(candidate.points, cv2.invertAffineTransform(transform), query_size))
    return inliers / max(overlap, inliers, 1)


def _inside(points: np.ndarray, transform: np.ndarray, size: tuple[int, int]) -> int:
    """How many of `points`, mapped by `transform`, fall inside a width x height image."""
    mapped = points.astype(np.float32) @ transform[:, :2].T + transform[:, 2]
    width, height = size
    return int(((mapped[:, 0] >= 0) & (mapped[:, 0] < width) & (mapped[:, 1] >= 0) & (mapped[:, 1] < height)).sum())


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
