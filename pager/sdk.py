"""Write your own mem_event daemon: attach to a ring, drain requests, answer in batches.

The shape follows QEMU's ``qemu.qmp``: an explicit :class:`RunState`, a scoped
attachment (``async with``) that enables the ring on entry and disables it on
exit (even on error), and errors that keep their root cause::

    async with MemEventClient(domid, RingKind.paging) as client:
        async for batch in client.requests():
            for req in batch:
                client.respond(MemEvent(type=req.type, flags=req.flags,
                                        vcpu_id=req.vcpu_id, gfn=req.gfn))
            await client.push()          # one push, at most one notify

The ring protocol itself (who produces, when to notify, the final check) is
handled here, on :mod:`hvemu.ring`; the daemon only sees batches of
:class:`~hvemu.abi.MemEvent` requests.  Every domctl a pager needs is a method
taking a batch of gfns and returning per-gfn results.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import mmap
import os
import re
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, RingKind
from hvemu.evtchn import ChannelClosed, EventChannel
from hvemu.ring import BackRing, RingCorruptError, SharedRing
from hvemu.transport import Connection, ControlError, TransportError

log = logging.getLogger("pager.sdk")


class RunState(enum.Enum):
    IDLE = "idle"
    ATTACHING = "attaching"
    RUNNING = "running"
    DETACHING = "detaching"
    DETACHED = "detached"


class SdkError(Exception):
    """Base of the SDK's errors; ``errno`` is an :class:`~hvemu.abi.Errno` name when known."""

    def __init__(self, message: str, errno: Errno | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AttachError(SdkError):
    """Enabling or mapping the ring failed; ``__cause__`` says why."""


class StateError(SdkError):
    """The client is not in a state that allows this call."""


class DomctlError(SdkError):
    """A whole domctl failed (per-gfn failures come back as results instead)."""


class DomainGone(SdkError):
    """The domain was destroyed (or the hypervisor stopped): the ring is gone.

    For a daemon this is the normal end of its work, as for ``xenpaging``
    when its guest shuts down.
    """


class Domctl:
    """The domctls a daemon issues for one domain, each on a batch of gfns.

    A :class:`MemEventClient` is one (on the connection that owns its ring);
    :meth:`MemEventClient.open_domctl` gives another on its own connection, so
    that slow background work (eviction) never delays page-ins.
    """

    def __init__(self, domid: int, conn: Connection | None = None) -> None:
        self.domid = domid
        self._conn = conn

    @classmethod
    async def open(cls, domid: int, socket_path: str) -> Domctl:
        conn = await Connection.connect(socket_path)
        try:
            await conn.call(protocol.ToolHello(client="sdk:domctl"))
        except BaseException:
            await conn.close()
            raise
        return cls(domid, conn)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # --------------------------------------------------------------- domctls
    def _connection(self) -> Connection:
        if self._conn is None:
            raise StateError("not connected")
        return self._conn

    async def call(self, msg: protocol.Msg) -> protocol.Msg:
        """Send one domctl; ESRCH or a lost hypervisor raise :class:`DomainGone`."""
        conn = self._connection()
        try:
            reply, fds = await conn.call(msg)
        except ControlError as exc:
            if exc.errno == Errno.ESRCH:
                raise DomainGone(f"dom{self.domid} is gone ({type(msg).__name__}: {exc})", exc.errno) from exc
            raise DomctlError(f"{type(msg).__name__} on dom{self.domid}: {exc}", exc.errno) from exc
        except TransportError as exc:
            raise DomainGone(f"lost the hypervisor during {type(msg).__name__}: {exc}") from exc
        for fd in fds:
            os.close(fd)
        return reply

    async def _batch(self, msg: protocol.Msg) -> list[Errno | None]:
        reply = await self.call(msg)
        if not isinstance(reply, protocol.BatchResult):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to {type(msg).__name__}")
        return reply.results

    async def nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        return await self._batch(protocol.PagingNominate(domid=self.domid, gfns=list(gfns)))

    async def evict(self, gfns: Sequence[int]) -> list[Errno | None]:
        return await self._batch(protocol.PagingEvict(domid=self.domid, gfns=list(gfns)))

    async def prep(self, gfns: Sequence[int]) -> list[Errno | None]:
        return await self._batch(protocol.PagingPrep(domid=self.domid, gfns=list(gfns)))

    async def load(self, gfns: Sequence[int], pages: Sequence[bytes], *, resume: bool = False) -> list[Errno | None]:
        """Allocate and fill frames; ``resume``: then drain the paging ring (unless a gfn got ``ENOMEM``).

        With ``resume``, publish the responses first (:meth:`MemEventClient.push`
        with ``notify=False``): the page-in then costs one domctl and no kick.
        """
        return await self._batch(protocol.PagingLoad(domid=self.domid, gfns=list(gfns), pages=list(pages),
                                                     resume=resume))

    async def resume(self, ring: RingKind = RingKind.paging) -> None:
        """The domctl twin of an event-channel kick: the hypervisor drains the ring's responses."""
        await self.call(protocol.MemEventResume(domid=self.domid, ring=ring))

    async def access_set(self, gfns: Sequence[int], access: int) -> list[Errno | None]:
        return await self._batch(protocol.AccessSet(domid=self.domid, gfns=list(gfns), access=access))

    async def map_foreign(self, gfns: Sequence[int]) -> protocol.ForeignPages:
        reply = await self.call(protocol.MapForeign(domid=self.domid, gfns=list(gfns)))
        if not isinstance(reply, protocol.ForeignPages):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to MapForeign")
        return reply

    async def get_target(self) -> int:
        reply = await self.call(protocol.GetTarget(domid=self.domid))
        if not isinstance(reply, protocol.TargetReply):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to GetTarget")
        return reply.pages

    async def stats(self) -> dict[str, object]:
        reply = await self.call(protocol.Stats(domid=self.domid))
        if not isinstance(reply, protocol.StatsReply):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to Stats")
        return dict(reply.stats)



@functools.cache
def _selector(value: int) -> bytes:
    """A ``bytes.translate`` table mapping ``value`` to 1 and every other byte to 0."""
    return bytes(1 if i == value else 0 for i in range(256))


@functools.cache
def _finder(value: int) -> re.Pattern[bytes]:
    return re.compile(re.escape(bytes([value])))


class MemEventClient(Domctl):
    """A daemon's attachment to one mem_event ring of one domain."""

    def __init__(self, domid: int, ring: RingKind = RingKind.paging, *, run_dir: str | None = None,
                 disable_on_exit: bool = True) -> None:
        super().__init__(domid)
        self.ring_kind = RingKind(ring)
        self.socket_path = protocol.socket_path(run_dir)
        #: Disable the ring on exit; False leaves it for another daemon (as a crash would).
        self.disable_on_exit = disable_on_exit
        self.state = RunState.IDLE
        self.info: protocol.MemEventEnabled | None = None
        self._evtchn: EventChannel | None = None
        self._maps: list[mmap.mmap] = []
        self.sring: SharedRing[MemEvent] | None = None
        self.back: BackRing[MemEvent] | None = None
        #: The guest's memory, writable (a pager reads evicted pages and fills prepared ones).
        self.memory: mmap.mmap | None = None
        #: The p2m type/access table, read-only.
        self.p2m: memoryview | None = None
        self.gfns = 0
        self.max_vcpus = 0
        self._queued = 0

    # ------------------------------------------------------------------ life
    async def __aenter__(self) -> MemEventClient:
        await self.attach()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.detach(disable=self.disable_on_exit)

    async def attach(self) -> None:
        if self.state is not RunState.IDLE:
            raise StateError(f"attach() in state {self.state.value}")
        self.state = RunState.ATTACHING
        fds: list[int] = []
        try:
            self._conn = await Connection.connect(self.socket_path)
            await self._conn.call(protocol.ToolHello(client=f"sdk:{self.ring_kind}"))
            reply, fds = await self._conn.call(protocol.MemEventEnable(domid=self.domid, ring=self.ring_kind))
            if not isinstance(reply, protocol.MemEventEnabled):
                raise AttachError(f"unexpected reply {type(reply).__name__}")
            named = dict(zip(reply.fds, fds, strict=True))
            self.info = reply
            self.gfns, self.max_vcpus = reply.gfns, reply.max_vcpus
            ring_map = mmap.mmap(named["ring"], abi.PAGE_SIZE, mmap.MAP_SHARED)
            self.memory = mmap.mmap(named["memory"], reply.gfns * abi.PAGE_SIZE, mmap.MAP_SHARED)
            p2m_map = mmap.mmap(named["p2m"], abi.p2m_table_size(reply.gfns), mmap.MAP_SHARED, mmap.PROT_READ)
            self._maps = [ring_map, self.memory, p2m_map]
            self.p2m = memoryview(p2m_map)
            self.sring = SharedRing(ring_map, abi.MemEventCodec, page_size=abi.ring_bytes(reply.ring_size))
            # A fresh ring has every index at 0; a re-attached one resumes at
            # rsp_prod: every request after it is unanswered.
            self.back = BackRing.attach(self.sring)
            self._evtchn = EventChannel(named.pop("evtchn"), reply.port)
            fds = list(named.values())  # mapped now: the fds themselves are not needed
        except ControlError as exc:
            await self._teardown()
            self.state = RunState.IDLE
            raise AttachError(f"cannot attach to dom{self.domid} {self.ring_kind} ring: {exc}",
                              exc.errno) from exc
        except (OSError, KeyError, ValueError) as exc:
            await self._teardown()
            self.state = RunState.IDLE
            raise AttachError(f"cannot attach to dom{self.domid} {self.ring_kind} ring: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
        self.state = RunState.RUNNING
        log.info("attached dom%d %s ring (port %d, %s)", self.domid, self.ring_kind, reply.port,
                 "re-attached" if reply.reattached else "new")

    async def detach(self, *, disable: bool = True) -> None:
        """Leave the ring: disable it (a clean stop) or just let go (as a crash would)."""
        if self.state in (RunState.DETACHED, RunState.IDLE):
            return
        self.state = RunState.DETACHING
        try:
            if disable and self._conn is not None:
                try:
                    await self._conn.call(protocol.MemEventDisable(domid=self.domid, ring=self.ring_kind))
                except ControlError as exc:
                    if exc.errno != Errno.ESRCH:  # a destroyed domain has no ring to disable
                        log.warning("disable of dom%d %s ring failed: %s", self.domid, self.ring_kind, exc)
                except OSError as exc:
                    log.warning("disable of dom%d %s ring failed: %s", self.domid, self.ring_kind, exc)
        finally:
            await self._teardown()
            self.state = RunState.DETACHED

    async def _teardown(self) -> None:
        if self._evtchn is not None:
            self._evtchn.close()
            self._evtchn = None
        if self.sring is not None:
            self.sring.release()
            self.sring = None
            self.back = None
        if self.p2m is not None:
            self.p2m.release()
            self.p2m = None
        for m in self._maps:
            m.close()
        self._maps = []
        self.memory = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _running(self) -> tuple[BackRing[MemEvent], EventChannel, Connection]:
        if self.state is not RunState.RUNNING or self.back is None or self._evtchn is None or self._conn is None:
            raise StateError(f"not attached (state {self.state.value})")
        return self.back, self._evtchn, self._conn

    async def open_domctl(self) -> Domctl:
        """Another connection for domctls on this domain (close it when done)."""
        self._running()
        return await Domctl.open(self.domid, self.socket_path)

    # -------------------------------------------------------------- requests
    def take_requests(self) -> list[MemEvent]:
        """Every request on the ring now (possibly none); never blocks."""
        back, _, _ = self._running()
        try:
            n = back.unconsumed_requests()
        except RingCorruptError as exc:
            raise SdkError(f"dom{self.domid} {self.ring_kind} ring is corrupt: {exc}") from exc
        return [back.get_request() for _ in range(n)]

    async def requests(self) -> AsyncIterator[list[MemEvent]]:
        """Batches of requests, forever: drain, final check, then sleep on the event channel."""
        while True:
            back, evtchn, _ = self._running()
            batch = self.take_requests()
            if batch:
                yield batch
                continue
            if back.final_check_for_requests():
                continue
            try:
                await evtchn.wait()
            except ChannelClosed as exc:
                raise DomainGone(f"dom{self.domid} {self.ring_kind} ring: the hypervisor closed it",
                                 Errno.ESRCH) from exc

    def respond(self, rsp: MemEvent) -> None:
        """Queue one response (it is not visible to the hypervisor until :meth:`push`)."""
        back, _, _ = self._running()
        back.put_response(rsp)
        self._queued += 1

    async def push(self, *, notify: bool = True) -> bool:
        """Publish every queued response with one index update and at most one notify.

        ``notify=False`` only publishes (``RING_PUSH_RESPONSES``): the caller
        resumes the ring itself with a domctl (``load(..., resume=True)`` or
        :meth:`resume`).  Returns whether the hypervisor was notified.
        """
        back, evtchn, _ = self._running()
        if not self._queued:
            return False
        self._queued = 0
        if not notify:
            back.push_responses()
            return False
        if back.push_responses_and_check_notify():
            evtchn.notify()
            return True
        return False

    def kick(self) -> None:
        """Notify the hypervisor unconditionally (e.g. after re-attaching)."""
        _, evtchn, _ = self._running()
        evtchn.notify()

    # ----------------------------------------------------------- p2m reading
    def p2m_type(self, gfn: int) -> int:
        if self.p2m is None:
            raise StateError("not attached")
        return self.p2m[abi.p2m_type_index(self.gfns, gfn)]

    def gfns_of_type(self, p2mt: abi.P2MType) -> list[int]:
        """Every gfn whose p2m type is ``p2mt``, by scans in C whatever the density.

        The eviction loop calls this for every batch, so its cost is per
        evicted page: a regex search touches only the matches (right when
        they are few), ``translate`` + ``compress`` every byte once (right when
        they are many, e.g. a full guest about to be paged out).
        """
        if self.p2m is None:
            raise StateError("not attached")
        start = abi.p2m_type_index(self.gfns, 0)
        table = bytes(self.p2m[start:start + self.gfns])
        value = int(p2mt)
        found = table.count(value)
        if not found:
            return []
        if found * 5 >= len(table):
            return list(itertools.compress(range(len(table)), table.translate(_selector(value))))
        return [m.start() for m in _finder(value).finditer(table)]

    def count_type(self, p2mt: abi.P2MType) -> int:
        if self.p2m is None:
            raise StateError("not attached")
        start = abi.p2m_type_index(self.gfns, 0)
        return bytes(self.p2m[start:start + self.gfns]).count(bytes([int(p2mt)]))
