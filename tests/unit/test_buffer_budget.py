"""The control server's budget of request bytes (issue 14, defect 3)."""

from __future__ import annotations

import asyncio

import pytest

from hvemu.abi import Errno
from hvemu.buffer_budget import BufferBudget, BufferFull


def test_a_connection_reads_while_under_both_caps() -> None:
    b = BufferBudget(100, 60)
    assert b.admits("a")
    b.set_held("a", 59)
    assert b.admits("a")
    b.set_held("a", 60)
    assert not b.admits("a"), "per-connection cap"
    b.set_held("b", 40)
    assert b.used == 100 and not b.admits("b"), "total reached: a holder waits"
    assert b.admits("c"), "one that holds nothing may always read once"
    b.forget("a")
    assert b.used == 40 and b.admits("b")
    with pytest.raises(ValueError):
        BufferBudget(0, 1)


async def test_room_made_by_a_release_wakes_a_waiter() -> None:
    b = BufferBudget(100, 100, stall=30)
    b.set_held("old", 90)
    b.set_held("new", 10)
    waiter = asyncio.ensure_future(b.wait_for_room("new"))
    await asyncio.sleep(0)
    assert not waiter.done()
    b.set_held("old", 50)
    await asyncio.wait_for(waiter, 5)


async def test_at_the_limit_the_oldest_holding_is_reclaimed() -> None:
    failed: list[BaseException] = []
    b = BufferBudget(100, 100, stall=0.01)
    b.register("old", failed.append)
    b.set_held("old", 70)
    await asyncio.sleep(0.01)
    b.set_held("new", 30)
    await b.wait_for_room("new")  # the old holding goes, the new one reads on
    assert len(failed) == 1 and isinstance(failed[0], BufferFull) and failed[0].errno == Errno.ENOMEM
    assert b.used == 30 and b.reclaimed == 1
    # The oldest holder is the one waiting: it is refused itself.
    b.set_held("newer", 70)
    with pytest.raises(BufferFull):
        await b.wait_for_room("new")
