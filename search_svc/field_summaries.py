"""What each filterable field holds across a collection (StatsResponse.field_summaries), the same on both
backends: how many items have it; for a string or bool field its most frequent values (most frequent
first, ties by value) and whether there are more; for a number field its smallest and largest value.

The FAISS store aggregates in SQL; Milvus has no GROUP BY, so its store feeds the filter columns of every
item, batch by batch, to a `FieldTally`."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from search_svc import columns
from search_svc.settings import FieldType
from vsearch.v1 import search_pb2

# Values listed per string or bool field, at most.
TOP_VALUES = 50


def value_text(value: object, field_type: FieldType) -> str:
    """A stored value as ValueCount.value says it: bools as "true" / "false"."""
    if field_type == "bool":
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class FieldSummary:
    name: str
    type: FieldType
    present: int
    # (value, count), most frequent first, ties by value; string and bool fields only.
    top_values: tuple[tuple[str, int], ...] = ()
    more_values: bool = False
    # Number fields, when any item has the field.
    minimum: float | None = None
    maximum: float | None = None

    def message(self) -> search_pb2.FieldSummary:
        summary = search_pb2.FieldSummary(
            name=self.name, type=self.type, present=self.present, more_values=self.more_values,
            top_values=[search_pb2.ValueCount(value=value, count=count) for value, count in self.top_values],
        )
        if self.minimum is not None:
            summary.min = self.minimum
        if self.maximum is not None:
            summary.max = self.maximum
        return summary


def top_values(counts: Iterable[tuple[str, int]]) -> tuple[tuple[tuple[str, int], ...], bool]:
    """The TOP_VALUES most frequent of (value, count) pairs, ties by value, and whether any was left out."""
    ranked = sorted(counts, key=lambda pair: (-pair[1], pair[0]))
    return tuple(ranked[:TOP_VALUES]), len(ranked) > TOP_VALUES


@dataclass
class _Tally:
    present: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    minimum: float | None = None
    maximum: float | None = None


class FieldTally:
    """Summaries built from rows of filter columns (a field's typed column and its presence column),
    fed in any number of batches."""

    def __init__(self, fields: Mapping[str, FieldType]) -> None:
        self._fields = dict(fields)
        self._tallies = {name: _Tally() for name in self._fields}

    @property
    def output_columns(self) -> list[str]:
        """The columns each row must hold."""
        return [name for field_name in self._fields for name in (field_name, columns.presence_column(field_name))]

    def add(self, rows: Iterable[Mapping[str, object]]) -> None:
        for row in rows:
            for name, field_type in self._fields.items():
                if not row.get(columns.presence_column(name)):
                    continue
                tally = self._tallies[name]
                tally.present += 1
                value = row[name]
                if field_type in ("string", "bool"):
                    tally.counts[value_text(value, field_type)] += 1
                else:
                    number = float(value)  # type: ignore[arg-type]
                    tally.minimum = number if tally.minimum is None else min(tally.minimum, number)
                    tally.maximum = number if tally.maximum is None else max(tally.maximum, number)

    def summaries(self) -> list[FieldSummary]:
        """One per field, in the settings' order."""
        found = []
        for name, field_type in self._fields.items():
            tally = self._tallies[name]
            listed, more = top_values(tally.counts.items())
            found.append(FieldSummary(name, field_type, tally.present, listed, more, tally.minimum, tally.maximum))
        return found


class FieldSummaryCache:
    """A collection's field summaries, reused while this process's index generation has not moved and
    they are younger than `max_age_s`; computed by one caller at a time per collection, so that page loads
    arriving together share one scan. Called from the store executor's threads."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # collection -> (generation, computed at, summaries)
        self._kept: dict[str, tuple[int, float, list[FieldSummary]]] = {}

    def get(self, collection: str, generation: int, compute: Callable[[], list[FieldSummary]]) -> list[FieldSummary]:
        with self._guard:
            lock = self._locks.setdefault(collection, threading.Lock())
        with lock:
            kept = self._kept.get(collection)
            if kept is not None and kept[0] == generation and self._clock() - kept[1] < self._max_age_s:
                return kept[2]
            summaries = compute()
            self._kept[collection] = (generation, self._clock(), summaries)
            return summaries
