"""hvemu's own pager and access listener on domains of the other ring ABIs (Xen 4.2.0's, Xen 4.17's vm_event)."""

from __future__ import annotations

import asyncio
import os

import pytest

from hvemu import protocol
from tests.integration.system import Hypervisor, Proc, ring_enabled, stats, wait_until


@pytest.mark.parametrize("ring_abi", ["4.2", "vm_event"])
async def test_the_sdk_pager_keeps_every_write(ring_abi: str, hypervisor: Hypervisor, tmp_path: object) -> None:
    conn = await hypervisor.tool()
    reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=2, gfns=1024, abi=ring_abi))
    assert isinstance(reply, protocol.DomainCreated)
    domid = reply.domid
    await conn.call(protocol.SetTarget(domid=domid, pages=384))
    pager = hypervisor.pager(domid, os.path.join(str(tmp_path), "d.pages"), "--batch", "32")
    guest: Proc | None = None
    try:
        await wait_until(lambda: ring_enabled(conn, domid))
        assert (await stats(conn, domid))["abi"] == ring_abi
        guest = hypervisor.guest(domid, "--duration", "2", "--pattern", "uniform", "--write-ratio", "0.5",
                                 "--linger")
        report = await asyncio.to_thread(guest.json_line, 60)
        assert report["integrity_failures"] == 0 and report["faults"] > 0, report
        st = await stats(conn, domid)
        assert st["events_lost"] == 0 and st["paging"]["responses_rejected"] == 0, st["paging"]
    finally:
        await conn.close()
        if guest is not None:
            guest.stop()
        pager.stop()
