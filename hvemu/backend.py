"""The OS resources behind each domain, and the effects of the core on them.

The core (:mod:`hvemu.core`) decides; this module *does*: it owns the shared
memory segments (guest memory, p2m table, in-flight table, ring pages), the
event channels, and the vCPUs' blocked exits, and it carries out the core's
effects: punch holes for released frames, kick event channels, resume blocked
vCPUs, fail the exits of a crashed domain.  It also performs the access
guarantee's shootdown (see :mod:`guest.memory` for the guest half).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable

from hvemu import abi
from hvemu.core.effects import DomainCrashed, Effect, FramesReleased, RingNotify, VcpuRunnable
from hvemu.core.errors import HypervisorError
from hvemu.core.hypervisor import Domain, Hypervisor
from hvemu.evtchn import EventChannel
from hvemu.histogram import Histogram
from hvemu.ring import mb
from hvemu.shm import Segment

log = logging.getLogger("hvemu.backend")

#: How long a shootdown waits for a vCPU to leave a page before the domain is
#: crashed (a guest stuck mid-access, e.g. SIGSTOPped, cannot hold the host).
SHOOTDOWN_TIMEOUT = 10.0
#: Loop turns a shootdown waits without sleeping, then how long it sleeps between looks.
SHOOTDOWN_SPINS = 64
SHOOTDOWN_POLL = 0.001


class RingBackend:
    """One enabled mem_event ring: its page, its event channel, its daemon.

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
        self._owner_pidfd = -1

    def set_owner(self, owner: object, pid: int, on_exit: Callable[[], object]) -> None:
        """``owner`` (a connection of process ``pid``) owns the ring; ``on_exit()`` runs when ``pid`` exits."""
        self.clear_owner()
        self.owner = owner
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
        asyncio.get_running_loop().add_reader(fd, on_exit)

    def clear_owner(self) -> None:
        """No daemon owns the ring (orphaned, or about to be closed)."""
        self.owner = None
        fd, self._owner_pidfd = self._owner_pidfd, -1
        if fd >= 0:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def new_channel(self) -> int:
        """A fresh event channel pair; returns the remote fd to hand to the daemon."""
        self.close_channel()
        local, remote = EventChannel.pair(self.port)
        self.evtchn = local
        return remote.detach()

    def close_channel(self) -> None:
        if self.evtchn is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.evtchn.fileno())
            self.evtchn.close()
            self.evtchn = None

    def close(self) -> None:
        self.clear_owner()
        self.close_channel()
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
        #: Blocked exits: the future resolves when the vCPU may run again.
        self.waiters: dict[int, asyncio.Future[None]] = {}
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

    def fail_waiters(self, exc: BaseException) -> None:
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiters.clear()

    def close(self) -> None:
        self.fail_waiters(HypervisorError(abi.Errno.ESRCH, f"domain {self.domid} is gone"))
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
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
            fut = be.waiters.pop(eff.vcpu_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
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
