"""Hostile ring fuzzing: a daemon that writes anything into its ring page and event channel.

The harness is, for a *victim* domain, both its guest (vCPU exits that pause
vCPUs) and the daemon of one of its rings (``MemEventEnable`` over a tool
connection, the ring page mapped writable): the paging ring (requests from
foreign mappings and from vCPUs touching paged gfns) or the access ring
(violations that pause, ``n2rwx`` events that do not, synchronous INT3
traps).  Each case puts a few requests on the ring, then writes what a buggy or
hostile daemon might: responses with bad vCPU ids, gfns out of range or not
being paged in, unknown flags and reserved bits, duplicates, random slots,
``rsp_prod`` far ahead or behind, garbage in ``req_event``/``req_prod`` (a crash: only the hypervisor writes it)/the
pad, a whole random page, notification floods, odd datagrams and fds on the
event channel, a re-attach over unpublished responses, a disable with
requests outstanding.  Pages staged in the paging ring's load area (issue
13) are fuzzed too: words naming the right gfn, another gfn, garbage or the
hypervisor's own ``LOAD_ENOMEM`` mark, beside valid and invalid responses;
exactly the pages the contract says are loaded come in, with the staged
bytes, and every word the hypervisor looked at is cleared.  Round 2 (issue 14) adds the life of the ring and the
fds around it: a hang-up datagram then traffic on the dead channel, the
daemon's own sockets and segments sent over its event channel, datagrams
naming other ports, ``ftruncate``/seals/``/proc`` reopen on its fds, a
graceful detach and an immediate re-attach, a half-close (``SHUT_WR``) of its
control connection, both rings of the domain at once, and a successor daemon
process that dies holding the ring in every way it can (the next one must
still get it, with every request).  The hypervisor's memory and fds are
sampled every 50 cases and their trend reported.

An oracle (:class:`Oracle`) reads the bytes actually on the page when the
hypervisor is told to resume, applies the contract's rules (DESIGN sections
5 and 6: validation, stale responses, counted event pauses, corrupt indices)
and predicts every counter; the hypervisor's ``Stats`` must match exactly,
exactly the vCPUs it predicts must run again, and a corrupt ring must crash
the victim (and only it) with the reason logged.  Meanwhile a bystander
domain (real pager, real guest verifying every page) keeps running rounds;
at the end the hypervisor is alive, the bystander had no failure and the
hypervisor holds no more fds than before.

``HVEMU_FUZZ_CASES`` sets the number of cases (default 150),
``HVEMU_FUZZ_SEED`` replays a run.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import mmap
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, MemEventCodec, MemEventFlag, P2MType, RingKind
from hvemu.client import ControlClient, ControlError
from hvemu.evtchn import EventChannel
from hvemu.ring import SharedRing
from tests.integration.hostile import FUZZ_CASES_ENV, Bystander, Trend, env_count, env_seed, open_fds
from tests.integration.system import ROOT, Hypervisor, stats

MASK = abi.RING_IDX_MASK
_PORT = struct.Struct("<I")
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
GFNS = 64
ECHO = int(MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL | MemEventFlag.FOREIGN)
#: Counters the oracle predicts (ring counters, plus the domain's paged_in).
COUNTED = ("responses", "responses_rejected", "responses_unknown_bits", "responses_dummy", "responses_loaded",
           "responses_stale", "unpause_ignored")
KINDS = {
    "valid": 6, "fields": 10, "duplicate": 4, "random_slots": 4, "rsp_ahead": 2, "rsp_back": 2,
    "header": 3, "whole_page": 3, "flood": 2, "evtchn_junk": 2, "reattach": 2, "disable": 1,
    # Round 2 (issue 14): the life of the ring and the fds around it.
    "hangup": 1, "own_fds": 1, "other_ports": 1, "fd_abuse": 1, "reattach_now": 1, "shut_wr": 1,
    "both_rings": 1, "dead_daemon": 0.3,
    # Issue 13: the load area beside the paging ring.
    "load_area": 4,
}
#: Sample the hypervisor's memory and fds every this many cases (the trend is reported).
SAMPLE_EVERY = 50


class CaseFailure(AssertionError):
    pass


@dataclass
class Prediction:
    crash: bool = False
    #: The daemon re-initialised an idle ring (``SHARED_RING_INIT``): both ends start again at 0.
    fresh: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    paged_in: int = 0
    runnable: set[int] = field(default_factory=set)
    #: Gfns whose staged page the hypervisor must load (ring slot -> gfn).
    loads: dict[int, int] = field(default_factory=dict)
    #: Ring slots whose load word the hypervisor must clear.
    cleared: set[int] = field(default_factory=set)


class Victim:
    """One victim domain: the harness is its guest and its paging daemon."""

    def __init__(self, hv: Hypervisor, rng: random.Random, vcpus: int, kind: RingKind = RingKind.paging) -> None:
        self.hv = hv
        self.rng = rng
        self.vcpus = vcpus
        #: The ring under attack: paging (foreign and vCPU populates) or access (violations, traps).
        self.kind = kind
        self.domid = -1
        self.tool: ControlClient | None = None
        self.daemon: ControlClient | None = None
        self.guest: ControlClient | None = None
        self.vcpu_conns: list[ControlClient] = []
        self.tasks: dict[int, asyncio.Task[object]] = {}
        self.event_pause = [0] * vcpus
        self.prepped: set[int] = set()
        self.requests: dict[int, bytes] = {}
        self.rsp_cons = 0
        self.req_prod = 0
        self.crashed = False
        self._ring_map: mmap.mmap | None = None
        self._p2m_map: mmap.mmap | None = None
        self.sring: SharedRing[MemEvent] | None = None
        self.evtchn: EventChannel | None = None
        self.evsock: socket.socket | None = None
        self.ring_size = 0
        #: The ring and p2m fds, kept open for the fd-level abuse.
        self.ring_fd = -1
        self.p2m_fd = -1
        #: The load words staged by the case under way, by response index from rsp_cons (for the oracle).
        self.staged_words: dict[int, int] = {}
        #: A paging ring's load area (a staged page per slot) and guest memory, read to check loads.
        self.load_map: mmap.mmap | None = None
        self.memory_map: mmap.mmap | None = None

    # ------------------------------------------------------------ life
    async def open(self) -> None:
        self.tool = await self.hv.tool()
        reply, _ = await self.tool.call(protocol.DomainCreate(max_vcpus=self.vcpus, gfns=GFNS, name="victim"))
        assert isinstance(reply, protocol.DomainCreated)
        self.domid = reply.domid
        self.guest = await ControlClient.connect(self.hv.socket)
        _, fds = await self.guest.call(protocol.GuestHello(domid=self.domid))
        for fd in fds:
            os.close(fd)
        for v in range(self.vcpus):
            c = await ControlClient.connect(self.hv.socket)
            self.vcpu_conns.append(c)
            await c.call(protocol.GuestHello(domid=self.domid, vcpu=v))
        await self.attach()
        if self.kind == RingKind.paging:
            await self.replenish()
        else:
            await self.tool.call(protocol.SetHvmParam(domid=self.domid, reason=int(abi.MemEventReason.INT3),
                                                      mode=abi.HVMPME_MODE_SYNC))

    async def attach(self) -> bool:
        self.daemon = await self.hv.tool()
        reply, fds = await self.daemon.call(protocol.MemEventEnable(domid=self.domid, ring=self.kind))
        assert isinstance(reply, protocol.MemEventEnabled)
        named = dict(zip(reply.fds, fds, strict=True))
        try:
            self.ring_size = reply.ring_size
            self._ring_map = mmap.mmap(named["ring"], abi.PAGE_SIZE, mmap.MAP_SHARED)
            self._p2m_map = self._p2m_map or mmap.mmap(named["p2m"], abi.p2m_table_size(GFNS), mmap.MAP_SHARED,
                                                       mmap.PROT_READ)
            self.sring = SharedRing(self._ring_map, MemEventCodec, page_size=abi.ring_bytes(reply.ring_size))
            self.evsock = socket.socket(fileno=named.pop("evtchn"))
            self.evtchn = EventChannel(self.evsock, reply.port)
            self.port = reply.port
            self._close_fds()
            self.ring_fd, self.p2m_fd = named.pop("ring"), named.pop("p2m")
            if "load" in named:
                self.load_map = mmap.mmap(named["load"], abi.load_area_size(reply.ring_size), mmap.MAP_SHARED)
            self.memory_map = self.memory_map or mmap.mmap(named["memory"], GFNS * abi.PAGE_SIZE,
                                                           mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            for name, fd in named.items():
                if name != "evtchn":
                    os.close(fd)
        return reply.reattached

    def _close_fds(self) -> None:
        for fd in (self.ring_fd, self.p2m_fd):
            if fd >= 0:
                os.close(fd)
        self.ring_fd = self.p2m_fd = -1

    def detach_ring(self) -> None:
        self._close_fds()
        if self.evtchn is not None:
            self.evtchn.close()
            self.evtchn = self.evsock = None
        if self.sring is not None:
            self.sring.release()
            self.sring = None
        if self._ring_map is not None:
            self._ring_map.close()
            self._ring_map = None
        if self.load_map is not None:
            self.load_map.close()
            self.load_map = None

    async def close(self) -> None:
        self.detach_ring()
        if self._p2m_map is not None:
            self._p2m_map.close()
            self._p2m_map = None
        if self.memory_map is not None:
            self.memory_map.close()
            self.memory_map = None
        for c in [self.daemon, self.guest, *self.vcpu_conns, self.tool]:
            if c is not None:
                await c.close()  # the guest's connection going away destroys the domain
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    # ------------------------------------------------------------ views
    def ptype(self, gfn: int) -> int:
        assert self._p2m_map is not None
        return self._p2m_map[abi.p2m_type_index(GFNS, gfn)]

    def ring(self) -> SharedRing[MemEvent]:
        assert self.sring is not None
        return self.sring

    def load_word(self, slot: int) -> int:
        """The load area's word of ring slot ``slot`` (0 without a load area)."""
        if self.load_map is None:
            return 0
        return int.from_bytes(self.load_map[slot * abi.LOAD_WORD_SIZE:(slot + 1) * abi.LOAD_WORD_SIZE], "little")

    def outstanding(self) -> int:
        return (self.req_prod - self.rsp_cons) & MASK

    def idle_vcpus(self) -> list[int]:
        return [v for v in range(self.vcpus) if v not in self.tasks and not self.event_pause[v]]

    async def stats(self) -> dict[str, object]:
        assert self.tool is not None
        return await stats(self.tool, self.domid)

    # ------------------------------------------------------------ making requests
    async def replenish(self) -> None:
        """Bring every gfn back, then page all of them out: a fresh pool of paged gfns."""
        assert self.tool is not None
        back = [g for g in range(GFNS) if self.ptype(g) != P2MType.ram_rw]
        if back:
            await self.tool.call(protocol.PagingLoad(domid=self.domid, gfns=back,
                                                     pages=[bytes(abi.PAGE_SIZE)] * len(back)))
        everything = list(range(GFNS))
        await self.tool.call(protocol.PagingNominate(domid=self.domid, gfns=everything))
        await self.tool.call(protocol.PagingEvict(domid=self.domid, gfns=everything))
        self.prepped.clear()

    def spent(self) -> bool:
        """An access victim whose vCPUs are all left paused and whose ring is empty can do no more."""
        return self.kind == RingKind.access and not self.idle_vcpus() and not self.outstanding()

    async def make_requests(self) -> None:
        if self.outstanding() >= 24:
            return
        before = self.req_prod
        self.last: list[object] = []
        if self.kind == RingKind.paging:
            await self._paging_requests()
        else:
            await self._access_requests()
        deadline = time.monotonic() + 10
        # (Only when something was put: a hostile case may have scribbled on req_prod since.)
        while self.req_prod != before and self.ring().req_prod != self.req_prod:
            if time.monotonic() > deadline:
                raise CaseFailure(f"{self.kind} ring: req_prod {self.ring().req_prod}, expected {self.req_prod} "
                                  f"after {self.last}; stats {await self.stats()}")
            await asyncio.sleep(0.001)
        i = before
        while i != self.req_prod:
            self.requests[i] = self.ring().read_slot(i)
            i = (i + 1) & MASK

    async def _access_requests(self) -> None:
        """Violations (vCPU paused), n2rwx events (not paused) and synchronous INT3 traps."""
        rng = self.rng
        assert self.tool is not None
        idle = self.idle_vcpus()
        chosen = rng.sample(idle, rng.randint(0 if self.outstanding() else 1, len(idle)))
        # One gfn each: a vCPU's exit may run after the next AccessSet, which must not be on its gfn.
        for v, gfn in zip(chosen, rng.sample(range(GFNS), len(chosen)), strict=True):
            what = rng.choice(["violation", "violation", "n2rwx", "int3"])
            msg: protocol.Msg
            if what == "int3":
                msg = protocol.GuestTrap(vcpu=v, reason=int(abi.MemEventReason.INT3), value=gfn, gla=gfn << 12)
            else:
                access = abi.P2MAccess.r if what == "violation" else abi.P2MAccess.n2rwx
                await self.tool.call(protocol.AccessSet(domid=self.domid, gfns=[gfn], access=int(access)))
                msg = protocol.GuestAccess(vcpu=v, gfn=gfn, access=abi.ACCESS_W, gla=(gfn << 12) | 0x10)
            self.last.append((what, v, gfn))
            task = asyncio.create_task(self.vcpu_conns[v].call(msg))
            self.req_prod = (self.req_prod + 1) & MASK
            if what == "n2rwx":
                await asyncio.wait_for(task, 10)  # reported, not paused
            else:
                self.tasks[v] = task
                self.event_pause[v] += 1

    async def _paging_requests(self) -> None:
        rng = self.rng
        paged = [g for g in range(GFNS) if self.ptype(g) == P2MType.ram_paged]
        if len(paged) < 12:
            await self.replenish()
            paged = list(range(GFNS))
        rng.shuffle(paged)
        idle = self.idle_vcpus()
        nvcpu = rng.randint(0, len(idle))
        nforeign = rng.randint(0 if nvcpu else 1, 4)
        assert self.tool is not None
        foreign = [paged.pop() for _ in range(nforeign)]
        if foreign:
            await self.tool.call(protocol.MapForeign(domid=self.domid, gfns=foreign))
            self.req_prod = (self.req_prod + len(foreign)) & MASK
        for v in rng.sample(idle, nvcpu):
            gfn = paged.pop()
            call = self.vcpu_conns[v].call(protocol.GuestAccess(vcpu=v, gfn=gfn, access=abi.ACCESS_R))
            self.tasks[v] = asyncio.create_task(call)
            self.event_pause[v] += 1
            self.req_prod = (self.req_prod + 1) & MASK

    def pending_requests(self) -> list[tuple[int, MemEvent]]:
        out = []
        i = self.rsp_cons
        while i != self.req_prod:
            out.append((i, MemEventCodec.decode(self.requests[i])))
            i = (i + 1) & MASK
        return out


class Oracle:
    """What the hypervisor must do with the bytes on the page (DESIGN sections 5 and 6)."""

    def __init__(self, victim: Victim) -> None:
        self.v = victim
        #: The p2m types before any response was written: the hypervisor may
        #: consume them as soon as they are published (a kick in flight).
        self.types = {g: victim.ptype(g) for g in range(GFNS)}
        #: The load words of the published responses' slots, read by the first prediction.
        self.words: dict[int, int] | None = None

    def predict(self, enomem: frozenset[int] = frozenset()) -> Prediction:
        """What the next resume does; ``enomem``: ring slots whose staged page found no host memory."""
        v = self.v
        sring = v.ring()
        if sring.req_prod != v.req_prod:  # only the hypervisor writes req_prod
            if sring.req_prod == 0 and sring.rsp_prod == 0 and not v.outstanding():
                return Prediction(fresh=True)
            return Prediction(crash=True)
        avail = (sring.rsp_prod - v.rsp_cons) & MASK
        if avail > v.outstanding():
            return Prediction(crash=True)
        p = Prediction()
        types = dict(self.types)
        prepped = set(v.prepped)
        pause = list(v.event_pause)
        # Staged pages load as their responses are consumed, whatever the
        # responses' other fields say: first every published slot's page, then the responses.
        if self.words is None:  # as staged: the hypervisor may have cleared them by now
            self.words = dict(v.staged_words) if v.staged_words else {
                k: v.load_word((v.rsp_cons + k) & (v.ring_size - 1)) for k in range(avail)}
        for k in range(avail):
            slot = (v.rsp_cons + k) & (v.ring_size - 1)
            word = self.words.get(k, 0)
            if not 0 < word < abi.LOAD_ENOMEM:
                continue
            p.cleared.add(slot)
            rsp = MemEventCodec.decode(sring.read_slot((v.rsp_cons + k) & MASK))
            gfn = word - 1
            if (rsp.type == abi.MemEventType.PAGING and not rsp.flags & MemEventFlag.DROP_PAGE and gfn == rsp.gfn
                    and gfn < GFNS and types[gfn] in (P2MType.ram_paged, P2MType.ram_paging_in)
                    and slot not in enomem):
                # p2m_mem_paging_load: the page comes in now (a prepared frame is kept, not filled).
                types[gfn] = P2MType.ram_rw
                p.paged_in += 1
                if gfn in prepped:
                    prepped.discard(gfn)
                else:
                    p.loads[slot] = gfn
        for k in range(avail):
            rsp = MemEventCodec.decode(sring.read_slot((v.rsp_cons + k) & MASK))
            p.counts["responses"] += 1
            if rsp.flags & ~abi.MEM_EVENT_KNOWN_FLAGS or rsp.reserved_bits:
                p.counts["responses_unknown_bits"] += 1  # ignored, as Xen does; the known bits count
                rsp.flags &= abi.MEM_EVENT_KNOWN_FLAGS
            if rsp.flags & MemEventFlag.DUMMY:
                p.counts["responses_dummy"] += 1
                continue
            paging = v.kind == RingKind.paging
            if rsp.vcpu_id >= v.vcpus or (paging and rsp.gfn >= GFNS):  # only paging checks the gfn
                p.counts["responses_rejected"] += 1
                continue
            if paging and not rsp.flags & MemEventFlag.DROP_PAGE:
                if types[rsp.gfn] == P2MType.ram_paging_in and rsp.gfn in prepped:
                    types[rsp.gfn] = P2MType.ram_rw
                    prepped.discard(rsp.gfn)
                    p.paged_in += 1
                elif types[rsp.gfn] == P2MType.ram_rw:
                    p.counts["responses_loaded"] += 1
                else:
                    p.counts["responses_stale"] += 1
            if rsp.flags & MemEventFlag.VCPU_PAUSED:
                if pause[rsp.vcpu_id]:
                    pause[rsp.vcpu_id] -= 1
                    p.runnable.add(rsp.vcpu_id)
                else:
                    p.counts["unpause_ignored"] += 1
        return p

    def commit(self, p: Prediction) -> None:
        v = self.v
        if p.crash:
            v.crashed = True
            return
        if p.fresh:
            v.req_prod = 0
        v.rsp_cons = v.ring().rsp_prod
        for g in list(v.prepped):
            if v.ptype(g) == P2MType.ram_rw:
                v.prepped.discard(g)
        for vcpu in p.runnable:
            v.event_pause[vcpu] -= 1


# ---------------------------------------------------------------------- mutations


def echo(req: MemEvent) -> MemEvent:
    return MemEvent(type=req.type, flags=req.flags & ECHO, vcpu_id=req.vcpu_id, gfn=req.gfn, p2mt=req.p2mt)


def mutate(rng: random.Random, rsp: MemEvent, vcpus: int) -> None:
    """Change one or more fields to something a broken daemon might write."""
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["vcpu", "gfn", "flags", "reserved", "type", "misc", "dummy", "drop", "unpause_other"])
        if what == "vcpu":
            rsp.vcpu_id = rng.choice([vcpus, vcpus + rng.randrange(64), MASK, rng.randrange(1 << 32),
                                      rng.randrange(vcpus)])
        elif what == "gfn":
            rsp.gfn = rng.choice([GFNS, GFNS + rng.randrange(1 << 20), (1 << 64) - 1, rng.randrange(1 << 64),
                                  rng.randrange(GFNS)])
        elif what == "flags":
            rsp.flags = rng.choice([rng.randrange(1 << 16), 1 << rng.randrange(5, 16),
                                    rsp.flags | (1 << rng.randrange(5, 16)), rng.randrange(32)])
        elif what == "reserved":
            rsp.reserved_bits = rng.randrange(1, 1 << 12)
        elif what == "type":
            rsp.type = rng.randrange(1 << 16)
        elif what == "misc":
            rsp.reason, rsp.p2mt = rng.randrange(1 << 16), rng.randrange(1 << 32)
            rsp.gla, rsp.offset = rng.randrange(1 << 64), rng.randrange(1 << 64)
            rsp.access_r, rsp.access_w, rsp.gla_valid = rng.random() < .5, rng.random() < .5, rng.random() < .5
        elif what == "dummy":
            rsp.flags |= MemEventFlag.DUMMY
        elif what == "drop":
            rsp.flags |= MemEventFlag.DROP_PAGE
        else:
            rsp.vcpu_id = rng.randrange(vcpus)
            rsp.flags |= MemEventFlag.VCPU_PAUSED


async def prep(victim: Victim, gfns: list[int]) -> None:
    assert victim.tool is not None
    gfns = sorted({g for g in gfns if g < GFNS and victim.ptype(g) == P2MType.ram_paging_in})
    if not gfns:
        return
    reply, _ = await victim.tool.call(protocol.PagingPrep(domid=victim.domid, gfns=gfns))
    assert isinstance(reply, protocol.BatchResult)
    victim.prepped.update(g for g, r in zip(gfns, reply.results, strict=True) if r is None)


def write_responses(victim: Victim, responses: list[MemEvent], publish: bool = True) -> None:
    sring = victim.ring()
    for k, rsp in enumerate(responses):
        sring.write_entry((victim.rsp_cons + k) & MASK, rsp)
    if publish:
        sring.rsp_prod = victim.rsp_cons + len(responses)


def rescue(victim: Victim, responses: list[MemEvent]) -> None:
    """Use the answers to foreign requests to release vCPUs that earlier bad responses left paused."""
    pending = {req.vcpu_id for _, req in victim.pending_requests() if req.flags & MemEventFlag.VCPU_PAUSED}
    stuck = [v for v in range(victim.vcpus) if victim.event_pause[v] and v not in pending]
    for rsp in responses:
        if not stuck:
            return
        if not rsp.flags & MemEventFlag.VCPU_PAUSED:
            rsp.vcpu_id = stuck.pop()
            rsp.flags |= MemEventFlag.VCPU_PAUSED


#: Share of the pending requests' gfns each kind prepares (frames allocated) first.
PREP = {"valid": 0.8, "fields": 0.5, "duplicate": 1.0, "flood": 1.0, "evtchn_junk": 1.0, "random_slots": 0.5,
        "whole_page": 0.3, "hangup": 0.8, "own_fds": 0.8, "other_ports": 0.8, "fd_abuse": 0.8, "both_rings": 0.8,
        "reattach_now": 0.8, "shut_wr": 0.8, "dead_daemon": 0.8}


async def prepare(kind: str, victim: Victim, rng: random.Random) -> None:
    """What a daemon does before it answers: prep (allocate frames for) some of the gfns asked for."""
    share = PREP.get(kind, 0.0) if victim.kind == RingKind.paging else 0.0
    await prep(victim, [req.gfn for _, req in victim.pending_requests() if rng.random() < share])


async def apply_case(kind: str, victim: Victim, rng: random.Random) -> dict[str, object]:
    """Write the hostile bytes of one case; returns facts to check afterwards."""
    reqs = [req for _, req in victim.pending_requests()]
    n = len(reqs)
    sring = victim.ring()
    facts: dict[str, object] = {}
    if kind == "valid":
        responses = [echo(r) for r in reqs]
        rescue(victim, responses)
        write_responses(victim, responses)
    elif kind == "fields":
        responses = [echo(r) for r in reqs[: rng.randint(1, n)]]
        for rsp in responses:
            if rng.random() < 0.7:
                mutate(rng, rsp, victim.vcpus)
        write_responses(victim, responses)
    elif kind == "duplicate":
        twice: list[MemEvent] = []
        for r in reqs[: max(1, n // 2)]:
            twice += [echo(r), echo(r)]
        write_responses(victim, twice[:n])
    elif kind == "random_slots":
        m = rng.randint(1, n)
        for k in range(m):
            raw = bytearray(rng.randbytes(abi.MEM_EVENT_SIZE))
            if rng.random() < 0.5:  # plausible flags, so validation goes further than the flags
                raw[2:4] = rng.randrange(32).to_bytes(2, "little")
                raw[36:38] = rng.randrange(16).to_bytes(2, "little")
                raw[4:8] = rng.randrange(victim.vcpus + 2).to_bytes(4, "little")
                raw[8:16] = rng.randrange(GFNS + 4).to_bytes(8, "little")
            sring.write_slot((victim.rsp_cons + k) & MASK, bytes(raw))
        sring.rsp_prod = victim.rsp_cons + m
    elif kind == "rsp_ahead":
        sring.rsp_prod = victim.rsp_cons + n + rng.choice([1, 2, victim.ring_size, rng.randrange(1, 1 << 31),
                                                         MASK - n])
    elif kind == "rsp_back":
        sring.rsp_prod = victim.rsp_cons - rng.choice([1, 2, victim.ring_size, rng.randrange(1, 1 << 31)])
    elif kind == "header":
        sring.req_event = rng.randrange(1 << 32)
        sring.req_prod = rng.randrange(1 << 32)
        sring.rsp_event = rng.randrange(1 << 32)
        view = memoryview(victim._ring_map)  # type: ignore[arg-type]
        view[abi.PAD_OFFSET:abi.PAD_OFFSET + abi.PAD_SIZE] = rng.randbytes(abi.PAD_SIZE)
        view.release()
    elif kind == "whole_page":
        size = abi.ring_bytes(victim.ring_size)
        keep = sring.rsp_prod if rng.random() < 0.5 else None
        page = rng.randbytes(size)
        view = memoryview(victim._ring_map)  # type: ignore[arg-type]
        # Everything but rsp_prod first, then rsp_prod: what is published is what the oracle reads.
        view[:abi.RSP_PROD_OFFSET] = page[:abi.RSP_PROD_OFFSET]
        view[abi.RSP_PROD_OFFSET + 4:size] = page[abi.RSP_PROD_OFFSET + 4:]
        view.release()
        sring.rsp_prod = (victim.rsp_cons + rng.randint(0, n) if keep is not None
                          else int.from_bytes(page[abi.RSP_PROD_OFFSET:abi.RSP_PROD_OFFSET + 4], "little"))
    elif kind == "load_area":
        facts["staged"] = stage_pages(victim, reqs, rng)
    elif kind == "flood":
        write_responses(victim, [echo(r) for r in reqs])
    elif kind == "evtchn_junk":
        write_responses(victim, [echo(r) for r in reqs])
    elif kind == "reattach":
        # Responses written but never published, then the daemon "dies":
        # the next one must find the original requests in those slots.
        for k in range(n):
            sring.write_slot((victim.rsp_cons + k) & MASK, rng.randbytes(abi.MEM_EVENT_SIZE))
        sring.rsp_event = rng.randrange(1 << 32)
        sring.req_event = rng.randrange(1 << 32)
        victim.detach_ring()
        assert victim.daemon is not None
        await victim.daemon.close()
        deadline = time.monotonic() + 10
        while True:
            st = await victim.stats()
            if str(victim.kind) in st.get("rings_orphaned", []):  # type: ignore[operator]
                break
            if time.monotonic() > deadline:
                raise CaseFailure("the ring was not orphaned after its daemon left")
            await asyncio.sleep(0.005)
        facts["reattached"] = await victim.attach()
        sring = victim.ring()
        facts["restored"] = all(sring.read_slot(i) == victim.requests[i] for i, _ in victim.pending_requests())
        facts["indices"] = (sring.req_prod, sring.rsp_prod) == (victim.req_prod, victim.rsp_cons)
    elif kind == "disable":
        assert victim.daemon is not None
        await victim.daemon.call(protocol.MemEventDisable(domid=victim.domid, ring=victim.kind))
        victim.detach_ring()
        await victim.daemon.close()
        facts["reattached"] = await victim.attach()
        victim.rsp_cons = victim.req_prod = 0
        victim.requests.clear()
        victim.prepped = {g for g in victim.prepped if victim.ptype(g) == P2MType.ram_paging_in}
        facts["fresh"] = (victim.ring().req_prod, victim.ring().rsp_prod) == (0, 0)
    elif kind in ("hangup", "own_fds", "other_ports", "both_rings"):
        write_responses(victim, [echo(r) for r in reqs])  # valid answers; the abuse is around them (poke)
        if kind == "both_rings":
            facts["other_ring"] = await other_ring(victim, rng)
    elif kind == "fd_abuse":
        write_responses(victim, [echo(r) for r in reqs])
        facts["worked"] = fd_abuse(victim)
    elif kind in ("reattach_now", "shut_wr", "dead_daemon"):
        # The daemon goes (a graceful hang-up, a half-close, or a successor that dies
        # holding the ring in every way it can) with nothing answered; the next one
        # re-attaches at once and finds every request.
        victim.detach_ring()
        assert victim.daemon is not None
        if kind == "reattach_now":
            await victim.daemon.hang_up()
        else:
            stream = victim.daemon._stream  # the half-close a raw client would do
            assert stream.sock is not None
            stream.sock.shutdown(socket.SHUT_WR)
            await wait_orphaned(victim)
            await victim.daemon.close()
            if kind == "dead_daemon":
                await dead_daemon(victim, rng)
        try:
            facts["reattached"] = await victim.attach()
        except ControlError as exc:
            facts["reattached"] = exc.errno  # EBUSY: the ring was not released
            return facts
        sring = victim.ring()
        facts["restored"] = all(sring.read_slot(i) == victim.requests[i] for i, _ in victim.pending_requests())
        write_responses(victim, [echo(r) for r in reqs])
    else:  # pragma: no cover
        raise AssertionError(kind)
    return facts


def stage_pages(victim: Victim, reqs: list[MemEvent], rng: random.Random) -> dict[int, bytes]:
    """Stage pages with words right, wrong or garbage, beside responses valid or not; returns slot -> page."""
    lm = victim.load_map
    if lm is None:  # an access ring has no load area: an ordinary valid round
        write_responses(victim, [echo(r) for r in reqs])
        return {}
    responses = [echo(r) for r in reqs[: rng.randint(1, len(reqs))]]
    for rsp in responses:
        if rng.random() < 0.2:
            mutate(rng, rsp, victim.vcpus)
    rescue(victim, responses)
    staged: dict[int, bytes] = {}
    for k in range(len(responses) + rng.randint(0, 2)):  # (and words of slots no response is in)
        slot = (victim.rsp_cons + k) & (victim.ring_size - 1)
        gfn = responses[k].gfn if k < len(responses) else rng.randrange(GFNS)
        word = rng.choices([abi.load_word(gfn), abi.load_word(rng.randrange(GFNS)), rng.randrange(1 << 64),
                            abi.LOAD_ENOMEM | abi.load_word(gfn), 0], [6, 1, 1, 1, 1])[0]
        page = rng.randbytes(abi.PAGE_SIZE)
        off = abi.load_page_offset(slot)
        lm[off:off + abi.PAGE_SIZE] = page
        word &= (1 << 64) - 1  # (a mutated gfn may be the last one: its word wraps, as a u64 does)
        lm[slot * abi.LOAD_WORD_SIZE:(slot + 1) * abi.LOAD_WORD_SIZE] = word.to_bytes(8, "little")
        staged[slot] = page
        victim.staged_words[k] = word  # as written: a kick in flight may consume (and clear) it at once
    write_responses(victim, responses)
    return staged


def check_staged(victim: Victim, staged: dict[int, bytes], p: Prediction) -> None:
    """Each predicted load brought its staged bytes in; every word looked at was cleared."""
    assert victim.memory_map is not None
    for slot, gfn in p.loads.items():
        got = victim.memory_map[gfn * abi.PAGE_SIZE:(gfn + 1) * abi.PAGE_SIZE]
        if got != staged[slot]:
            raise CaseFailure(f"gfn {gfn} staged in slot {slot} came in with other bytes")
    for slot in p.cleared:
        if victim.load_word(slot) != 0:
            raise CaseFailure(f"load word of slot {slot} left as {victim.load_word(slot):#x}")


async def wait_orphaned(victim: Victim) -> None:
    deadline = time.monotonic() + 10
    while str(victim.kind) not in (await victim.stats()).get("rings_orphaned", []):  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise CaseFailure("the ring was not orphaned after its daemon left")
        await asyncio.sleep(0.005)


async def dead_daemon(victim: Victim, rng: random.Random) -> None:
    """A daemon process re-attaches, then dies with its control connection kept open (issue 14, defect 2)."""
    how = rng.choice(["evtchn", "child"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.hangup_daemon", "--run-dir", victim.hv.run_dir,
        "--domid", str(victim.domid), "--how", how, "--ring", str(victim.kind), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    child = int(out.strip() or 0)
    try:
        await wait_orphaned(victim)
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def other_ring(victim: Victim, rng: random.Random) -> str:
    """Both rings of the domain at once: the other one enabled, scribbled on, kicked, disabled."""
    other = RingKind.access if victim.kind == RingKind.paging else RingKind.paging
    conn = await victim.hv.tool()
    try:
        reply, fds = await conn.call(protocol.MemEventEnable(domid=victim.domid, ring=other))
        assert isinstance(reply, protocol.MemEventEnabled)
        named = dict(zip(reply.fds, fds, strict=True))
        try:
            page = mmap.mmap(named["ring"], abi.PAGE_SIZE, mmap.MAP_SHARED)
            view = memoryview(page)
            # Everything but rsp_prod (responses to requests never made would crash the domain, rightly).
            view[abi.RSP_PROD_OFFSET + 4:abi.ring_bytes(reply.ring_size)] = rng.randbytes(
                abi.ring_bytes(reply.ring_size) - abi.RSP_PROD_OFFSET - 4)
            view.release()
            page.close()
            ev = socket.socket(fileno=named.pop("evtchn"))
            with ev:
                for _ in range(rng.randint(1, 100)):
                    with contextlib.suppress(BlockingIOError):
                        ev.send(_PORT.pack(rng.choice([reply.port, victim.port, rng.randrange(1 << 32)])),
                                socket.MSG_DONTWAIT)
            await conn.call(protocol.MemEventResume(domid=victim.domid, ring=other))
            await conn.call(protocol.MemEventDisable(domid=victim.domid, ring=other))
        finally:
            for fd in named.values():
                os.close(fd)
        return "ok"
    except ControlError as exc:
        return exc.errno  # e.g. EBUSY: a crashed victim, or the ring taken
    finally:
        await conn.close()


def fd_abuse(victim: Victim) -> list[str]:
    """What a daemon can do to the segments behind its fds; the ones that worked (none may)."""
    worked: list[str] = []
    for name, fd in (("ring", victim.ring_fd), ("p2m", victim.p2m_fd)):
        for size in (0, abi.PAGE_SIZE // 2, 1 << 30):
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                worked.append(f"{name}: ftruncate {size}")
        for seal in (fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, fcntl.F_SEAL_SHRINK):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
                worked.append(f"{name}: seal {seal}")
    try:
        rw = os.open(f"/proc/self/fd/{victim.p2m_fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return worked
    try:
        with contextlib.suppress(OSError):
            os.pwrite(rw, bytes([P2MType.ram_paging_in]), 0)
            worked.append("p2m: write through /proc reopen")
        with contextlib.suppress(OSError):
            mmap.mmap(rw, abi.p2m_table_size(GFNS), mmap.MAP_SHARED).close()
            worked.append("p2m: writable mapping through /proc reopen")
    finally:
        os.close(rw)
    return worked


async def poke(kind: str, victim: Victim, rng: random.Random) -> None:
    """Event-channel abuse, after the prediction: it makes the hypervisor drain at once."""
    if kind == "flood":
        assert victim.evtchn is not None
        for _ in range(rng.randint(200, 5000)):
            victim.evtchn.notify()
    elif kind == "evtchn_junk":
        assert victim.evsock is not None
        for _ in range(rng.randint(1, 50)):
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionError):
                # (an empty one reads as a hang-up: the hypervisor closes the channel, and
                # the daemon has only hurt its own kicks; resume domctls still work)
                victim.evsock.send(rng.randbytes(rng.choice([0, *range(1, 65)])), socket.MSG_DONTWAIT)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionError):
                # (socket.send_fds of 3.11 ignores its flags: it would block on a full queue)
                victim.evsock.sendmsg([b"\x01\x00\x00\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                                 array.array("i", [null] * 3).tobytes())],
                                      socket.MSG_DONTWAIT)
        finally:
            os.close(null)
    elif kind == "hangup":
        # An empty datagram reads as a hang-up: the hypervisor drains and closes its end.
        # Then traffic on a channel nobody reads any more: it must go nowhere.
        assert victim.evsock is not None
        with contextlib.suppress(OSError):
            victim.evsock.send(b"", socket.MSG_DONTWAIT)
        for _ in range(rng.randint(1, 200)):
            with contextlib.suppress(OSError):
                victim.evsock.send(_PORT.pack(victim.port), socket.MSG_DONTWAIT)
    elif kind == "own_fds":
        # The daemon's own sockets and segments, over its event channel.
        assert victim.evsock is not None and victim.daemon is not None
        own = [victim.evsock.fileno(), victim.daemon.fileno(), victim.ring_fd, victim.p2m_fd]
        with contextlib.suppress(OSError):
            victim.evsock.sendmsg([_PORT.pack(victim.port)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                               array.array("i", own).tobytes())],
                                  socket.MSG_DONTWAIT)
    elif kind == "other_ports":
        assert victim.evsock is not None
        for _ in range(rng.randint(1, 100)):
            with contextlib.suppress(OSError):
                victim.evsock.send(_PORT.pack(rng.choice([0, 1, 2, victim.port + 1, victim.port - 1, MASK,
                                                          rng.randrange(1 << 32)])), socket.MSG_DONTWAIT)
    elif rng.random() < 0.3:
        assert victim.evtchn is not None
        victim.evtchn.notify()


# ---------------------------------------------------------------------- the run


async def run_case(case: int, kind: str, victim: Victim, rng: random.Random, log: list[str]) -> None:
    victim.staged_words = {}
    await victim.make_requests()
    await prepare(kind, victim, rng)
    before = await victim.stats()
    oracle = Oracle(victim)
    facts = await apply_case(kind, victim, rng)
    if kind == "reattach":
        if facts != {"reattached": True, "restored": True, "indices": True}:
            raise CaseFailure(f"re-attach over unpublished responses: {facts}")
    if kind == "disable" and facts != {"reattached": False, "fresh": True}:
        raise CaseFailure(f"disable then enable: {facts}")
    if kind in ("reattach_now", "shut_wr", "dead_daemon") and facts != {"reattached": True, "restored": True}:
        raise CaseFailure(f"{kind}: the next daemon did not get the ring with its requests at once: {facts}")
    if kind == "fd_abuse" and facts["worked"]:
        raise CaseFailure(f"fd-level abuse worked: {facts['worked']}")
    if kind == "both_rings" and facts["other_ring"] != "ok":
        raise CaseFailure(f"the other ring of the domain: {facts['other_ring']}")
    prediction = oracle.predict()
    await poke(kind, victim, rng)
    assert victim.tool is not None
    try:
        await victim.tool.call(protocol.MemEventResume(domid=victim.domid, ring=victim.kind))
        resumed: Errno | None = None
    except ControlError as exc:
        resumed = exc.errno
    try:
        after = await victim.stats()
    except ControlError as exc:
        # A crash hangs up on the guest (this harness), which destroys the domain.
        if exc.errno != Errno.ESRCH:
            raise
        after = {"crashed": True, victim.kind: before[victim.kind], "paged_in": before["paged_in"], "gone": True}
    crashed = bool(after["crashed"])
    # A staged page that found no host memory is marked so (the oracle cannot know it beforehand).
    enomem = frozenset(s for s, g in prediction.loads.items() if victim.load_word(s) == abi.LOAD_ENOMEM | (g + 1))
    if enomem:
        prediction = oracle.predict(enomem)
        prediction.cleared -= enomem
    if prediction.crash:
        # The resume that finds the corruption crashes the domain and returns
        # (like Xen's); one that comes after the crash (a kick got there first) is ESRCH.
        if not crashed or resumed not in (None, Errno.ESRCH):
            raise CaseFailure(f"a corrupt ring did not crash the domain (resume -> {resumed})")
    elif crashed or resumed is not None:
        raise CaseFailure(f"the domain crashed or resume failed ({resumed}) on a ring that was not corrupt")
    b_ring, a_ring = before[victim.kind], after[victim.kind]
    assert isinstance(b_ring, dict) and isinstance(a_ring, dict)
    got = Counter({k: int(a_ring[k]) - int(b_ring[k]) for k in COUNTED})
    got_paged_in = int(after["paged_in"]) - int(before["paged_in"])  # type: ignore[call-overload]
    want = Counter({k: prediction.counts[k] for k in COUNTED})
    if got != want or got_paged_in != prediction.paged_in:
        raise CaseFailure(f"counters {dict(got)} paged_in {got_paged_in}, oracle says {dict(want)} "
                          f"paged_in {prediction.paged_in}")
    if kind == "load_area" and not crashed:
        check_staged(victim, facts["staged"], prediction)  # type: ignore[arg-type]
    oracle.commit(prediction)
    if crashed:
        log.append(f"domain {victim.domid} crashed")
        return
    for vcpu in prediction.runnable:
        task = victim.tasks.pop(vcpu)
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            raise CaseFailure(f"vCPU {vcpu} was not unpaused by a valid response") from None
    for vcpu, task in victim.tasks.items():
        if task.done():
            raise CaseFailure(f"vCPU {vcpu} ran although no response released it: {task}")


async def fuzz(hv: Hypervisor, seed: int, cases: int, workdir: str) -> dict[str, object]:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    first = list(kinds)
    rng.shuffle(first)
    baseline = open_fds(hv.proc.pid)
    trend = Trend(hv.proc.pid)
    bystander = Bystander(hv, workdir)
    await bystander.start()
    victim: Victim | None = None
    crashed_domains: list[tuple[int, RingKind]] = []
    rings: Counter[str] = Counter()
    done: Counter[str] = Counter()
    log: list[str] = []
    kind = "?"
    case = -1
    try:
        for case in range(cases):
            bystander.check()
            if victim is None or victim.crashed or victim.spent():
                if victim is not None:
                    if victim.crashed:
                        crashed_domains.append((victim.domid, victim.kind))
                    await victim.close()
                kind_of_ring = RingKind.paging if rng.random() < 0.7 else RingKind.access
                victim = Victim(hv, rng, rng.choice([1, 2, 3, 4]), kind_of_ring)
                await victim.open()
                rings[kind_of_ring] += 1
            # Every kind once (in a random order) first, then as weighted.
            kind = first[case] if case < len(first) else rng.choices(kinds, weights)[0]
            await run_case(case, kind, victim, rng, log)
            done[kind] += 1
            if case % SAMPLE_EVERY == 0:
                trend.sample()
            if not hv.proc.alive():
                raise CaseFailure("the hypervisor died")
        if victim is not None and victim.crashed:
            crashed_domains.append((victim.domid, victim.kind))
    except Exception as exc:
        bystander.kill()
        raise CaseFailure(f"seed {seed} case {case} ({kind}) on domain "
                          f"{victim.domid if victim else '?'}: {exc}\n{hv.proc.stderr()[-3000:]}") from exc
    finally:
        if victim is not None:
            await victim.close()
    await bystander.stop()
    assert hv.proc.alive(), "the hypervisor died"
    err = hv.proc.stderr()
    for domid, ring in crashed_domains:
        assert re.search(rf"domain {domid} crashed: {ring} ring corrupt", err), f"no crash reason for {domid}"
    assert "Traceback" not in err, err[-3000:]
    # Every victim and bystander domain is gone: the hypervisor holds what it held before.
    deadline = time.monotonic() + 10
    while open_fds(hv.proc.pid) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert open_fds(hv.proc.pid) <= baseline, "the hypervisor leaked fds"
    trend.sample()
    return {"seed": seed, "cases": dict(done), "victims": dict(rings), "crashed_domains": len(crashed_domains),
            "bystander_rounds": bystander.rounds, "bystander_faults": bystander.faults,
            "hypervisor": trend.summary()}


CASES = env_count(FUZZ_CASES_ENV, 300)


@pytest.mark.timeout(120 + CASES // 10)
async def test_hostile_daemon_fuzz(tmp_path: object) -> None:
    cases = CASES
    seed = env_seed()
    hv = Hypervisor(os.path.join(str(tmp_path), "run"), memory_mib=24)
    try:
        start = time.monotonic()
        result = await fuzz(hv, seed, cases, str(tmp_path))
        print(f"hostile ring fuzz: {result} in {time.monotonic() - start:.1f}s")
        assert result["bystander_rounds"] != 0
        ran = result["cases"]
        if cases >= len(KINDS):
            assert isinstance(ran, dict) and set(ran) == set(KINDS), result
    finally:
        assert hv.stop() == 0, "the hypervisor did not stop cleanly"
