"""Shared pieces of the hostile-input tests: a bystander domain, fd counts, env knobs.

A :class:`Bystander` is another domain living next to the one under attack:
rounds of (create domain, real pager, real guest verifying every page it
wrote) run in the background for as long as the attack goes on.  Each round's
guest must exit 0 with no integrity failure and its pager must exit 0 when the
domain goes away; :meth:`Bystander.stop` raises otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from typing import Any

from hvemu import protocol
from hvemu.toolstack.soak import process_sample, trend
from tests.integration.system import Hypervisor, Proc, ring_enabled

#: Raise these for long runs (the default suite runs small counts).
FUZZ_CASES_ENV = "HVEMU_FUZZ_CASES"
CRASH_CASES_ENV = "HVEMU_CRASH_CASES"
SEED_ENV = "HVEMU_FUZZ_SEED"


def env_count(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_seed() -> int:
    """The run's seed: ``$HVEMU_FUZZ_SEED`` or a fresh one (printed by the tests on failure)."""
    value = os.environ.get(SEED_ENV, "")
    return int(value) if value.strip() else random.SystemRandom().randrange(1 << 32)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Trend:
    """The hypervisor's resident memory and open fds, sampled over a run (see :func:`hvemu.toolstack.soak.trend`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []

    def sample(self) -> None:
        self.samples.append(process_sample(self.pid, self.start))

    def summary(self) -> dict[str, Any]:
        return {"seconds": round(self.samples[-1][0], 1) if self.samples else 0.0, "samples": len(self.samples),
                **trend(self.samples)}


def fd_targets(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return sorted(out)


async def wait_proc(proc: Proc, timeout: float) -> int:
    """Wait for a child without blocking the loop."""
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.argv[:2]} still running after {timeout}s: {proc.stderr()[-1500:]}")
        await asyncio.sleep(0.05)
    return proc.p.returncode


class Bystander:
    """Rounds of an innocent domain (pager + verifying guest) beside an attack."""

    def __init__(self, hv: Hypervisor, workdir: str, *, vcpus: int = 2, gfns: int = 512, target: int = 128,
                 round_seconds: float = 1.5) -> None:
        self.hv = hv
        self.workdir = workdir
        self.vcpus = vcpus
        self.gfns = gfns
        self.target = target
        self.round_seconds = round_seconds
        self.rounds = 0
        self.faults = 0
        self.accesses = 0
        self.domids: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._procs: list[Proc] = []

    async def start(self) -> None:
        await self._round_start_check()
        self._task = asyncio.create_task(self._run(), name="bystander")

    async def _round_start_check(self) -> None:
        conn = await self.hv.tool()
        await conn.close()

    async def _run(self) -> None:
        while True:
            await self._round()
            if self._stop.is_set():
                return

    async def _round(self) -> None:
        conn = await self.hv.tool()
        try:
            reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=self.vcpus, gfns=self.gfns,
                                                             name="bystander"))
            assert isinstance(reply, protocol.DomainCreated)
            domid = reply.domid
            self.domids.append(domid)
            await conn.call(protocol.SetTarget(domid=domid, pages=self.target))
            pager = self.hv.pager(domid, os.path.join(self.workdir, f"bystander{domid}.pages"), "--batch", "32")
            self._procs.append(pager)
            deadline = time.monotonic() + 15
            while not await ring_enabled(conn, domid):
                assert pager.alive(), f"bystander pager died: {pager.stderr()[-2000:]}"
                assert time.monotonic() < deadline, "bystander pager did not attach"
                await asyncio.sleep(0.02)
            guest = self.hv.guest(domid, "--duration", str(self.round_seconds), "--pattern", "uniform",
                                  "--write-ratio", "0.5", "--seed", str(domid))
            self._procs.append(guest)
        finally:
            await conn.close()
        status = await wait_proc(guest, 120)
        out, err = guest.communicate(5)
        assert status == 0, f"bystander guest of domain {domid} exited {status}: {err[-3000:]}"
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert report["ok"] and report["integrity_failures"] == 0, report
        self.faults += int(report["faults"])
        self.accesses += int(report["accesses"])
        pstatus = await wait_proc(pager, 30)
        assert pstatus == 0, f"bystander pager of domain {domid} exited {pstatus}: {pager.stderr()[-3000:]}"
        for p in (guest, pager):
            p.stop()
            self._procs.remove(p)
        self.rounds += 1

    def check(self) -> None:
        """Raise now if a round already failed."""
        if self._task is not None and self._task.done():
            self._task.result()

    async def stop(self) -> None:
        """Finish the current round and raise if any failed."""
        self._stop.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(asyncio.shield(self._task), 180)
                self._task.result()
        finally:
            self.kill()

    def kill(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for p in self._procs:
            p.stop()
        self._procs.clear()
