"""The one readiness primitive (:mod:`hvemu.readiness`), on uvloop: waits, closing, persistent readers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from hvemu import readiness
from hvemu.readiness import BusyResourceError, ClosedResourceError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        for s in (a, b):
            readiness.notify_closing(s.fileno())
            s.close()


async def _waiting(fd: int) -> asyncio.Task[None]:
    """A task waiting for ``fd`` to be readable, and waiting already."""
    task = asyncio.create_task(readiness.wait_readable(fd))
    await asyncio.sleep(0.01)
    assert not task.done()
    return task


async def test_wait_readable_returns_when_data_arrives(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    waiter = await _waiting(b.fileno())
    a.send(b"x")
    await asyncio.wait_for(waiter, 1)
    assert b.recv(1) == b"x"


async def test_wait_writable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    await asyncio.wait_for(readiness.wait_writable(a.fileno()), 1)  # an empty buffer is writable


async def test_one_waiter_per_fd_and_direction(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    first = await _waiting(b.fileno())
    with pytest.raises(BusyResourceError):
        await readiness.wait_readable(b.fileno())
    await asyncio.wait_for(readiness.wait_writable(b.fileno()), 1)  # the other direction is free
    a.send(b"x")
    await asyncio.wait_for(first, 1)


async def test_cancelled_wait_leaves_no_waiter(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    first = await _waiting(b.fileno())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = await _waiting(b.fileno())
    a.send(b"x")
    await asyncio.wait_for(second, 1)


async def test_notify_closing_wakes_the_waiter_with_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    waiter = await _waiting(b.fileno())
    readiness.notify_closing(b.fileno())
    with pytest.raises(ClosedResourceError):
        await asyncio.wait_for(waiter, 1)
    waiter = await _waiting(b.fileno())
    readiness.notify_closing(b.fileno(), ConnectionResetError("gone"))  # the caller's own error
    with pytest.raises(ConnectionResetError, match="gone"):
        await asyncio.wait_for(waiter, 1)


async def test_a_wake_up_with_nobody_waiting_stops_polling(pair: tuple[socket.socket, socket.socket]) -> None:
    """The registration outlives its wait, until a wake-up finds no waiter (else a readable fd would spin)."""
    a, b = pair
    a.send(b"x")
    await readiness.wait_readable(b.fileno())
    # Nobody reads the byte and nobody waits: the loop must not keep calling back.
    entry = readiness._fds[b.fileno()]
    await asyncio.sleep(0.02)
    assert entry.registered == [False, False]
    await asyncio.wait_for(readiness.wait_readable(b.fileno()), 1)  # and a new wait registers again


async def test_persistent_reader_and_its_errors(pair: tuple[socket.socket, socket.socket],
                                                caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def readable() -> None:
        data = b.recv(16)
        seen.append(data)
        if data == b"boom":
            raise ValueError("a bug in the callback")

    readiness.add_reader(b.fileno(), readable, errors.append)
    try:
        with pytest.raises(BusyResourceError):
            await readiness.wait_readable(b.fileno())
        with pytest.raises(BusyResourceError):
            readiness.add_reader(b.fileno(), readable, errors.append)
        a.send(b"one")
        await asyncio.sleep(0.02)
        with caplog.at_level(logging.ERROR, logger="hvemu.readiness"):
            a.send(b"boom")
            await asyncio.sleep(0.02)
        assert seen == [b"one", b"boom"]
        assert [str(e) for e in errors] == ["a bug in the callback"]
        assert "Traceback" in caplog.text and "a bug in the callback" in caplog.text
        a.send(b"two")  # still registered: on_error decides what an error breaks
        await asyncio.sleep(0.02)
        assert seen[-1] == b"two"
    finally:
        readiness.remove_reader(b.fileno())
    a.send(b"three")
    await asyncio.sleep(0.02)
    assert seen[-1] == b"two"
    await asyncio.wait_for(readiness.wait_readable(b.fileno()), 1)  # the fd is free to wait on again


async def test_notify_closing_removes_a_persistent_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    calls: list[int] = []
    readiness.add_reader(b.fileno(), lambda: calls.append(len(b.recv(16))), lambda exc: None)
    readiness.notify_closing(b.fileno())
    a.send(b"x")
    await asyncio.sleep(0.02)
    assert calls == []


def test_notify_closing_needs_no_loop() -> None:
    r, w = os.pipe()
    try:
        readiness.notify_closing(r)  # nobody waits: nothing to do, and no running loop needed
    finally:
        os.close(r)
        os.close(w)


def test_an_entry_left_by_a_closed_loop_is_dropped() -> None:
    r, w = os.pipe()
    try:
        async def wait_once() -> None:
            os.write(w, b"x")
            await readiness.wait_readable(r)

        for _ in range(2):  # the second loop finds the first one's entry and replaces it
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(wait_once())
            finally:
                loop.close()
    finally:
        readiness.notify_closing(r)
        os.close(r)
        os.close(w)
