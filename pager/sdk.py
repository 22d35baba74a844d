"""Write your own mem_event daemon: attach to a ring, drain requests, answer in batches.

The shape follows QEMU's ``qemu.qmp``: an explicit :class:`RunState`, a scoped
attachment (``async with``) that enables the ring on entry and disables it on
exit (even on error), and errors that keep their root cause::

    async with MemEventClient(domid, RingKind.paging) as client:
        async for batch in client.requests():
            ...                          # load pages, change access rights...
            client.respond_all(batch)    # one response per request, echoing its flags
            await client.push()          # one index update, at most one notify

The ring protocol itself (who produces, when to notify, the final check) is
handled here, on :mod:`hvemu.ring`; the daemon only sees batches
(:class:`RequestBatch`, a list of :class:`~hvemu.abi.MemEvent`).  Every domctl
a daemon needs is a method of :class:`Domctl` taking a batch of gfns and
returning one result per gfn (``None`` or an :class:`~hvemu.abi.Errno` name);
a domctl that fails as a whole raises :class:`DomctlError` whose ``errno`` is
the errno name.  :class:`pager.base.Pager` is a paging daemon built on this
module, with hooks for a custom victim policy.  ``docs/writing-a-daemon.md``
explains the protocol and the pitfalls.

Why one module of ~630 lines: :class:`MemEventClient` is one object with a run-state, and its
attach, request loop, responses and detach share that state (its domctls are :mod:`pager.domctl`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import mmap
import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, MemEventFlag, MemEventReason, MemEventType, RingKind
from hvemu.client import ControlClient, ControlError
from hvemu.evtchn import EventChannel
from hvemu.ring import BackRing, RingCorruptError, SharedRing
from pager.domctl import (
    AttachError,
    DomainGone,
    Domctl,
    DomctlError,
    SdkError,
    StateError,
    pages_out,
)
from pager.gfns import GfnsOfType
from pager.pagefile import PageStore

log = logging.getLogger("pager.sdk")

#: What daemons import from here (the domctls and errors live in :mod:`pager.domctl`).
__all__ = ["ECHO_FLAGS", "AttachError", "DomainGone", "Domctl", "DomctlError", "MemEventClient", "RequestBatch",
           "RunState", "SdkError", "StateError", "failures", "pages_out", "response_for"]

#: The request flags a response echoes back.  The hypervisor acts on
#: ``VCPU_PAUSED`` (unpause that vCPU) and ``DROP_PAGE`` (nothing to page in);
#: the others are echoed as Xen's daemons do, for the record.
ECHO_FLAGS = int(MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL
                 | MemEventFlag.FOREIGN)
_DUMMY = int(MemEventFlag.DUMMY)
_DROP_PAGE = int(MemEventFlag.DROP_PAGE)
_EVICT_FAIL = int(MemEventFlag.EVICT_FAIL)
_NO_LOAD = _DROP_PAGE | _EVICT_FAIL | _DUMMY


def response_for(req: MemEvent, *, flags: int | None = None) -> MemEvent:
    """The response to ``req``: same type, vCPU, gfn, p2m type and reason, its flags echoed.

    A response must name the vCPU and carry ``VCPU_PAUSED`` exactly when the
    request did, or the vCPU stays paused (or, in an older Xen, a vCPU paused
    for something else would be released).  ``flags`` replaces the echoed
    flags, e.g. ``flags=MemEventFlag.DUMMY`` for a response the hypervisor
    must ignore.
    """
    return MemEvent(type=req.type, flags=req.flags & ECHO_FLAGS if flags is None else int(flags),
                    vcpu_id=req.vcpu_id, gfn=req.gfn, p2mt=req.p2mt, reason=req.reason)


def failures(gfns: Sequence[int], results: Sequence[Errno | None]) -> dict[int, Errno]:
    """The gfns of a batched domctl that failed, with their errno names (empty: all succeeded)."""
    return {g: r for g, r in zip(gfns, results, strict=True) if r is not None}


class RequestBatch(list[MemEvent]):
    """One drain of the ring: the requests in ring order, with views a daemon often needs.

    It is a plain ``list`` of :class:`~hvemu.abi.MemEvent`; the properties are
    computed on use, so a daemon that only iterates pays nothing for them.
    """

    @property
    def populates(self) -> list[MemEvent]:
        """Paging requests that need the page brought in (not ``DROP_PAGE``, ``EVICT_FAIL`` or ``DUMMY``).

        An ``EVICT_FAIL`` request's page was only nominated: it still has its
        frame and its data, so the response alone makes it ``ram_rw`` again.
        """
        return [r for r in self if r.type == MemEventType.PAGING and not r.flags & _NO_LOAD]

    def gfns_to_load(self) -> list[int]:
        """The distinct gfns of :attr:`populates`, in ring order (several vCPUs may wait for one)."""
        return list(dict.fromkeys(r.gfn for r in self.populates))

    @property
    def drops(self) -> list[MemEvent]:
        """``DROP_PAGE`` requests: the guest gave a paged-out gfn back; forget its copy."""
        return [r for r in self if r.flags & _DROP_PAGE]

    @property
    def evict_fails(self) -> list[MemEvent]:
        """Populates of a gfn that was nominated but not yet evicted (its evict will fail)."""
        return [r for r in self if r.flags & _EVICT_FAIL]

    @property
    def violations(self) -> list[MemEvent]:
        """mem_access violations (``ACCESS`` requests with reason ``VIOLATION``)."""
        return [r for r in self if r.type == MemEventType.ACCESS and r.reason == MemEventReason.VIOLATION]

    def by_reason(self, reason: MemEventReason | int) -> list[MemEvent]:
        """Requests with this reason (``CR3``, ``INT3``... of ``hvm_memory_event_traps``)."""
        return [r for r in self if r.reason == reason]

    @property
    def paused(self) -> list[MemEvent]:
        """Requests whose vCPU waits for the response (``VCPU_PAUSED``)."""
        return [r for r in self if r.flags & MemEventFlag.VCPU_PAUSED]


class RunState(enum.Enum):
    IDLE = "idle"
    ATTACHING = "attaching"
    RUNNING = "running"
    DETACHING = "detaching"
    DETACHED = "detached"


class MemEventClient:
    """A daemon's attachment to one mem_event ring of one domain.

    ``async with MemEventClient(domid, ring) as client`` enables the ring (or
    re-attaches to one whose daemon died: ``client.info.reattached``) and maps
    the ring page, the guest's memory (:attr:`memory`) and its p2m table
    (:attr:`p2m`, read-only); leaving the block disables the ring, even when
    the block raised.  Its :attr:`domctl` is the :class:`Domctl` of its
    domain on the connection that owns the ring.  It is meant for one task
    reading :meth:`requests`; domctls may come from any task of the same loop.
    """

    def __init__(self, domid: int, ring: RingKind = RingKind.paging, *, run_dir: str | None = None,
                 disable_on_exit: bool = True) -> None:
        self.domid = domid
        #: The domain's domctls on the connection that owns the ring (not connected outside an attachment).
        self.domctl = Domctl(domid)
        self._conn: ControlClient | None = None
        self._gone = False
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
        #: The event channel's persistent reader (installed at attach): it sets
        #: ``_kicked`` and wakes the one :meth:`requests` sleeping, if any.
        self._kicked = False
        self._wakeup: asyncio.Future[None] | None = None
        self._channel_gone = False
        self._watching = False
        #: A paging ring's load area (see :meth:`respond_with_page`): the whole map, and its words.
        self._load_view: memoryview | None = None
        self._load_words: memoryview | None = None

    # ------------------------------------------------------------------ life
    async def __aenter__(self) -> MemEventClient:
        await self.attach()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.detach(disable=self.disable_on_exit)

    async def attach(self) -> None:
        """Enable the ring (or re-attach to an orphaned one) and map it; what ``async with`` does on entry.

        Raises :class:`AttachError` (``EBUSY``: another daemon has the ring;
        ``ESRCH``: no such domain).
        """
        if self.state is not RunState.IDLE:
            raise StateError(f"attach() in state {self.state.value}")
        self.state = RunState.ATTACHING
        fds: list[int] = []
        try:
            self._conn = await ControlClient.connect(self.socket_path)
            self.domctl.use(self._conn)
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
            if "load" in named:  # a paging ring's load area: pages come in without a message
                load_map = mmap.mmap(named["load"], abi.load_area_size(reply.ring_size), mmap.MAP_SHARED)
                self._maps.append(load_map)
                self._load_view = memoryview(load_map)
                self._load_words = self._load_view[:abi.LOAD_WORD_SIZE * reply.ring_size].cast("Q")
            self.p2m = memoryview(p2m_map)
            codec = abi.entry_codec(reply.abi, reply.ring)
            self.sring = SharedRing(ring_map, codec, page_size=abi.ring_bytes(reply.ring_size, codec.size))
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

    async def detach(self, *, disable: bool = True, force: bool = False) -> None:
        """Leave the ring: disable it (a clean stop) or just let go (as a crash would).

        A clean stop first publishes responses still queued and has the
        hypervisor drain them (so no vCPU is left paused for an answer that was
        written but never seen), then disables.  Requests still unanswered at
        that point are logged: their vCPUs stay paused until the domain dies
        (Xen's rule, DESIGN section 5), so a daemon answers everything before
        it stops.  ``disable=False`` leaves the ring, and its requests, to the
        next daemon that attaches.  A paging ring with pages still out is left
        too, with a warning, unless ``force``: once it is disabled, a guest
        touching one of those pages crashes its domain, whereas a ring left
        orphaned waits for the pager that holds them.
        """
        if self.state in (RunState.DETACHED, RunState.IDLE):
            return
        self.state = RunState.DETACHING
        try:
            if self.gone:
                disable = False  # a domain that is gone has no ring to disable, nor pages to keep
            out = self.pages_out() if self.ring_kind == RingKind.paging and self.p2m is not None else 0
            if disable and out and not force:
                log.warning("dom%d: %d pages are still out: the paging ring is left for the pager that holds "
                            "them", self.domid, out)
                disable = False
            if disable and self._conn is not None:
                await self._drain_before_disable()
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

    async def _drain_before_disable(self) -> None:
        """Publish queued responses, have them consumed, and report what stays unanswered."""
        back, conn = self.back, self._conn
        if back is None or conn is None:
            return
        try:
            if self._queued:
                self._queued = 0
                back.push_responses()
            await conn.call(protocol.MemEventResume(domid=self.domid, ring=self.ring_kind))
        except (ControlError, OSError) as exc:
            log.debug("resume before disabling dom%d %s ring: %s", self.domid, self.ring_kind, exc)
            return
        left = (back.sring.req_prod - back.sring.rsp_prod) & abi.RING_IDX_MASK
        if left:
            log.warning("disabling dom%d %s ring with %d requests unanswered: their vCPUs stay paused",
                        self.domid, self.ring_kind, left)

    async def _teardown(self) -> None:
        if self._evtchn is not None:
            self._evtchn.close()  # and its reader
            self._evtchn = None
        self._watching = self._kicked = self._channel_gone = False
        if self.sring is not None:
            self.sring.release()
            self.sring = None
            self.back = None
        if self.p2m is not None:
            self.p2m.release()
            self.p2m = None
        if self._load_view is not None and self._load_words is not None:
            self._load_words.release()
            self._load_view.release()
            self._load_view = self._load_words = None
        for m in self._maps:
            m.close()
        self._maps = []
        self.memory = None
        if self._conn is not None:
            # Returns once the hypervisor has released the ring (a ring not
            # disabled is then orphaned): a successor may attach at once.
            await self._conn.hang_up()
            self._conn = None
            self.domctl.use(None)

    def _on_kick(self, _ports: set[int]) -> None:
        """The channel's reader: the hypervisor notified (it put requests, or woke us to look)."""
        self._kicked = True
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_channel_gone(self) -> None:
        """The hypervisor closed the channel (domain gone) or we closed it: wake a sleeper to notice."""
        self._channel_gone = True
        self._on_kick(set())

    async def _wait_kick(self) -> None:
        """Sleep until the hypervisor notifies (at once if it did since the last sleep).

        One reader for the channel's life, installed at the first sleep and
        removed with the channel: a sleep is a future on it, not a reader
        added to and removed from the loop each time.
        """
        if not self._watching:
            _, evtchn, _ = self._running()
            evtchn.watch(self._on_kick, on_close=self._on_channel_gone)
            self._watching = True
        if not self._kicked and not self._channel_gone:
            fut = self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                self._wakeup = None
        self._kicked = False
        if self._channel_gone:
            self.gone = True
            raise DomainGone(f"dom{self.domid} {self.ring_kind} ring: the hypervisor closed it", Errno.ESRCH)

    def _running(self) -> tuple[BackRing[MemEvent], EventChannel, ControlClient]:
        if self.state is not RunState.RUNNING or self.back is None or self._evtchn is None or self._conn is None:
            raise StateError(f"not attached (state {self.state.value})")
        return self.back, self._evtchn, self._conn

    async def open_domctl(self) -> Domctl:
        """Another connection for domctls on this domain (close it when done)."""
        self._running()
        return await Domctl.open(self.domid, self.socket_path)

    async def resume(self, ring: RingKind | None = None) -> None:
        """Make the hypervisor drain this ring's responses now (a domctl instead of a kick)."""
        await self.domctl.resume(self.ring_kind if ring is None else ring)

    @property
    def gone(self) -> bool:
        """The domain is gone (a domctl got ``ESRCH``, or the hypervisor closed the ring): nothing more to do."""
        return self._gone or self.domctl.gone

    @gone.setter
    def gone(self, value: bool) -> None:
        self._gone = value

    # -------------------------------------------------------------- requests
    def rewind_unanswered(self) -> int:
        """Consume again every request taken but not yet answered; how many.

        A daemon task cancelled between taking a batch and answering it leaves
        those requests consumed but unanswered; they are still in their slots
        (a slot only changes when its response is written), so going back to
        ``rsp_prod_pvt`` hands them out once more, as a restarted daemon would
        get them (:meth:`hvemu.ring.BackRing.attach`).
        """
        back, _, _ = self._running()
        n = back.free_responses()
        back.req_cons = back.rsp_prod_pvt
        return n

    def take_requests(self) -> RequestBatch:
        """Every request on the ring now (possibly none); never blocks."""
        back, _, _ = self._running()
        try:
            n = back.unconsumed_requests()
        except RingCorruptError as exc:
            raise SdkError(f"dom{self.domid} {self.ring_kind} ring is corrupt: {exc}") from exc
        return RequestBatch([back.get_request() for _ in range(n)])

    async def requests(self) -> AsyncIterator[RequestBatch]:
        """Batches of requests, forever: drain, final check, then sleep on the event channel.

        Each batch is everything the ring held when it was read.  When the
        ring is empty the iterator re-arms ``req_event`` and looks once more
        (``RING_FINAL_CHECK_FOR_REQUESTS``: a request put between the last
        look and the re-arm sent no notification), and only then sleeps.
        Answer a batch before asking for the next one if you can: requests
        hold ring slots until they are answered, and a full ring pauses vCPUs.
        Raises :class:`DomainGone` when the hypervisor closes the ring's event
        channel (the domain was destroyed or crashed, or the hypervisor stopped).
        A daemon that stages pages (:meth:`respond_with_page`) may get an
        empty batch: a staged page found no host memory, see :meth:`take_load_failures`.
        """
        told = False  # an empty batch was yielded for the load failures there are now
        while True:
            back, _, _ = self._running()
            batch = self.take_requests()
            if batch:
                yield batch
                continue
            if not told and self._load_failed():
                told = True
                yield batch  # empty: only pages staged with responses came back (take_load_failures)
                continue
            if back.final_check_for_requests():
                continue
            await self._wait_kick()
            told = False

    def respond(self, rsp: MemEvent) -> None:
        """Queue one response (it is not visible to the hypervisor until :meth:`push`).

        Responses need not come in request order: each names its vCPU and gfn.
        There can be at most one per consumed request (``OverflowError`` else).
        """
        back, _, _ = self._running()
        words = self._load_words
        if words is not None:
            words[back.rsp_prod_pvt & (back.size - 1)] = 0  # no page staged with this one
        back.put_response(rsp)
        self._queued += 1

    def respond_with_page(self, rsp: MemEvent, gfn: int, store: PageStore) -> None:
        """Queue ``rsp`` with ``gfn``'s page from ``store`` staged in the load area: the page-in in one step.

        When the hypervisor consumes the response (after :meth:`push`'s kick)
        it loads the page (allocate, copy, make ``ram_rw``) before it
        unpauses the vCPU: no domctl, no page in a message.  A store with
        ``read_into`` (a :class:`~pager.pagefile.Pagefile`) reads straight
        into the load area.  If the read fails (``OSError``) nothing is
        queued: do not answer that request yet (keep it and try again).  A
        page that found no host memory comes back from :meth:`take_load_failures`.
        """
        back, _, _ = self._running()
        words, view = self._load_words, self._load_view
        if words is None or view is None:
            raise StateError(f"the {self.ring_kind} ring has no load area (only a paging ring has one)")
        if back.free_responses() <= 0:
            raise OverflowError("more responses than requests consumed")
        slot = back.rsp_prod_pvt & (back.size - 1)
        off = abi.load_page_offset(slot)
        page = view[off:off + abi.PAGE_SIZE]
        try:
            read_into = getattr(store, "read_into", None)
            if read_into is not None:
                read_into(gfn, page)
            else:
                page[:] = store.read(gfn)
        finally:
            page.release()
        words[slot] = abi.load_word(gfn)  # after the page: the push's barrier publishes both with the response
        back.put_response(rsp)
        self._queued += 1

    @property
    def can_stage_pages(self) -> bool:
        """Has the ring a load area (a paging ring does): may :meth:`respond_with_page` be used?"""
        return self._load_words is not None

    def _load_failed(self) -> bool:
        words = self._load_words
        return words is not None and max(words) >= abi.LOAD_ENOMEM

    def staged(self) -> set[int]:
        """Gfns whose staged page the hypervisor has not consumed yet (its response is still on the ring).

        Do not load such a gfn by another path meanwhile: once it was loaded,
        written and paged out again, the staged copy would be stale.
        """
        words = self._load_words
        if words is None:
            return set()
        return {w - 1 for w in words if w and w < abi.LOAD_ENOMEM}

    def take_load_failures(self) -> list[int]:
        """Gfns whose staged page found no host memory (the hypervisor marked them): load them yourself.

        Their responses were consumed (their vCPUs wait on the gfn); make
        room, then load each with :meth:`load` (or :meth:`prep` and
        :meth:`fill`), which wakes them.  Cheap when there are none.
        """
        words = self._load_words
        if words is None or not self._load_failed():
            return []
        out = []
        for slot, word in enumerate(words):
            if word >= abi.LOAD_ENOMEM:
                words[slot] = 0
                out.append((word & ~abi.LOAD_ENOMEM) - 1)
        return out

    def respond_all(self, batch: Sequence[MemEvent]) -> None:
        """Queue :func:`response_for` every request of ``batch``."""
        for req in batch:
            self.respond(response_for(req))

    @property
    def outstanding(self) -> int:
        """Requests consumed (handed out by :meth:`requests`) and not answered yet."""
        back, _, _ = self._running()
        return back.free_responses()

    def unanswered(self) -> int:
        """Requests on the ring with no published response (consumed or not): what a
        disable now would leave waiting forever."""
        back, _, _ = self._running()
        return (back.sring.req_prod - back.sring.rsp_prod) & abi.RING_IDX_MASK

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

    def fill(self, gfn: int, store: PageStore) -> None:
        """Copy ``gfn``'s page from ``store`` straight into the guest's frame: the one copy of a page-in.

        Only for a gfn whose :meth:`prep` just succeeded (its frame is there,
        and the gfn stays ``ram_paging_in`` until a response makes it
        ``ram_rw``).  A store with ``read_into`` (a :class:`~pager.pagefile.Pagefile`)
        reads into the mapping itself, so the kernel copies the page once; a
        failure (``OSError``: a short read, the store's disk, the frame's host
        memory) leaves the frame invalid: then do *not* respond for that gfn
        (a response would make the frame ``ram_rw``, bytes and all); keep the
        request and fill it again later.
        """
        if self.memory is None:
            raise StateError("not attached")
        off = gfn * abi.PAGE_SIZE
        if not 0 <= gfn < self.gfns:
            raise ValueError(f"gfn {gfn} is outside dom{self.domid}")
        with memoryview(self.memory) as mem:
            frame = mem[off:off + abi.PAGE_SIZE]
            try:
                read_into = getattr(store, "read_into", None)
                if read_into is not None:
                    read_into(gfn, frame)
                else:
                    frame[:] = store.read(gfn)
            finally:
                frame.release()

    def kick(self) -> None:
        """Notify the hypervisor unconditionally (e.g. after re-attaching)."""
        _, evtchn, _ = self._running()
        evtchn.notify()

    # ----------------------------------------------------------- p2m reading
    def p2m_type(self, gfn: int) -> int:
        """The gfn's :class:`~hvemu.abi.P2MType` now (the hypervisor may change it any time)."""
        if self.p2m is None:
            raise StateError("not attached")
        return self.p2m[abi.p2m_type_index(self.gfns, gfn)]

    def p2m_access(self, gfn: int) -> int:
        """The gfn's :class:`~hvemu.abi.P2MAccess` now."""
        if self.p2m is None:
            raise StateError("not attached")
        return self.p2m[abi.p2m_access_index(self.gfns, gfn)]

    def p2m_types(self) -> bytes:
        """A snapshot of the p2m type array, one byte per gfn (one copy, at C speed)."""
        if self.p2m is None:
            raise StateError("not attached")
        start = abi.p2m_type_index(self.gfns, 0)
        return bytes(self.p2m[start:start + self.gfns])

    def gfns_view(self, p2mt: abi.P2MType, types: bytes | None = None) -> GfnsOfType:
        """The gfns of type ``p2mt`` now, as a sequence that lists them only if indexed or iterated.

        What eviction passes to a victim policy once per batch: counting,
        membership, a clock hand's walk and random sampling cost a scan in C
        or a few probes, not a list of the whole guest (:mod:`pager.gfns`).
        ``types`` reuses a snapshot from :meth:`p2m_types`.
        """
        return GfnsOfType(self.p2m_types() if types is None else types, int(p2mt))

    def gfns_of_type(self, p2mt: abi.P2MType) -> list[int]:
        """Every gfn whose p2m type is ``p2mt``, ascending."""
        return self.gfns_view(p2mt).as_list()

    def pages_out(self) -> int:
        """Gfns paged out or on their way back in (their bytes are not in guest memory)."""
        return pages_out(self.p2m_types())

    async def stored_pages_out(self) -> int:
        """Pages out (paged, or on their way back) whose bytes a pager stored; 0 if none was ever evicted.

        What a pager attaching must find in its store.  A domain created
        larger than the host budget starts with gfns paged out that were
        never written anywhere (they read as zeros): those need no store.
        """
        out = self.pages_out()
        evicted = (await self.domctl.stats()).get("evicted", 0) if out else 0
        return out if isinstance(evicted, int) and evicted > 0 else 0

    def count_type(self, p2mt: abi.P2MType) -> int:
        """How many gfns have the p2m type ``p2mt`` now."""
        return self.p2m_types().count(int(p2mt))
