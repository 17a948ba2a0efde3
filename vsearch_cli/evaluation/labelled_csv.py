"""Reading a labelled image set's CSV (`path,label[,split]` and the like), shared by `vsearch eval`,
the quantization guard and `vsearch model adapt`/`calibrate`."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class LabelsFileError(ValueError):
    """The labels CSV cannot be read or lacks a column; the message names the file and the problem."""


def read_label_rows(labels_csv: Path, required_columns: Sequence[str]) -> list[dict[str, str]]:
    try:
        with labels_csv.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LabelsFileError(f"cannot read {labels_csv}: {error}") from None
    missing = [column for column in required_columns if column not in columns]
    if missing:
        raise LabelsFileError(
            f"{labels_csv} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)})"
        )
    return rows


@dataclass(frozen=True)
class ListedImage:
    relative: str  # the path as written in the CSV
    path: Path
    label: str  # "" for an unlabelled row
    split: str  # "" without a split column


def read_listed_images(
    images_root: Path, labels_csv: Path, path_col: str, label_col: str, split_col: str | None,
) -> list[ListedImage]:
    """Every row with a path, in order; `split_col` None reads no split. A path listed twice, or one
    that is not a file under `images_root`, is a `LabelsFileError` naming it."""
    rows = read_label_rows(labels_csv, [path_col, label_col] + ([split_col] if split_col else []))
    images: list[ListedImage] = []
    seen: set[str] = set()
    for row in rows:
        relative = (row.get(path_col) or "").strip()
        if not relative:
            continue
        if relative in seen:
            raise LabelsFileError(f"{labels_csv}: {relative!r} is listed twice")
        seen.add(relative)
        split = (row.get(split_col) or "").strip() if split_col else ""
        images.append(ListedImage(relative, images_root / relative, (row.get(label_col) or "").strip(), split))
    absent = [image.path for image in images if not image.path.is_file()]
    if absent:
        raise LabelsFileError(f"{len(absent)} listed image(s) not found under {images_root}, e.g. {absent[0]}")
    return images
