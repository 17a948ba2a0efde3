"""What `vsearch duplicates` prints or writes: text (the default), one JSON object (`--json`), or a
self-contained HTML page (`--html FILE`) with thumbnails: local files (file:// URIs) embedded as small
JPEGs, http(s) images linked by their URL."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

from vsearch_cli.duplicates.grouping import TIER_TITLES, TIERS, Group, Member

THUMBNAIL_PIXELS = 160
# Thumbnails per group on the page (its other members are listed by id): a page stays a few MB.
THUMBNAILS_PER_GROUP = 12
# Members shown per group in the text output.
TEXT_MEMBERS_SHOWN = 10


def summary(groups: list[Group], scan: dict[str, Any]) -> dict[str, Any]:
    """The run in one JSON-ready object: the scan's figures, the tiers' totals and every group."""
    tiers = {
        tier: {"groups": sum(group.tier == tier for group in groups),
               "items": sum(group.size for group in groups if group.tier == tier)}
        for tier in TIERS
    }
    return {
        **scan,
        "tiers": tiers,
        "groups": [
            {
                "tier": group.tier, "size": group.size,
                "representative": {"id": group.representative.id, "image_uri": group.representative.image_uri},
                "members": [{"id": member.id, "image_uri": member.image_uri, "edges": member.edges}
                            for member in group.members],
            }
            for group in groups
        ],
    }


def write_text(report: dict[str, Any], out: TextIO) -> None:
    threshold = report["similar_threshold"]
    out.write(f"{report['items']} items in {report['elapsed_s']:.1f} s ({report['items_per_s']:.1f} items/s); "
              f"similar: {threshold['kind']} >= {threshold['value']:g} ({threshold['chosen_by']})\n")
    if report["without_copy_features"]:
        out.write(f"{report['without_copy_features']} items have no copy features: searched for similar "
                  "images only (index them again to find their copies)\n")
    for tier in TIERS:
        totals = report["tiers"][tier]
        out.write(f"\n{tier}: {TIER_TITLES[tier]}: {totals['groups']} groups, {totals['items']} items\n")
        for group in (group for group in report["groups"] if group["tier"] == tier):
            representative = group["representative"]
            out.write(f"  {group['size']} items, representative {representative['id']}  {representative['image_uri']}\n")
            for member in group["members"][1:TEXT_MEMBERS_SHOWN]:
                out.write(f"    {member['id']}  {member['image_uri']}\n")
            if group["size"] > TEXT_MEMBERS_SHOWN:
                out.write(f"    ... and {group['size'] - TEXT_MEMBERS_SHOWN} more\n")


def write_json(report: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(report) + "\n")


def thumbnail_source(image_uri: str) -> str | None:
    """What an <img> shows for this image: a data: URI of a small JPEG for a readable local file, the URL
    itself for http(s), None otherwise."""
    parsed = urlparse(image_uri)
    if parsed.scheme in ("http", "https"):
        return image_uri
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(image_uri) if image_uri else None
    if path is None or not path.is_file():
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=80)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { margin-top: 1.5em; border-bottom: 1px solid #ccc; }
.group { margin: 1em 0; padding: .5em; border: 1px solid #ddd; border-radius: 6px; }
.members { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 164px; font-size: 11px; overflow-wrap: anywhere; }
figure.representative img, figure.representative .missing { outline: 3px solid #2a7; }
img, .missing { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; display: block; }
.missing { display: flex; align-items: center; justify-content: center; color: #999; }
.more { font-size: 12px; color: #555; }
"""


def _figure(member: Member, representative: bool) -> str:
    source = thumbnail_source(member.image_uri)
    picture = (f'<img src="{html.escape(source)}" alt="{html.escape(member.id)}" loading="lazy">' if source
               else '<div class="missing">no preview</div>')
    classes = ' class="representative"' if representative else ""
    return (f'<figure{classes} title="{html.escape(member.image_uri)}">{picture}'
            f'<figcaption>{html.escape(member.id)}</figcaption></figure>')


def write_html(groups: list[Group], report: dict[str, Any], path: Path) -> None:
    """The page, written group by group (thumbnails are made as they are written, never all held)."""
    threshold = report["similar_threshold"]
    collection = report["collection"] or "default collection"
    with path.open("w", encoding="utf-8") as out:
        out.write(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Duplicates: "
                  f"{html.escape(collection)}</title><style>{_PAGE_STYLE}</style></head><body>\n")
        out.write(f"<h1>Near-duplicate groups in {html.escape(collection)}</h1>\n<p>{report['items']} items; "
                  f"similar: {html.escape(threshold['kind'])} &ge; {threshold['value']:g} "
                  f"({html.escape(threshold['chosen_by'])}); {report['items_per_s']:.1f} items/s.</p>\n")
        for tier in TIERS:
            totals = report["tiers"][tier]
            out.write(f'<h2 id="{tier}">{tier}: {html.escape(TIER_TITLES[tier])} ({totals["groups"]} groups, '
                      f'{totals["items"]} items)</h2>\n')
            for group in (group for group in groups if group.tier == tier):
                out.write(f'<div class="group" data-tier="{tier}" data-size="{group.size}">'
                          f'<div>{group.size} items, representative <b>{html.escape(group.representative.id)}</b></div>'
                          '<div class="members">')
                for position, member in enumerate(group.members[:THUMBNAILS_PER_GROUP]):
                    out.write(_figure(member, representative=position == 0))
                out.write("</div>")
                rest = group.members[THUMBNAILS_PER_GROUP:]
                if rest:
                    out.write(f'<p class="more">and {len(rest)} more: '
                              f'{html.escape(", ".join(member.id for member in rest))}</p>')
                out.write("</div>\n")
        out.write("</body></html>\n")
