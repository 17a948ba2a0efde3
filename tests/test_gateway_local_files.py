"""Which files the gateway's /v1/files may serve: only images under the configured roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.local_files import LocalImageFiles
from service_kit.status import ServiceError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "catalog" / "shoes").mkdir(parents=True)
    (tmp_path / "catalog" / "shoes" / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "catalog" / "notes.txt").write_text("text")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "b.png").write_bytes(b"png")
    # A link inside the root that points outside it must not open the outside file.
    (tmp_path / "catalog" / "escape.png").symlink_to(tmp_path / "private" / "b.png")
    return tmp_path


def test_serves_images_under_a_root_and_nothing_else(tree: Path):
    files = LocalImageFiles([tree / "catalog"])
    path, media_type = files.resolve((tree / "catalog" / "shoes" / "a.jpg").as_uri())
    assert path == (tree / "catalog" / "shoes" / "a.jpg").resolve() and media_type == "image/jpeg"
    assert files.resolve((tree / "catalog" / "notes.txt").as_uri()) is None
    assert files.resolve((tree / "private" / "b.png").as_uri()) is None
    assert files.resolve((tree / "catalog" / "escape.png").as_uri()) is None
    assert files.resolve((tree / "catalog" / ".." / "private" / "b.png").as_uri()) is None
    assert files.resolve((tree / "catalog" / "missing.jpg").as_uri()) is None
    assert files.resolve((tree / "catalog" / "shoes").as_uri()) is None


def test_no_roots_serves_nothing_and_only_file_uris_are_accepted(tree: Path):
    assert not LocalImageFiles([]).enabled
    files = LocalImageFiles([tree])
    for uri in ("https://example.com/a.jpg", "file://otherhost/etc/a.jpg", "relative/a.jpg"):
        with pytest.raises(ServiceError):
            files.resolve(uri)
