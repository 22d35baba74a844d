"""How many request bytes a control server may hold for its clients, all together and each.

Every connection of :class:`hvemu.hypervisor.server.ControlServer` holds bytes: the
start of a frame still arriving (up to ``MAX_FRAME``, 8 MiB) and complete
frames waiting for, or being served by, the connection's worker.  Without a
cap, fifty clients that each send all of an 8 MiB frame but its last byte
hold 400 MB of the hypervisor, and the OOM killer, when it comes, takes the
hypervisor and every domain with it.  So a :class:`BufferBudget` counts what
each connection holds, and a connection reads only while

* it holds less than ``per_connection`` (a pipelining client waits for its
  own requests to be served: back-pressure through its socket), and
* the total is under ``limit``, unless it holds nothing (one read, at most
  ``RECV_SIZE``, always goes through: small requests never wait for big ones).

A connection kept from reading for ``stall`` seconds (in all, however often
it was woken meanwhile) while the total is at the limit has the budget
*reclaimed*: of the holders of at least ``RECLAIM_MIN`` bytes, the one whose
holding is oldest is failed with ``ENOMEM`` (the server answers it and
closes).  Oldest, not largest: a frame of a legitimate client arrives at full
speed and is served within milliseconds, whereas bytes that have sat since
before the budget ran out are what ran it out.  Small holdings (a request in
service, e.g. a vCPU's exit waiting for its page) are never reclaimed: they
are not what fills the budget.  A waiting connection also checks that its
peer is still there (``check``): one that can read nothing would otherwise
never see its peer close, and never give its bytes back.

Sans-I/O but for one asyncio future per waiting reader; nothing here reads
or writes a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from hvemu.abi import Errno
from hvemu.protocol import ProtocolError

log = logging.getLogger("hvemu.buffers")

#: Seconds a reader waits for room before the oldest holding is reclaimed.
STALL = 0.5
#: Holdings smaller than this are never reclaimed (one read's worth: ``stream.RECV_SIZE``).
RECLAIM_MIN = 64 * 1024


class BufferFull(ProtocolError):
    """This connection's bytes were reclaimed: the server's request buffers are full."""

    def __init__(self, held: int, limit: int) -> None:
        super().__init__(Errno.ENOMEM, f"the control server's request buffers are full ({limit} bytes); this "
                         f"connection held {held} bytes the longest and is closed", fatal=True)


class BufferBudget:
    """Bytes held per connection (any hashable key), against a total and a per-connection cap."""

    def __init__(self, limit: int, per_connection: int, *, stall: float = STALL) -> None:
        if limit < 1 or per_connection < 1:
            raise ValueError("buffer limits must be positive")
        self.limit = limit
        self.per_connection = per_connection
        self.stall = stall
        self.used = 0
        #: Connections that were failed to make room (a counter, for the record).
        self.reclaimed = 0
        self._held: dict[Hashable, tuple[int, float]] = {}
        self._fail: dict[Hashable, Callable[[BaseException], object]] = {}
        #: Connections reclaimed while they waited here: their wait raises.
        self._failed: dict[Hashable, BufferFull] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def held(self, key: Hashable) -> int:
        return self._held.get(key, (0, 0.0))[0]

    def register(self, key: Hashable, fail: Callable[[BaseException], object]) -> None:
        """``fail(exc)`` ends the connection ``key`` when its bytes are reclaimed."""
        self._fail[key] = fail

    def set_held(self, key: Hashable, nbytes: int) -> None:
        """``key`` holds ``nbytes`` now (its holding ages from when it last went up from zero)."""
        old, since = self._held.get(key, (0, 0.0))
        if nbytes == old:
            return
        if nbytes:
            self._held[key] = (nbytes, since if old else time.monotonic())
        else:
            self._held.pop(key, None)
        self.used += nbytes - old
        if nbytes < old:
            self._wake()

    def forget(self, key: Hashable) -> None:
        """The connection is gone: what it held is free."""
        self.set_held(key, 0)
        self._fail.pop(key, None)
        self._failed.pop(key, None)

    def admits(self, key: Hashable) -> bool:
        """May ``key`` read more now?"""
        held = self.held(key)
        return held < self.per_connection and (held == 0 or self.used < self.limit)

    async def wait_for_room(self, key: Hashable, check: Callable[[], object] | None = None) -> None:
        """Return when ``key`` may read; reclaim the oldest holding if the total stays at the limit.

        ``check()`` runs at least once per ``stall`` (and may raise: the
        peer has gone).  Raises :class:`BufferFull` if ``key``'s own holding
        is the one reclaimed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stall
        while True:
            failed = self._failed.pop(key, None)
            if failed is not None:
                raise failed
            if self.admits(key):
                return
            now = loop.time()
            if now >= deadline:
                if check is not None:
                    check()
                if self.used >= self.limit:
                    self._reclaim(key)
                deadline = now + self.stall
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                await asyncio.wait_for(fut, deadline - now)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(fut)

    def _reclaim(self, waiting: Hashable) -> None:
        big = [k for k, (n, _) in self._held.items() if n >= RECLAIM_MIN]
        if not big:
            return  # only small holdings: they come back as their requests are served
        victim = min(big, key=lambda k: self._held[k][1])
        held = self.held(victim)
        self.reclaimed += 1
        log.warning("control buffers full (%d of %d bytes held by %d connections): reclaiming the %d bytes "
                    "held longest", self.used, self.limit, len(self._held), held)
        exc = BufferFull(held, self.limit)
        if victim == waiting:
            raise exc
        fail = self._fail.pop(victim, None)
        self._failed[victim] = exc
        self.set_held(victim, 0)  # its bytes go with it, whatever its reader is doing (wakes it too)
        if fail is not None:
            fail(exc)

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
