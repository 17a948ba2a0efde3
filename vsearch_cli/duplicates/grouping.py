"""The groups of near-duplicates, kept in memory linear in the catalog: each item is a small int, and each
tier is a union-find forest over those ints (plus a count of edges per item), so no pair list is ever
stored, however many edges the searches find.

Tiers nest: an exact byte duplicate is also a copy, and a copy is also similar, so an edge of one tier
joins the groups of that tier and of every looser one. A tier lists the groups (2 items or more) of its
edges and the stricter ones', except a group that is the same as one a stricter tier listed already."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

TIERS = ("exact", "copy", "similar")
TIER_TITLES = {
    "exact": "exact byte duplicates",
    "copy": "verified copies (crops, mirror images, recompressions...)",
    "similar": "similar images",
}
EXACT, COPY, SIMILAR = range(3)


@dataclass(frozen=True)
class Member:
    id: str
    image_uri: str
    edges: int  # edges found at this tier or a stricter one


@dataclass(frozen=True)
class Group:
    tier: str
    members: list[Member]  # the representative first, then by id

    @property
    def representative(self) -> Member:
        return self.members[0]

    @property
    def size(self) -> int:
        return len(self.members)


class _Forest:
    """Union-find with path halving and union by size, over 0..n-1 (grown on demand)."""

    def __init__(self) -> None:
        self.parent = array("l")
        self.size = array("l")

    def add(self) -> None:
        self.parent.append(len(self.parent))
        self.size.append(1)

    def root(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        a, b = self.root(a), self.root(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


class DuplicateGroups:
    """Items by id, the edges found between them, and the groups they make."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.image_uris: list[str] = []
        self._number: dict[str, int] = {}
        # The first item seen with each content hash (raw 32 bytes: half the memory of the hex).
        self._first_with_content: dict[bytes, int] = {}
        self._forests = [_Forest() for _ in TIERS]
        self._edges = [array("l") for _ in TIERS]

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, item_id: str, image_uri: str = "") -> int:
        """The item's number, added when new (a hit may name an item before the listing reaches it)."""
        number = self._number.get(item_id)
        if number is None:
            number = len(self.ids)
            self._number[item_id] = number
            self.ids.append(item_id)
            self.image_uris.append(image_uri)
            for forest, edges in zip(self._forests, self._edges):
                forest.add()
                edges.append(0)
        elif image_uri and not self.image_uris[number]:
            self.image_uris[number] = image_uri
        return number

    def listed(self, item_id: str, image_uri: str, content_sha256: str) -> int:
        """An item of the catalog's listing: an exact-tier edge to the first item with the same bytes."""
        number = self.item(item_id, image_uri)
        if content_sha256:
            digest = bytes.fromhex(content_sha256)
            first = self._first_with_content.setdefault(digest, number)
            if first != number:
                self.link(EXACT, first, number)
        return number

    def link(self, tier: int, a: int, b: int) -> None:
        if a == b:
            return
        for looser in range(tier, len(TIERS)):
            self._forests[looser].union(a, b)
            self._edges[looser][a] += 1
            self._edges[looser][b] += 1

    def groups(self) -> list[Group]:
        """Every tier's groups, tier by tier, largest first (ties by the representative's id). A group's
        representative is its member with the most edges (ties: the smallest id)."""
        found: list[Group] = []
        for tier, name in enumerate(TIERS):
            forest, edges = self._forests[tier], self._edges[tier]
            stricter = self._forests[tier - 1] if tier else None
            members_of: dict[int, list[int]] = {}
            for number in range(len(self.ids)):
                root = forest.root(number)
                if forest.size[root] > 1:
                    members_of.setdefault(root, []).append(number)
            for members in members_of.values():
                if stricter is not None and stricter.size[stricter.root(members[0])] == len(members):
                    continue  # the very group a stricter tier lists
                representative = min(members, key=lambda number: (-edges[number], self.ids[number]))
                ordered = [representative] + sorted((m for m in members if m != representative), key=self.ids.__getitem__)
                found.append(Group(name, [Member(self.ids[m], self.image_uris[m], edges[m]) for m in ordered]))
        found.sort(key=lambda group: (TIERS.index(group.tier), -group.size, group.representative.id))
        return found
