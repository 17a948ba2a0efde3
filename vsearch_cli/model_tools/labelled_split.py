"""The labelled images `vsearch model adapt` and `vsearch model calibrate` learn from, split into the rows
they fit on and the rows they are checked on (which the fit never sees)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vsearch_cli.evaluation.labelled_csv import LabelsFileError, read_listed_images
from service_kit.file_digest import file_sha256

# Without a split column: the share of each label's images held out of the fit, to check it on.
DEFAULT_HOLDOUT_SHARE = 0.25


class LabelledSplitError(ValueError):
    """The labels file or the options give nothing to fit on; the message says why."""


@dataclass(frozen=True)
class LabelledSplit:
    """Paths and labels of the rows fitted on and of those held out. A label of "" marks a catalog
    distractor (a row without a label, or with an excluded one): never fitted on, never a query, never
    relevant, but among the neighbours, as in `vsearch eval`."""

    labels_csv: Path
    labels_sha256: str
    fit_paths: list[Path]
    fit_labels: list[str]
    held_out_paths: list[Path]
    held_out_labels: list[str]
    description: str

    @property
    def fit_classes(self) -> list[str]:
        return sorted({label for label in self.fit_labels if label})


def read_labelled_split(
    labels_csv: Path,
    images_root: Path,
    *,
    path_col: str = "path",
    label_col: str = "label",
    split_col: str | None = None,
    fit_split: str | None = None,
    exclude_labels: Sequence[str] = (),
    holdout_share: float = DEFAULT_HOLDOUT_SHARE,
    seed: int = 0,
) -> LabelledSplit:
    """Fit rows: those of `fit_split` in `split_col` (both or neither must be given); held out: every
    other row. Without a split, a seeded `holdout_share` of each label's images is held out. Rows
    without a label, or with an excluded one, are distractors (label "")."""
    if (split_col is None) != (fit_split is None):
        raise LabelledSplitError("--split-col and --fit-split go together: give both or neither")
    if not 0.0 < holdout_share < 1.0:
        raise LabelledSplitError(f"the held-out share must be between 0 and 1, got {holdout_share}")
    try:
        listed = [(image.path, image.label, image.split)
                  for image in read_listed_images(images_root, labels_csv, path_col, label_col, split_col)]
    except LabelsFileError as error:
        raise LabelledSplitError(str(error)) from None
    excluded = frozenset(exclude_labels)

    def role(label: str) -> str:
        return label if label and label not in excluded else ""

    if fit_split is not None:
        fit = [(path, role(label)) for path, label, split in listed if split == fit_split]
        held = [(path, role(label)) for path, label, split in listed if split != fit_split]
        how = f"split {fit_split!r}; checked on the other {len(held)} rows"
    else:
        rng = random.Random(seed)
        by_label: dict[str, list[Path]] = {}
        for path, label, _ in listed:
            by_label.setdefault(role(label), []).append(path)
        fit, held = [], []
        for label in sorted(by_label):
            paths = sorted(by_label[label])
            rng.shuffle(paths)
            # A label with fewer than 3 images is fitted only: one held-out image has nothing to find.
            count = max(1, round(holdout_share * len(paths))) if len(paths) >= 3 else 0
            held += [(path, label) for path in sorted(paths[:count])]
            fit += [(path, label) for path in sorted(paths[count:])]
        how = f"{len(fit)} rows (seed {seed}); checked on the other {len(held)} ({holdout_share:.0%} of each label)"
    if not any(label for _, label in fit):
        raise LabelledSplitError(f"no labelled rows to fit on in {labels_csv}"
                                 + (f" (split {fit_split!r})" if fit_split is not None else ""))
    classes = len({label for _, label in fit if label})
    labels_sha256 = file_sha256(labels_csv)
    description = f"{labels_csv.name} (sha256 {labels_sha256[:12]}): fit on {how}; {classes} labels"
    if excluded:
        description += f"; {', '.join(sorted(excluded))} excluded"
    return LabelledSplit(
        labels_csv=labels_csv, labels_sha256=labels_sha256,
        fit_paths=[path for path, _ in fit], fit_labels=[label for _, label in fit],
        held_out_paths=[path for path, _ in held], held_out_labels=[label for _, label in held],
        description=description,
    )
