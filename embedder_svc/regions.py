"""The regions an image is indexed with beside its full view (EmbedImagesRequest.with_regions): a fixed
multi-scale grid of parts of the image, so that a query showing a small part of an image (a crop, a
cropped copy) meets a vector of about that part. The grid and why it is this one: docs/regions.md."""

from __future__ import annotations

from embedder_svc.image_decoding import CropBox

# (left, top, width, height) as fractions of the image's width and height.
Fraction = tuple[float, float, float, float]


def _square_grid(side: float, per_row: int) -> list[Fraction]:
    """per_row x per_row regions of `side`, spread evenly from edge to edge (overlapping when
    side * per_row > 1), row by row."""
    step = (1.0 - side) / (per_row - 1) if per_row > 1 else 0.0
    return [(column * step, row * step, side, side) for row in range(per_row) for column in range(per_row)]


# The four half-side quadrants and the half-side centre, then 0.4-side regions on an overlapping 3x3
# grid: 14 regions, 15 vectors per item with the full view. Among the grids measured on Caltech-101 (1,000
# images, 450 crops per size) it is where recall per stored vector bends: 50 % crops 0.94 and 30 % crops
# 0.85 recall@1 (full view alone: 0.80 and 0.28); 9 half-side regions give 0.96 and 0.74, 18 (those 9
# and the 0.4 grid) 0.97 and 0.85, 25 0.96 and 0.89. Table: docs/regions.md.
REGION_GRID: tuple[Fraction, ...] = tuple(
    _square_grid(0.5, 2) + [(0.25, 0.25, 0.5, 0.5)] + _square_grid(0.4, 3)
)


# The shorter side of the smallest region, as a fraction of the image's shorter side: an image must be
# decoded 1 / SMALLEST_REGION_SIDE times larger than the model's input for every region to reach it.
SMALLEST_REGION_SIDE = min(min(width, height) for _left, _top, width, height in REGION_GRID)


def region_boxes(width: int, height: int, grid: tuple[Fraction, ...] = REGION_GRID) -> list[CropBox]:
    """The grid's regions in pixels of a `width` x `height` image, each at least 1x1 and inside it."""
    boxes = []
    for left, top, region_width, region_height in grid:
        x = min(round(left * width), width - 1)
        y = min(round(top * height), height - 1)
        right = max(min(round((left + region_width) * width), width), x + 1)
        bottom = max(min(round((top + region_height) * height), height), y + 1)
        boxes.append(CropBox(x, y, right - x, bottom - y))
    return boxes
