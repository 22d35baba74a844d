"""Xen 4.17's own xen-access, unmodified, monitors a running hvemu guest through the drop-in libraries.

``write`` and ``exec`` restrict every page and reopen each on its first
write (fetch): the gfns it prints are exactly the pages whose access it
opened, each event names the right kind of access.  ``breakpoint`` reports the
guest's INT3s and re-injects each into the guest.  The guest runs on, and
SIGTERM tears everything down: exit 0, ring disabled, default access back.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvemu import abi, protocol
from tests.integration.system import Hypervisor
from tests.integration.xen_tools import XenTool, create_vm_event_domain, domain_stats, make_hypervisor, until

GFNS = 256
ACCESS_LINE = re.compile(r"^PAGE ACCESS: ([r-])([w-])([x-]) for GFN ([0-9a-f]+) \(offset ([0-9a-f]+)\) "
                         r"gla ([0-9a-f]+) .*\(vcpu (\d+) \[p\]", re.M)
BREAKPOINT_LINE = re.compile(r"^Breakpoint: rip=([0-9a-f]+), gfn=([0-9a-f]+) \(vcpu (\d+)\)", re.M)


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    yield from make_hypervisor(os.path.join(str(tmp_path), "run"))


async def accesses(hv: Hypervisor, domid: int, gfns: list[int]) -> dict[int, int]:
    conn = await hv.tool()
    try:
        out = {}
        for g in gfns:
            reply, _ = await conn.call(protocol.AccessGet(domid=domid, gfn=g))
            assert isinstance(reply, protocol.AccessReply)
            out[g] = reply.access
        return out
    finally:
        await conn.close()


async def pause(hv: Hypervisor, domid: int, paused: bool) -> None:
    conn = await hv.tool()
    try:
        await conn.call(protocol.DomainPause(domid=domid) if paused else protocol.DomainUnpause(domid=domid))
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["write", "exec", "breakpoint"])
async def test_xen_access(mode: str, hv: Hypervisor, xen_bin: Path, xen_libs: Path) -> None:
    domid = await create_vm_event_domain(hv, 2, GFNS)
    guest = hv.guest(domid, "--duration", "4", "--pattern", "uniform", "--write-ratio", "0.3",
                     "--exec-every", "7", "--int3-every", "40", "--linger", "--report", "-")
    stdbuf = shutil.which("stdbuf")  # xen-access printf()s to a file: line-buffer it to read it live
    argv = [str(xen_bin / "xen-access"), str(domid), mode]
    tool = XenTool(Path(stdbuf) if stdbuf else xen_bin / "xen-access", ["-oL", *argv] if stdbuf else argv[1:],
                   hv.run_dir)
    try:
        await until(hv, domid, lambda st: st["access"]["enabled"] and st["access"]["put"] >= 5,
                    f"xen-access {mode} seeing events", tool=tool)
        await pause(hv, domid, True)  # every vCPU stops at its next step: xen-access catches up
        await until(hv, domid, lambda st: st["access"]["occupancy"] == 0, "the ring drained", tool=tool)
        await asyncio.sleep(0.5)
        out = tool.output()
        if mode in ("write", "exec"):
            events = ACCESS_LINE.findall(out)
            assert events, out[-2000:]
            want = ("-", "w", "-") if mode == "write" else ("-", "-", "x")
            printed = set()
            for r, w, x, gfn, offset, gla, _vcpu in events:
                assert (r, w, x) == want, f"a {mode} listener got a {r}{w}{x} event"
                g = int(gfn, 16)
                assert g < GFNS and int(gla, 16) == g * abi.PAGE_SIZE + int(offset, 16)
                printed.add(g)
            access = await accesses(hv, domid, list(range(GFNS)))
            opened = {g for g, a in access.items() if a == abi.P2MAccess.rwx}
            assert printed <= opened
            # xen-access restricts gfns 0..max_gpfn-1 (Xen's max_gpfn counts its special pages above RAM).
            assert opened - printed <= {GFNS - 1}, sorted(opened - printed)[:10]
            restricted = abi.P2MAccess.rx if mode == "write" else abi.P2MAccess.rw
            assert all(a == restricted for g, a in access.items() if g not in opened)
        else:
            hits = BREAKPOINT_LINE.findall(out)
            assert hits, out[-2000:]
            for rip, gfn, _vcpu in hits:
                assert int(gfn, 16) < GFNS and int(rip, 16) == int(gfn, 16) * abi.PAGE_SIZE
        await pause(hv, domid, False)
        tool.signal(signal.SIGTERM)
        status = await asyncio.to_thread(tool.wait, 60)
        out = tool.output()
        assert status == 0 and "xenaccess exit code 0" in out, out[-2000:]
        assert "Error" not in out, out[-2000:]
        st = await domain_stats(hv, domid)
        assert not st["access"]["enabled"], "xen-access left the ring enabled"
        assert st["access"]["lost"] == 0 and not st["crashed"]
        access = await accesses(hv, domid, [abi.DEFAULT_ACCESS_GFN, *range(GFNS)])
        assert set(access.values()) == {abi.P2MAccess.rwx}, "xen-access restores the default access"
        # The guest runs on to the end of its run (its report comes once every vCPU got there).
        report = await asyncio.to_thread(guest.json_line, 60)
        assert report["integrity_failures"] == 0 and report["accesses"] > 0, report
        assert all(not v["pauses"] for v in (await domain_stats(hv, domid))["vcpus"])
        if mode == "breakpoint":
            delivered = sum(v["traps_delivered"] for v in report["vcpus"])
            assert delivered == len(BREAKPOINT_LINE.findall(out)), "each INT3 re-injected reaches the guest"
    finally:
        tool.kill()
        guest.stop()
