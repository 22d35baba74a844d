"""Xen 4.17's own xenpaging, unmodified, pages an hvemu domain through the drop-in libraries.

The guest writes stamped pages and reads them back (every read checks the
stamp of the last write); xenpaging follows the xenstore target down, up and
down again, serves every page-in, and on SIGTERM pages everything back in and
disables the ring.  Skipped (with the reason) when the Debian package cannot be
fetched, except under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvemu import protocol, xenstore
from hvemu.abi import Errno
from tests.integration.system import Hypervisor
from tests.integration.xen_tools import (
    XenTool,
    create_vm_event_domain,
    domain_stats,
    kib,
    make_hypervisor,
    set_target,
    until,
)

GFNS = 1024
VCPUS = 2


@pytest.fixture
def hv(tmp_path: Path, policy: str) -> Iterator[Hypervisor]:
    yield from make_hypervisor(os.path.join(str(tmp_path), "run"), policy)


async def foreign_mapper(hv: Hypervisor, domid: int, stop: asyncio.Event, tally: dict[str, int]) -> None:
    """Another tool mapping random gfns one at a time, retrying a paged one until it is back."""
    conn = await hv.tool()
    rng = random.Random(7)
    try:
        while not stop.is_set():
            gfn = rng.randrange(GFNS)
            for _ in range(2000):
                reply, _ = await conn.call(protocol.MapForeign(domid=domid, gfns=[gfn]))
                assert isinstance(reply, protocol.ForeignPages)
                if reply.results[0] is None:
                    tally["mapped"] += 1
                    break
                assert reply.results[0] in (Errno.ENOENT, Errno.EBUSY), reply.results
                tally["retried"] += 1
                await asyncio.sleep(0.005)
            else:
                raise AssertionError(f"gfn {gfn:#x} never came back for the foreign mapper")
    finally:
        await conn.close()


async def run_xenpaging(hv: Hypervisor, xen_bin: Path, tmp_path: Path, *, mapper: bool) -> None:
    domid = await create_vm_event_domain(hv, VCPUS, GFNS)
    guest = hv.guest(domid, "--duration", "8", "--pattern", "uniform", "--write-ratio", "0.5", "--seed", "3",
                     "--linger", "--report", "-")
    pagefile = str(tmp_path / f"dom{domid}.paging")
    tool = XenTool(xen_bin / "xenpaging", ["-d", str(domid), "-f", pagefile], hv.run_dir)
    stop_mapping = asyncio.Event()
    tally = {"mapped": 0, "retried": 0}
    mapping = asyncio.create_task(foreign_mapper(hv, domid, stop_mapping, tally)) if mapper else None
    try:
        await until(hv, domid, lambda st: st["paging"]["enabled"], "xenpaging enabling the ring", tool=tool)
        with xenstore.XsClient(xenstore.socket_path(hv.run_dir)) as xs:
            for target, done in ((GFNS // 2, lambda st: st["resident"] <= GFNS // 2 + 8),
                                 (GFNS * 3 // 4, lambda st: st["resident"] >= GFNS * 3 // 4 - 8),
                                 (GFNS // 4, lambda st: st["resident"] <= GFNS // 4 + 8)):
                await set_target(hv, domid, target)
                assert xs.read(f"/local/domain/{domid}/memory/target-tot_pages") == str(kib(target)).encode()
                await until(hv, domid, done, f"xenpaging following the target to {target} pages", tool=tool)
        assert (await domain_stats(hv, domid))["paged"] > 0
        if mapping is not None:
            stop_mapping.set()
            await mapping
            assert tally["mapped"] > 0
        # SIGTERM: xenpaging pages everything back in, disables the ring, exits 0.
        tool.signal(signal.SIGTERM)
        status = await asyncio.to_thread(tool.wait, 90)
        out = tool.output()
        assert status == 0, out[-3000:]
        assert "error" not in out.lower(), out[-3000:]
        st = await domain_stats(hv, domid)
        assert st["paged"] == 0 and st["paging_in"] == 0 and st["paging_out"] == 0, st
        assert not st["paging"]["enabled"], "xenpaging left the ring enabled"
        assert not os.path.exists(pagefile), "xenpaging removes its pagefile"
        report = await asyncio.to_thread(guest.json_line, 90)
        assert report["integrity_failures"] == 0, report
        assert report["faults"] > 0, "the guest never faulted: nothing was paged under it"
        st = await domain_stats(hv, domid)
        assert st["events_lost"] == 0, st["paging"]
        assert not st["crashed"], st
    finally:
        stop_mapping.set()
        if mapping is not None and not mapping.done():
            mapping.cancel()
        tool.kill()
        guest.stop()


# Both admission policies (the seed's rule; claim-a-slot-first), and another tool mapping pages meanwhile.
# The claim run has the mapper: it is the seed run's flow plus foreign traffic, so a claim run without it
# would add time and no case (xenpaging's own page-ins are foreign populates in every run).
@pytest.mark.parametrize(("policy", "mapper"), [("seed", False), ("seed", True), ("claim", True)],
                         ids=["seed", "seed-foreign-mapper", "claim-foreign-mapper"])
async def test_xenpaging_pages_down_and_back(policy: str, mapper: bool, hv: Hypervisor, xen_bin: Path,
                                             xen_libs: Path, tmp_path: Path) -> None:
    await run_xenpaging(hv, xen_bin, tmp_path, mapper=mapper)
