"""The running system, as real processes: hypervisor, guests, pagers, a foreign mapper."""

from __future__ import annotations

import os
import signal
import time

from hvemu import protocol
from hvemu.client import ControlClient
from tests.integration.system import Hypervisor, Proc, ring_enabled, stats, wait_until

GFNS_8M = 2048


async def _domain(hv: Hypervisor, vcpus: int = 2, gfns: int = GFNS_8M, target: int = 512) -> int:
    return await hv.create_domain(vcpus, gfns, target)


async def _start_pager(hv: Hypervisor, domid: int, pagefile: str) -> Proc:
    pager = hv.pager(domid, pagefile, "--batch", "32")
    conn = await hv.tool()
    try:
        await wait_until(lambda: ring_enabled(conn, domid))
    finally:
        await conn.close()
    return pager


async def test_end_to_end_paging_keeps_every_write(hypervisor: Hypervisor, tmp_path: object) -> None:
    domid = await _domain(hypervisor)
    pager = await _start_pager(hypervisor, domid, os.path.join(str(tmp_path), "d.pages"))
    guest = hypervisor.guest(domid, "--duration", "2", "--pattern", "uniform", "--write-ratio", "0.5")
    try:
        out, err = guest.communicate(60)
        assert guest.p.returncode == 0, err
        import json

        report = json.loads(out.strip().splitlines()[-1])
        assert report["ok"] and report["integrity_failures"] == 0
        assert report["faults"] > 0, "the guest never faulted: nothing was paged"
        pager_status = pager.wait(15)  # the guest's exit destroyed the domain
        assert pager_status == 0, pager.communicate(5)[1]
    finally:
        guest.stop()
        pager.stop()


async def test_overcommit_two_domains(tmp_path: object) -> None:
    hv = Hypervisor(os.path.join(str(tmp_path), "run"), memory_mib=10)  # 2 x 8 MiB over 10 MiB
    procs: list[Proc] = []
    try:
        doms = [await _domain(hv, target=700) for _ in range(2)]
        for d in doms:
            procs.append(await _start_pager(hv, d, os.path.join(str(tmp_path), f"d{d}.pages")))
        guests = [hv.guest(d, "--duration", "2", "--pattern", "hotcold") for d in doms]
        procs += guests
        for g in guests:
            _, err = g.communicate(60)
            assert g.p.returncode == 0, err
    finally:
        for p in procs:
            p.stop()
        assert hv.stop() == 0


async def test_pager_killed_and_restarted_loses_nothing(hypervisor: Hypervisor, tmp_path: object) -> None:
    pagefile = os.path.join(str(tmp_path), "d.pages")
    domid = await _domain(hypervisor, vcpus=4)
    pager = await _start_pager(hypervisor, domid, pagefile)
    guest = hypervisor.guest(domid, "--duration", "4", "--pattern", "uniform", "--write-ratio", "0.5")
    second: Proc | None = None
    try:
        time.sleep(1.0)
        pager.signal(signal.SIGKILL)
        pager.wait(5)
        time.sleep(0.3)  # vCPUs pile up on the orphaned ring meanwhile
        second = await _start_pager(hypervisor, domid, pagefile)
        out, err = guest.communicate(60)
        assert guest.p.returncode == 0, err
        assert '"integrity_failures": 0' in out
    finally:
        guest.stop()
        pager.stop()
        if second is not None:
            second.stop()


async def test_clean_pager_stop_pages_everything_in(hypervisor: Hypervisor, tmp_path: object) -> None:
    domid = await _domain(hypervisor)
    pager = await _start_pager(hypervisor, domid, os.path.join(str(tmp_path), "d.pages"))
    guest = hypervisor.guest(domid, "--duration", "1", "--linger")
    conn = await hypervisor.tool()
    try:
        guest.json_line(60)
        pager.signal(signal.SIGTERM)
        assert pager.wait(60) == 0, pager.communicate(5)[1]
        st = await stats(conn, domid)
        assert st["paged"] == 0 and st.get("paging_in", 0) == 0, st
        assert not st["paging"]["enabled"], "the pager did not disable its ring"
    finally:
        await conn.close()
        guest.stop()
        pager.stop()


async def _guest_running(conn: ControlClient, domid: int) -> None:
    """Until the domain's guest has said hello (a fixed sleep is too short on a busy machine)."""
    async def connected() -> bool:
        return bool((await stats(conn, domid))["guest_connected"])

    await wait_until(connected, timeout=30)


async def test_guest_killed_destroys_domain_and_frees_memory(hypervisor: Hypervisor) -> None:
    domid = await _domain(hypervisor, target=GFNS_8M)
    guest = hypervisor.guest(domid, "--duration", "30")
    conn = await hypervisor.tool()
    try:
        await _guest_running(conn, domid)
        guest.signal(signal.SIGKILL)
        guest.wait(5)

        async def gone() -> bool:
            reply, _ = await conn.call(protocol.DomainList())
            assert isinstance(reply, protocol.DomainListReply)
            return not reply.domains

        await wait_until(gone)
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=16))
        assert isinstance(reply, protocol.DomainCreated)
        st = await stats(conn, reply.domid)
        assert st["host_frames_used"] == 16, "the killed domain's frames were not returned"
    finally:
        await conn.close()
        guest.stop()


async def test_foreign_mapper_during_heavy_faulting(hypervisor: Hypervisor, tmp_path: object) -> None:
    from hvemu.toolstack.cli.base import map_foreign

    domid = await _domain(hypervisor, vcpus=4, target=256)
    pager = await _start_pager(hypervisor, domid, os.path.join(str(tmp_path), "d.pages"))
    guest = hypervisor.guest(domid, "--duration", "8", "--pattern", "uniform")
    conn = await hypervisor.tool()
    try:
        time.sleep(0.8)
        total_retries = 0
        for start in range(0, GFNS_8M, 256):
            gfns = list(range(start, start + 256, 4))
            pages, retries = await map_foreign(conn, domid, gfns, timeout=20)
            assert sorted(pages) == gfns
            total_retries += retries
        assert total_retries > 0, "no gfn was paged out when mapped: the foreign path did not run"
        _, err = guest.communicate(60)
        assert guest.p.returncode == 0, err
    finally:
        await conn.close()
        guest.stop()
        pager.stop()


async def test_destroying_a_domain_stops_its_guest(hypervisor: Hypervisor) -> None:
    domid = await _domain(hypervisor, target=GFNS_8M)  # nothing paged: the guest never exits by itself
    guest = hypervisor.guest(domid, "--duration", "60")
    conn = await hypervisor.tool()
    try:
        await _guest_running(conn, domid)
        await conn.call(protocol.DomainDestroy(domid=domid))
        assert guest.wait(10) == 0, "a destroyed domain is a normal end for its guest"
        err = guest.stderr()
        assert f"domain {domid}: the domain was destroyed" in err and "lost the hypervisor" not in err, err
    finally:
        await conn.close()
        guest.stop()
