"""Serving catalog images stored as `file://` URIs, for the web page's thumbnails. Off unless the
operator names the directories that may be served (`GATEWAY_IMAGE_ROOTS`); nothing outside them, and
nothing that is not an image file, is ever read."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from service_kit.status import invalid_argument

IMAGE_MEDIA_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".avif": "image/avif",
    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
}


class LocalImageFiles:
    def __init__(self, roots: list[Path]) -> None:
        # Resolved once: a root given through a symbolic link still matches the resolved file paths.
        self.roots = [root.resolve() for root in roots]

    @property
    def enabled(self) -> bool:
        return bool(self.roots)

    def resolve(self, uri: str) -> tuple[Path, str] | None:
        """The file a `file://` URI names and its media type, or None when it may not be served (not
        under a root, not an image, or missing): the caller answers 404 alike, so nothing about
        files outside the roots leaks."""
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise invalid_argument("uri must be a file:// URI")
        try:
            path = Path(url2pathname(unquote(parsed.path))).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        media_type = IMAGE_MEDIA_TYPES.get(path.suffix.lower())
        if media_type is None or not path.is_file():
            return None
        if not any(path.is_relative_to(root) for root in self.roots):
            return None
        return path, media_type
