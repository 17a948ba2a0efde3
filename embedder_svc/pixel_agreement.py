"""Do a query and a candidate agree pixel for pixel where the verifier's transform lays one on the other?

Local features cannot tell a copy from another photograph of the same flat object (a book cover, a
poster, a rug shot again): both agree on a transform. Their pixels can. A copy, however recompressed,
rescaled, greyed or brightened, keeps its original's image structure, so once aligned, the two images'
gradients correlate almost perfectly (the agreement below is 0.82-0.99 in the worst 1 % of Caltech-101
copies, by transform); another photograph of the object differs in lighting, perspective and
background, and correlates far less (below 0.6 in half of ukbench56's same-object pairs that the
features verify). docs/copy-search.md has the measurements.

Both images are compared small: the candidate as the thumbnail stored with its features, the query's
thumbnail warped onto it. The agreement is the median, over the candidate thumbnail's cells (8 x 8
pixels) that the query covers and where both images have texture, of the correlation of the two images'
gradients there: gradients, so that brightness and contrast do not count; a median, so that a caption,
a patch or a rotated copy's black corners over some cells do not; texture on both sides, so that
highlights a brightened copy clipped to white are not compared."""

from __future__ import annotations

import cv2
import numpy as np

CELL_PIXELS = 8
# A cell is judged only when the query covers it (nearly) whole and both images have texture there: a
# flat cell's gradients are noise, and a copy's cell may be flat where the original's is not (highlights
# clipped to white by brightening, detail blurred away).
_COVERED = 0.9
_MIN_GRADIENT_ENERGY = 50.0  # mean of gx^2 + gy^2 (Sobel 3x3 on 0..255 grey)
# Fewer judged cells than this say nothing either way (a small crop of a plain picture).
MIN_CELLS = 4


def pixel_agreement(
    query_thumbnail: np.ndarray, query_working_size: tuple[int, int],
    candidate_thumbnail: np.ndarray, candidate_working_size: tuple[int, int],
    transform: np.ndarray, mirrored: bool,
) -> float | None:
    """The agreement (-1..1) of the query and the candidate under `transform` (2 x 3, query working
    pixels -> candidate working pixels; of the query's mirror image when `mirrored`), or None when too
    few cells can be judged."""
    query = np.ascontiguousarray(query_thumbnail[:, ::-1]) if mirrored else query_thumbnail
    to_query_working = _pixels_to_working(query.shape, query_working_size)
    from_candidate_working = np.linalg.inv(_pixels_to_working(candidate_thumbnail.shape, candidate_working_size))
    mapping = from_candidate_working @ np.vstack([transform, [0.0, 0.0, 1.0]]) @ to_query_working
    # Shrink the query first where the mapping does (warpAffine samples, it does not average).
    shrink = min(1.0, float(np.sqrt(abs(np.linalg.det(mapping[:2, :2])))))
    if shrink < 1.0:
        size = (max(1, round(query.shape[1] * shrink)), max(1, round(query.shape[0] * shrink)))
        resized = cv2.resize(query, size, interpolation=cv2.INTER_AREA)
        mapping = mapping @ _pixels_to_pixels(resized.shape, query.shape)
        query = resized
    height, width = candidate_thumbnail.shape
    warped = cv2.warpAffine(query.astype(np.float32), mapping[:2], (width, height), flags=cv2.INTER_LINEAR)
    covered = cv2.warpAffine(np.ones(query.shape, np.uint8), mapping[:2], (width, height), flags=cv2.INTER_NEAREST)
    # Sobel reads a pixel's neighbours: the edge of the covered part is not compared.
    covered = cv2.erode(covered, np.ones((5, 5), np.uint8)).astype(bool)
    return _median_cell_correlation(warped, candidate_thumbnail.astype(np.float32), covered)


def _pixels_to_working(thumbnail_shape: tuple[int, ...], working_size: tuple[int, int]) -> np.ndarray:
    """Thumbnail pixel -> working-image pixel (pixel centres on pixel centres, as cv2.resize scales)."""
    scale_x, scale_y = working_size[0] / thumbnail_shape[1], working_size[1] / thumbnail_shape[0]
    return np.array([[scale_x, 0.0, 0.5 * scale_x - 0.5], [0.0, scale_y, 0.5 * scale_y - 0.5], [0.0, 0.0, 1.0]])


def _pixels_to_pixels(from_shape: tuple[int, ...], to_shape: tuple[int, ...]) -> np.ndarray:
    return _pixels_to_working(from_shape, (to_shape[1], to_shape[0]))


def _median_cell_correlation(warped: np.ndarray, candidate: np.ndarray, covered: np.ndarray) -> float | None:
    rows, columns = candidate.shape[0] // CELL_PIXELS, candidate.shape[1] // CELL_PIXELS
    if rows == 0 or columns == 0:
        return None

    def cells(values: np.ndarray) -> np.ndarray:
        """Per-cell sums of a [height, width] array."""
        cropped = values[: rows * CELL_PIXELS, : columns * CELL_PIXELS]
        return cropped.reshape(rows, CELL_PIXELS, columns, CELL_PIXELS).sum(axis=(1, 3))

    query_x, query_y = _gradients(warped)
    candidate_x, candidate_y = _gradients(candidate)
    inside = covered.astype(np.float32)
    product = cells((query_x * candidate_x + query_y * candidate_y) * inside)
    query_energy = cells((query_x ** 2 + query_y ** 2) * inside)
    candidate_energy = cells((candidate_x ** 2 + candidate_y ** 2) * inside)
    count = cells(inside)
    least_energy = _MIN_GRADIENT_ENERGY * np.maximum(count, 1)
    judged = ((count >= _COVERED * CELL_PIXELS * CELL_PIXELS) & (candidate_energy >= least_energy)
              & (query_energy >= least_energy))
    if int(judged.sum()) < MIN_CELLS:
        return None
    correlation = product[judged] / (np.sqrt(query_energy[judged] * candidate_energy[judged]) + 1e-6)
    return float(np.median(correlation))


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
