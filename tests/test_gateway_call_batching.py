"""Searches sharing downstream calls (gateway/call_batching.py): a lone search is sent at once; those
arriving while a call runs go together in the next one, each getting its own outcome; deadlines,
cancellation and failures stay per search. The send function is a stand-in that records its calls
and can hold them until the test lets them go."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.call_batching import CallBatcher
from service_kit.status import ServiceError


class Sender:
    """Answers item * 10, or the ServiceError an item names; `hold` keeps calls waiting until set."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list, float | None]] = []
        self.hold: asyncio.Event | None = None
        self.cancelled = 0
        self.fail: Exception | None = None

    async def __call__(self, key, items, timeout):
        self.calls.append((key, list(items), timeout))
        try:
            if self.hold is not None:
                await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return [item if isinstance(item, Exception) else item * 10 for item in items]


async def settle() -> None:
    """Lets the tasks started so far run as far as they can."""
    for _ in range(5):
        await asyncio.sleep(0)


def batcher(sender: Sender, **options) -> CallBatcher:
    return CallBatcher(sender, "stand-in", **{"max_in_flight": 1, "max_items": 32, **options})


async def test_a_lone_item_is_sent_at_once_and_alone():
    sender = Sender()
    assert await batcher(sender).submit("k", 4) == 40
    assert [items for _key, items, _timeout in sender.calls] == [[4]]


async def test_items_arriving_while_a_call_runs_go_together_in_the_next_one():
    sender = Sender()
    calls = batcher(sender)
    sender.hold = asyncio.Event()
    first = asyncio.create_task(calls.submit("k", 1))
    await settle()
    rest = [asyncio.create_task(calls.submit("k", n)) for n in (2, 3, 4)]
    await settle()
    assert [items for _key, items, _timeout in sender.calls] == [[1]]
    sender.hold.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert [items for _key, items, _timeout in sender.calls] == [[1], [2, 3, 4]]


async def test_keys_never_share_a_call_and_each_has_its_own_calls_in_flight():
    sender = Sender()
    calls = batcher(sender)
    sender.hold = asyncio.Event()
    tasks = [asyncio.create_task(calls.submit(key, n)) for key, n in (("a", 1), ("b", 2), ("a", 3), ("b", 4))]
    await settle()
    assert sorted((key, items) for key, items, _ in sender.calls) == [("a", [1]), ("b", [2])]
    sender.hold.set()
    assert await asyncio.gather(*tasks) == [10, 20, 30, 40]
    assert sorted((key, items) for key, items, _ in sender.calls) == [("a", [1]), ("a", [3]), ("b", [2]), ("b", [4])]


async def test_a_call_carries_at_most_max_items_and_max_weight():
    sender = Sender()
    calls = batcher(sender, max_items=2, max_weight=10)
    sender.hold = asyncio.Event()
    first = asyncio.create_task(calls.submit("k", 0))
    await settle()
    weights = {1: 4, 2: 4, 3: 4, 4: 4, 5: 20}
    rest = [asyncio.create_task(calls.submit("k", n, weight=weight)) for n, weight in weights.items()]
    await settle()
    sender.hold.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    # Two per call; an item heavier than max_weight still goes, alone.
    assert [items for _key, items, _timeout in sender.calls] == [[0], [1, 2], [3, 4], [5]]


async def test_more_calls_in_flight_start_at_once():
    sender = Sender()
    calls = batcher(sender, max_in_flight=2)
    sender.hold = asyncio.Event()
    tasks = [asyncio.create_task(calls.submit("k", n)) for n in (1, 2, 3, 4)]
    await settle()
    assert [items for _key, items, _timeout in sender.calls] == [[1], [2]]
    sender.hold.set()
    assert await asyncio.gather(*tasks) == [10, 20, 30, 40]
    assert [items for _key, items, _timeout in sender.calls] == [[1], [2], [3, 4]]


async def test_an_item_fails_alone_and_a_failed_call_fails_every_item_it_carried():
    sender = Sender()
    calls = batcher(sender)
    refused = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
    sender.hold = asyncio.Event()
    first = asyncio.create_task(calls.submit("k", 1))
    await settle()
    mixed = [asyncio.create_task(calls.submit("k", item)) for item in (2, refused, 3)]
    await settle()
    sender.hold.set()
    outcomes = await asyncio.gather(first, *mixed, return_exceptions=True)
    assert outcomes[:2] == [10, 20] and outcomes[2] is refused and outcomes[3] == 30

    sender.fail = ServiceError(grpc.StatusCode.UNAVAILABLE, "stand-in: down")
    outcomes = await asyncio.gather(calls.submit("k", 1), calls.submit("k", 2), return_exceptions=True)
    assert [getattr(outcome, "code", None) for outcome in outcomes] == [grpc.StatusCode.UNAVAILABLE] * 2
    sender.fail = None
    assert await calls.submit("k", 5) == 50  # nothing left stuck in flight


async def test_each_item_keeps_its_deadline_and_the_call_runs_until_the_latest():
    sender = Sender()
    calls = batcher(sender)
    sender.hold = asyncio.Event()
    first = asyncio.create_task(calls.submit("k", 1, deadline=time.monotonic() + 30))
    await settle()
    short = asyncio.create_task(calls.submit("k", 2, deadline=time.monotonic() + 0.05))
    long = asyncio.create_task(calls.submit("k", 3, deadline=time.monotonic() + 20))
    with pytest.raises(ServiceError) as error:
        await short
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "stand-in" in error.value.message
    sender.hold.set()
    assert await asyncio.gather(first, long) == [10, 30]
    (_, items, timeout), = sender.calls[1:]
    assert items == [3] and 19 < timeout <= 20  # the item whose time was up was left out
    assert 29 < sender.calls[0][2] <= 30


async def test_a_call_no_item_waits_for_any_more_is_cancelled():
    sender = Sender()
    calls = batcher(sender)
    sender.hold = asyncio.Event()
    tasks = [asyncio.create_task(calls.submit("k", n)) for n in (1, 2)]
    await settle()
    tasks[0].cancel()  # item 1's call carries it alone; item 2 waits for the next
    await settle()
    assert sender.cancelled == 1 and tasks[0].cancelled()
    assert [items for _key, items, _timeout in sender.calls] == [[1], [2]]
    sender.hold.set()
    assert await tasks[1] == 20


async def test_a_call_runs_in_the_context_of_its_first_item():
    import contextvars

    request_id = contextvars.ContextVar("request_id", default=None)
    seen = []

    async def send(key, items, timeout):
        seen.append(request_id.get())
        await settle()
        return items

    calls = CallBatcher(send, "stand-in", max_in_flight=1, max_items=8)

    async def search(name: str, item: int) -> int:
        request_id.set(name)
        return await calls.submit("k", item)

    assert await asyncio.gather(search("first", 1), search("second", 2), search("third", 3)) == [1, 2, 3]
    assert seen == ["first", "second"]
