"""The daemon-writer's kit without a hypervisor: SDK helpers, the ring loop of MemEventClient
over an in-process ring, the Pager base class's hooks, and the raw attach's command channel."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Sequence
from typing import Any

import pytest

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, MemEventFlag, MemEventReason, MemEventType, P2MAccess, P2MType, RingKind
from hvemu.evtchn import EventChannel
from hvemu.ring import FrontRing, SharedRing
from pager import attach
from pager.base import Pager
from pager.examples.access_listener import describe, parse_gfns
from pager.gfns import GfnsOfType, gfns_in
from pager.sdk import (
    DomainGone,
    DomctlError,
    MemEventClient,
    RequestBatch,
    RunState,
    SdkError,
    StateError,
    failures,
    response_for,
)

PAUSED = int(MemEventFlag.VCPU_PAUSED)


def _req(gfn: int, flags: int = PAUSED, *, vcpu: int = 0, type_: int = MemEventType.PAGING,
         reason: int = MemEventReason.UNKNOWN) -> MemEvent:
    return MemEvent(type=type_, flags=flags, vcpu_id=vcpu, gfn=gfn, p2mt=P2MType.ram_paged, reason=reason)


# --------------------------------------------------------------------------- helpers


def test_response_for_echoes_what_the_hypervisor_acts_on() -> None:
    req = _req(7, PAUSED | MemEventFlag.EVICT_FAIL | MemEventFlag.DUMMY, vcpu=3, type_=MemEventType.ACCESS,
               reason=MemEventReason.CR3)
    req.gla, req.gla_valid = 0x1234, True
    rsp = response_for(req)
    assert (rsp.type, rsp.vcpu_id, rsp.gfn, rsp.p2mt, rsp.reason) == (req.type, 3, 7, req.p2mt, MemEventReason.CR3)
    assert rsp.flags == PAUSED | MemEventFlag.EVICT_FAIL, "DUMMY in a request is not echoed"
    assert not rsp.gla_valid
    assert response_for(req, flags=MemEventFlag.DUMMY).flags == MemEventFlag.DUMMY


def test_request_batch_views() -> None:
    batch = RequestBatch([
        _req(1), _req(1, vcpu=1), _req(2, MemEventFlag.DROP_PAGE), _req(3, PAUSED | MemEventFlag.EVICT_FAIL),
        _req(4, MemEventFlag.FOREIGN), _req(9, type_=MemEventType.ACCESS, reason=MemEventReason.VIOLATION),
        _req(0x5000, type_=MemEventType.ACCESS, reason=MemEventReason.CR3),
    ])
    assert isinstance(batch, list) and len(batch) == 7
    assert [r.gfn for r in batch.populates] == [1, 1, 4]
    assert batch.gfns_to_load() == [1, 4]
    assert [r.gfn for r in batch.drops] == [2] and [r.gfn for r in batch.evict_fails] == [3]
    assert [r.gfn for r in batch.violations] == [9]
    assert [r.gfn for r in batch.by_reason(MemEventReason.CR3)] == [0x5000]
    assert [r.gfn for r in batch.paused] == [1, 1, 3, 9, 0x5000]


def test_failures_and_typed_errors() -> None:
    assert failures([1, 2, 3], [None, Errno.EBUSY, None]) == {2: Errno.EBUSY}
    assert failures([], []) == {}
    with pytest.raises(ValueError):
        failures([1], [])
    err = DomctlError("PagingEvict on dom1: EINVAL", Errno.EINVAL)
    assert isinstance(err, SdkError) and err.errno == Errno.EINVAL
    assert DomainGone("gone", Errno.ESRCH).errno == "ESRCH"


# --------------------------------------------------------------------------- the ring loop


class _Ring:
    """The hypervisor's end of an in-process ring, and a client attached to the other."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, abi.PAGE_SIZE)
        hv_sring: SharedRing[MemEvent] = SharedRing(self.page, abi.MemEventCodec)
        hv_sring.init()
        self.front = FrontRing(hv_sring)
        self.hv_chan, remote = EventChannel.pair(7)
        self.client = MemEventClient(1, RingKind.paging)
        c = self.client
        c.sring = SharedRing(self.page, abi.MemEventCodec)
        from hvemu.ring import BackRing

        c.back = BackRing.attach(c.sring)
        c._evtchn = remote
        c._conn = object()  # type: ignore[assignment]  # no domctls in these tests
        c.state = RunState.RUNNING

    def put(self, *reqs: MemEvent) -> None:
        for r in reqs:
            self.front.put_request(r)
        if self.front.push_requests_and_check_notify():
            self.hv_chan.notify()

    def responses(self) -> list[MemEvent]:
        out = []
        while self.front.unconsumed_responses():
            out.append(self.front.get_response())
        return out

    def close(self) -> None:
        self.client._evtchn.close()  # type: ignore[union-attr]
        self.hv_chan.close()
        assert self.client.sring is not None
        self.client.sring.release()
        self.front.sring.release()
        self.page.close()


async def test_requests_drain_answer_and_sleep_until_notified() -> None:
    ring = _Ring()
    client = ring.client
    try:
        ring.put(_req(1), _req(2, vcpu=1))
        it = client.requests()
        batch = await asyncio.wait_for(anext(it), 5)
        assert [r.gfn for r in batch] == [1, 2] and client.outstanding == 2
        client.respond_all(batch)
        assert ring.responses() == [], "a response is invisible until pushed"
        await client.push()
        assert [(r.gfn, r.vcpu_id, r.flags) for r in ring.responses()] == [(1, 0, PAUSED), (2, 1, PAUSED)]
        assert client.outstanding == 0 and client.unanswered() == 0
        # Nothing on the ring: the iterator re-arms req_event and sleeps ...
        nxt = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.05)
        assert not nxt.done()
        assert ring.front.sring.req_event == 3, "req_event re-armed at req_cons + 1"
        ring.put(_req(3))  # ... and the put's notification wakes it
        assert [r.gfn for r in await asyncio.wait_for(nxt, 5)] == [3]
        assert client.unanswered() == 1
        with pytest.raises(OverflowError):  # one response per consumed request
            for _ in range(2):
                client.respond(response_for(_req(3)))
        # The hypervisor closing the channel ends the stream with DomainGone.
        ring.hv_chan.close()
        with pytest.raises(DomainGone):
            await asyncio.wait_for(anext(it), 5)
    finally:
        ring.close()


async def test_a_detached_client_refuses_ring_calls() -> None:
    client = MemEventClient(1, RingKind.access)
    with pytest.raises(StateError):
        client.take_requests()
    with pytest.raises(StateError):
        client.p2m_access(0)
    await client.detach()  # detaching an idle client is a no-op
    assert client.state is RunState.IDLE


# --------------------------------------------------------------------------- the Pager base class


class _FakeClient:
    """What Pager uses of a MemEventClient, recorded (``can_stage_pages``: a paging ring's load area)."""

    domid = 1
    can_stage_pages = False

    def __init__(self, types: bytes) -> None:
        self.domctl = self  # the fake plays the client's Domctl too
        self.types = bytearray(types)
        self.memory = bytearray(len(types) * abi.PAGE_SIZE)
        self.responses: list[MemEvent] = []
        self.loaded: list[int] = []
        self.prepped: list[int] = []
        self._published = 0
        self.filled: list[int] = []
        self.pushes = 0

    def respond(self, rsp: MemEvent) -> None:
        self.responses.append(rsp)

    async def push(self, *, notify: bool = True) -> bool:
        """Publish; the hypervisor's resume makes each prepared gfn answered ``ram_rw``."""
        self.pushes += 1
        for rsp in self.responses[self._published:]:
            if self.types[rsp.gfn] == P2MType.ram_paging_in and rsp.gfn in self.filled:
                self.types[rsp.gfn] = P2MType.ram_rw
        self._published = len(self.responses)
        return notify

    def kick(self) -> None:
        pass

    async def load(self, gfns: Sequence[int], pages: Sequence[bytes], *, resume: bool = False) -> list[Errno | None]:
        self.loaded += gfns
        for g in gfns:
            self.types[g] = P2MType.ram_rw
        return [None] * len(gfns)

    async def prep(self, gfns: Sequence[int]) -> list[Errno | None]:
        self.prepped += gfns
        for g in gfns:
            self.types[g] = P2MType.ram_paging_in
        return [None] * len(gfns)

    def fill(self, gfn: int, store: _Store) -> None:
        self.filled.append(gfn)
        self.memory[gfn * abi.PAGE_SIZE:(gfn + 1) * abi.PAGE_SIZE] = store.read(gfn)

    def respond_with_page(self, rsp: MemEvent, gfn: int, store: _Store) -> None:
        page = store.read(gfn)  # may raise: then nothing is queued
        self.memory[gfn * abi.PAGE_SIZE:(gfn + 1) * abi.PAGE_SIZE] = page  # as the hypervisor's load will
        self.filled.append(gfn)
        self.types[gfn] = P2MType.ram_paging_in
        self.responses.append(rsp)

    def take_load_failures(self) -> list[int]:
        return []

    def staged(self) -> set[int]:
        return set()

    def gfns_of_type(self, t: int) -> list[int]:
        return [g for g, x in enumerate(self.types) if x == t]

    def p2m_types(self) -> bytes:
        return bytes(self.types)

    def gfns_view(self, t: int) -> GfnsOfType:
        return GfnsOfType(bytes(self.types), t)

    def count_type(self, t: int) -> int:
        return self.types.count(t)

    async def nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        for g in gfns:
            self.types[g] = P2MType.ram_paging_out
        return [None] * len(gfns)

    async def evict(self, gfns: Sequence[int]) -> list[Errno | None]:
        for g in gfns:
            self.types[g] = P2MType.ram_paged
        return [None] * len(gfns)


class _Store:
    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}

    def write(self, gfn: int, data: bytes | memoryview) -> None:
        self.pages[gfn] = bytes(data)

    def read(self, gfn: int) -> bytes:
        return self.pages.get(gfn, bytes(abi.PAGE_SIZE))

    def discard(self, gfns: Sequence[int]) -> None:
        for g in gfns:
            self.pages.pop(g, None)


class _Recording(Pager):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.populated: list[int] = []
        self.dropped: list[int] = []
        self.asked: list[tuple[list[int], int]] = []

    def choose_victims(self, candidates: GfnsOfType, count: int) -> list[int]:
        self.asked.append((list(candidates), count))
        return candidates[-count:]

    def on_populate(self, gfns: list[int]) -> None:
        self.populated += gfns

    def on_drop(self, gfn: int) -> None:
        self.dropped.append(gfn)


async def test_pager_hooks_are_the_whole_policy() -> None:
    types = bytes([P2MType.ram_rw] * 6 + [P2MType.ram_paging_in] * 2)
    client = _FakeClient(types)
    store = _Store()
    pager = _Recording(client, store, batch=3)  # type: ignore[arg-type]
    assert await pager.evict_batch(10) == 3
    assert pager.asked == [([0, 1, 2, 3, 4, 5], 3)], "candidates are the ram_rw gfns, count capped by batch"
    assert sorted(store.pages) == [3, 4, 5] and client.gfns_of_type(P2MType.ram_paged) == [3, 4, 5]
    batch = RequestBatch([_req(6), _req(6, vcpu=1), _req(3, MemEventFlag.DROP_PAGE),
                          _req(7, PAUSED | MemEventFlag.EVICT_FAIL)])
    await pager.handle_batch(batch)
    assert client.loaded == [6], "one load of the distinct gfns that need a page (a ring without a load area)"
    assert pager.populated == [6] and pager.dropped == [3]
    assert sorted(store.pages) == [4, 5], "the copy of a gfn given back is discarded"
    assert [r.gfn for r in client.responses] == [6, 6, 3, 7] and client.pushes == 1
    assert pager.summary()["drops"] == 1 and pager.summary()["evict_failed"] == 1
    with pytest.raises(ValueError):
        Pager(client, store, batch=0)  # type: ignore[arg-type]


class _SlowLoad(_FakeClient):
    """A load that makes its gfns ``ram_rw`` (the resume) and then waits before it answers."""

    def __init__(self, types: bytes) -> None:
        super().__init__(types)
        self.resumed = asyncio.Event()
        self.answer = asyncio.Event()
        self.nominated: list[int] = []

    async def load(self, gfns: Sequence[int], pages: Sequence[bytes], *, resume: bool = False) -> list[Errno | None]:
        result = await super().load(gfns, pages, resume=resume)
        self.resumed.set()
        await self.answer.wait()
        return result

    async def nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        self.nominated += gfns
        return await super().nominate(gfns)


async def test_a_page_in_is_reported_before_its_gfn_can_go_out_again() -> None:
    """Issue 14, defect 1: between a load's resume and its reply, eviction could take the gfn again."""
    client = _SlowLoad(bytes([P2MType.ram_rw] * 4 + [P2MType.ram_paging_in]))
    store = _Store()
    store.pages[4] = b"\x04" * abi.PAGE_SIZE
    pager = _Recording(client, store, batch=5)  # type: ignore[arg-type]
    serving = asyncio.create_task(pager.handle_batch(RequestBatch([_req(4)])))
    await client.resumed.wait()  # gfn 4 is ram_rw for the hypervisor; the load's reply is not in yet
    assert await pager.evict_batch(5) == 4
    assert 4 not in client.nominated and 4 in pager.asked[0][0], "offered to the policy, never nominated"
    client.answer.set()
    await serving
    assert pager.populated == [4] and 4 not in store.pages, "reported, and the store's copy discarded"
    assert await pager.evict_batch(5) == 1 and client.nominated[-1] == 4, "and then it may go out again"
    assert store.pages[4] == bytes(abi.PAGE_SIZE)


class _Targeted(_FakeClient):
    """A fake client with a target, slow or meddling batches, and a count of p2m counts."""

    def __init__(self, gfns: int, target: int) -> None:
        super().__init__(bytes([P2MType.ram_rw] * gfns))
        self.target = target
        self.nominations = 0
        self.batch_delay = 0.0
        #: Called with the number of the nominate call, before it runs: meddles behind the pager's back.
        self.on_nominate: Any = None

    async def get_target(self) -> int:
        return self.target

    async def nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        self.nominations += 1
        if self.on_nominate is not None:
            self.on_nominate(self.nominations)
        if self.batch_delay:
            await asyncio.sleep(self.batch_delay)
        return await super().nominate(gfns)

    def resident(self) -> int:
        return self.types.count(P2MType.ram_rw)

    def retype(self, old: int, new: int, count: int) -> None:
        for g in [g for g, t in enumerate(self.types) if t == old][:count]:
            self.types[g] = new


async def _settle(client: _Targeted, pager: Pager, timeout: float = 5.0) -> int:
    """Run the eviction loop until resident is within one batch under the target, and stays there."""
    task = asyncio.create_task(pager.evict_loop())
    try:
        async with asyncio.timeout(timeout):
            while not client.target - pager.batch < client.resident() <= client.target:
                await asyncio.sleep(0.002)
        now = client.resident()
        await asyncio.sleep(0.1)  # polls later: nothing more evicted
        assert client.resident() == now
        return now
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_evict_loop_counts_the_p2m_per_poll_not_per_batch() -> None:
    client = _Targeted(1000, target=600)
    pager = Pager(client, _Store(), batch=16, poll_interval=30)  # type: ignore[arg-type]
    count = pager.resident
    counts = 0

    def counted() -> int:
        nonlocal counts
        counts += 1
        return count()

    pager.resident = counted  # type: ignore[method-assign]
    assert await _settle(client, pager) == 600
    assert client.nominations == 25
    assert counts <= 3, f"{counts} counts for 25 batches (one at start, one before waiting)"


async def test_evict_loop_counts_before_waiting() -> None:
    """Pages made resident behind the pager's back while it evicts (a foreign populate): caught before it waits."""
    client = _Targeted(1000, target=600)
    client.on_nominate = lambda n: client.retype(P2MType.ram_paged, P2MType.ram_rw, 40) if n == 10 else None
    pager = Pager(client, _Store(), batch=16, poll_interval=30)  # type: ignore[arg-type]
    await _settle(client, pager, timeout=2)  # the next poll is 30 s away: only the count before waiting helps


async def test_evict_loop_recounts_at_each_poll_while_evicting() -> None:
    """Pages gone behind its back mid page-out (ballooned): the poll's count stops it evicting too many."""
    client = _Targeted(1000, target=600)
    client.batch_delay = 0.004  # 25 batches over 100 ms, 10 polls
    client.on_nominate = lambda n: client.retype(P2MType.ram_rw, P2MType.mmio_dm, 50) if n == 3 else None
    pager = Pager(client, _Store(), batch=16, poll_interval=0.01)  # type: ignore[arg-type]
    await _settle(client, pager)  # without the poll's count it would stop 50 pages short (at 550)


async def test_evict_loop_wakes_on_page_ins_and_recounts_after_waiting() -> None:
    """Page-ins that take the domain above its target wake the loop at once (not at the next poll), and
    the loop counts afresh after its wait: pages gone meanwhile are not evicted for twice."""
    client = _Targeted(1000, target=600)
    pager = Pager(client, _Store(), batch=16, poll_interval=30)  # type: ignore[arg-type]
    task = asyncio.create_task(pager.evict_loop())
    try:
        async with asyncio.timeout(5):
            while client.resident() > 600:
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)  # waiting now: on target, the next poll 30 s away
        client.retype(P2MType.ram_rw, P2MType.mmio_dm, 30)  # ballooned out while it waits
        paged = client.gfns_of_type(P2MType.ram_paged)[:40]
        await pager.handle_batch(RequestBatch([_req(g) for g in paged]))  # 40 faults: 610 resident
        assert client.resident() == 610
        async with asyncio.timeout(2):
            while client.resident() > 600:
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)
        assert 600 - 16 < client.resident() <= 600, "a stale estimate (640) would have evicted 40 and more"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_default_victims_are_a_random_subset() -> None:
    pager = Pager(_FakeClient(b""), _Store(), seed=1)  # type: ignore[arg-type]
    picked = pager.choose_victims(gfns_in(list(range(100))), 10)
    assert len(set(picked)) == 10 and set(picked) <= set(range(100))
    assert sorted(pager.choose_victims(gfns_in([1, 2]), 10)) == [1, 2]


# --------------------------------------------------------------------------- raw attach: command channel


def test_parse_commands() -> None:
    c = attach.parse_command(b"nominate 1 0x10 2\n")
    assert (c.name, c.gfns, c.pages) == ("nominate", [1, 16, 2], 0)
    c = attach.parse_command(b"load 5 6\n")
    assert (c.name, c.gfns, c.pages) == ("load", [5, 6], 2)
    assert attach.parse_command(b"access rx 1 2").args == [str(int(P2MAccess.rx))]
    assert attach.parse_command(b"access 7 1").args == ["7"]
    assert attach.parse_command(b"hvm-param cr3 sync onchangeonly").args == [
        str(int(MemEventReason.CR3)), str(abi.HVMPME_MODE_SYNC | abi.HVMPME_ONCHANGEONLY)]
    assert attach.parse_command(b"target").args == [] and attach.parse_command(b"target 12").args == ["12"]
    assert attach.parse_command(b"  ping  \r\n").name == "ping"


@pytest.mark.parametrize("line, why", [
    (b"\n", "empty"), (b"frob 1", "unknown command"), (b"evict", "at least one gfn"), (b"evict -1", "negative"),
    (b"evict x", "not a number"), (b"access rwz 1", "unknown access"), (b"access rx", "usage"),
    (b"hvm-param cr9 sync", "usage"), (b"hvm-param cr3 sync always", "usage"), (b"ping 1", "no arguments"),
    (b"access-required 2", "usage"), (b"target 1 2", "usage"), (b"\xffping", "ASCII"),
    (b"evict " + b" ".join(b"1" for _ in range(attach.MAX_BATCH + 1)), "at most"),
])
def test_malformed_commands_are_einval(line: bytes, why: str) -> None:
    with pytest.raises(attach.CommandError, match=why) as exc:
        attach.parse_command(line)
    assert exc.value.errno == Errno.EINVAL


def test_a_malformed_load_still_owns_its_pages() -> None:
    """So that the channel stays in step: one page per word after 'load', whatever the words."""
    assert attach.data_pages(b"load 1 x y\n") == 3
    assert attach.data_pages(b"evict 1 2\n") == 0 and attach.data_pages(b"\n") == 0


def test_reply_formats() -> None:
    assert attach.format_results([None, Errno.EBUSY, None]) == "ok 0 EBUSY 0"
    assert attach.format_error(Errno.ESRCH, "dom1\nis gone") == "ESRCH dom1 is gone"
    assert attach.format_error(None, "?") == "EINVAL ?"
    assert attach.exit_status(3) == 3 and attach.exit_status(-15) == 143


class _FakeDomctl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def load(self, gfns: list[int], pages: list[bytes]) -> list[Errno | None]:
        self.calls.append(("load", (gfns, [p[:1] for p in pages])))
        return [None, Errno.ENOMEM][:len(gfns)]

    async def evict(self, gfns: list[int]) -> list[Errno | None]:
        raise DomainGone("dom1 is gone", Errno.ESRCH)

    async def nominate(self, gfns: list[int]) -> list[Errno | None]:
        raise DomctlError("PagingNominate on dom1: EPERM", Errno.EPERM)

    async def resume(self, ring: RingKind) -> None:
        self.calls.append(("resume", ring))

    async def set_hvm_param(self, reason: int, mode: int) -> None:
        self.calls.append(("hvm", (reason, mode)))

    async def get_target(self) -> int:
        return 42

    async def set_target(self, pages: int) -> None:
        self.calls.append(("target", pages))


async def test_command_server_runs_domctls() -> None:
    d = _FakeDomctl()
    server = attach.CommandServer(d, RingKind.access)  # type: ignore[arg-type]
    page = abi.PAGE_SIZE
    assert await server.handle_line(b"load 5 6\n", b"\xab" * page + b"\xcd" * page) == "ok 0 ENOMEM"
    assert d.calls[-1] == ("load", ([5, 6], [b"\xab", b"\xcd"]))
    assert await server.handle_line(b"evict 1\n", b"") == "ESRCH dom1 is gone"
    assert await server.handle_line(b"nominate 1\n", b"") == "EPERM PagingNominate on dom1: EPERM"
    assert await server.handle_line(b"resume\n", b"") == "ok" and d.calls[-1] == ("resume", RingKind.access)
    assert await server.handle_line(b"target 9\n", b"") == "ok 42" and ("target", 9) in d.calls
    assert await server.handle_line(b"hvm-param int3 async\n", b"") == "ok"
    assert d.calls[-1] == ("hvm", (int(MemEventReason.INT3), abi.HVMPME_MODE_ASYNC))
    assert (await server.handle_line(b"hello\n", b"")).startswith("ok hvemu-attach ")
    assert (await server.handle_line(b"oops\n", b"")).startswith("EINVAL unknown command")


async def test_command_server_over_a_stream_keeps_in_step() -> None:
    d = _FakeDomctl()
    server = attach.CommandServer(d, RingKind.paging)  # type: ignore[arg-type]
    import socket

    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    task = asyncio.create_task(server.serve(reader, writer))
    try:
        page = abi.PAGE_SIZE
        # A malformed load, its pages, then a good command: the pages are skipped, not parsed.
        b.sendall(b"load 1 zz\n" + b"\n" * (2 * page) + b"ping\nload 3\n" + b"\x01" * page + b"target\n")
        b.shutdown(socket.SHUT_WR)
        got = b""
        while got.count(b"\n") < 4:
            chunk = await asyncio.to_thread(b.recv, 4096)
            assert chunk, got
            got += chunk
        assert got.decode().splitlines() == ["EINVAL gfn 'zz' is not a number", "ok", "ok 0", "ok 42"]
        await asyncio.wait_for(task, 5)  # EOF ends the server
    finally:
        task.cancel()
        writer.close()
        b.close()


def test_child_env_names_every_fact() -> None:
    reply = protocol.MemEventEnabled(domid=3, ring=RingKind.access, port=9, ring_size=8, max_vcpus=2, gfns=100,
                                     reattached=True, domain_handle="ab" * 16, fds=["ring", "evtchn", "memory", "p2m"])
    env = attach.child_env({"PATH": "/bin"}, reply, {"ring": 10, "evtchn": 11, "memory": 12, "p2m": 13}, 14,
                           "/run/hv", "/run/hv/control.sock")
    assert env["PATH"] == "/bin"
    assert {k: v for k, v in env.items() if k.startswith("HVEMU_")} == {
        "HVEMU_DOMID": "3", "HVEMU_RING": "access", "HVEMU_RING_FD": "10", "HVEMU_RING_SIZE": "8",
        "HVEMU_EVTCHN_FD": "11", "HVEMU_PORT": "9", "HVEMU_MEMORY_FD": "12", "HVEMU_P2M_FD": "13",
        "HVEMU_CTL_FD": "14", "HVEMU_GFNS": "100", "HVEMU_MAX_VCPUS": "2", "HVEMU_PAGE_SIZE": str(abi.PAGE_SIZE),
        "HVEMU_REATTACHED": "1", "HVEMU_DOMAIN_HANDLE": "ab" * 16, "HVEMU_RUN_DIR": "/run/hv",
        "HVEMU_SOCKET": "/run/hv/control.sock", "HVEMU_RING_ABI": "seed",
    }


# --------------------------------------------------------------------------- access listener helpers


def test_listener_gfn_spec_and_lines() -> None:
    assert parse_gfns("0-3,0x10,2", 32) == [0, 1, 2, 3, 16]
    assert parse_gfns("all", 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        parse_gfns("30-40", 32)
    v = _req(0x1C, type_=MemEventType.ACCESS, reason=MemEventReason.VIOLATION)
    v.access_w, v.gla, v.gla_valid, v.offset = True, 0x1C123, True, 0x123
    assert describe(v, "rwx") == ("PAGE ACCESS: -w- for GFN 0x1c (offset 0x000123) gla 0x000000000001c123 "
                                  "(vcpu 0) [-> rwx]")
    assert describe(_req(0x5000, type_=MemEventType.ACCESS, reason=MemEventReason.CR3), None) == \
        "CR3 write: 0x5000 (vcpu 0)"


class _FailingStore(_Store):
    def __init__(self) -> None:
        super().__init__()
        self.failing: set[int] = set()

    def read(self, gfn: int) -> bytes:
        if gfn in self.failing:
            raise OSError(5, "Input/output error")
        return super().read(gfn)


async def test_a_failed_read_is_never_answered_until_a_read_succeeds() -> None:
    """A page the pager could not read is staged with no response, and no sweep loads it: a retry does.

    (A response without its page would let the guest see whatever the frame
    holds once anything made it ``ram_rw``.)
    """
    staged = True
    types = bytes([P2MType.ram_rw] * 4 + [P2MType.ram_paged] * 2)
    client = _FakeClient(types)
    client.can_stage_pages = staged  # type: ignore[misc]
    store = _FailingStore()
    store.pages[4] = b"\x44" * abi.PAGE_SIZE
    store.pages[5] = b"\x55" * abi.PAGE_SIZE
    store.failing = failing = {4}
    pager = _Recording(client, store, batch=3)  # type: ignore[arg-type]
    await pager.handle_batch(RequestBatch([_req(4), _req(5, vcpu=1), _req(4, vcpu=2)]))
    assert [(r.gfn, r.vcpu_id) for r in client.responses] == [(5, 1)], "no response for the unfilled gfn"
    assert client.types[4] == (P2MType.ram_paged if staged else P2MType.ram_paging_in)
    assert client.types[5] == P2MType.ram_rw
    assert pager.populated == [5]
    # Two sweeps see gfn 4 ram_paging_in: still it is not loaded (its frame is prepared, not filled).
    assert await pager.load_stranded() == 0 and await pager.load_stranded() == 0 and not client.loaded
    assert await pager.retry_unfilled() == 0, "still failing: still unanswered"
    assert [(r.gfn, r.vcpu_id) for r in client.responses] == [(5, 1)]
    failing.clear()
    assert await pager.retry_unfilled() == 2
    assert [(r.gfn, r.vcpu_id) for r in client.responses] == [(5, 1), (4, 0), (4, 2)]
    assert client.types[4] == P2MType.ram_rw
    assert bytes(client.memory[4 * abi.PAGE_SIZE:5 * abi.PAGE_SIZE]) == b"\x44" * abi.PAGE_SIZE
    assert pager.populated == [5, 4] and pager.summary()["requests"] == 3
