"""Reading a labelled image set's CSV (`path,label[,split]` and the like), shared by `vsearch eval`
and the quantization guard."""

from __future__ import annotations

import csv
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
