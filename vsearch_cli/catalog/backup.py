"""`vsearch backup FAISS_DIR DEST`: a consistent copy of the FAISS backend's collections, taken while
search_svc runs and writes.

Each collection is one SQLite file in WAL mode (`*.sqlite3` in SEARCH_FAISS__DATA_DIR): copying the file
alone would miss the writes still in its `-wal` file, and copying both while a write lands can give a
torn file. SQLite's online backup copies the database as of one read transaction, which the writer does
not wait for. The index snapshots beside the files are not copied: search_svc builds the index from the
files when it starts on them. (Milvus keeps its data itself: back it up with Milvus's own tools.)"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# How long the backup's connection waits for a write holding the file (search_svc's writes are short).
BUSY_TIMEOUT_S = 30.0


class BackupError(Exception):
    """A reason to stop, in one line."""


@dataclass(frozen=True)
class CopiedFile:
    name: str
    bytes: int


def collection_files(faiss_dir: Path) -> list[Path]:
    if not faiss_dir.is_dir():
        raise BackupError(f"{faiss_dir}: not a directory (give search_svc's SEARCH_FAISS__DATA_DIR)")
    files = sorted(faiss_dir.glob("*.sqlite3"))
    if not files:
        raise BackupError(f"{faiss_dir}: no collection files (*.sqlite3) in it")
    return files


def back_up_file(source: Path, target: Path) -> CopiedFile:
    """`source` copied to `target` as of one moment, through SQLite's online backup, then checked."""
    # Not read-only: a read-only connection to a WAL file that no one has open leaves its -wal and -shm
    # files behind, which the last read-write connection to close removes. Nothing here writes to it.
    with contextlib.closing(sqlite3.connect(source, timeout=BUSY_TIMEOUT_S)) as live, \
            contextlib.closing(sqlite3.connect(target)) as copy:
        live.backup(copy)  # all pages in one step: one read transaction, so one consistent state
        copy.execute("PRAGMA journal_mode=WAL")  # as search_svc opens it
        verdict = copy.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise BackupError(f"the copy of {source.name} fails SQLite's check: {verdict}")
    return CopiedFile(source.name, target.stat().st_size)


def back_up(faiss_dir: Path, destination: Path) -> list[CopiedFile]:
    files = collection_files(faiss_dir)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupError(f"{destination}: exists and is not an empty directory; give a new one")
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in files:
        try:
            copied.append(back_up_file(source, destination / source.name))
        except sqlite3.Error as error:
            raise BackupError(f"{source}: {error} (nothing more copied; {len(copied)} file(s) in {destination})") from None
    return copied


def cmd_backup(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        copied = back_up(Path(args.faiss_dir), Path(args.destination))
    except (BackupError, OSError) as error:
        print(f"vsearch backup: {error}", file=sys.stderr)
        return 2 if isinstance(error, BackupError) else 1
    seconds = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps({"destination": args.destination, "seconds": seconds,
                          "files": [{"name": item.name, "bytes": item.bytes} for item in copied]}))
    else:
        for item in copied:
            print(f"{item.name}: {item.bytes:,} bytes")
        print(f"{len(copied)} collection file(s) copied to {args.destination} in {seconds:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    backup = sub.add_parser(
        "backup", help="copy the FAISS backend's collection files, consistently, while search_svc runs",
        description="Copies every collection file (*.sqlite3) of search_svc's FAISS data directory into DEST "
                    "(a new or empty directory) through SQLite's online backup: each copy is the collection "
                    "as of one moment, even while writes land. To restore: stop search_svc, put the files "
                    "into an empty data directory, start it, and flush the gateway's result cache "
                    "(docs/operations.md).")
    backup.add_argument("faiss_dir", metavar="FAISS_DIR",
                        help="search_svc's SEARCH_FAISS__DATA_DIR (vsearch up: DATA_DIR/faiss)")
    backup.add_argument("destination", metavar="DEST", help="a new or empty directory for the copies")
    backup.add_argument("--json", action="store_true", help="print one JSON object")
    backup.set_defaults(func=cmd_backup)
