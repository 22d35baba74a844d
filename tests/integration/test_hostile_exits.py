"""A hostile guest on its exit page: whatever it writes into its ioreq slots harms only its own domain.

The harness is a *victim* domain's guest, speaking the contract raw: it maps
the domain's exit page (Xen's ioreq page, :mod:`hvemu.abi`) from its hello and
binds each vCPU's event channel, while a real pager pages the victim's memory
in and out.  Each case writes what a buggy or hostile guest might: a slot of
random bytes marked READY, exits with a bad type, bad access bits, an offset
past the page, a gfn outside the domain, a bad trap reason, a state that is
not READY, a kick flood and a rewritten slot while an exit is in process
(an access violation the test, as the access listener, holds),
garbage in the response words and in the slots of vCPUs that do not exist,
odd datagrams on the channel, a channel closed under an exit in process and
re-bound by a new hello.  An oracle written from the contract (DESIGN
section 4, the core's validation) predicts each answer: an errno for a bad
exit, Ok for a good one (once the pager has brought a paged gfn in), nothing
at all for a kick with no READY exit, and exactly one handled exit per READY
slot, however often it is kicked (the domain's ``faults`` counter).

Meanwhile a bystander domain (real pager, real guest verifying every page)
keeps running rounds; at the end the hypervisor is alive, the victim never
crashed and still serves a clean exit, the bystander had no failure and the
hypervisor holds no more fds than before.  ``HVEMU_FUZZ_CASES`` sets the
number of cases, ``HVEMU_FUZZ_SEED`` replays a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import random
import socket
import struct
import time

import pytest

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, RingKind
from hvemu.client import ControlClient, ControlError
from hvemu.evtchn import EventChannel
from pager.sdk import MemEventClient
from tests.integration.hostile import FUZZ_CASES_ENV, Bystander, env_count, env_seed, open_fds, wait_proc
from tests.integration.system import Hypervisor, ring_enabled, stats

VCPUS = 4
GFNS = 64
TARGET = 16
SLOT = abi.IOREQ_SLOT_SIZE
READY = int(abi.IoreqState.READY)
RESP_READY = int(abi.IoreqState.RESP_READY)
OK = (int(abi.ExitResult.OK), 0)
TRAPS = {int(r) for r in (abi.MemEventReason.CR0, abi.MemEventReason.CR3, abi.MemEventReason.CR4,
                          abi.MemEventReason.INT3, abi.MemEventReason.SINGLESTEP)}
ANSWER_TIMEOUT = 20.0


def _einval() -> tuple[int, int]:
    return int(abi.ExitResult.ERROR), abi.ERRNO_NUMBERS[Errno.EINVAL]


def expected(kind: int, a: int, c: int, d: int) -> tuple[int, int]:
    """The answer the contract gives an exit, from the core's rules (not from the hypervisor's code)."""
    if kind == abi.ExitType.ACCESS:
        if d == 0 or d & ~7 or not 0 <= c < abi.PAGE_SIZE or not 0 <= a < GFNS:
            return _einval()
        return OK  # direct, spurious, or paged in by the pager and answered
    if kind == abi.ExitType.TRAP:
        return OK if d in TRAPS else _einval()  # no hvm param set: no event, the vCPU goes on
    return _einval()


class HostileGuest:
    """The victim's guest: its exit page and its vCPUs' channels, written to by hand."""

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        self.hv = hv
        self.domid = domid
        self.main: ControlClient | None = None
        self.page: mmap.mmap | None = None
        self.states: memoryview | None = None
        self.conns: dict[int, ControlClient] = {}
        self.chans: dict[int, EventChannel] = {}

    async def open(self) -> None:
        self.main = await ControlClient.connect(self.hv.socket)
        reply, fds = await self.main.call(protocol.GuestHello(domid=self.domid))
        assert isinstance(reply, protocol.Welcome)
        named = dict(zip(reply.fds, fds, strict=True))
        try:
            self.page = mmap.mmap(named["ioreq"], abi.ioreq_page_size(VCPUS), mmap.MAP_SHARED)
        finally:
            for fd in fds:
                os.close(fd)
        self.states = memoryview(self.page).cast("I")
        for v in range(VCPUS):
            await self.bind(v)

    async def bind(self, vcpu: int) -> None:
        """A vCPU hello (retried while the hypervisor has not yet seen the vCPU's last connection end)."""
        deadline = time.monotonic() + 10
        while True:
            conn = await ControlClient.connect(self.hv.socket)
            try:
                reply, fds = await conn.call(protocol.GuestHello(domid=self.domid, vcpu=vcpu))
                break
            except ControlError as exc:
                await conn.close()
                if exc.errno != Errno.EBUSY or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        assert isinstance(reply, protocol.Welcome) and reply.fds == ["evtchn"] and reply.port is not None
        self.conns[vcpu] = conn
        self.chans[vcpu] = EventChannel(fds[0], reply.port)

    async def unbind(self, vcpu: int) -> None:
        self.chans.pop(vcpu).close()
        await self.conns.pop(vcpu).close()

    def state(self, vcpu: int) -> int:
        assert self.states is not None
        return self.states[abi.ioreq_state_word(vcpu)]

    def set_state(self, vcpu: int, value: int) -> None:
        assert self.states is not None
        self.states[abi.ioreq_state_word(vcpu)] = value

    def write(self, vcpu: int, kind: int, a: int, gla: int | None, c: int, d: int) -> None:
        assert self.page is not None
        abi.ioreq_pack_exit(memoryview(self.page), vcpu, kind, a, gla, c, d)

    def scribble(self, vcpu: int, data: bytes, at: int = 0) -> None:
        assert self.page is not None
        off = vcpu * SLOT + at
        self.page[off:off + len(data)] = data

    async def answer(self, vcpu: int) -> tuple[int, int]:
        """Wait for RESP_READY on ``vcpu``'s slot (the channel kicks; the state word decides)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while self.state(vcpu) != RESP_READY:
            assert time.monotonic() < deadline, f"vCPU {vcpu}'s exit was never answered"
            try:
                await asyncio.wait_for(self.chans[vcpu].wait(), 0.2)
            except TimeoutError:
                pass
        assert self.page is not None
        result = abi.ioreq_unpack_response(memoryview(self.page), vcpu)
        self.set_state(vcpu, int(abi.IoreqState.NONE))
        return result

    async def exit(self, vcpu: int, kind: int, a: int, gla: int | None, c: int, d: int) -> tuple[int, int]:
        self.write(vcpu, kind, a, gla, c, d)
        self.set_state(vcpu, READY)
        self.chans[vcpu].notify()
        return await self.answer(vcpu)

    async def close(self) -> None:
        for v in list(self.chans):
            await self.unbind(v)
        if self.states is not None:
            self.states.release()
        if self.page is not None:
            self.page.close()
        if self.main is not None:
            await self.main.close()


class Violation(list[MemEvent]):
    """The access request of a violation, and how many page-ins (exits answered Ok) came first."""

    populates_first = 0


async def violation(guest: HostileGuest, listener: MemEventClient, vcpu: int, gfn: int) -> Violation:
    """Exit on ``gfn`` (access ``n``) until the access listener has its request and the vCPU is paused.

    A gfn the pager has out is first paged in (the exit is answered Ok, and the
    vCPU exits again, as it re-executes its access); only a gfn with a frame
    is checked against its access right.
    """
    out = Violation()
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        guest.write(vcpu, abi.ExitType.ACCESS, gfn, None, 0, abi.ACCESS_R)
        guest.set_state(vcpu, READY)
        guest.chans[vcpu].notify()
        while not (batch := listener.take_requests()):
            assert time.monotonic() < deadline, f"no violation of gfn {gfn} by vCPU {vcpu}"
            if guest.state(vcpu) == RESP_READY:
                break
            await asyncio.sleep(0.005)
        if batch:
            out.extend(batch)
            return out
        assert await guest.answer(vcpu) == OK
        out.populates_first += 1


def random_exit(rng: random.Random) -> tuple[int, int, int | None, int, int]:
    """Operands from a mix of good and bad values."""
    kind = rng.choice([1, 1, 1, 2, 2, 0, 3, rng.randrange(1 << 32)])
    a = rng.choice([rng.randrange(GFNS), rng.randrange(GFNS), GFNS, rng.randrange(1 << 64)])
    gla = rng.choice([None, rng.randrange(1 << 64)])
    c = rng.choice([0, rng.randrange(abi.PAGE_SIZE), abi.PAGE_SIZE, rng.randrange(1 << 64)])
    d = rng.choice([1, 2, 3, 4, 7, 0, 8, rng.randrange(1 << 32), *TRAPS, 0, 1, 7, 99])
    return kind, a, gla, c, d


async def fuzz(hv: Hypervisor, seed: int, cases: int, workdir: str) -> dict[str, object]:
    rng = random.Random(seed)
    baseline = open_fds(hv.proc.pid)
    bystander = Bystander(hv, workdir)
    await bystander.start()
    tool = await hv.tool()
    domid = await hv.create_domain(VCPUS, GFNS, target=TARGET)
    pager = hv.pager(domid, os.path.join(workdir, "victim.pages"), "--batch", "8")
    guest = HostileGuest(hv, domid)
    listener = MemEventClient(domid, RingKind.access, run_dir=hv.run_dir)
    done: dict[str, int] = {}
    handled = 0  # READY exits the hypervisor must have taken (the domain's faults counter counts accesses)
    try:
        deadline = time.monotonic() + 20
        while not await ring_enabled(tool, domid):
            assert pager.alive(), pager.stderr()[-2000:]
            assert time.monotonic() < deadline, "the victim's pager did not attach"
            await asyncio.sleep(0.02)
        await guest.open()
        await listener.attach()
        faults0 = int((await stats(tool, domid))["faults"])
        for i in range(cases):
            bystander.check()
            v = rng.randrange(VCPUS)
            case = rng.choice(["random_exit", "random_slot", "not_ready", "flood_in_process",
                               "garbage_elsewhere", "odd_datagrams", "rebind_in_process"])
            done[case] = done.get(case, 0) + 1
            ctx = f"case {i} {case} vCPU {v} (seed {seed})"
            if case == "random_exit":
                kind, a, gla, c, d = random_exit(rng)
                got = await guest.exit(v, kind, a, gla, c, d)
                assert got == expected(kind, a, c, d), (ctx, kind, a, c, d, got)
                handled += kind == abi.ExitType.ACCESS and got == OK
            elif case == "random_slot":
                raw = bytearray(rng.randbytes(abi.IOREQ_RESPONSE_OFFSET))
                struct.pack_into("<I", raw, 0, READY)
                guest.scribble(v, bytes(raw))
                guest.chans[v].notify()
                st, kind, a, _gla, c, d, _flags = abi.ioreq_unpack_slot(bytes(raw))
                got = await guest.answer(v)
                assert got == expected(kind, a, c, d), (ctx, got)
                handled += kind == abi.ExitType.ACCESS and got == OK
            elif case == "not_ready":
                # Kicks with a slot that is not READY are nothing; the next good exit is answered once.
                guest.write(v, abi.ExitType.ACCESS, GFNS + 5, None, 0, 1)  # would be EINVAL if taken
                written = rng.choice([0, 2, 3, 4, 0xFFFFFFFF])
                guest.set_state(v, written)
                for _ in range(rng.randrange(1, 20)):
                    guest.chans[v].notify()
                await asyncio.sleep(0.01)
                assert guest.state(v) == written, f"{ctx}: a slot that was not READY was taken"
                gfn = rng.randrange(GFNS)
                assert await guest.exit(v, abi.ExitType.ACCESS, gfn, None, 0, abi.ACCESS_R) == OK, ctx
                handled += 1
            elif case == "flood_in_process":
                # An access violation pauses the vCPU until the access listener (this test) answers;
                # meanwhile the guest rewrites the slot (bad exits marked READY, garbage in the
                # response words) and kicks: nothing is taken, and the one exit is answered once.
                gfn = rng.randrange(GFNS)
                assert await listener.domctl.access_set([gfn], abi.P2MAccess.n) == [None], ctx
                batch = await violation(guest, listener, v, gfn)
                handled += len(batch) + batch.populates_first
                assert [(r.vcpu_id, r.gfn) for r in batch] == [(v, gfn)], ctx
                for _ in range(rng.randrange(1, 30)):
                    guest.write(v, rng.randrange(1 << 32), rng.randrange(1 << 64), None, rng.randrange(1 << 64), 0)
                    guest.set_state(v, READY)
                    guest.scribble(v, rng.randbytes(8), abi.IOREQ_RESPONSE_OFFSET)
                    guest.chans[v].notify()
                    await asyncio.sleep(0)
                await asyncio.sleep(0.02)
                assert guest.state(v) == READY, f"{ctx}: the hypervisor answered an exit in process early"
                await listener.domctl.access_set([gfn], abi.P2MAccess.rwx)
                listener.respond_all(batch)
                await listener.push()
                assert await guest.answer(v) == OK, ctx
                await asyncio.sleep(0.02)
                assert guest.state(v) == int(abi.IoreqState.NONE), f"{ctx}: a second answer for one exit"
            elif case == "garbage_elsewhere":
                # Slots of vCPUs the domain does not have, and the pad of real slots: never read.
                other = rng.randrange(VCPUS, abi.ioreq_page_size(VCPUS) // SLOT)
                guest.scribble(other, rng.randbytes(SLOT))
                guest.scribble(v, rng.randbytes(16), 48)
                assert await guest.exit(v, abi.ExitType.TRAP, 0, None, 0, abi.MemEventReason.CR3) == OK, ctx
            elif case == "odd_datagrams":
                # An event channel message of the wrong size or port is still a kick.
                guest.write(v, abi.ExitType.ACCESS, rng.randrange(GFNS), None, 0, abi.ACCESS_R)
                guest.set_state(v, READY)
                sock = socket.socket(fileno=os.dup(guest.chans[v].fileno()))
                try:
                    sock.send(rng.choice([b"x", b"\0" * 4, struct.pack("<I", 0xDEAD), b"\xff" * 60]))
                finally:
                    sock.close()
                assert await guest.answer(v) == OK, ctx
                handled += 1
            else:  # rebind_in_process
                # The vCPU's channel and connection go while an exit is in process; a new hello binds
                # a new channel, the old exit's answer lands in the slot, and the vCPU goes on.
                gfn = rng.randrange(GFNS)
                guest.write(v, abi.ExitType.ACCESS, gfn, None, 0, abi.ACCESS_R)
                guest.set_state(v, READY)
                guest.chans[v].notify()
                await asyncio.sleep(0)
                await guest.unbind(v)
                await guest.bind(v)
                await asyncio.sleep(0.02)  # the kick may have been read before the channel closed, or not
                if guest.state(v) == READY:
                    guest.chans[v].notify()  # not taken yet: a kick on the new channel takes it (once)
                got = await guest.answer(v)
                assert got == OK, (ctx, got)
                handled += 1
        after = await stats(tool, domid)
        assert not after["crashed"], after
        assert int(after["faults"]) - faults0 == handled, (int(after["faults"]) - faults0, handled, done)
        assert hv.proc.alive()
        await bystander.stop()
    finally:
        bystander.kill()
        await listener.detach()
        await guest.close()
        pager.stop()
        try:
            with contextlib.suppress(ControlError):  # gone with its guest's first connection already
                await tool.call(protocol.DomainDestroy(domid=domid))
        finally:
            await tool.close()
    await wait_proc(pager, 30)
    deadline = time.monotonic() + 10
    while open_fds(hv.proc.pid) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert open_fds(hv.proc.pid) <= baseline, "the hypervisor leaked fds"
    return {"seed": seed, "cases": done, "handled": handled, "bystander_rounds": bystander.rounds}


CASES = env_count(FUZZ_CASES_ENV, 200)


@pytest.mark.timeout(120 + CASES // 5)
async def test_hostile_guest_exit_slots(tmp_path: object) -> None:
    seed = env_seed()
    hv = Hypervisor(os.path.join(str(tmp_path), "run"), memory_mib=24)
    try:
        start = time.monotonic()
        result = await fuzz(hv, seed, CASES, str(tmp_path))
        print(f"hostile exit fuzz: {result} in {time.monotonic() - start:.1f}s")
        assert result["bystander_rounds"] != 0
    finally:
        assert hv.stop() == 0, "the hypervisor did not stop cleanly"
