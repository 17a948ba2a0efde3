"""Catalog manifests for `vsearch index --manifest`: one image per row, as JSON Lines or CSV.

A row names its image by `path` (relative paths resolve against the manifest's folder) or by a
`file://` `uri`, may give an `id`, and every other column or key is metadata. `category` must be a
string and `price` a number, since the search service stores both in typed, filterable columns.
CSV cells are text (except `price`, parsed as a float); empty cells are dropped. A JSONL row's
`metadata` object is merged in; its top-level keys win over the object's.

Rows are parsed one at a time, so a catalog of any size streams; a bad row becomes a `ManifestRow`
with `error` set (and the line it starts on), never an exception."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

ManifestFormat = Literal["jsonl", "csv"]

PATH_KEY = "path"
URI_KEY = "uri"
ID_KEY = "id"
METADATA_KEY = "metadata"
# Mirrors the gateway's limit, so a too-long id is a row error here rather than a failed item there.
MAX_ID_CHARS = 256
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
SNIFF_BYTES = 64 * 1024


class ManifestError(Exception):
    """The manifest as a whole cannot be read (missing, not text, no usable header): a usage error."""


@dataclass
class ManifestRow:
    line: int
    image_path: Path | None = None
    item_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Set when the row is unusable; the run records it as a failure and goes on.
    error: str | None = None
    # What the row named (path or URI), for reporting a row whose image could not be resolved.
    source: str = ""


def detect_format(manifest: Path) -> tuple[ManifestFormat, str]:
    """(format, CSV delimiter): by extension, else by sniffing the first bytes."""
    suffix = manifest.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl", ""
    if suffix in CSV_SUFFIXES:
        return "csv", CSV_SUFFIXES[suffix]
    head = _read_head(manifest)
    if head.lstrip().startswith("{"):
        return "jsonl", ""
    try:
        # Only the header line: data cells (titles with commas) would mislead the sniffer.
        return "csv", csv.Sniffer().sniff(head.splitlines()[0] if head.strip() else ",", ",;\t|").delimiter
    except csv.Error:  # a single column has no delimiter to find
        return "csv", ","


def _read_head(manifest: Path) -> str:
    try:
        with manifest.open("rb") as stream:
            head = stream.read(SNIFF_BYTES)
    except OSError as error:
        raise ManifestError(f"cannot read manifest {manifest}: {error.strerror or error}") from None
    try:
        # Incremental, so a character cut in two at the end of the head is not an error.
        return codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {manifest} is not UTF-8 text: {error.reason} at byte {error.start}") from None


def count_rows(manifest: Path) -> int:
    """About how many rows the manifest holds (lines, less a CSV header), for a progress bar."""
    fmt, _ = detect_format(manifest)
    with manifest.open("rb") as stream:
        lines = sum(1 for line in stream if line.strip())
    return max(0, lines - (1 if fmt == "csv" else 0))


def read_manifest(manifest: Path) -> Iterator[ManifestRow]:
    """The manifest's rows in order. Raises ManifestError only for a manifest that cannot be read at all;
    the check happens on the first `next()`, so call `check_manifest` first for an early, clear error."""
    fmt, delimiter = detect_format(manifest)
    base_dir = manifest.resolve().parent
    try:
        stream = manifest.open("r", encoding="utf-8-sig", newline="")
    except OSError as error:
        raise ManifestError(f"cannot read manifest {manifest}: {error.strerror or error}") from None
    with stream:
        try:
            if fmt == "jsonl":
                yield from _jsonl_rows(stream, base_dir)
            else:
                yield from _csv_rows(stream, base_dir, delimiter, manifest)
        except UnicodeDecodeError as error:
            raise ManifestError(f"manifest {manifest} is not UTF-8 text: {error.reason}") from None


def check_manifest(manifest: Path) -> None:
    """Raises ManifestError when the manifest is missing, unreadable or has no usable CSV header."""
    if not manifest.is_file():
        raise ManifestError(f"no such manifest file: {manifest}")
    fmt, delimiter = detect_format(manifest)
    if fmt == "csv":
        header = next(csv.reader(io.StringIO(_read_head(manifest)), delimiter=delimiter), None)
        _check_csv_header(header, manifest)


def _check_csv_header(header: list[str] | None, manifest: Path) -> list[str]:
    if not header:
        raise ManifestError(f"manifest {manifest} is empty: it needs a header row with a `path` or `uri` column")
    columns = [name.strip() for name in header]
    if PATH_KEY not in columns and URI_KEY not in columns:
        raise ManifestError(
            f"manifest {manifest}: the header needs a `path` or `uri` column (found: {', '.join(columns)})"
        )
    duplicated = sorted({name for name in columns if name and columns.count(name) > 1})
    if duplicated:
        raise ManifestError(f"manifest {manifest}: column {duplicated[0]!r} appears more than once in the header")
    return columns


def _csv_rows(stream: io.TextIOBase, base_dir: Path, delimiter: str, manifest: Path) -> Iterator[ManifestRow]:
    reader = csv.reader(stream, delimiter=delimiter)
    columns = _check_csv_header(next(reader, None), manifest)
    next_line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a NUL byte or an unterminated quote at the end
            yield ManifestRow(line=next_line, error=f"line {next_line}: not valid CSV: {error}")
            next_line = reader.line_num + 1
            continue
        line, next_line = next_line, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(columns):
            yield ManifestRow(line=line, error=f"line {line}: {len(cells)} cells but the header has {len(columns)} columns")
            continue
        values: dict[str, Any] = {}
        for name, cell in zip(columns, cells):
            cell = cell.strip()
            if name and cell:
                values[name] = cell
        yield _row_from_values(values, line, base_dir)


def _jsonl_rows(stream: io.TextIOBase, base_dir: Path) -> Iterator[ManifestRow]:
    for line, text in enumerate(stream, 1):
        if not text.strip():
            continue
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            yield ManifestRow(line=line, error=f"line {line}: not valid JSON: {error.msg} at column {error.colno}")
            continue
        if not isinstance(values, dict):
            yield ManifestRow(line=line, error=f"line {line}: expected a JSON object, got {type(values).__name__}")
            continue
        nested = values.pop(METADATA_KEY, None)
        if nested is not None and not isinstance(nested, dict):
            yield ManifestRow(line=line, error=f"line {line}: `metadata` must be an object")
            continue
        merged = {**(nested or {}), **values}
        yield _row_from_values({key: value for key, value in merged.items() if value is not None}, line, base_dir)


def _row_from_values(values: dict[str, Any], line: int, base_dir: Path) -> ManifestRow:
    raw_path, raw_uri, raw_id = values.pop(PATH_KEY, None), values.pop(URI_KEY, None), values.pop(ID_KEY, None)
    row = ManifestRow(line=line, source=str(raw_path or raw_uri or ""))
    try:
        row.image_path = _image_path(raw_path, raw_uri, base_dir)
        row.item_id = _item_id(raw_id)
        row.metadata = _metadata(values)
    except ValueError as error:
        row.error = f"line {line}: {error}"
    return row


def _image_path(raw_path: Any, raw_uri: Any, base_dir: Path) -> Path:
    if raw_path is not None and raw_uri is not None:
        raise ValueError("give `path` or `uri`, not both")
    if raw_path is None and raw_uri is None:
        raise ValueError("no `path` or `uri`")
    if raw_uri is not None:
        if not isinstance(raw_uri, str):
            raise ValueError("`uri` must be a string")
        return file_uri_path(raw_uri)
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise ValueError("`path` must be a non-empty string")
    if raw_path.startswith("file:"):
        return file_uri_path(raw_path)
    path = Path(raw_path).expanduser()
    return path if path.is_absolute() else base_dir / path


def file_uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme.lower() != "file":
        raise ValueError(f"uri {uri!r} is not a file:// URI; only local files can be read")
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"uri {uri!r} names host {parsed.netloc!r}; only local files can be read")
    if not parsed.path:
        raise ValueError(f"uri {uri!r} has no path")
    return Path(url2pathname(unquote(parsed.path)))


def _item_id(raw_id: Any) -> str | None:
    if raw_id is None:
        return None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError("`id` must be a string")
    item_id = str(raw_id).strip()
    if not item_id:
        return None
    if len(item_id) > MAX_ID_CHARS:
        raise ValueError(f"`id` is {len(item_id)} characters; at most {MAX_ID_CHARS}")
    return item_id


def _metadata(values: dict[str, Any]) -> dict[str, Any]:
    metadata = dict(values)
    if "price" in metadata:
        metadata["price"] = _price(metadata["price"])
    if "category" in metadata and not isinstance(metadata["category"], str):
        raise ValueError(f"category {metadata['category']!r} must be a string")
    return metadata


def _price(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"price {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"price {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"price {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"price {value!r} must be finite")
    return float(value)
