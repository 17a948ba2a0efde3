"""Children of `vsearch up` killed with SIGKILL while a bounded search loop runs: the supervisor starts
each again (a new pid, the same port and settings), searches fail only as promised (never while Redis is
away; UNAVAILABLE within the deadline while a service is), nothing acknowledged is lost, and a child that
keeps dying, or does not come back, stops the whole stack with its name and its log.

The helpers here (the search loop, the writer, finding a child's pid) are this file's own."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import redis

from conftest import VsearchUp, children_of, process_gone, vsearch_up, wait_for
from vsearch.v1 import embedder_pb2, gateway_pb2, gateway_pb2_grpc

# Every search in the loop has this deadline; a failure must come back within it.
SEARCH_DEADLINE_S = 2.0
# Scheduling on a busy two-core machine: how far past the deadline an answer may still arrive.
DEADLINE_SLACK_S = 0.5
# A killed service must be answering searches again this soon after the kill.
RECOVERY_LIMIT_S = 10.0
# The loop's pace: a steady load, not a flood that starves the restarting child of CPU.
SEARCH_PAUSE_S = 0.05
CATALOG_SIZE = 8
# Query crops never repeat within the session, so every "new" query misses every cache.
NEW_QUERY_NUMBERS = itertools.count()


# ---- waiting ------------------------------------------------------------------------------------


# ---- the stack's processes and output -----------------------------------------------------------


def kill_child(up: VsearchUp, name: str) -> tuple[int, float]:
    """SIGKILL to child `name`; its pid and when it was killed (time.monotonic)."""
    pid = up.child_pid(name)
    assert pid is not None, f"no {name} child of vsearch up"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return pid, killed_at


def wait_for_restart(up: VsearchUp, name: str, old_pid: int) -> int:
    """The pid of the child the supervisor started in place of `old_pid`."""
    return wait_for(lambda: (pid := up.child_pid(name)) not in (None, old_pid) and pid,
                      RECOVERY_LIMIT_S, f"{name} restarted by vsearch up")


class StackOutput:
    """Reads what `vsearch up` writes after its banner (stderr and stdout together), so it never
    blocks on a full pipe and the tests can wait for a line."""

    def __init__(self, process) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        return wait_for(lambda: re.search(pattern, self.text), timeout,
                          f"a line matching {pattern!r} from vsearch up; it said:\n{self.text}")

    def finish(self, timeout: float = 10.0) -> str:
        """Everything it wrote, once it has closed its output (exited)."""
        self._thread.join(timeout)
        return self.text


# ---- load: searches and acknowledged writes, each in a thread ----------------------------------


@dataclass(frozen=True)
class SearchOutcome:
    started: float
    finished: float
    code: grpc.StatusCode
    new_query: bool
    from_cache: bool = False
    embedding_from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


@dataclass
class SearchLoop:
    """gRPC searches through the gateway, one after another with `SEARCH_DEADLINE_S` each, until
    stopped: every other one repeats one of four catalog images (cache hits), the others are crops
    never asked before (misses all the way down). Every outcome is recorded."""

    gateway: str
    images: list[bytes]
    outcomes: list[SearchOutcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SearchLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(SEARCH_DEADLINE_S + 5)

    def _request(self, number: int) -> tuple[gateway_pb2.VisualSearchRequest, bool]:
        if number % 2 == 0:
            return gateway_pb2.VisualSearchRequest(image=self.images[number // 2 % 4], k=4), False
        new = next(NEW_QUERY_NUMBERS)  # ukbench images are 640x480: every crop fits
        crop = embedder_pb2.CropBox(x=new % 300, y=new // 300 % 200, width=320, height=240)
        return gateway_pb2.VisualSearchRequest(image=self.images[new % len(self.images)], k=4, crop=crop), True

    def _run(self) -> None:
        # Reconnect quickly when the gateway itself comes back (gRPC's default waits up to minutes).
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        with grpc.insecure_channel(self.gateway, options=options) as channel:
            stub = gateway_pb2_grpc.VisualSearchStub(channel)
            for number in itertools.count():
                if self._stop.is_set():
                    return
                request, new_query = self._request(number)
                started = time.monotonic()
                try:
                    reply = stub.Search(request, timeout=SEARCH_DEADLINE_S)
                    outcome = SearchOutcome(started, time.monotonic(), grpc.StatusCode.OK, new_query,
                                            reply.from_cache, reply.embedding_from_cache)
                except grpc.RpcError as error:
                    outcome = SearchOutcome(started, time.monotonic(), error.code(), new_query)
                with self._lock:
                    self.outcomes.append(outcome)
                self._stop.wait(SEARCH_PAUSE_S)

    def recorded(self) -> list[SearchOutcome]:
        with self._lock:
            return list(self.outcomes)

    def first(self, matching: Callable[[SearchOutcome], bool]) -> SearchOutcome | None:
        return next((outcome for outcome in self.recorded() if matching(outcome)), None)

    def wait_for(
        self, matching: Callable[[SearchOutcome], bool], count: int, timeout: float, what: str
    ) -> SearchOutcome:
        """The `count`-th recorded outcome `matching`, once there is one."""
        def found() -> SearchOutcome | None:
            hits = [outcome for outcome in self.recorded() if matching(outcome)]
            return hits[count - 1] if len(hits) >= count else None

        return wait_for(found, timeout, f"{what}; outcomes: {self.summary()}")

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.recorded():
            counts[outcome.code.name] = counts.get(outcome.code.name, 0) + 1
        return counts


@dataclass
class AckedWriter:
    """Adds one image at a time (ids acked-0, acked-1, ...) to `collection` until stopped or out of
    distinct images, recording the ids whose AddImages answered "indexed"."""

    gateway: str
    images: list[bytes]
    collection: str
    acked: list[str] = field(default_factory=list)
    attempted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AckedWriter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        with grpc.insecure_channel(self.gateway) as channel:
            stub = gateway_pb2_grpc.VisualSearchStub(channel)
            for number, image in enumerate(self.images):
                if self._stop.is_set():
                    return
                item_id = f"acked-{number}"
                self.attempted.append(item_id)
                request = gateway_pb2.AddImageRequest(id=item_id, image=image, collection=self.collection)
                try:
                    summary = stub.AddImages(iter([request]), timeout=10)
                    if summary.indexed == 1:
                        self.acked.append(item_id)
                except grpc.RpcError:
                    pass  # not acknowledged: it may or may not be stored
                self._stop.wait(SEARCH_PAUSE_S * 4)

    def wait_for_acks(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: len(self.acked) >= count, timeout, f"{count} acknowledged writes")


# ---- the stack the kills share ------------------------------------------------------------------


@dataclass
class SupervisedStack:
    up: VsearchUp
    output: StackOutput
    images: list[bytes]

    @property
    def redis_port(self) -> int:
        found = re.search(r"redis://127\.0\.0\.1:(\d+)/0", self.up.banner)
        assert found is not None, self.up.banner
        return int(found.group(1))


def add_images(gateway: str, items: dict[str, bytes], collection: str = "") -> None:
    with grpc.insecure_channel(gateway) as channel:
        summary = gateway_pb2_grpc.VisualSearchStub(channel).AddImages(
            iter([gateway_pb2.AddImageRequest(id=item_id, image=image, collection=collection)
                  for item_id, image in items.items()]), timeout=60)
    assert summary.indexed == len(items), summary


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ukbench_bytes) -> Iterator[SupervisedStack]:
    with vsearch_up(tmp_path_factory.mktemp("death"), "--redis-maxmemory", "64mb") as up:
        output = StackOutput(up.process)
        add_images(up.gateway, {f"catalog-{index}": ukbench_bytes[index] for index in range(CATALOG_SIZE)})
        yield SupervisedStack(up, output, ukbench_bytes[:CATALOG_SIZE])


def recovery_report(name: str, seconds: float, loop: SearchLoop) -> None:
    # Read by whoever writes the operations docs: run with -s to see it.
    print(f"\nrecovery after kill -9 of {name}: {seconds:.2f}s to the first successful search "
          f"(outcomes of the loop: {loop.summary()})")


def assert_failures_are_unavailable_within_the_deadline(loop: SearchLoop) -> None:
    outcomes = loop.recorded()
    failures = [outcome for outcome in outcomes if not outcome.ok]
    assert {outcome.code for outcome in failures} <= {grpc.StatusCode.UNAVAILABLE}, loop.summary()
    slowest = max(outcome.finished - outcome.started for outcome in outcomes)
    assert slowest <= SEARCH_DEADLINE_S + DEADLINE_SLACK_S, f"a search took {slowest:.2f}s"


# ---- the kills ----------------------------------------------------------------------------------


def test_redis_killed_no_search_fails_and_it_comes_back_capped(stack: SupervisedStack) -> None:
    client = redis.Redis(port=stack.redis_port, socket_timeout=1)
    with SearchLoop(stack.up.gateway, stack.images) as loop:
        loop.wait_for(lambda outcome: outcome.ok and outcome.from_cache, 2, 30, "searches answered from the cache")
        old_pid, killed_at = kill_child(stack.up, "redis")
        new_pid = wait_for_restart(stack.up, "redis", old_pid)

        def answers() -> bool:
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_for(answers, RECOVERY_LIMIT_S, "the restarted Redis answering PING")
        back_at = time.monotonic()
        # The cache is in use again: a repeated query stored in the new Redis is read back from it.
        cached = loop.wait_for(lambda outcome: outcome.started > back_at and outcome.from_cache, 1, 30,
                               "a search answered from the restarted Redis")
        # Several new queries too, after the restart.
        loop.wait_for(lambda outcome: outcome.started > back_at and outcome.new_query and outcome.ok, 5, 30,
                      "new queries after the restart")
    outcomes = loop.recorded()
    assert [outcome for outcome in outcomes if not outcome.ok] == [], loop.summary()
    assert any(killed_at <= outcome.started <= back_at for outcome in outcomes), "no search while Redis was away"
    assert stack.output.wait_for(
        rf"died: redis \(pid {old_pid}\) was killed by SIGKILL after [\d.]+s; restarting it in 0\.5s")
    assert stack.output.wait_for(rf"restarted: redis \(pid {new_pid}\)")
    # The same settings as the first one: the memory cap and its eviction policy.
    assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    print(f"\nrecovery after kill -9 of redis: {back_at - killed_at:.2f}s to PING, "
          f"{cached.finished - killed_at:.2f}s to the first answer from the cache again "
          f"(outcomes of the loop: {loop.summary()})")


def test_embedder_killed_searches_fail_unavailable_until_it_is_restarted(stack: SupervisedStack) -> None:
    with SearchLoop(stack.up.gateway, stack.images) as loop:
        loop.wait_for(lambda outcome: outcome.ok and outcome.new_query, 2, 30, "new queries answered")
        old_pid, killed_at = kill_child(stack.up, "embedder")
        new_pid = wait_for_restart(stack.up, "embedder", old_pid)
        # Embedded by the restarted embedder: a query no cache has.
        recovered = loop.wait_for(
            lambda outcome: outcome.started > killed_at and outcome.ok and outcome.new_query,
            1, RECOVERY_LIMIT_S + SEARCH_DEADLINE_S, "a new query answered after the kill")
        loop.wait_for(lambda outcome: outcome.started > recovered.finished and outcome.ok and outcome.new_query,
                      3, 30, "more new queries answered")
    assert_failures_are_unavailable_within_the_deadline(loop)
    assert loop.first(lambda outcome: outcome.started > killed_at and not outcome.ok), "the kill failed no search"
    assert recovered.finished - killed_at <= RECOVERY_LIMIT_S
    assert stack.output.wait_for(rf"died: embedder \(pid {old_pid}\) was killed by SIGKILL after [\d.]+s; restarting")
    assert stack.output.wait_for(rf"ready again: embedder \(pid {new_pid}\)")
    recovery_report("embedder", recovered.finished - killed_at, loop)


def test_search_svc_killed_loses_nothing_acknowledged(stack: SupervisedStack, ukbench_bytes: list[bytes]) -> None:
    collection = "acked"
    with SearchLoop(stack.up.gateway, stack.images) as loop, \
            AckedWriter(stack.up.gateway, ukbench_bytes, collection) as writer:
        writer.wait_for_acks(3)
        loop.wait_for(lambda outcome: outcome.ok and outcome.new_query, 2, 30, "new queries answered")
        acked_before_kill = len(writer.acked)
        old_pid, killed_at = kill_child(stack.up, "search")
        new_pid = wait_for_restart(stack.up, "search", old_pid)
        # Searched by the restarted search_svc: not a cached result.
        recovered = loop.wait_for(
            lambda outcome: outcome.started > killed_at and outcome.ok and not outcome.from_cache,
            1, RECOVERY_LIMIT_S + SEARCH_DEADLINE_S, "a search answered after the kill")
        loop.wait_for(lambda outcome: outcome.started > recovered.finished and outcome.ok and outcome.new_query,
                      3, 30, "more new queries answered")
        writer.wait_for_acks(acked_before_kill + 3)
    assert_failures_are_unavailable_within_the_deadline(loop)
    assert loop.first(lambda outcome: outcome.started > killed_at and not outcome.ok), "the kill failed no search"
    assert recovered.finished - killed_at <= RECOVERY_LIMIT_S
    assert stack.output.wait_for(rf"died: search \(pid {old_pid}\) was killed by SIGKILL after [\d.]+s; restarting")
    assert stack.output.wait_for(rf"ready again: search \(pid {new_pid}\)")

    with grpc.insecure_channel(stack.up.gateway) as channel:
        stub = gateway_pb2_grpc.VisualSearchStub(channel)
        count = stub.Stats(gateway_pb2.VisualStatsRequest(collection=collection), timeout=10).count
        # Every acknowledged item is there (a write that failed may be there too: its answer was lost).
        assert len(writer.acked) <= count <= len(writer.attempted)
        for item_id in writer.acked:
            reply = stub.Search(gateway_pb2.VisualSearchRequest(item_id=item_id, k=1, collection=collection),
                                timeout=10)
            assert [hit.id for hit in reply.hits] == [item_id]
    recovery_report("search_svc", recovered.finished - killed_at, loop)


def test_gateway_killed_comes_back_on_the_same_ports(stack: SupervisedStack) -> None:
    with SearchLoop(stack.up.gateway, stack.images) as loop:
        loop.wait_for(lambda outcome: outcome.ok, 2, 30, "searches answered")
        old_pid, killed_at = kill_child(stack.up, "gateway")
        wait_for_restart(stack.up, "gateway", old_pid)
        recovered = loop.wait_for(lambda outcome: outcome.started > killed_at and outcome.ok, 1,
                                  RECOVERY_LIMIT_S + SEARCH_DEADLINE_S, "a search answered after the kill")
    assert_failures_are_unavailable_within_the_deadline(loop)
    assert recovered.finished - killed_at <= RECOVERY_LIMIT_S
    with socket.create_connection(("127.0.0.1", stack.up.http_port), timeout=5):
        pass  # the HTTP port is back too
    recovery_report("gateway", recovered.finished - killed_at, loop)


def test_restarted_children_still_die_with_vsearch_up(stack: SupervisedStack) -> None:
    # Last in the module: it ends the shared stack. By now the supervisor has restarted every child
    # (from its main thread): they must still follow `vsearch up` when it is SIGKILLed.
    children = list(children_of(stack.up.process.pid))
    assert len(children) == 4
    stack.up.process.kill()
    stack.up.process.wait(10)
    for pid in children:
        wait_for(lambda pid=pid: process_gone(pid), 15, f"child {pid} to die with vsearch up")


# ---- children that do not come back -------------------------------------------------------------


def test_a_child_that_keeps_dying_stops_the_stack(tmp_path: Path) -> None:
    with vsearch_up(tmp_path / "data", "--no-redis") as up:
        output = StackOutput(up.process)
        children = list(children_of(up.process.pid))
        search_port = int(up.search.rsplit(":", 1)[1])
        kill_child(up, "search")
        # Another process takes search_svc's port before the supervisor restarts it: every restart
        # then fails to bind and exits at once.
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

            def took_the_port() -> bool:
                try:  # free once the gateway has closed its end of the dead server's connections
                    squatter.bind(("127.0.0.1", search_port))
                except OSError:
                    return False
                return True

            # Before the restart can bind: the supervisor waits 0.5 s, the new interpreter ~0.8 s more
            # here. A restart that binds first keeps the port, so this fails rather than passes wrongly.
            wait_for(took_the_port, 1.5, "search_svc's port free after the kill")
            squatter.listen()
            up.process.wait(90)
        said = output.finish()
    assert up.process.returncode == 1, said
    # Four restarts, each after twice the wait of the one before, then the fifth death ends it all.
    assert re.findall(r"died: search \(pid \d+\) (?:was killed|exited)[^;]*; restarting it in ([\d.]+)s", said) == \
        ["0.5", "1.0", "2.0", "4.0"], said
    assert re.search(r"giving up: search \(pid \d+\) exited with code 1, 5 deaths within 60s; "
                     rf"the last lines of {re.escape(str(tmp_path / 'data' / 'logs' / 'search.log'))}:\n", said), said
    assert f"Failed to bind to address 127.0.0.1:{search_port}" in said, said  # from the end of its log
    assert "vsearch up: stopping everything" in said and said.endswith("vsearch up: stopped"), said
    for pid in children:
        assert process_gone(pid), f"child {pid} outlived vsearch up"


def test_a_child_that_does_not_come_back_stops_the_stack(tmp_path: Path) -> None:
    with vsearch_up(tmp_path / "data", "--no-redis", "--timeout", "15") as up:
        output = StackOutput(up.process)
        # The model goes away: a restarted embedder runs, but never loads it, so it is never SERVING.
        model_dir = next((tmp_path / "data" / "models").iterdir())
        model_dir.rename(model_dir.with_name("moved-away"))
        kill_child(up, "embedder")
        up.process.wait(90)
        said = output.finish()
    assert up.process.returncode == 1, said
    assert re.search(r"giving up: embedder \(pid \d+\) was restarted but is not ready after 15s; "
                     r"the last lines of \S+embedder\.log:\n", said), said
    assert "not ready" in said.split("giving up:", 1)[1]  # its log says why: the model cannot load
