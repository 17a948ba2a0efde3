"""Manifest parsing for `vsearch index --manifest`: formats, path resolution, metadata typing, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsearch_cli import main as cli
from vsearch_cli.catalog.manifest import ManifestError, check_manifest, count_rows, detect_format, read_manifest


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_csv_rows_resolve_paths_type_price_and_drop_empty_cells(tmp_path):
    image = tmp_path / "abs.jpg"
    (tmp_path / "sub").mkdir()
    manifest = write(tmp_path / "sub" / "catalog.csv", (
        "path,uri,id,category,price,title,brand\n"
        "images/a.jpg,,,shoes,49.5,\"Red shoe, size 9\",acme\n"
        f",{image.as_uri()},sku-2,bags, 12 ,Tote,\n"
    ), encoding="utf-8-sig")  # a BOM, as spreadsheet programs write it
    first, second = read_manifest(manifest)
    assert first.error is None and second.error is None
    assert first.line == 2 and first.image_path == tmp_path / "sub" / "images" / "a.jpg"
    assert first.item_id is None
    assert first.metadata == {"category": "shoes", "price": 49.5, "title": "Red shoe, size 9", "brand": "acme"}
    assert second.image_path == image and second.item_id == "sku-2"
    assert second.metadata == {"category": "bags", "price": 12.0, "title": "Tote"}
    assert count_rows(manifest) == 2


def test_csv_bad_rows_are_errors_with_line_numbers(tmp_path):
    manifest = write(tmp_path / "catalog.csv", (
        "path,price\n"
        "a.jpg,cheap\n"
        "\n"
        "b.jpg,1,extra\n"
        ",3\n"
        "c.jpg,nan\n"
        "d.jpg,2\n"
    ))
    rows = list(read_manifest(manifest))
    assert [(row.line, row.error) for row in rows] == [
        (2, "line 2: price 'cheap' is not a number"),
        (4, "line 4: 3 cells but the header has 2 columns"),
        (5, "line 5: no `path` or `uri`"),
        (6, "line 6: price nan must be finite"),
        (7, None),
    ]


def test_a_quoted_cell_spanning_lines_keeps_the_row_start_line(tmp_path):
    manifest = write(tmp_path / "catalog.csv", 'path,title\na.jpg,"two\nlines"\nb.jpg,x\n')
    rows = list(read_manifest(manifest))
    assert [(row.line, row.metadata["title"]) for row in rows] == [(2, "two\nlines"), (4, "x")]


def test_jsonl_merges_metadata_and_reports_bad_lines(tmp_path):
    manifest = write(tmp_path / "catalog.jsonl", "\n".join([
        json.dumps({"path": "a.jpg", "id": "x1", "price": 3, "metadata": {"title": "A", "price": 1, "tags": ["t"]}}),
        "",
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"uri": "https://example.com/a.jpg"}),
        json.dumps({"path": "b.jpg", "category": 7}),
        json.dumps({"path": "c.jpg", "metadata": "oops"}),
        json.dumps({"path": "d.jpg", "price": "2.5", "title": None}),
        json.dumps({"path": "e.jpg", "uri": "file:///e.jpg"}),
    ]) + "\n")
    rows = list(read_manifest(manifest))
    first = rows[0]
    assert first.error is None and first.item_id == "x1" and first.image_path == tmp_path / "a.jpg"
    assert first.metadata == {"title": "A", "price": 3.0, "tags": ["t"]}  # top-level keys win
    errors = {row.line: row.error for row in rows[1:]}
    assert errors[3].startswith("line 3: not valid JSON")
    assert errors[4] == "line 4: expected a JSON object, got list"
    assert "not a file:// URI" in errors[5]
    assert errors[6] == "line 6: category 7 must be a string"
    assert errors[7] == "line 7: `metadata` must be an object"
    assert errors[8] is None and rows[-2].metadata == {"price": 2.5}  # null values dropped
    assert errors[9] == "line 9: give `path` or `uri`, not both"


def test_format_comes_from_the_extension_else_from_the_content(tmp_path):
    assert detect_format(write(tmp_path / "a.tsv", "path\ttitle\n")) == ("csv", "\t")
    assert detect_format(write(tmp_path / "a.ndjson", "")) == ("jsonl", "")
    assert detect_format(write(tmp_path / "rows.txt", '{"path": "a.jpg"}\n')) == ("jsonl", "")
    assert detect_format(write(tmp_path / "semi.txt", "path;title\na.jpg;x, y\n")) == ("csv", ";")
    assert detect_format(write(tmp_path / "one.txt", "path\na.jpg\n")) == ("csv", ",")
    rows = list(read_manifest(tmp_path / "semi.txt"))
    assert rows[0].metadata == {"title": "x, y"}


def test_unusable_manifests_are_usage_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        check_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match=r"needs a `path` or `uri` column \(found: file, title\)"):
        check_manifest(write(tmp_path / "cols.csv", "file,title\na.jpg,x\n"))
    with pytest.raises(ManifestError, match="is empty"):
        check_manifest(write(tmp_path / "empty.csv", ""))


@pytest.mark.parametrize("argv, message", [
    (["index"], "give image files or folders, or --manifest FILE"),
    (["index", "--manifest", "/nonexistent/catalog.csv"], "no such manifest file"),
    (["index", "/nonexistent/images"], "no such file or directory"),
    (["index", ".", "--collection", "9lives"], "collection name '9lives' is invalid"),
    (["index", ".", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["index", ".", "--retry-for", "-1"], "--retries and --retry-for must be at least 0 and --timeout positive"),
    (["index", ".", "--timeout", "0"], "--retries and --retry-for must be at least 0 and --timeout positive"),
    (["delete"], "give item ids, or --manifest FILE"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_manifest_that_is_not_utf8_is_refused_up_front(tmp_path):
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("path,title\na.jpg,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="is not UTF-8 text"):
        check_manifest(manifest)
