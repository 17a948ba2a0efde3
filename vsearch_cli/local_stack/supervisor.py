"""Keeps `vsearch up`'s stack running: a child that dies is started again after a backoff, on the same
port with the same settings, and every death is reported on stderr. Every child is watched: Redis, the
Milvus server and each replica (`--replicas`) included. A child that keeps dying, or does not become
ready again after a restart, ends the whole stack, with the reason.

Only process exits are supervised: a child that is alive but answers NOT_SERVING (the gateway while a
downstream is away, the embedder while Triton is) is left alone; its health is for its callers."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from vsearch_cli.local_stack.child_processes import how_it_ended
from vsearch_cli.local_stack.launcher import LocalStack

Clock = Callable[[], float]
# How often the supervisor looks at its children.
TICK_S = 0.1


@dataclass(frozen=True)
class RestartPolicy:
    # The wait before the first restart, doubled after every death up to the maximum.
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    # A child that ran this long before it died is restarted after the initial backoff again.
    stable_after_s: float = 30.0
    # A child's `max_deaths`-th death within `death_window_s` ends the stack rather than restarting it.
    max_deaths: int = 5
    death_window_s: float = 60.0
    # A restarted child must be ready again within this long (`vsearch up --timeout`), else the stack ends.
    ready_timeout_s: float = 180.0


class RestartHistory:
    """One child's deaths: how long to wait before starting it again, or that it died too often."""

    def __init__(self, policy: RestartPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.deaths: deque[float] = deque()
        self._next_backoff_s = policy.initial_backoff_s

    def record_death(self, uptime_s: float) -> float | None:
        """Records a death after `uptime_s` of running; returns the seconds to wait before the restart,
        or None when this is the `max_deaths`-th death within the window (give up)."""
        now = self.clock()
        self.deaths.append(now)
        while now - self.deaths[0] > self.policy.death_window_s:
            self.deaths.popleft()
        if len(self.deaths) >= self.policy.max_deaths:
            return None
        if uptime_s >= self.policy.stable_after_s:
            self._next_backoff_s = self.policy.initial_backoff_s
        backoff_s = self._next_backoff_s
        self._next_backoff_s = min(backoff_s * 2, self.policy.max_backoff_s)
        return backoff_s


@dataclass
class SupervisedChild:
    name: str
    history: RestartHistory
    # Dead and waiting out its backoff: when to start it again.
    restart_at: float | None = None
    # Restarted and not ready yet: when to give up on it.
    ready_by: float | None = None


class StackFailed(Exception):
    """A child keeps dying, or did not come back: the stack must stop. The message says which and why."""


def report_to_stderr(line: str) -> None:
    # Each line starts with what happened ("died: gateway ..."): only the banner starts "vsearch up: gateway".
    print(f"vsearch up: {line}", file=sys.stderr, flush=True)


class Supervisor:
    """Watches `stack`'s children (all started and ready) and restarts those that die, by `policy`.
    Runs on the main thread: it spawns the restarted children itself (see `LocalStack.spawn`)."""

    def __init__(
        self, stack: LocalStack, policy: RestartPolicy, report: Callable[[str], None] = report_to_stderr
    ) -> None:
        self.stack = stack
        self.policy = policy
        self.report = report
        self.children = {name: SupervisedChild(name, RestartHistory(policy)) for name in stack.processes}

    def run(self, stop_requested: Callable[[], bool]) -> StackFailed | None:
        """Supervises until `stop_requested()` says so (None) or a child is given up on (why)."""
        while not stop_requested():
            try:
                self.check()
            except StackFailed as failure:
                return failure
            time.sleep(TICK_S)
        return None

    def check(self) -> None:
        """One look at every child: notices deaths, restarts those whose backoff is over, and follows
        restarted ones until they are ready. Raises `StackFailed` when one is given up on."""
        for child in self.children.values():
            now = time.monotonic()
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child, now)
                continue
            process = self.stack.processes[child.name]
            if process.poll() is not None:
                self._died(child, process.pid, process.returncode, now)
            elif child.ready_by is not None:
                self._follow_restart(child, process.pid, now)

    def _died(self, child: SupervisedChild, pid: int, returncode: int, now: float) -> None:
        ended = how_it_ended(returncode)
        uptime_s = now - self.stack.started_at[child.name]
        backoff_s = child.history.record_death(uptime_s)
        if backoff_s is None:
            raise StackFailed(
                f"{child.name} (pid {pid}) {ended}, {self.policy.max_deaths} deaths within "
                f"{self.policy.death_window_s:.0f}s; {self.stack.failure_report(child.name)}"
            )
        child.restart_at, child.ready_by = now + backoff_s, None
        self.report(
            f"died: {child.name} (pid {pid}) {ended} after {uptime_s:.1f}s; restarting it in {backoff_s:.1f}s "
            f"(death {len(child.history.deaths)} of {self.policy.max_deaths} allowed within "
            f"{self.policy.death_window_s:.0f}s)"
        )

    def _restart(self, child: SupervisedChild, now: float) -> None:
        process = self.stack.spawn(child.name)
        child.restart_at = None
        child.ready_by = now + self.policy.ready_timeout_s
        self.report(f"restarted: {child.name} (pid {process.pid})")

    def _follow_restart(self, child: SupervisedChild, pid: int, now: float) -> None:
        if self.stack.is_ready(child.name):
            child.ready_by = None
            self.report(f"ready again: {child.name} (pid {pid}), "
                        f"{now - self.stack.started_at[child.name]:.1f}s after its restart")
        elif now > child.ready_by:
            raise StackFailed(
                f"{child.name} (pid {pid}) was restarted but is not ready after "
                f"{self.policy.ready_timeout_s:.0f}s; {self.stack.failure_report(child.name)}"
            )
