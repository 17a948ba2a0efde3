"""The restart policy of `vsearch up`'s supervisor, by a clock only the test moves: how long a dead
child waits before it is started again, and when it is given up on. The supervisor itself, with real
processes killed, is tests/test_process_death.py."""

from __future__ import annotations

from conftest import ManualClock
from vsearch_cli.local_stack.ports import free_port
from vsearch_cli.local_stack.supervisor import RestartHistory, RestartPolicy


def test_the_wait_doubles_up_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    clock = ManualClock()
    history = RestartHistory(RestartPolicy(max_deaths=100), clock)
    waits = []
    for _ in range(7):
        clock.now += 1
        waits.append(history.record_death(uptime_s=1))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += 1
    assert history.record_death(uptime_s=30) == 0.5  # it had run for stable_after_s
    clock.now += 1
    assert history.record_death(uptime_s=1) == 1.0


def test_the_fifth_death_within_a_minute_gives_up() -> None:
    clock = ManualClock()
    history = RestartHistory(RestartPolicy(), clock)
    for _ in range(4):
        assert history.record_death(uptime_s=1) is not None
        clock.now += 14
    assert clock.now == 56
    assert history.record_death(uptime_s=1) is None


def test_deaths_older_than_the_window_are_forgotten() -> None:
    clock = ManualClock()
    history = RestartHistory(RestartPolicy(), clock)
    for _ in range(4):
        assert history.record_death(uptime_s=1) is not None
        clock.now += 20
    # Deaths at 0, 20, 40, 60 and now 80: the one at 0 is out of the 60 s window.
    assert history.record_death(uptime_s=1) is not None
    assert list(history.deaths) == [20, 40, 60, 80]


def test_free_ports_are_never_handed_out_twice() -> None:
    """A stack's services get their ports one after another before any of them binds: the kernel, asked
    for a free port again and again, gives some port twice within a couple of thousand asks (once to an
    embedder and its search_svc), so the ports must be told apart here."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
