"""Each query descriptor's two nearest descriptors by Hamming distance, in each of several candidates' sets.

Verification matches a query's descriptors against each candidate's (30 or more per copy search), and
that was half of its time: faiss's k-NN (`knn_hamming`, a heap per query descriptor) over one candidate
at a time. Here one call computes every distance to a group of candidates at once (faiss's `hammings`,
about a quarter of the heap's time per distance), and numpy picks each candidate's nearest two from that
matrix, releasing Python's lock in its loops, so a decode worker verifying other candidates runs meanwhile
(faiss keeps the lock). The neighbours are the same: where the nearest distance is unique its index is the same, and
the verifier's ratio test refuses every match whose nearest two are tied."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

# The most distances one group's matrix holds (int32: 16 MB): candidates are grouped to stay within it.
MAX_DISTANCES_PER_GROUP = 4_000_000
# Above any Hamming distance of 256-bit descriptors: fills a shorter set's columns.
_FAR = 1 << 20


@dataclass(frozen=True)
class Neighbours:
    """For each query descriptor: the distance to its nearest candidate descriptor, to the second
    nearest, and the nearest's index in the candidate's set."""

    nearest: np.ndarray
    second: np.ndarray
    nearest_index: np.ndarray


def nearest_two(query: np.ndarray, candidates: list[np.ndarray]) -> list[Neighbours | None]:
    """Per candidate set (`[n, bytes]` uint8 each), the query's (`[m, bytes]`) two nearest neighbours in it;
    None for a set with fewer than two descriptors, or for all when the query has none."""
    results: list[Neighbours | None] = [None] * len(candidates)
    usable = [index for index, descriptors in enumerate(candidates) if len(descriptors) >= 2]
    if len(query) == 0 or not usable:
        return results
    query = np.ascontiguousarray(query, dtype=np.uint8)
    for group in _groups(usable, candidates, len(query)):
        for index, neighbours in zip(group, _nearest_two_in_group(query, [candidates[i] for i in group])):
            results[index] = neighbours
    return results


def _groups(usable: list[int], candidates: list[np.ndarray], query_count: int) -> list[list[int]]:
    """`usable` cut into runs whose padded distance matrices stay within MAX_DISTANCES_PER_GROUP."""
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in usable:
        wider = max(width, len(candidates[index]))
        if current and query_count * wider * (len(current) + 1) > MAX_DISTANCES_PER_GROUP:
            groups.append(current)
            current, wider = [], len(candidates[index])
        current.append(index)
        width = wider
    groups.append(current)
    return groups


def _nearest_two_in_group(query: np.ndarray, sets: list[np.ndarray]) -> list[Neighbours]:
    width, code_bytes = max(len(descriptors) for descriptors in sets), query.shape[1]
    padded = np.zeros((len(sets) * width, code_bytes), dtype=np.uint8)
    for position, descriptors in enumerate(sets):
        padded[position * width: position * width + len(descriptors)] = descriptors
    distances = np.empty((len(query), len(padded)), dtype=np.int32)
    faiss.hammings(faiss.swig_ptr(query), faiss.swig_ptr(padded), len(query), len(padded), code_bytes,
                   faiss.swig_ptr(distances))
    by_set = distances.reshape(len(query), len(sets), width)
    for position, descriptors in enumerate(sets):
        by_set[:, position, len(descriptors):] = _FAR
    nearest_index = by_set.argmin(axis=2)
    nearest = np.take_along_axis(by_set, nearest_index[..., None], axis=2)[..., 0]
    np.put_along_axis(by_set, nearest_index[..., None], _FAR, axis=2)
    second = by_set.min(axis=2)
    return [Neighbours(nearest[:, position], second[:, position], nearest_index[:, position])
            for position in range(len(sets))]
