"""`vsearch index` and `vsearch delete`: keep the catalog in step with image files through the gateway.

An item's id is the hex sha256 of its bytes unless a manifest gives one, and the gateway skips an id
that is already stored with the same content, metadata and image URI (`unchanged`). So indexing is
idempotent and resumable without any client state: after a crash or a kill, running the same command
again sends everything again and only what is missing or different gets embedded and written.

Pipeline: one producer thread lists the sources, reads and hashes files on a small thread pool (in
order, a bounded window ahead), drops in-run duplicates and packs chunks; `--concurrency` sender
tasks each stream one chunk at a time to AddImages. A bounded number of chunks exist at once, so
memory stays flat however large the catalog.

Every AddImages call has a deadline (`--timeout`). A chunk the gateway answers UNAVAILABLE (a broken
stream, a gateway restarting) is retried with backoff for at most `--retry-for` seconds, waiting for
the channel to connect in between; any other whole-call failure, or an outage that outlasts that
budget, stops the run: the chunks in flight finish, nothing new is sent, and every file that was not
indexed is counted (`not_indexed`) and listed in the errors file, so that the summary adds up to the
files found and the same command, run again, picks up where this one stopped."""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import itertools
import json
import os
import random
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
from tqdm import tqdm

from vsearch.client import NO_RETRIES, ON_COPY_POLICIES, AddItem, AddSummary, AsyncVisualSearchClient, VsearchError
from vsearch_cli.catalog.manifest import ManifestError, check_manifest, count_rows, read_manifest
from vsearch_cli.gateway_connection import (
    add_gateway_arguments, async_gateway_client, report_gateway_failure,
)
from vsearch_cli.image_files import is_image_file

# Images per AddImages stream: two of the gateway's embedder batches of 32, and a broken stream costs
# at most this much re-sending.
INDEX_CHUNK = 64
# A chunk of large images closes early, bounding what the retry buffer holds.
CHUNK_MAX_BYTES = 32 * 1024 * 1024
# The gateway refuses gRPC messages over 64 MiB by default, which would fail the whole stream; a file
# this large is failed here instead. (The gateway's own per-image limit, 20 MB by default, is lower.)
MAX_FILE_BYTES = 63 * 1024 * 1024
DEFAULT_CONCURRENCY = 2
DEFAULT_READ_THREADS = 4
DEFAULT_RETRIES = 5
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# The deadline of one AddImages call (one chunk). The gateway's own downstream deadlines (embed 10 s,
# write 30 s per batch) keep a healthy chunk far below it; it bounds a gateway that hangs.
DEFAULT_TIMEOUT_S = 120.0
# How long a chunk keeps retrying while the gateway is UNAVAILABLE (long enough for a restart).
DEFAULT_RETRY_FOR_S = 30.0
CONNECT_TIMEOUT_S = 20.0
DELETE_TIMEOUT_S = 60.0
DELETE_BATCH = 1000
# Failures listed on the terminal; the errors file always has all of them.
SHOWN_FAILURES = 20
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
DATA_DIR = Path(".vsearch")
# Item-level codes: the gateway reports these per item; the client uses the same names for its own.
READ_ERROR_CODES = {
    errno.ENOENT: "NOT_FOUND", errno.EACCES: "PERMISSION_DENIED", errno.EPERM: "PERMISSION_DENIED",
    errno.EISDIR: "INVALID_ARGUMENT",
}


class UsageError(Exception):
    """Bad command-line input: a one-line message and exit status 2."""


class GatewayError(Exception):
    """A whole call failed (not one item): the run stops with exit status 1."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message

    @property
    def reason(self) -> str:
        """Why an item was not indexed, for its line in the errors file."""
        if self.code == "UNAVAILABLE":
            return f"gateway unavailable: {self.details}"
        return f"gateway call failed: {self.code}: {self.details}"


# ---- sources --------------------------------------------------------------------------------

@dataclass
class Source:
    """One image to index, as listed (a file under a PATH argument, or a manifest row)."""

    path: Path
    item_id: str | None
    metadata: dict[str, Any]
    # Manifest rows only: the line it starts on, and why it is unusable when it is.
    line: int | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass
class LoadedImage:
    source: Source
    data: bytes = b""
    sha256: str = ""
    image_uri: str = ""
    failure: dict[str, Any] | None = None


@dataclass
class ChunkItem:
    source: Source
    item_id: str


@dataclass
class Chunk:
    items: list[ChunkItem] = field(default_factory=list)
    adds: list[AddItem] = field(default_factory=list)
    nbytes: int = 0


def iter_image_files(paths: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(image files, skipped non-image files), recursively, in a stable order."""
    images, skipped = [], []
    for raw in paths:
        path = Path(raw)
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            (images if is_image_file(candidate) else skipped).append(candidate)
    return images, skipped


def item_metadata(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "filename": path.name, "folder": path.parent.name}


def file_sources(files: Iterable[Path]) -> Iterator[Source]:
    for path in files:
        yield Source(path=path, item_id=None, metadata=item_metadata(path))


def manifest_sources(manifest: Path) -> Iterator[Source]:
    for row in read_manifest(manifest):
        path = row.image_path if row.image_path is not None else Path(row.source)
        error = f"{manifest.name} {row.error}" if row.error else None
        yield Source(path=path, item_id=row.item_id, metadata=row.metadata, line=row.line, error=error)


def failure_record(source: Source, item_id: str, code: str, message: str) -> dict[str, Any]:
    record: dict[str, Any] = {"path": source.label, "id": item_id, "code": code, "message": message}
    if source.line is not None:
        record["line"] = source.line
    return record


def load_image(source: Source) -> LoadedImage:
    """Reads and hashes one file (on a reader thread; sha256 releases the GIL on large buffers)."""
    where = f"line {source.line}: " if source.line is not None else ""
    try:
        size = source.path.stat().st_size
        if size > MAX_FILE_BYTES:
            return LoadedImage(source, failure=failure_record(
                source, source.item_id or "", "INVALID_ARGUMENT",
                f"{where}file is {size} bytes; at most {MAX_FILE_BYTES} can be sent"))
        data = source.path.read_bytes()
    except OSError as error:
        code = READ_ERROR_CODES.get(error.errno or 0, "UNKNOWN")
        return LoadedImage(source, failure=failure_record(
            source, source.item_id or "", code, f"{where}cannot read file: {error.strerror or error}"))
    if not data:
        return LoadedImage(source, failure=failure_record(source, source.item_id or "", "INVALID_ARGUMENT",
                                                          f"{where}file is empty"))
    return LoadedImage(source, data=data, sha256=hashlib.sha256(data).hexdigest(),
                       image_uri=source.path.resolve().as_uri())


def ordered_loads(sources: Iterable[Source], pool: ThreadPoolExecutor, window: int,
                  stop: threading.Event | Halt, unfinished: list[LoadedImage] | None = None) -> Iterator[LoadedImage]:
    """Loads sources on the pool, up to `window` ahead, yielding results in source order so that
    "first seen" (for duplicates) does not depend on thread timing. When `stop` is set, the sources
    taken but not yielded go to `unfinished` (loaded or not, in order); the rest stay in `sources`."""
    pending: deque[tuple[Source, Future[LoadedImage]]] = deque()
    for source in sources:
        if stop.is_set():
            pending.append((source, Future()))
            break
        if source.error is not None:
            failed: Future[LoadedImage] = Future()
            failed.set_result(LoadedImage(source, failure=failure_record(
                source, source.item_id or "", "INVALID_ARGUMENT", source.error)))
            pending.append((source, failed))
        else:
            pending.append((source, pool.submit(load_image, source)))
        while len(pending) > window:
            yield pending.popleft()[1].result()
    while pending and not stop.is_set():
        yield pending.popleft()[1].result()
    for source, future in pending:
        if future.cancel() or not future.done():
            loaded = LoadedImage(source)
        else:
            loaded = future.result()
        if unfinished is not None:
            unfinished.append(loaded)


# ---- the run's report -----------------------------------------------------------------------

class IndexReport:
    """Counts, failures and duplicates of one run; shared by the producer thread and the senders.
    Each failure is appended to the errors file as one JSON line in a single write(2), so a kill at
    any moment leaves whole lines only."""

    def __init__(self, errors_path: Path, progress: tqdm) -> None:
        self._lock = threading.Lock()
        self.errors_path = errors_path
        self._errors_fd: int | None = None
        self._errors_unwritable = False
        self.progress = progress
        self.found = 0  # image files plus manifest rows: what the other counts add up to
        self.indexed = 0
        self.unchanged = 0
        self.skipped = 0
        self.not_indexed = 0
        # --on-copy flag|skip: the new items found to be copies of others (skipped ones not written).
        self.copies: list[dict[str, Any]] = []
        self.skipped_copies = 0
        self.failures: list[dict[str, Any]] = []
        self.duplicate_items: list[dict[str, Any]] = []
        self.started = time.monotonic()
        # The file describes the latest run only; a stale one would report errors since fixed.
        try:
            errors_path.unlink(missing_ok=True)
        except OSError:
            pass

    def fail(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.failures.append(record)
            self._write_error(record)
            self.progress.update(1)

    def unsent(self, source: Source, item_id: str, error: GatewayError, sent: bool) -> None:
        """An item the run stopped before indexing: its chunk failed as a whole (`sent`), or it was
        never sent. Listed in the errors file; running the same command again indexes it."""
        what = "sent, but the gateway did not confirm it" if sent else "not sent"
        record = failure_record(source, item_id, error.code, f"{error.reason} ({what})")
        record["not_indexed"] = True
        with self._lock:
            self.not_indexed += 1
            self._write_error(record)
            self.progress.update(1)

    def duplicate(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.duplicate_items.append(record)
            self.progress.update(1)

    def chunk_done(self, chunk: Chunk, reply: AddSummary) -> None:
        with self._lock:
            self.indexed += reply.indexed
            self.unchanged += reply.unchanged
            self.skipped_copies += reply.skipped_copies
            for found in reply.copies:
                path = chunk.items[found.index].source.label if found.index < len(chunk.items) else ""
                self.copies.append({"path": path, "id": found.id, "copy_of": found.copy_of,
                                    "copy_score": round(found.copy_score, 4), "skipped": found.skipped})
            for failure in reply.failures:
                if failure.index >= len(chunk.items):  # not ours to map; still counted
                    record = {"path": "", "id": failure.id, "code": failure.code.name, "message": failure.message}
                else:
                    item = chunk.items[failure.index]
                    record = failure_record(item.source, failure.id or item.item_id, failure.code.name,
                                            failure.message)
                self.failures.append(record)
                self._write_error(record)
            self.progress.update(len(chunk.items))
            self.progress.set_postfix(indexed=self.indexed, unchanged=self.unchanged, failed=len(self.failures),
                                      refresh=False)

    def _write_error(self, record: dict[str, Any]) -> None:
        if self._errors_unwritable:
            return
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            if self._errors_fd is None:
                self._errors_fd = os.open(self.errors_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._errors_fd, line)
        except OSError as error:
            self._errors_unwritable = True
            print(f"vsearch index: cannot write errors file {self.errors_path}: {error.strerror or error}",
                  file=sys.stderr)

    def close(self) -> None:
        self.progress.close()
        if self._errors_fd is not None:
            os.close(self._errors_fd)
            self._errors_fd = None

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        listed = self.failures or self.not_indexed
        return {
            "found": self.found,
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "failures": self.failures,
            "skipped_copies": self.skipped_copies,
            "copies": self.copies,
            "duplicates": len(self.duplicate_items),
            "duplicate_items": self.duplicate_items,
            "not_indexed": self.not_indexed,
            "errors_file": str(self.errors_path) if listed and not self._errors_unwritable else None,
            "elapsed_s": round(elapsed, 3),
        }


# ---- producer (thread) ----------------------------------------------------------------------

@dataclass(frozen=True)
class IndexOptions:
    gateway: str
    api_key: str | None
    collection: str = ""
    concurrency: int = DEFAULT_CONCURRENCY
    read_threads: int = DEFAULT_READ_THREADS
    chunk_size: int = INDEX_CHUNK
    retries: int = DEFAULT_RETRIES
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_for_s: float = DEFAULT_RETRY_FOR_S
    category_from_folder: bool = False
    on_copy: str = "keep"  # a key of ON_COPY_POLICIES
    regions: bool = False


class Halt:
    """Stops the run: set on the event loop when a whole call fails (the first error is kept) or the
    run ends; read by the producer thread, which then reports what it has not delivered."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: GatewayError | None = None

    def fail(self, error: GatewayError) -> None:
        if self.error is None:
            self.error = error
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def produce_chunks(sources: Iterable[Source], options: IndexOptions, report: IndexReport,
                   deliver: Callable[[Chunk], bool], halt: Halt) -> None:
    """Runs on its own thread: loads, de-duplicates and packs the sources into chunks for `deliver`
    (which blocks while enough chunks wait, and says False once the run is halted). When a gateway
    failure halts the run, reports every item it has not delivered as not indexed."""
    sources = iter(sources)
    unfinished: list[LoadedImage] = []
    with ThreadPoolExecutor(options.read_threads, thread_name_prefix="vsearch-read") as pool:
        loads = ordered_loads(sources, pool, options.read_threads * 4, halt, unfinished)
        chunk = pack_chunks(loads, options, report, deliver, halt)
        # Once halted, the loads still yield what was read ahead, then leave the rest in `unfinished`.
        loaded_late = list(loads)
    if halt.error is None:
        return  # finished, or interrupted: nothing to account for
    for item in chunk.items:
        report.unsent(item.source, item.item_id, halt.error, sent=False)
    left = (LoadedImage(source) for source in sources)  # never read: no file I/O for these
    for loaded in itertools.chain(loaded_late, unfinished, left):
        source = loaded.source
        if loaded.failure is not None:
            report.fail(loaded.failure)
        elif source.error is not None:
            report.fail(failure_record(source, source.item_id or "", "INVALID_ARGUMENT", source.error))
        else:
            report.unsent(source, source.item_id or loaded.sha256, halt.error, sent=False)


def pack_chunks(loads: Iterable[LoadedImage], options: IndexOptions, report: IndexReport,
                deliver: Callable[[Chunk], bool], halt: Halt) -> Chunk:
    """Packs loaded images into chunks for `deliver`; returns the chunk it could not deliver (empty
    when every item was delivered or reported)."""
    first_path_by_id: dict[str, str] = {}
    chunk = Chunk()
    for loaded in loads:
        source = loaded.source
        if loaded.failure is not None:
            report.fail(loaded.failure)
            continue
        item_id = source.item_id or loaded.sha256
        if item_id in first_path_by_id:
            duplicate = {"path": source.label, "id": item_id, "duplicate_of": first_path_by_id[item_id]}
            if source.line is not None:
                duplicate["line"] = source.line
            report.duplicate(duplicate)
            continue
        first_path_by_id[item_id] = source.label
        metadata = dict(source.metadata)
        if options.category_from_folder:
            metadata.setdefault("category", source.path.parent.name)
        chunk.items.append(ChunkItem(source, item_id))
        chunk.adds.append(AddItem(image=loaded.data, id=item_id, metadata=metadata, image_uri=loaded.image_uri))
        chunk.nbytes += len(loaded.data)
        if len(chunk.items) >= options.chunk_size or chunk.nbytes >= CHUNK_MAX_BYTES:
            if not deliver(chunk):
                return chunk
            chunk = Chunk()
        if halt.is_set():
            return chunk
    if chunk.items and not halt.is_set() and deliver(chunk):
        return Chunk()
    return chunk


# ---- senders (asyncio) ----------------------------------------------------------------------

async def add_chunk(client: AsyncVisualSearchClient, chunk: Chunk, options: IndexOptions) -> AddSummary:
    """One AddImages stream for the chunk (the client's add), with the `--timeout` deadline, retried on
    UNAVAILABLE here rather than by the client, which never resends a stream that started: this chunk
    is in memory, and the gateway upserts by id, so resending items that a broken stream already wrote
    is harmless (they come back unchanged). Retries back off and wait for the channel to reconnect, for
    at most `--retries` retries and `--retry-for` seconds from the first failure; then GatewayError.

    Calls do not wait for the channel to be ready: a call made while the gateway is away fails at once
    (waiting for the whole deadline was a 300 s hang when a gateway died mid-run)."""
    started = time.monotonic()
    first_failure: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return await client.add(chunk.adds, collection=options.collection, on_copy=options.on_copy,
                                    regions=options.regions, timeout=options.timeout_s)
        except VsearchError as error:
            code, details = error.code, error.message
        now = time.monotonic()
        if first_failure is None:
            first_failure = now
        give_up_at = first_failure + options.retry_for_s
        if code == grpc.StatusCode.UNAVAILABLE and attempt <= options.retries and now < give_up_at:
            # Full jitter: concurrent senders that failed together do not come back together.
            backoff = random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)))
            await asyncio.sleep(min(backoff, give_up_at - now))
            if await client.wait_ready(give_up_at - time.monotonic()):
                continue
            details = f"{details}; not reachable for {options.retry_for_s:g} s"
        tries = f" (after {attempt} attempts in {time.monotonic() - started:.1f} s)" if attempt > 1 else ""
        raise GatewayError(f"gateway {options.gateway}: {code.name}: {details}{tries}", code.name, details)


async def index_sources(sources: Iterable[Source], options: IndexOptions, report: IndexReport) -> None:
    """Runs the producer and the senders; raises the GatewayError that halted the run, if one did,
    after every item has been reported (indexed, unchanged, failed, duplicate or not indexed)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
    # Chunks read ahead of the senders, plus those being sent: bounds memory to a few chunks.
    slots = threading.BoundedSemaphore(options.concurrency * 2)
    halt = Halt()

    def deliver(chunk: Chunk) -> bool:
        while not slots.acquire(timeout=0.2):
            if halt.is_set():
                return False
        if halt.is_set():
            slots.release()
            return False
        loop.call_soon_threadsafe(queue.put_nowait, chunk)
        return True

    def unsent(chunk: Chunk, error: GatewayError, sent: bool) -> None:
        for item in chunk.items:
            report.unsent(item.source, item.item_id, error, sent)

    async def produce() -> None:
        try:
            await asyncio.to_thread(produce_chunks, sources, options, report, deliver, halt)
        finally:
            queue.put_nowait(None)  # after every chunk the thread put (call_soon_threadsafe is FIFO)

    async def send_loop(client: AsyncVisualSearchClient) -> None:
        while True:
            chunk = await queue.get()
            if chunk is None:
                queue.put_nowait(None)  # for the other senders
                return
            try:
                if halt.error is not None:  # queued before the run halted: never sent
                    unsent(chunk, halt.error, sent=False)
                    continue
                try:
                    reply = await add_chunk(client, chunk, options)
                except GatewayError as error:
                    halt.fail(error)  # the chunks in flight finish; nothing new is sent
                    unsent(chunk, error, sent=True)
                    continue
            finally:
                slots.release()
            report.chunk_done(chunk, reply)

    async with async_gateway_client(options.gateway, options.api_key, retries=NO_RETRIES) as client:
        try:
            await wait_connected(client, options.gateway)
        except GatewayError as error:
            halt.fail(error)  # nothing is sent, and every item is reported as not indexed
        producer = asyncio.ensure_future(produce())
        senders = [asyncio.create_task(send_loop(client)) for _ in range(options.concurrency)]
        try:
            await asyncio.gather(producer, *senders)
        finally:
            halt.event.set()
            for sender in senders:
                sender.cancel()
            await asyncio.wait([producer, *senders])  # the producer notices `halt` within 0.2 s
    if halt.error is not None:
        raise halt.error


# ---- commands -------------------------------------------------------------------------------

def check_collection(name: str) -> str:
    if name and not COLLECTION_NAME.match(name):
        raise UsageError(f"collection name {name!r} is invalid: use a letter or '_', then letters, digits or '_'")
    return name


def default_errors_path(manifest: Path | None) -> Path:
    if manifest is not None:
        return manifest.parent / f"{manifest.stem}.errors.jsonl"
    return DATA_DIR / "index-errors.jsonl" if DATA_DIR.is_dir() else Path("vsearch-index-errors.jsonl")


def print_index_summary(summary: dict[str, Any]) -> None:
    not_indexed = f", not indexed {summary['not_indexed']}" if summary["not_indexed"] else ""
    line = (f"indexed {summary['indexed']}, unchanged {summary['unchanged']}, duplicates {summary['duplicates']}, "
            f"skipped {summary['skipped']}, failed {summary['failed']}{not_indexed} in {summary['elapsed_s']:.1f} s")
    if summary["indexed"] == 0 and summary["unchanged"] and not summary["failed"] and not summary["not_indexed"]:
        line += ": everything was already indexed"
    print(line)
    if summary["copies"]:
        flagged = len(summary["copies"]) - summary["skipped_copies"]
        print(f"copies: {summary['skipped_copies']} skipped, {flagged} flagged (metadata copy_of)")
        for found in summary["copies"][:SHOWN_FAILURES]:
            action = "skipped" if found["skipped"] else "flagged"
            print(f"  {action} {found['path'] or found['id']}: copy of {found['copy_of']} ({found['copy_score']:.2f})")
    for duplicate in summary["duplicate_items"][:SHOWN_FAILURES]:
        print(f"  duplicate {duplicate['path']}: same id as {duplicate['duplicate_of']}")
    for failure in summary["failures"][:SHOWN_FAILURES]:
        print(f"  failed {failure['path']}: {failure['code']}: {failure['message']}")
    hidden = max(0, len(summary["failures"]) - SHOWN_FAILURES) + max(0, summary["duplicates"] - SHOWN_FAILURES)
    if hidden:
        print(f"  ... and {hidden} more")
    if summary["errors_file"]:
        print(f"errors: {summary['errors_file']}")


def cmd_index(args: argparse.Namespace) -> int:
    try:
        collection = check_collection(args.collection)
        if not args.paths and args.manifest is None:
            raise UsageError("give image files or folders, or --manifest FILE")
        missing = [p for p in args.paths if not Path(p).exists()]
        if missing:
            raise UsageError(f"no such file or directory: {', '.join(missing)}")
        manifest = Path(args.manifest) if args.manifest is not None else None
        if manifest is not None:
            check_manifest(manifest)
        for name, value in (("--concurrency", args.concurrency), ("--read-threads", args.read_threads),
                            ("--chunk-size", args.chunk_size)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1")
        if args.retries < 0 or not args.timeout > 0 or not args.retry_for >= 0:
            raise UsageError("--retries and --retry-for must be at least 0 and --timeout positive")
    except (UsageError, ManifestError) as error:
        print(f"vsearch index: {error}", file=sys.stderr)
        return 2

    files, skipped = iter_image_files(args.paths)
    sources: Iterable[Source] = file_sources(files)
    total = len(files)
    if manifest is not None:
        sources = itertools.chain(manifest_sources(manifest), sources)
        total += count_rows(manifest)
    on_copy = args.on_copy
    # A copy check sees what is stored when it runs: one stream at a time, so that every chunk's check
    # sees the chunks before it (the gateway orders the batches within a stream the same way).
    concurrency = args.concurrency if on_copy == "keep" else 1
    options = IndexOptions(
        gateway=args.gateway, api_key=args.api_key, collection=collection, concurrency=concurrency, read_threads=args.read_threads,
        chunk_size=args.chunk_size, retries=args.retries, timeout_s=args.timeout, retry_for_s=args.retry_for,
        category_from_folder=args.category_from_folder, on_copy=on_copy, regions=args.regions,
    )
    show_progress = args.progress or (not args.json and sys.stderr.isatty())
    progress = tqdm(total=total, unit="img", disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    report = IndexReport(Path(args.errors) if args.errors else default_errors_path(manifest), progress)
    report.skipped = len(skipped)
    report.found = total
    status, problem = 0, None
    try:
        asyncio.run(index_sources(sources, options, report))
    except GatewayError as error:
        status, problem = 1, str(error)
    except ManifestError as error:
        status, problem = 2, str(error)
    except KeyboardInterrupt:
        status, problem = 130, "interrupted; run the same command again to resume"
    finally:
        report.close()
    summary = report.summary()
    if problem and summary["not_indexed"]:
        listed = f" (listed in {summary['errors_file']})" if summary["errors_file"] else ""
        problem += (f"\n{summary['not_indexed']} of {total} items were not indexed{listed}. Run the same command "
                    "again to resume: items already indexed are skipped as unchanged.")
    if args.json:
        print(json.dumps(summary))
    else:
        print_index_summary(summary)
    if problem:
        print(f"vsearch index: {problem}", file=sys.stderr)
    return status


def manifest_ids(manifest: Path, read_threads: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The ids indexing `manifest` would write (explicit, or the file's sha256), and the rows that
    name no usable image."""
    ids: list[str] = []
    failures: list[dict[str, Any]] = []
    to_hash: list[Source] = []
    for source in manifest_sources(manifest):
        if source.error is None and source.item_id:
            ids.append(source.item_id)  # no need to read the file
        else:
            to_hash.append(source)
    with ThreadPoolExecutor(read_threads) as pool:
        for loaded in ordered_loads(to_hash, pool, read_threads * 4, threading.Event()):
            if loaded.failure is not None:
                failures.append(loaded.failure)
            else:
                ids.append(loaded.sha256)
    return ids, failures


async def wait_connected(client: AsyncVisualSearchClient, gateway: str) -> None:
    """Turns "nothing listens there" into a prompt error rather than a long wait (AddImages retries
    with a bounded budget, see add_chunk)."""
    if not await client.wait_ready(CONNECT_TIMEOUT_S):
        details = f"not reachable after {CONNECT_TIMEOUT_S:.0f}s"
        raise GatewayError(f"gateway {gateway}: UNAVAILABLE: {details}", "UNAVAILABLE", details)


async def delete_ids(gateway: str, ids: list[str], collection: str, api_key: str | None = None) -> int:
    """Deletes `ids` in batches (the client retries a batch the gateway answers UNAVAILABLE)."""
    deleted = 0
    async with async_gateway_client(gateway, api_key) as client:
        for start in range(0, len(ids), DELETE_BATCH):
            reply = await client.delete(ids[start:start + DELETE_BATCH], collection=collection,
                                        timeout=DELETE_TIMEOUT_S)
            deleted += reply.deleted
    return deleted


def cmd_delete(args: argparse.Namespace) -> int:
    try:
        collection = check_collection(args.collection)
        if not args.ids and args.manifest is None:
            raise UsageError("give item ids, or --manifest FILE")
        if args.manifest is not None:
            check_manifest(Path(args.manifest))
    except (UsageError, ManifestError) as error:
        print(f"vsearch delete: {error}", file=sys.stderr)
        return 2
    ids, failures = list(args.ids), []
    if args.manifest is not None:
        try:
            found, failures = manifest_ids(Path(args.manifest), DEFAULT_READ_THREADS)
        except ManifestError as error:
            print(f"vsearch delete: {error}", file=sys.stderr)
            return 2
        ids.extend(found)
    unique_ids = list(dict.fromkeys(ids))
    try:
        deleted = asyncio.run(delete_ids(args.gateway, unique_ids, collection, args.api_key)) if unique_ids else 0
    except VsearchError as error:
        return report_gateway_failure("delete", args.gateway, error)
    summary = {"requested": len(unique_ids), "deleted": deleted, "failed": len(failures), "failures": failures}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"deleted {deleted} of {len(unique_ids)} ids ({len(unique_ids) - deleted} did not exist)"
              + (f"; {len(failures)} manifest rows failed" if failures else ""))
        for failure in failures[:SHOWN_FAILURES]:
            print(f"  failed {failure['path']}: {failure['code']}: {failure['message']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="add or update images (files, folders, or a manifest) through the gateway")
    index.add_argument("paths", nargs="*", help="image files and folders (searched recursively)")
    index.add_argument("--manifest", metavar="FILE",
                       help="JSONL or CSV: per row `path` (relative to the manifest) or `uri` (file://), "
                            "optional `id`, and metadata (category, price, title, ...)")
    index.add_argument("--collection", default="", help="catalog to write to (default: the default one)")
    add_gateway_arguments(index)
    index.add_argument("--json", action="store_true", help="print one JSON summary object")
    index.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    index.add_argument("--category-from-folder", action="store_true",
                       help="set each item's filterable `category` to its folder's name (unless given)")
    index.add_argument("--on-copy", choices=list(ON_COPY_POLICIES), default="keep",
                       help="what to do with a new image that is a verified copy (crop, mirror image, "
                            "recompression...) of one already indexed or sent before it in this run: keep it "
                            "(the default, no check), flag it (metadata copy_of: the id it copies) or skip it; "
                            "flag and skip send one stream at a time")
    index.add_argument("--regions", action="store_true",
                       help="index each image with its regions too (a grid of parts of it, 14 vectors per image "
                            "instead of 1), so that a crop showing a small part of it finds it; the collection "
                            "remembers it, so later runs make regions without the flag (docs/regions.md)")
    index.add_argument("--errors", metavar="FILE",
                       help="JSONL of this run's failures (default: beside the manifest, else .vsearch/ or here)")
    index.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                       help=f"AddImages streams in flight (default {DEFAULT_CONCURRENCY})")
    index.add_argument("--read-threads", type=int, default=DEFAULT_READ_THREADS,
                       help=f"threads reading and hashing files (default {DEFAULT_READ_THREADS})")
    index.add_argument("--chunk-size", type=int, default=INDEX_CHUNK,
                       help=f"images per AddImages stream (default {INDEX_CHUNK})")
    index.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                       help=f"retries of a chunk the gateway answers UNAVAILABLE (default {DEFAULT_RETRIES})")
    index.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"deadline of each AddImages call, one chunk (default {DEFAULT_TIMEOUT_S:g})")
    index.add_argument("--retry-for", type=float, default=DEFAULT_RETRY_FOR_S, metavar="SECONDS",
                       help="how long a chunk keeps retrying while the gateway is unavailable before the run "
                            f"stops and lists what was not indexed (default {DEFAULT_RETRY_FOR_S:g})")
    index.set_defaults(func=cmd_index)

    delete = sub.add_parser("delete", help="remove items by id (or the items a manifest would index)")
    delete.add_argument("ids", nargs="*")
    delete.add_argument("--manifest", metavar="FILE", help="delete the ids that indexing this manifest would write")
    delete.add_argument("--collection", default="")
    add_gateway_arguments(delete)
    delete.add_argument("--json", action="store_true")
    delete.set_defaults(func=cmd_delete)
