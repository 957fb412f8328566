"""The idle timeouts' shared timers (proxyd/upstream/deadlines.py, issue 15)."""

from __future__ import annotations

import asyncio

import pytest

from proxyd.upstream.deadlines import Deadlines, slot_width


class Item:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fired: list[float] = []

    def on_deadline(self) -> None:
        self.fired.append(self.loop.time())


@pytest.mark.parametrize(
    ("timeout", "width"), [(0.05, 1 / 64), (3.0, 1 / 64), (60.0, 1 / 8), (300.0, 1.0)]
)
def test_slot_width_is_a_small_share_of_the_timeout(timeout: float, width: float) -> None:
    # At most 1/256 of the timeout, within 1/64 s and 1 s.
    assert slot_width(timeout) == width


async def test_fires_never_early_and_at_most_a_slot_late() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    items = [Item(loop) for _ in range(3)]
    start = loop.time()
    whens = [start + 0.02 + i * 0.005 for i in range(3)]
    for item, when in zip(items, whens, strict=True):
        deadlines.add(when, 0.05, item)
    await asyncio.sleep(0.1)
    for item, when in zip(items, whens, strict=True):
        assert len(item.fired) == 1
        # The loop's clock may run a hair ahead of a timer's due time (libuv's milliseconds).
        assert when - 0.002 <= item.fired[0] <= when + 1 / 64 + 0.05


async def test_items_due_in_one_slot_share_one_timer_and_removal_cancels_it() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    a, b = Item(loop), Item(loop)
    when = loop.time() + 0.03
    due_a = deadlines.add(when, 300.0, a)
    due_b = deadlines.add(when + 0.0001, 300.0, b)
    assert due_a == due_b and len(deadlines._slots) == 1
    deadlines.remove(due_a, a)
    assert len(deadlines._slots) == 1
    handle = deadlines._slots[due_b][0]
    deadlines.remove(due_b, b)
    assert not deadlines._slots and handle.cancelled()


async def test_a_failing_item_does_not_keep_the_others_from_firing() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))

    class Failing:
        def on_deadline(self) -> None:
            raise RuntimeError("boom")

    items = [Item(loop), Item(loop)]
    when = loop.time() + 0.01
    deadlines.add(when, 0.05, items[0])
    deadlines.add(when, 0.05, Failing())
    deadlines.add(when, 0.05, items[1])
    await asyncio.sleep(0.06)
    assert [len(i.fired) for i in items] == [1, 1]
    assert len(errors) == 1
