"""Daemons that misbehave around the life of their ring (issue 14, round 2).

* A daemon that dies with its control connection kept open (its fd queued in
  its own event channel, or held by a process that outlives it) must not keep
  its ring: the ring goes back to the hypervisor, orphaned, and the next
  daemon re-attaches (defect 2).
* ``detach(disable=False)`` returns only once the ring is released: a
  successor that attaches at once is never refused ``EBUSY`` (defect 5).
* A domain crash is logged once at ERROR, not twice (defect 6).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal

import pytest

from hvemu import abi, protocol
from hvemu.abi import RingKind
from hvemu.client import ControlError
from hvemu.ring import SharedRing
from pager.sdk import MemEventClient
from tests.integration.system import Hypervisor, Proc, stats, wait_until


async def _successor_attaches(hv: Hypervisor, domid: int) -> bool:
    """Try to enable the ring as a new daemon; True (and the ring left orphaned again) if it worked."""
    conn = await hv.tool()
    try:
        reply, fds = await conn.call(protocol.MemEventEnable(domid=domid, ring=RingKind.paging))
    except ControlError as exc:
        assert exc.errno == abi.Errno.EBUSY, exc
        return False
    finally:
        await conn.hang_up()  # returns once the ring is orphaned again
    for fd in fds:
        os.close(fd)
    assert isinstance(reply, protocol.MemEventEnabled) and reply.reattached
    return True


@pytest.mark.parametrize("how", ["evtchn", "child"])
async def test_a_dead_daemon_loses_its_ring_whatever_holds_its_connection(hypervisor: Hypervisor,
                                                                          how: str) -> None:
    """Defect 2: ownership ends with the daemon's process, not with the last fd of its connection."""
    domid = await hypervisor.create_domain(1, 16)
    guest = await hypervisor.tool()  # (a tool standing in for nothing: the domain lives without a guest)
    daemon = Proc("-m", "tests.integration.hangup_daemon", "--run-dir", hypervisor.run_dir,
                  "--domid", str(domid), "--how", how)
    child = 0
    try:
        out, err = daemon.communicate(30)
        assert daemon.p.returncode == 0, err
        child = int(out.strip() or 0)
        await wait_until(lambda: _successor_attaches(hypervisor, domid), timeout=10)
        st = await stats(guest, domid)
        assert st["rings_orphaned"] == ["paging"], st["rings_orphaned"]
    finally:
        daemon.stop()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
        await guest.close()


async def test_detach_without_disable_returns_once_the_ring_is_released(hypervisor: Hypervisor) -> None:
    """Defect 5: an immediate successor used to get EBUSY for a few milliseconds."""
    domid = await hypervisor.create_domain(1, 16)
    refused = 0
    for _ in range(50):
        successor = await hypervisor.tool()  # connected and greeted already: one request from the ring
        try:
            first = MemEventClient(domid, RingKind.paging, run_dir=hypervisor.run_dir, disable_on_exit=False)
            async with first:
                pass
            try:
                reply, fds = await successor.call(protocol.MemEventEnable(domid=domid, ring=RingKind.paging))
            except ControlError as exc:
                assert exc.errno == abi.Errno.EBUSY, exc
                refused += 1
                await wait_until(lambda: _successor_attaches(hypervisor, domid))  # leave it orphaned
                continue
            for fd in fds:
                os.close(fd)
            assert isinstance(reply, protocol.MemEventEnabled) and reply.reattached
        finally:
            await successor.close()
        await wait_until(lambda: _orphaned(hypervisor, domid))
    assert refused == 0, f"{refused} of 50 successors were refused EBUSY after detach() returned"


async def _orphaned(hv: Hypervisor, domid: int) -> bool:
    conn = await hv.tool()
    try:
        return (await stats(conn, domid))["rings_orphaned"] == ["paging"]
    finally:
        await conn.close()


async def test_a_crash_is_logged_once(hypervisor: Hypervisor) -> None:
    """Defect 6: the core and the driver each logged every domain crash at ERROR."""
    tool = await hypervisor.tool()
    domid = await hypervisor.create_domain(1, 16)
    reply, fds = await tool.call(protocol.MemEventEnable(domid=domid, ring=RingKind.paging))
    assert isinstance(reply, protocol.MemEventEnabled)
    named = dict(zip(reply.fds, fds, strict=True))
    page = mmap.mmap(named["ring"], abi.PAGE_SIZE, mmap.MAP_SHARED)
    try:
        ring: SharedRing[abi.MemEvent] = SharedRing(page, abi.MemEventCodec, page_size=abi.ring_bytes(reply.ring_size))
        ring.rsp_prod = 5  # responses to requests never made: a corrupt ring
        ring.release()
        await tool.call(protocol.MemEventResume(domid=domid, ring=RingKind.paging))
        assert (await stats(tool, domid))["crashed"]
    finally:
        page.close()
        for fd in fds:
            os.close(fd)
        await tool.close()
    lines = [ln for ln in hypervisor.proc.stderr().splitlines() if f"domain {domid} crashed" in ln]
    assert [ln.split()[1] for ln in lines] == ["ERROR"], lines
