"""How strongly do a verdict's agreeing matches say the two images were taken from different viewpoints?

A copy, however cropped, rescaled, rotated, mirrored or squeezed, is an affine image of its original: its
matched keypoints lie where an affine transform puts them, up to the keypoints' own jitter. Another
photograph of the same flat object (a book cover, a poster, a rug shot again from a step aside) is a
projective image of it: a homography fits its matches, an affine transform leaves a pattern in the
residuals that grows across the picture. The pixels rarely see that at thumbnail size, and the
similarity transform the verifier fits absorbs it within RANSAC's tolerance.

The evidence is the F statistic of the homography's two extra parameters over the affine transform,
both fitted by least squares to the agreeing matches: how much the residual shrinks per extra parameter,
against the homography's residual per remaining degree of freedom. When the truth is affine it stays
near 1 however many matches agree (below 16 for all but one of the 1,565 Caltech-101 copies of 22
transforms the verifier checked it on, 25 at most); when the truth is projective it grows with the
matches (43 at the median of the 23 ukbench56 same-object pairs checked, over 30 for 14).
docs/copy-search.md has the measurements."""

from __future__ import annotations

import cv2
import numpy as np

# Fewer matches than this leave too few degrees of freedom beside the homography's 8 to judge from.
MIN_MATCHES = 10


def perspective_evidence(source: np.ndarray, target: np.ndarray) -> float | None:
    """The F statistic of a homography against an affine transform fitted to matches `source` -> `target`
    ([n, 2] each, the agreeing matches); None with too few matches or a degenerate fit."""
    count = len(source)
    if count < MIN_MATCHES:
        return None
    source = source.astype(np.float64)
    target = target.astype(np.float64)
    design = np.hstack([source, np.ones((count, 1))])
    affine, *_ = np.linalg.lstsq(design, target, rcond=None)
    affine_residual = float(((design @ affine - target) ** 2).sum())
    # method 0: every match, least squares (refined on the reprojection error); RANSAC already chose them.
    homography, _ = cv2.findHomography(source, target, 0)
    if homography is None:
        return None
    projected = cv2.perspectiveTransform(source.reshape(-1, 1, 2), homography).reshape(-1, 2)
    homography_residual = float(((projected - target) ** 2).sum())
    # Two coordinates per match; the homography spends 8 of those degrees of freedom.
    remaining = 2 * count - 8
    gained = max(0.0, affine_residual - homography_residual)
    return (gained / 2) / max(homography_residual / remaining, 1e-9)
