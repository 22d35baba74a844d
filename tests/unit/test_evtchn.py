"""Event channels in one process: pending-bit coalescing, never blocking, asyncio waits on uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from hvemu import readiness
from hvemu.evtchn import MESSAGE_SIZE, ChannelClosed, EventChannel


@pytest.fixture
def pair() -> Iterator[tuple[EventChannel, EventChannel]]:
    local, remote = EventChannel.pair(7)
    try:
        yield local, remote
    finally:
        local.close()
        remote.close()


def test_wire_format_is_a_little_endian_port(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    assert local.notify()
    raw = socket.socket(fileno=os.dup(remote.fileno()))
    try:
        assert raw.type == socket.SOCK_SEQPACKET
        assert raw.recv(64) == struct.pack("<I", 7) and MESSAGE_SIZE == 4
    finally:
        raw.close()


def test_many_notifies_are_one_event(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    for _ in range(100):
        local.notify()
    assert remote.drain() == {7}
    assert remote.received == 100
    assert remote.drain() == set()


def test_both_directions(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    remote.notify()
    remote.notify()
    assert local.drain() == {7}
    assert remote.drain() == set()


def test_full_queue_drops_without_blocking_or_raising(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    t0 = time.monotonic()
    results = [local.notify() for _ in range(5000)]
    assert time.monotonic() - t0 < 2
    assert results[0] is True
    assert results.count(False) > 0, "the queue never filled?"
    assert local.sent + local.coalesced == 5000
    assert remote.drain() == {7}
    assert remote.received == local.sent
    assert local.notify()  # room again


def test_notify_after_peer_closed(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    remote.close()
    assert local.notify() is False
    assert local.peer_closed
    assert local.drain() == set()


def test_drain_sees_eof(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    local.notify()
    local.close()
    assert remote.drain() == {7}  # what was queued still counts
    assert remote.drain() == set()
    assert remote.peer_closed


def test_odd_sized_message_counts_as_own_port(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    raw = socket.socket(fileno=os.dup(local.fileno()))
    try:
        raw.send(b"\x01\x00\x00\x00\x00\x00\x00\x00")  # an eventfd-style u64 from a foreign program
        raw.send(struct.pack("<I", 9))  # another port multiplexed on the channel
    finally:
        raw.close()
    assert remote.drain() == {7, 9}


def test_closed_channel_refuses_io(pair: tuple[EventChannel, EventChannel]) -> None:
    local, _ = pair
    local.close()
    local.close()  # idempotent
    assert local.fileno() == -1 and local.closed
    with pytest.raises(ValueError):
        local.notify()
    with pytest.raises(ValueError):
        local.drain()


def test_from_fd_and_detach(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    fd = remote.detach()
    assert remote.closed
    again = EventChannel(fd, 7)
    try:
        assert not os.get_inheritable(fd)
        local.notify()
        assert again.drain() == {7}
    finally:
        again.close()


def test_flags_of_the_fd_are_left_alone(pair: tuple[EventChannel, EventChannel]) -> None:
    # The fd a daemon receives is a normal blocking socket: no O_NONBLOCK.
    _, remote = pair
    assert os.get_blocking(remote.fileno())


def test_wrong_socket_type_is_refused_and_fd_left_open() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError):
            EventChannel(a.fileno(), 1)
        os.fstat(a.fileno())  # still open
        with pytest.raises(ValueError):
            EventChannel(a, 1)
        with pytest.raises(ValueError):
            EventChannel.pair(-1)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------
# asyncio (uvloop: see conftest)
# --------------------------------------------------------------------------


async def test_wait_returns_at_once_if_pending(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    local.notify()
    assert await asyncio.wait_for(remote.wait(), 1) == {7}


async def test_wait_sleeps_until_notified(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    task = asyncio.create_task(remote.wait())
    await asyncio.sleep(0.05)
    assert not task.done()
    for _ in range(10):
        local.notify()
    assert await asyncio.wait_for(task, 1) == {7}
    assert remote.drain() == set()  # all ten were one event


async def test_wait_tolerates_spurious_wakeups() -> None:
    class Flaky(EventChannel):
        spurious = 2

        def drain(self) -> set[int]:
            ports = super().drain()
            if ports and self.spurious:
                self.spurious -= 1
                return set()  # as if someone else had drained it first
            return ports

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    local, remote = EventChannel(a, 3), Flaky(b, 3)
    try:
        task = asyncio.create_task(remote.wait())
        for _ in range(3):
            await asyncio.sleep(0.02)
            assert not task.done()
            local.notify()
        assert await asyncio.wait_for(task, 1) == {3}
    finally:
        local.close()
        remote.close()


async def test_cancelled_wait_removes_its_reader(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    task = asyncio.create_task(remote.wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # No waiter left: another task may wait on the same fd...
    other = asyncio.create_task(readiness.wait_readable(remote.fileno()))
    await asyncio.sleep(0.01)
    local.notify()
    await asyncio.wait_for(other, 1)
    # ...and a new wait works.
    assert await asyncio.wait_for(remote.wait(), 1) == {7}


async def test_close_wakes_a_waiter(pair: tuple[EventChannel, EventChannel]) -> None:
    _, remote = pair
    task = asyncio.create_task(remote.wait())
    await asyncio.sleep(0.01)
    remote.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(task, 1)


async def test_wait_raises_when_peer_closes(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    task = asyncio.create_task(remote.wait())
    await asyncio.sleep(0.01)
    local.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(task, 1)


async def test_only_one_waiter(pair: tuple[EventChannel, EventChannel]) -> None:
    _, remote = pair
    task = asyncio.create_task(remote.wait())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError):
        await remote.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_watch_calls_back_and_stops_on_peer_close() -> None:
    class Counting(EventChannel):
        drains = 0

        def drain(self) -> set[int]:
            self.drains += 1
            return super().drain()

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    local, remote = EventChannel(a, 7), Counting(b, 7)
    try:
        seen: list[set[int]] = []
        closed = asyncio.Event()
        remote.watch(seen.append, closed.set)
        for _ in range(5):
            local.notify()
        await asyncio.sleep(0.05)
        assert seen == [{7}]
        local.close()
        await asyncio.wait_for(closed.wait(), 1)
        # The reader is gone: a dead peer (an fd readable forever) cannot make the loop spin.
        drains = remote.drains
        await asyncio.sleep(0.1)
        assert remote.drains == drains
    finally:
        local.close()
        remote.close()


async def test_unwatch(pair: tuple[EventChannel, EventChannel]) -> None:
    local, remote = pair
    seen: list[set[int]] = []
    remote.watch(seen.append)
    remote.unwatch()
    local.notify()
    await asyncio.sleep(0.02)
    assert seen == []
    assert await asyncio.wait_for(remote.wait(), 1) == {7}
