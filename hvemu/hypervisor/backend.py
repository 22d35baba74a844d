"""The OS resources behind each domain, and the effects of the core on them.

The core (:mod:`hvemu.core`) decides; this module *does*: it owns the shared
memory segments (guest memory, p2m table, in-flight table, ring pages), the
event channels, and the vCPUs' blocked exits, and it carries out the core's
effects: punch holes for released frames, kick event channels, resume blocked
vCPUs, fail the exits of a crashed domain.  It also performs the access
guarantee's shootdown (see :mod:`guest.memory` for the guest half).

vCPU exits arrive on the domain's exit page (Xen's ioreq page, laid out in
:mod:`hvemu.abi`) with one event channel per vCPU: :class:`VcpuExits` takes an
exit out of its slot and answers it there.  Which vCPU has an exit in process
is kept here, never read back from the page, so whatever a guest writes on it
only ever reaches the core as the validated arguments of one of its own
vCPUs' exits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from hvemu import abi, readiness
from hvemu.abi import (
    EXIT_ACCESS,
    IOREQ_INPROCESS,
    IOREQ_READY,
    IOREQ_RESP_READY,
    RESULT_ERROR,
    RESULT_OK,
    RESULT_TRAP_INJECTED,
)
from hvemu.core.effects import DomainCrashed, Effect, FramesReleased, RingNotify, VcpuRunnable
from hvemu.core.errors import HypervisorError
from hvemu.core.hypervisor import Domain, Hypervisor
from hvemu.evtchn import EventChannel
from hvemu.histogram import Histogram
from hvemu.hypervisor.shm import Segment
from hvemu.ring import FrontRing, mb

log = logging.getLogger("hvemu.hypervisor.backend")

#: How long a shootdown waits for a vCPU to leave a page before the domain is
#: crashed (a guest stuck mid-access, e.g. SIGSTOPped, cannot hold the host).
SHOOTDOWN_TIMEOUT = 10.0
#: Loop turns a shootdown waits without sleeping, then how long it sleeps between looks.
SHOOTDOWN_SPINS = 64
SHOOTDOWN_POLL = 0.001


_RING_MASK = abi.RING_IDX_MASK
_PAGING = int(abi.MemEventType.PAGING)
_DROP_PAGE = int(abi.MemEventFlag.DROP_PAGE)


class RingBackend:
    """One enabled mem_event ring: its page, its event channel, its daemon (and a paging ring's load area).

    A ring belongs to its daemon for as long as both the daemon's control
    connection and the daemon's *process* live.  The connection alone is not
    enough: its fd can outlive the process (queued in a socket buffer, held
    by a child), and a ring owned by a dead daemon refuses every successor
    with ``EBUSY`` until the domain dies.  So the owner's process is watched
    with a pidfd (readable once the process has exited).
    """

    def __init__(self, domid: int, kind: abi.RingKind, port: int) -> None:
        self.domid = domid
        self.kind = kind
        self.port = port
        self.page = Segment(abi.PAGE_SIZE, tag=f"d{domid}-{kind}")
        self.evtchn: EventChannel | None = None
        #: The control connection of the daemon that owns the ring (None: orphaned).
        self.owner: object | None = None
        #: The owner's pid, as its connection's peer credentials gave it (0: orphaned, or not known).
        self.owner_pid = 0
        #: A paging ring's load area (:mod:`hvemu.abi`: one staged page per ring slot), and its views.
        self.load: Segment | None = None
        self._load_view: memoryview | None = None
        self._load_words: memoryview | None = None
        self._owner_pidfd = -1

    def set_owner(self, owner: object, pid: int, on_exit: Callable[[], object],
                  on_error: Callable[[BaseException], object]) -> None:
        """``owner`` (a connection of process ``pid``) owns the ring; ``on_exit()`` runs when ``pid`` exits.

        ``on_error`` gets what ``on_exit`` raises (:func:`hvemu.readiness.add_reader`).
        """
        self.clear_owner()
        self.owner = owner
        self.owner_pid = max(pid, 0)
        if pid <= 0:  # SO_PEERCRED gives 0 for a peer in another pid namespace: nothing to watch
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            asyncio.get_running_loop().call_soon(on_exit)  # gone already (the connection lives on)
            return
        except OSError as exc:
            log.warning("dom%d %s ring: cannot watch daemon pid %d (%s): the ring is released only when its "
                        "connection closes", self.domid, self.kind, pid, exc)
            return
        self._owner_pidfd = fd
        readiness.add_reader(fd, on_exit, on_error)

    def clear_owner(self) -> None:
        """No daemon owns the ring (orphaned, or about to be closed)."""
        self.owner = None
        self.owner_pid = 0
        fd, self._owner_pidfd = self._owner_pidfd, -1
        if fd >= 0:
            readiness.notify_closing(fd)
            os.close(fd)

    def open_load_area(self, slots: int) -> None:
        self.load = Segment(abi.load_area_size(slots), tag=f"d{self.domid}-load")
        self._load_view = memoryview(self.load.map)
        self._load_words = self._load_view[:abi.LOAD_WORD_SIZE * slots].cast("Q")

    def resume(self, dom: Domain, memory: Segment) -> bool:
        """``mem_event_resume`` of this ring, loading the pages staged with the responses it consumes.

        Returns True if a staged page found no host memory (the caller kicks
        the daemon).  The pages of the responses published by now are loaded
        first, so that it is the response that makes its vCPU run, after its
        page is in.  The resume's final check may consume responses the
        daemon pushed meanwhile: their pages are loaded right after, before
        any vCPU runs again (one resumed by such a response finds its gfn
        still on its way in and waits on it, as Xen's vCPU re-executes).
        """
        med = dom.rings[self.kind]
        front = med.front
        if self._load_words is None or front is None or dom.crashed:
            dom.mem_event_resume(self.kind)
            return False
        first = front.rsp_cons
        avail = (front.sring.rsp_prod - first) & _RING_MASK
        enomem = False
        if avail and avail <= (front.req_prod_published - first) & _RING_MASK:
            # (More than was asked for: the core's resume calls the ring corrupt; nothing is loaded.)
            mb()  # ring.h's rmb(): the responses (and their staged pages) after rsp_prod
            enomem = self._load_slots(dom, memory, front, first, avail)
        dom.mem_event_resume(self.kind)
        if med.front is front and not dom.crashed:
            consumed = (front.rsp_cons - first) & _RING_MASK
            if consumed > avail:
                enomem |= self._load_slots(dom, memory, front, first, consumed)
        return enomem

    def _load_slots(self, dom: Domain, memory: Segment, front: FrontRing[abi.MemEvent], idx: int,
                    count: int) -> bool:
        """Load the page staged in each of ``count`` response slots from ``idx``; True if one found no memory.

        Each staged page goes through ``p2m_mem_paging_load`` (allocate, copy
        from the load area, retype; a failed copy or no memory changes
        nothing) and its word is cleared, or marked ``LOAD_ENOMEM`` for the
        daemon.  Nothing here trusts the daemon: a word that does not name
        its response's gfn is dropped, and the load refuses any gfn that is
        not on its way in.
        """
        words, view = self._load_words, self._load_view
        assert words is not None and view is not None
        size = front.size
        enomem = False
        read_entry = front.sring.read_entry
        for _ in range(count):
            slot = idx & (size - 1)
            word = words[slot]
            if word and word < abi.LOAD_ENOMEM:
                words[slot] = 0
                rsp = read_entry(idx)
                if rsp.type == _PAGING and not rsp.flags & _DROP_PAGE and word == rsp.gfn + 1:
                    off = abi.load_page_offset(slot)
                    page = view[off:off + abi.PAGE_SIZE]
                    try:
                        result = dom.paging_load([rsp.gfn], functools.partial(_fill_from, memory, page))
                    except HypervisorError as exc:
                        log.warning("domain %d: staged load of gfn %#x: %s", self.domid, rsp.gfn, exc)
                        result = [exc.errno]
                    finally:
                        page.release()
                    if result[0] == abi.Errno.ENOMEM:
                        words[slot] = abi.LOAD_ENOMEM | word
                        enomem = True
            idx = (idx + 1) & _RING_MASK
        return enomem

    def new_channel(self, on_kick: Callable[[], None], on_hangup: Callable[[], None],
                    on_error: Callable[[BaseException], object]) -> int:
        """A fresh event channel pair, watched; returns the remote fd to hand to the daemon.

        ``on_kick()`` runs when the daemon notifies, ``on_hangup()`` once when
        its end is gone (the channel stops being read then), ``on_error`` gets
        what either raises (:meth:`hvemu.evtchn.EventChannel.watch`).
        """
        self.close_channel()
        local, remote = EventChannel.pair(self.port)
        try:
            local.watch(lambda _ports: on_kick(), on_close=on_hangup, on_error=on_error)
        except BaseException:
            local.close()
            remote.close()
            raise
        self.evtchn = local
        return remote.detach()

    def close_channel(self) -> None:
        if self.evtchn is not None:
            self.evtchn.unwatch()  # closing it here is no hang-up of the daemon's
            self.evtchn.close()
            self.evtchn = None

    def close(self) -> None:
        self.clear_owner()
        self.close_channel()
        self.page.close()
        if self.load is not None:
            assert self._load_words is not None and self._load_view is not None
            self._load_words.release()
            self._load_view.release()
            self.load.close()
            self.load = None


class Exit(NamedTuple):
    """One vCPU exit, copied out of its slot (operands as :mod:`hvemu.abi` lays them out)."""

    kind: int
    a: int
    gla: int | None
    c: int
    d: int


_NO_EXIT = 0


class VcpuExits:
    """A domain's exit page and its vCPUs' event channels (the hypervisor's end).

    ``take(vcpu)`` copies a READY slot out (once: the guest may go on
    scribbling on the page, the copy is what is handled) and marks the exit
    in process; ``answer(vcpu, ...)`` writes the response, stores RESP_READY
    and kicks the vCPU.  Both are plain calls from the hypervisor's reader
    callback and from the effect that makes a vCPU runnable: no task, no
    future per exit.
    """

    def __init__(self, domid: int, max_vcpus: int) -> None:
        self.page = Segment(abi.ioreq_page_size(max_vcpus), tag=f"d{domid}-ioreq")
        self._view = memoryview(self.page.map)
        self._states = self._view.cast("I")
        #: Per vCPU: the ExitType of the exit in process (0: none), private to the hypervisor.
        self.in_process = [_NO_EXIT] * max_vcpus
        #: When each exit in process was taken (perf_counter_ns), for the fault latency.
        self.started = [0] * max_vcpus
        self.channels: dict[int, EventChannel] = {}
        #: Exits taken while their vCPU was paused (a hypercall of its own under way, a tool's
        #: pause): a paused vCPU executes nothing, so each runs once its vCPU runs again.
        self.deferred: dict[int, Exit] = {}
        #: vCPUs of deferred exits that the core made runnable: the driver runs their exits now.
        self.runnable_deferred: list[int] = []

    def bind(self, vcpu: int, port: int, on_kick: Callable[[int], None],
             on_error: Callable[[BaseException], object]) -> int:
        """A fresh event channel for ``vcpu``, watched by ``on_kick(vcpu)``; returns the guest's end.

        ``on_error`` gets what ``on_kick`` raises (:func:`hvemu.readiness.add_reader`).
        """
        self.unbind(vcpu)
        local, remote = EventChannel.pair(port)
        try:
            local.watch(lambda _ports: on_kick(vcpu), on_error=on_error)
        except BaseException:
            local.close()
            remote.close()
            raise
        self.channels[vcpu] = local
        return remote.detach()

    def unbind(self, vcpu: int) -> None:
        """Close ``vcpu``'s channel (its reader goes with it); an exit in process stays in process."""
        chan = self.channels.pop(vcpu, None)
        if chan is not None:
            chan.close()

    def take(self, vcpu: int) -> Exit | None:
        """The exit in ``vcpu``'s slot, now in process; None if there is none to take.

        A kick while an exit of that vCPU is already in process, or with a
        slot that is not READY, is spurious (or a guest breaking the
        protocol): nothing happens, the vCPU only delays itself.
        """
        if self.in_process[vcpu]:
            return None
        off = abi.ioreq_slot_offset(vcpu)
        state, kind, a, gla, c, d, flags = abi.ioreq_unpack_slot(bytes(self._view[off:off + abi.IOREQ_RESPONSE_OFFSET]))
        if state != IOREQ_READY:
            return None
        self._states[abi.ioreq_state_word(vcpu)] = IOREQ_INPROCESS
        self.in_process[vcpu] = kind or -1  # a type of 0 is still an exit in process (refused as EINVAL)
        self.started[vcpu] = time.perf_counter_ns()
        return Exit(kind, a, gla if flags & abi.EXIT_GLA_VALID else None, c, d)

    def answer(self, vcpu: int, result: int = RESULT_OK, value: int = 0) -> None:
        """Write the response of ``vcpu``'s exit in process, store RESP_READY and kick the vCPU."""
        self.in_process[vcpu] = _NO_EXIT
        abi.ioreq_pack_response(self._view, vcpu, result, value)
        self._states[abi.ioreq_state_word(vcpu)] = IOREQ_RESP_READY
        chan = self.channels.get(vcpu)
        if chan is not None and not chan.closed:
            chan.notify()

    def resumed(self, vcpu: int, trap: int | None) -> None:
        """The vCPU may run: answer Ok, or with the trap a tool injected meanwhile."""
        if trap is None:
            self.answer(vcpu)
        else:
            self.answer(vcpu, RESULT_TRAP_INJECTED, trap)

    def refuse(self, vcpu: int, errno: abi.Errno) -> None:
        self.answer(vcpu, RESULT_ERROR, abi.ERRNO_NUMBERS[errno])

    def fail_all(self, errno: abi.Errno) -> None:
        """Refuse every exit in process (the domain crashed or is going)."""
        self.deferred.clear()
        self.runnable_deferred.clear()
        for vcpu, kind in enumerate(self.in_process):
            if kind:
                self.refuse(vcpu, errno)

    def close(self) -> None:
        for vcpu in list(self.channels):
            self.unbind(vcpu)
        self._states.release()
        self._view.release()
        self.page.close()


class DomainBackend:
    """Segments, rings, guest connections and blocked exits of one domain."""

    def __init__(self, dom: Domain, memory: Segment, p2m: Segment, inflight: Segment, handle: str) -> None:
        self.dom = dom
        self.domid = dom.domid
        #: The domain handle (:class:`hvemu.protocol.DomainCreate`): names this instance of the domain.
        self.handle = handle
        self.memory = memory
        self.p2m = p2m
        self.inflight = inflight
        self._inflight_words = memoryview(inflight.map)[: abi.INFLIGHT_WORD_SIZE * dom.max_vcpus].cast("Q")
        self.rings: dict[abi.RingKind, RingBackend] = {}
        self.guest: object | None = None
        self.vcpu_conns: dict[int, object] = {}
        #: Blocked exits of the control socket: the future resolves when the vCPU may run again.
        self.waiters: dict[int, asyncio.Future[None]] = {}
        #: The exit page and the vCPUs' event channels (exits without the control socket).
        self.exits = VcpuExits(dom.domid, dom.max_vcpus)
        self.target = dom.gfns
        self.faults = 0
        #: Hypervisor-observed time a faulting vCPU stayed paused (exit to resume), ns.
        self.fault_latency = Histogram()
        self.created = time.time()

    async def shootdown(self, gfns: Iterable[int]) -> bool:
        """Wait until no vCPU is inside an access to any of ``gfns`` (their p2m already changed)."""
        mb()
        words = self._inflight_words
        wanted = {g + 1 for g in gfns}
        if not wanted:
            return True
        deadline = 0.0
        spins = 0
        while any(w in wanted for w in words):
            if not deadline:
                deadline = time.monotonic() + SHOOTDOWN_TIMEOUT
            elif time.monotonic() > deadline:
                return False
            # A vCPU leaves a page within microseconds: yield a few times, then
            # poll gently, so that a guest that never leaves cannot pin a host CPU.
            spins += 1
            await asyncio.sleep(0 if spins <= SHOOTDOWN_SPINS else SHOOTDOWN_POLL)
            mb()
        return True

    def vcpu_runnable(self, vcpu: int) -> None:
        """The core made ``vcpu`` runnable: resume its blocked exit, whichever path it came by."""
        fut = self.waiters.pop(vcpu, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        exits = self.exits
        if vcpu in exits.deferred:
            exits.runnable_deferred.append(vcpu)  # its exit has not run yet: the driver runs it
        elif exits.in_process[vcpu]:
            if exits.in_process[vcpu] == EXIT_ACCESS:
                self.fault_latency.record(time.perf_counter_ns() - exits.started[vcpu])
            exits.resumed(vcpu, self.dom.take_pending_trap(vcpu))

    def fail_waiters(self, exc: BaseException) -> None:
        if isinstance(exc, HypervisorError):
            self.exits.fail_all(exc.errno)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiters.clear()

    def close(self) -> None:
        self.fail_waiters(HypervisorError(abi.Errno.ESRCH, f"domain {self.domid} is gone"))
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.exits.close()
        self._inflight_words.release()
        for seg in (self.memory, self.inflight, self.p2m):
            seg.close()


def apply_effects(hv: Hypervisor, backends: dict[int, DomainBackend]) -> list[DomainCrashed]:
    """Carry out everything the core asked for since the last call."""
    crashed: list[DomainCrashed] = []
    effects: list[Effect] = hv.take_effects()
    for eff in effects:
        be = backends.get(eff.domid)
        if be is None:
            continue
        if isinstance(eff, VcpuRunnable):
            be.vcpu_runnable(eff.vcpu_id)
        elif isinstance(eff, RingNotify):
            ring = be.rings.get(eff.ring)
            if ring is not None and ring.evtchn is not None:
                ring.evtchn.notify()
        elif isinstance(eff, FramesReleased):
            for start, length in _runs(eff.gfns):
                be.memory.release_range(start * abi.PAGE_SIZE, length * abi.PAGE_SIZE)
        elif isinstance(eff, DomainCrashed):
            # The core logged the crash (at ERROR, with its reason): once is enough.
            be.fail_waiters(HypervisorError(abi.Errno.ESRCH, f"domain {eff.domid} crashed: {eff.reason}"))
            crashed.append(eff)
    return crashed


def _fill_from(memory: Segment, page: memoryview, gfn: int) -> None:
    """Copy a staged page into ``gfn``'s new frame, through the fd (see :class:`hvemu.hypervisor.shm.PosixSegment`)."""
    memory.pwrite(gfn * abi.PAGE_SIZE, page)


def _runs(gfns: Iterable[int]) -> list[tuple[int, int]]:
    """Coalesce gfns into (start, length) runs, so one madvise covers each run."""
    ordered = sorted(set(gfns))
    if ordered and ordered[-1] - ordered[0] + 1 == len(ordered):
        return [(ordered[0], len(ordered))]  # one run (a clock pager's batch): no per-gfn loop
    out: list[tuple[int, int]] = []
    for g in ordered:
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((g, 1))
    return out
