"""The control server's budget of request bytes (issue 14, defect 3)."""

from __future__ import annotations

import asyncio

import pytest

from hvemu.abi import Errno
from hvemu.buffer_budget import RECLAIM_MIN, BufferBudget, BufferFull


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
    k = RECLAIM_MIN
    b = BufferBudget(100 * k, 100 * k, stall=0.01)
    b.register("old", failed.append)
    b.set_held("small", k - 1)  # older still, but a request in service: never reclaimed
    await asyncio.sleep(0.01)
    b.set_held("old", 70 * k)
    await asyncio.sleep(0.01)
    b.set_held("new", 30 * k)
    await b.wait_for_room("new")  # the old holding goes, the new one reads on
    assert len(failed) == 1 and isinstance(failed[0], BufferFull) and failed[0].errno == Errno.ENOMEM
    assert b.used == 31 * k - 1 and b.reclaimed == 1
    # The oldest big holder is the one waiting: it is refused itself.
    b.set_held("newer", 70 * k)
    with pytest.raises(BufferFull):
        await b.wait_for_room("new")


async def test_wake_ups_do_not_restart_the_stall() -> None:
    """Releases elsewhere wake a waiter often; the stall still counts from when it began waiting."""
    k = RECLAIM_MIN
    failed: list[BaseException] = []
    b = BufferBudget(100 * k, 100 * k, stall=0.2)
    b.register("hog", failed.append)
    b.set_held("hog", 99 * k)
    b.set_held("new", k)

    async def churn() -> None:
        while True:
            b.set_held("busy", 10)
            b.set_held("busy", 0)  # a release: wakes every waiter
            await asyncio.sleep(0.01)

    churner = asyncio.ensure_future(churn())
    try:
        await asyncio.wait_for(b.wait_for_room("new"), 5)
    finally:
        churner.cancel()
    assert failed and b.held("hog") == 0


async def test_a_waiter_whose_peer_left_stops_waiting() -> None:
    b = BufferBudget(10, 10, stall=0.01)
    b.set_held("a", 10)

    def gone() -> None:
        raise ConnectionResetError("peer left")

    with pytest.raises(ConnectionResetError):
        await b.wait_for_room("a", gone)
