"""The walk over a catalog through the gateway: ListImages page by page (exact duplicates by content
hash), and for each item one copy-mode Search by its id (its stored vector and copy features), whose
verified copies are copy edges and whose other hits above the threshold are similar edges.

Memory: the listing is read a page ahead of `concurrency` searches through a bounded queue, and every
edge goes straight into the union-find (`grouping.DuplicateGroups`), so what stays is a few ints and the
id and image URI per item."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from vsearch.client import AsyncVisualSearchClient, FailedPrecondition, Hit, NotFound, SearchResult, VsearchError
from vsearch_cli.duplicates.grouping import COPY, SIMILAR, DuplicateGroups

LIST_PAGE_SIZE = 1000
SEARCH_TIMEOUT_S = 60.0
# Without a calibration, the cosine from which two images count as similar: with the default model
# (MobileNetV2 int8) on 1,010 Caltech-101 images, every group at 0.9 holds one class; at 0.85 and 0.8 some
# mix classes (docs/loading-a-catalog.md#near-duplicate-groups-vsearch-duplicates).
DEFAULT_SIMILAR_COSINE = 0.9
# With one, the match probability (that the two share a label) from which they count as similar: sharing
# a label is looser than being near-duplicates, hence a high one.
DEFAULT_SIMILAR_PROBABILITY = 0.9


@dataclass(frozen=True)
class SimilarThreshold:
    """What makes a hit that is not a verified copy a similar edge: its match_probability (calibrated
    models) or its cosine score at least `value`."""

    kind: str  # "match_probability" or "cosine"
    value: float
    chosen_by: str  # "--similar-above" or "default"

    def passes(self, hit: Hit) -> bool:
        if self.kind == "match_probability":
            return hit.match_probability is not None and hit.match_probability >= self.value
        return hit.score >= self.value


def similar_threshold(calibrated: bool, given: float | None) -> SimilarThreshold:
    kind = "match_probability" if calibrated else "cosine"
    if given is not None:
        return SimilarThreshold(kind, given, "--similar-above")
    return SimilarThreshold(kind, DEFAULT_SIMILAR_PROBABILITY if calibrated else DEFAULT_SIMILAR_COSINE, "default")


@dataclass
class ScanCounts:
    listed: int = 0
    searched: int = 0
    # Items stored without copy features (or an embedder that verifies no copies): searched in similar
    # mode only, so they can be in exact and similar groups, not in copy groups.
    without_copy_features: int = 0
    # Deleted between the listing and their search.
    gone: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


class ScanError(Exception):
    """A gateway call failed as a whole: the scan stops."""


async def scan_catalog(
    client: AsyncVisualSearchClient, collection: str, k: int, threshold: SimilarThreshold,
    concurrency: int, groups: DuplicateGroups, counts: ScanCounts, progress: Callable[[int], None],
) -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=concurrency * 4)
    copy_mode = [True]  # turned off for good once the embedder says it verifies no copies

    async def list_pages() -> None:
        try:
            async for image in client.list_images(collection=collection, page_size=LIST_PAGE_SIZE,
                                                  timeout=SEARCH_TIMEOUT_S):
                groups.listed(image.id, image.image_uri, image.content_sha256)
                counts.listed += 1
                await queue.put(image.id)
        finally:
            for _ in range(concurrency):
                await queue.put(None)

    async def search(item_id: str, mode: str) -> SearchResult:
        return await client.search(item_id=item_id, k=k, mode=mode, collection=collection, timeout=SEARCH_TIMEOUT_S)

    async def search_items() -> None:
        while (item_id := await queue.get()) is not None:
            try:
                if copy_mode[0]:
                    try:
                        reply = await search(item_id, "copy")
                    except FailedPrecondition as error:
                        if "does not verify copies" in error.message:
                            copy_mode[0] = False
                        counts.without_copy_features += 1
                        reply = await search(item_id, "similar")
                else:
                    counts.without_copy_features += 1
                    reply = await search(item_id, "similar")
            except NotFound:
                counts.gone += 1
                progress(1)
                continue
            except VsearchError as error:
                raise ScanError(f"searching item {item_id!r}: {error}") from None
            number = groups.item(item_id)
            for hit in reply.hits:
                if hit.id == item_id:
                    continue
                if hit.is_copy:
                    groups.link(COPY, number, groups.item(hit.id, hit.image_uri))
                elif threshold.passes(hit):
                    groups.link(SIMILAR, number, groups.item(hit.id, hit.image_uri))
            counts.searched += 1
            progress(1)

    lister = asyncio.create_task(list_pages())
    searchers = [asyncio.create_task(search_items()) for _ in range(concurrency)]
    try:
        await asyncio.gather(lister, *searchers)
    except VsearchError as error:
        raise ScanError(f"listing the catalog: {error}") from None
    finally:
        for task in (lister, *searchers):
            task.cancel()
        await asyncio.gather(lister, *searchers, return_exceptions=True)
