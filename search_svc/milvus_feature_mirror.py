"""A Milvus collection's descriptor index (`feature_index.FeatureIndex`), kept in each search_svc
replica's memory and in step with what every replica writes: what gives copy searches on Milvus their
feature candidates (docs/copy-search.md, "Candidates by shared features").

Milvus cannot hold the index itself (Milvus Lite indexes binary vectors by brute force only: 0.8 s per
lookup at about 1,200 items), so each replica builds it from the stored copy features when it prepares
the collection, and follows it:
- its own writes at once (`apply_written`, `remove`);
- every replica's writes by polling (`catch_up`, every `SEARCH_MILVUS__FEATURE_SYNC_S`): each item row
  carries `written_us`, its write's time in microseconds, and the mirror reads the ids and stamps of the
  rows stamped after its previous poll began, less `OVERLAP_US` (for other replicas' clocks, and for a
  write acknowledged after a later one), then fetches the features of those it does not hold at that
  stamp. The window follows this replica's clock, not the newest stamp: after a bulk write, polls
  would otherwise read its last minute again and again (26 ms a poll at 16k rows, 390 at 100k);
- other replicas' deletes by counting: when Milvus holds fewer items than the mirror knows, every id is
  read and the missing ones are removed.

A mirror behind Milvus costs recall, never a wrong answer: the store reads its candidates back from
Milvus by id, with the search's filter, so a deleted item drops out and a replaced one is verified
against the features Milvus holds now.

A stamp orders two versions of one item: a version is taken only over an older one. A replica stamps
its writes above every stamp it has read (milvus_store), so only two writes of one item through two
replicas within a poll of each other, by clocks that differ by more than the time between them, can
leave the older version's descriptors held until the item is written again (recall only, as above).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from search_svc import columns
from search_svc.feature_index import FeatureIndex

logger = logging.getLogger(__name__)

# How far before the previous poll's start (by this replica's clock) a catch-up reads again: more than any
# clock difference between replicas and any Milvus call's time from stamp to acknowledgement
# (SEARCH_MILVUS__TIMEOUT_S, 10 s).
OVERLAP_US = 60_000_000
# Features fetched per `id in [...]` query of a catch-up (up to 48 KB each, 16 KB typically).
FETCH_IDS = 200


def _now_us() -> int:
    return time.time_ns() // 1000


# (filter expression, output columns) -> batches of rows, copy features as raw bytes.
Scan = Callable[[str, list[str]], Iterator[list[dict]]]
# (ids, output columns) -> their rows, copy features as raw bytes.
Fetch = Callable[[Sequence[str], list[str]], list[dict]]


@dataclass
class _Held:
    """What the mirror holds: the descriptor index and which item each label is."""

    index: FeatureIndex
    labels: dict[str, int] = field(default_factory=dict)  # id -> its descriptors' label
    ids: dict[int, str] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)  # every known id -> the stamp of its version held
    newest: int = 0
    next_label: int = 1


class MilvusFeatureMirror:
    def __init__(self, collection: str, hash_bits: int, scan: Scan, fetch: Fetch, count: Callable[[], int]) -> None:
        self.collection = collection
        self._hash_bits = hash_bits
        self._scan, self._fetch, self._count = scan, fetch, count
        self._lock = threading.Lock()  # guards `_held`; lookups and writes each take it briefly
        self._sync_lock = threading.Lock()  # one catch-up or rebuild at a time
        self._held = _Held(FeatureIndex(hash_bits))
        self.built = False  # until a build has read the collection once
        # Rows stamped after this were not yet read: the previous read's start, less OVERLAP_US.
        self._read_since = -1

    # --- reading Milvus ------------------------------------------------------------------------

    def build(self) -> None:
        """Reads every item's stamp and features (a scan of the collection), replaces what is held, and
        catches up with what was written meanwhile."""
        with self._sync_lock:
            started = _now_us()
            held = _Held(FeatureIndex(self._hash_bits))
            for rows in self._scan("", [columns.ID, columns.WRITTEN_US, columns.COPY_FEATURES]):
                self._take(held, rows)
            with self._lock:
                self._held = held
            self._read_since = started - OVERLAP_US
            self._catch_up()
            self.built = True

    def reset(self) -> None:
        """Forgets everything held, as if never built (a collection beyond the index's size limit)."""
        with self._sync_lock:
            with self._lock:
                self._held = _Held(FeatureIndex(self._hash_bits))
            self.built = False
            self._read_since = -1

    def catch_up(self) -> None:
        """Takes the rows every replica wrote since the previous poll began (less OVERLAP_US), and removes
        items deleted elsewhere; rebuilds once removed descriptors outnumber the live ones."""
        with self._sync_lock:
            self._catch_up()
        if self._held.index.wants_rebuild:
            logger.info("rebuilding collection %s's feature index: most of it was removed", self.collection)
            self.build()

    def _catch_up(self) -> None:
        started = _now_us()
        written = [
            (row[columns.ID], row[columns.WRITTEN_US])
            for rows in self._scan(f"{columns.WRITTEN_US} > {self._read_since}", [columns.ID, columns.WRITTEN_US])
            for row in rows
        ]
        with self._lock:
            stamps = self._held.stamps
            changed = [item_id for item_id, stamp in written if stamp > stamps.get(item_id, -1)]
        for start in range(0, len(changed), FETCH_IDS):
            rows = self._fetch(changed[start:start + FETCH_IDS], [columns.ID, columns.WRITTEN_US, columns.COPY_FEATURES])
            with self._lock:
                self._take(self._held, rows)
        # After the rows above: Milvus then holds no item the mirror does not know, so fewer items there
        # means deletes (a write landing between the two reads can hide one until the next catch-up).
        if self._count() < len(self._held.stamps):
            present = {row[columns.ID] for rows in self._scan("", [columns.ID]) for row in rows}
            with self._lock:
                gone = [item_id for item_id in self._held.stamps if item_id not in present]
            self.remove(gone)
        self._read_since = started - OVERLAP_US

    # --- this replica's writes -----------------------------------------------------------------

    def apply_written(self, rows: Iterable[dict]) -> None:
        """Rows this replica has just written (acknowledged by Milvus): id, stamp and raw copy features."""
        with self._lock:
            self._take(self._held, rows)

    def remove(self, stored_ids: Iterable[str]) -> None:
        with self._lock:
            held = self._held
            labels = []
            for item_id in stored_ids:
                held.stamps.pop(item_id, None)
                label = held.labels.pop(item_id, None)
                if label is not None:
                    del held.ids[label]
                    labels.append(label)
            held.index.remove(labels)

    # --- lookups -------------------------------------------------------------------------------

    def best(self, descriptors: np.ndarray, count: int) -> list[str]:
        """The ids of up to `count` items with the most votes from `descriptors`, most first."""
        with self._lock:
            return [self._held.ids[label] for label in self._held.index.best(descriptors, count)]

    @property
    def known_items(self) -> int:
        """Items known (with features or without)."""
        return len(self._held.stamps)

    @property
    def newest(self) -> int:
        """The newest stamp held."""
        return self._held.newest

    @property
    def indexed_items(self) -> int:
        """Items whose descriptors are in the index."""
        return self._held.index.items

    @staticmethod
    def _take(held: _Held, rows: Iterable[dict]) -> None:
        """Each row's version, over an older one held (under `_lock`, or on a `_Held` no one sees yet)."""
        added, removed = [], []
        for row in rows:
            item_id, stamp = row[columns.ID], int(row[columns.WRITTEN_US])
            if stamp <= held.stamps.get(item_id, -1):
                continue
            held.stamps[item_id] = stamp
            held.newest = max(held.newest, stamp)
            old = held.labels.pop(item_id, None)
            if old is not None:
                del held.ids[old]
                removed.append(old)
            if row[columns.COPY_FEATURES]:
                label, held.next_label = held.next_label, held.next_label + 1
                held.labels[item_id], held.ids[label] = label, item_id
                added.append((label, row[columns.COPY_FEATURES]))
        held.index.remove(removed)
        held.index.add(added)
