"""Which items' stored copy features share the most local descriptors with a query's: candidates for a
copy search that its similarity shortlist misses. A half-side crop's original can rank far down a large
catalog's similarity order while it shares dozens of ORB descriptors with the crop; on 5,425 Caltech-101
photos the original of 93.3 % of half-side crops was among the 30 most similar, and among those or the 5
items with the most shared descriptors for 98.7 % (docs/copy-search.md, "Candidates by shared features").

Each item's own descriptors (256 at most; not its mirror set: a query brings its mirror image's) are
kept in a faiss IndexBinaryHash under the item's label, bucketed by their first `hash_bits` bits, which
needs no training (ORB's tests were chosen for uncorrelated bits, so the first ones spread descriptors
well enough, if unevenly). A query descriptor looks in its own bucket only; each item with a descriptor
among the `NEIGHBOURS` nearest it finds there within `MAX_DISTANCE` bits gets one vote from it, and
items with fewer than `MIN_VOTES` are left out. Looking in the 16 buckets one bit away as well found the
same originals on the development set for 13 times the time (5.3 ms against 0.4 for a query's 352
descriptors at 5,425 items). Memory: 65 bytes per descriptor measured (32 of code, 8 of label, the
buckets' growth slack), about 16 KiB per item.

IndexBinaryHash cannot remove entries, so a deleted or replaced item's label is only marked removed
(its votes are dropped); the owner rebuilds the index from the stored features once removed
descriptors outnumber the live ones. Not thread-safe for writes: writes under the collection's write
lock, lookups under its read lock.
"""

from __future__ import annotations

import logging
from typing import Iterable

import faiss
import numpy as np

from service_kit.copy_feature_codec import DESCRIPTOR_BYTES, CopyFeaturesInvalid, decode_copy_features

logger = logging.getLogger(__name__)

DESCRIPTOR_BITS = DESCRIPTOR_BYTES * 8
# Neighbours looked at per query descriptor, and the largest Hamming distance (of 256 bits) that still
# counts: a copy's descriptors lie within 20-50 bits of their originals', unrelated ones near 128.
NEIGHBOURS = 4
MAX_DISTANCE = 64
# Fewer votes than this are chance: the best item outside a no-copy query's shortlist had 4 votes at the
# median (5,425 Caltech-101 photos); all but one of the originals verified only through their votes had
# 5 or more. At 5, a no-copy query's search verifies 0.74 feature candidates on average instead of 5,
# for one half-side crop of 150 fewer found (docs/copy-search.md).
MIN_VOTES = 5


class FeatureIndex:
    def __init__(self, hash_bits: int) -> None:
        self._index = faiss.IndexBinaryHash(DESCRIPTOR_BITS, hash_bits)
        self._index.nflip = 0
        self._descriptors: dict[int, int] = {}  # live label -> its descriptors in the index
        self._removed_labels = np.empty(0, dtype=np.int64)  # their entries stay until a rebuild
        self._removed_descriptors = 0

    @property
    def items(self) -> int:
        """Items with descriptors in the index (not removed)."""
        return len(self._descriptors)

    @property
    def wants_rebuild(self) -> bool:
        """More removed descriptors than live ones: rebuilt, the index would be less than half the size."""
        return self._removed_descriptors > max(self._index.ntotal - self._removed_descriptors, 0)

    def add(self, items: Iterable[tuple[int, bytes]]) -> None:
        """(label, stored copy features) of new items; an item without features, or with a blob that is
        not copy features, is left out (it cannot be verified a copy either)."""
        labels, descriptors = [], []
        for label, blob in items:
            if not blob:
                continue
            try:
                own = decode_copy_features(blob).plain.descriptors
            except CopyFeaturesInvalid as error:
                logger.warning("item label %d left out of the feature index: %s", label, error)
                continue
            if len(own):
                labels.append(np.full(len(own), label, dtype=np.int64))
                descriptors.append(own)
                self._descriptors[label] = len(own)
        if labels:
            self._index.add_with_ids(np.ascontiguousarray(np.concatenate(descriptors)), np.concatenate(labels))

    def remove(self, labels: Iterable[int]) -> None:
        removed = []
        for label in labels:
            count = self._descriptors.pop(int(label), None)
            if count is not None:  # each label once: it leaves `_descriptors`
                removed.append(int(label))
                self._removed_descriptors += count
        if removed:
            self._removed_labels = np.concatenate([self._removed_labels, np.asarray(removed, dtype=np.int64)])

    def best(self, descriptors: np.ndarray, count: int, allowed: np.ndarray | None = None) -> list[int]:
        """The labels of up to `count` items with the most votes (at least MIN_VOTES) from `descriptors`
        ([n, 32] uint8), most first (ties by label); with `allowed` (labels), only those."""
        if count <= 0 or not len(descriptors) or not self._descriptors:
            return []
        distances, labels = self._index.search(np.ascontiguousarray(descriptors, dtype=np.uint8), NEIGHBOURS)
        near = (labels >= 0) & (distances <= MAX_DISTANCE)
        if len(self._removed_labels):
            near &= ~np.isin(labels, self._removed_labels)
        if allowed is not None:
            near &= np.isin(labels, allowed)
        rows = np.broadcast_to(np.arange(len(labels), dtype=np.int64)[:, None], labels.shape)[near]
        # One vote per (query descriptor, item): several of an item's descriptors near one query
        # descriptor are one piece of evidence. Both in one integer, for a 1-d unique.
        voters = np.unique(labels[near] * len(labels) + rows) // len(labels)
        if not len(voters):
            return []
        items, votes = np.unique(voters, return_counts=True)
        enough = votes >= MIN_VOTES
        items, votes = items[enough], votes[enough]
        order = np.lexsort((items, -votes))[:count]
        return items[order].tolist()
