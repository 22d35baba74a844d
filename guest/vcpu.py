"""A guest vCPU: runs its workload, touching memory directly or exiting.

Each vCPU is an asyncio task with its own slot of the ioreq page and its own
event channel (:mod:`guest.exits`), so a vCPU blocked in an exit (waiting
for the pager) blocks alone while the others run.  The answer to an exit
comes only once the hypervisor has unpaused the vCPU; the vCPU then retries
the access, exactly as a real vCPU re-executes the faulting instruction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgspec

from guest.exits import ExitPort
from guest.memory import GuestMemory
from guest.stamp import StampError, make_page, verify_page
from hvemu import abi, protocol
from hvemu.client import ControlClient
from hvemu.histogram import Histogram

#: Accesses between voluntary yields, so that vCPUs that never fault still
#: take turns (and the process stays responsive).
YIELD_EVERY = 32


class VcpuReport(msgspec.Struct):
    vcpu: int
    accesses: int = 0
    reads: int = 0
    writes: int = 0
    faults: int = 0
    traps: int = 0
    #: Steps reported while single-stepping.
    steps: int = 0
    #: Traps a tool injected (xen-access re-injecting an INT3), delivered to the guest's own handler.
    traps_delivered: int = 0
    #: Instruction fetches (``--exec-every``): reads that need the execute right.
    fetches: int = 0
    integrity_failures: int = 0
    errors: list[str] = []
    latency: dict[str, float] = {}


class Vcpu:
    def __init__(self, vcpu_id: int, memory: GuestMemory, versions: list[int], conn: ControlClient,
                 port: ExitPort) -> None:
        self.vcpu_id = vcpu_id
        self.mem = memory
        #: Expected version of every page, shared by the domain's vCPUs (one thread).
        self.versions = versions
        #: The vCPU's control connection (its hello, and hypercalls such as a balloon).
        self.conn = conn
        #: Where its exits go.
        self.port = port
        self.hist = Histogram()
        self.report = VcpuReport(vcpu=vcpu_id)

    async def _exit(self, gfn: int, access: int) -> None:
        # The guest runs identity-mapped and copies whole pages from their first
        # byte, so the faulting address is the page's guest-physical address
        # (what a listener sees as gla, at offset 0).
        self._resumed(await self.port.access(gfn, access, gfn * abi.PAGE_SIZE, 0))

    async def _call(self, exit_msg: protocol.Msg) -> None:
        """An exit that stays on the control socket (``GuestYield``, an operator's pause: rare)."""
        reply, _ = await self.conn.call(exit_msg)
        self._resumed(reply.vector if isinstance(reply, protocol.TrapInjected) else None)

    def _resumed(self, vector: int | None) -> None:
        """Back from an exit: take any trap a tool injected meanwhile."""
        if vector is not None:
            self.report.traps_delivered += 1  # the guest's own handler for the vector runs here

    async def step(self, gfn: int) -> None:
        """After an instruction (an access) of a vCPU a tool single-steps: report the step."""
        self._resumed(await self.port.trap(int(abi.MemEventReason.SINGLESTEP), gfn, 0, gfn * abi.PAGE_SIZE))
        self.report.steps += 1

    async def breakpoint(self, gfn: int) -> None:
        """An INT3 at the start of ``gfn`` (a listener may re-inject it into the guest)."""
        self._resumed(await self.port.trap(int(abi.MemEventReason.INT3), gfn, 0, gfn * abi.PAGE_SIZE))
        self.report.traps += 1

    async def read(self, gfn: int, right: int = abi.ACCESS_R) -> None:
        """Read the page (``right=ACCESS_X``: fetch instructions from it) and check its stamp."""
        start = 0
        while (data := self.mem.try_read(self.vcpu_id, gfn, right)) is None:
            if not start:
                start = time.perf_counter_ns()
            await self._exit(gfn, right)
        if start:
            self._fault_done(start)
        if right == abi.ACCESS_X:
            self.report.fetches += 1
        else:
            self.report.reads += 1
        try:
            verify_page(data, gfn, self.versions[gfn])
        except StampError as exc:
            self._integrity(str(exc))

    async def write(self, gfn: int) -> None:
        version = self.versions[gfn] + 1
        page = make_page(gfn, version)
        start = 0
        while not self.mem.try_write(self.vcpu_id, gfn, page):
            if not start:
                start = time.perf_counter_ns()
            await self._exit(gfn, abi.ACCESS_W)
            # Another vCPU may have written the page while we were paused.
            if self.versions[gfn] >= version:
                version = self.versions[gfn] + 1
                page = make_page(gfn, version)
        if start:
            self._fault_done(start)
        self.versions[gfn] = version
        self.report.writes += 1

    async def trap(self, reason: abi.MemEventReason, value: int, old: int) -> None:
        """A CR write or INT3: the hypervisor may pause us until a listener answers."""
        self._resumed(await self.port.trap(int(reason), value, old))
        self.report.traps += 1

    def _fault_done(self, start: int) -> None:
        self.report.faults += 1
        self.hist.record(time.perf_counter_ns() - start)

    def _integrity(self, why: str) -> None:
        self.report.integrity_failures += 1
        if len(self.report.errors) < 20:
            self.report.errors.append(why)

    async def run(self, stream: Iterator[tuple[int, bool]], deadline: float, *,
                  max_accesses: int = 0, trap_every: int = 0, int3_every: int = 0,
                  exec_every: int = 0) -> VcpuReport:
        n = 0
        cr3 = 0x1000
        while time.monotonic() < deadline and (not max_accesses or n < max_accesses):
            gfn, is_write = next(stream)
            if is_write:
                await self.write(gfn)
            else:
                await self.read(gfn)
            n += 1
            if debug := self.mem.vcpu_debug(self.vcpu_id):
                if debug & abi.VCPU_DEBUG_PAUSED:  # xl pause: wait in an exit until unpaused
                    await self._call(protocol.GuestYield(vcpu=self.vcpu_id))
                if self.mem.single_stepping(self.vcpu_id):
                    await self.step(gfn)
            if exec_every and n % exec_every == 0:
                await self.read(gfn, abi.ACCESS_X)
            if int3_every and n % int3_every == 0:
                await self.breakpoint(gfn)
            if trap_every and n % trap_every == 0:
                old, cr3 = cr3, cr3 + 0x1000
                await self.trap(abi.MemEventReason.CR3, cr3, old)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        self.report.accesses = n
        self.report.latency = self.hist.summary(scale=1000.0)
        return self.report
