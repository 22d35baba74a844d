"""Evicting really gives memory back to the host, and ballooning reaches the pager."""

from __future__ import annotations

import os
import signal
import time

from hvemu import protocol
from hvemu.procs import status_bytes
from tests.integration.system import Hypervisor, ring_enabled, stats, wait_until

MiB = 1 << 20


def _meminfo_shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def _rss_shmem(pid: int) -> int:
    return status_bytes(pid, "RssShmem")


def _on_tmpfs(path: str) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, kind, *_ = line.split()
            if path.startswith(mnt) and len(mnt) > len(best):
                best, fstype = mnt, kind
    return fstype == "tmpfs"


async def test_eviction_frees_host_and_guest_memory(hypervisor: Hypervisor, tmp_path: object) -> None:
    gfns = 8192  # 32 MiB
    conn = await hypervisor.tool()
    pager = guest = None
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=gfns))
        assert isinstance(reply, protocol.DomainCreated)
        domid = reply.domid
        pagefile = os.path.join(str(tmp_path), "d.pages")
        pager = hypervisor.pager(domid, pagefile)
        await wait_until(lambda: ring_enabled(conn, domid))
        # Every page written once (a sequential sweep), then the guest idles.
        guest = hypervisor.guest(domid, "--pattern", "sequential", "--write-ratio", "1", "--max-accesses",
                                 str(gfns), "--duration", "60", "--no-verify-all", "--linger")
        guest.json_line(60)
        time.sleep(0.2)
        shmem_before, guest_before = _meminfo_shmem(), _rss_shmem(guest.pid)
        assert guest_before >= 28 * MiB, f"the guest touched only {guest_before / MiB:.1f} MiB"

        await conn.call(protocol.SetTarget(domid=domid, pages=512))

        async def evicted() -> bool:
            return int((await stats(conn, domid))["paged"]) >= gfns - 512 - 64

        await wait_until(evicted, timeout=30)
        time.sleep(0.2)
        freed_host = shmem_before - _meminfo_shmem()
        freed_guest = guest_before - _rss_shmem(guest.pid)
        assert freed_guest >= 24 * MiB, f"guest RssShmem dropped by only {freed_guest / MiB:.1f} MiB"
        if not _on_tmpfs(pagefile):
            assert freed_host >= 20 * MiB, f"host Shmem dropped by only {freed_host / MiB:.1f} MiB"
        st = await stats(conn, domid)
        assert st["host_frames_used"] <= 512 + 64, st["host_frames_used"]
    finally:
        await conn.close()
        for proc in (guest, pager):
            if proc is not None:
                proc.stop()


async def test_balloon_out_of_paged_pages_sends_drop_requests(hypervisor: Hypervisor, tmp_path: object) -> None:
    conn = await hypervisor.tool()
    pager = guest = None
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=2, gfns=2048))
        assert isinstance(reply, protocol.DomainCreated)
        domid = reply.domid
        await conn.call(protocol.SetTarget(domid=domid, pages=256))
        pager = hypervisor.pager(domid, os.path.join(str(tmp_path), "d.pages"))
        await wait_until(lambda: ring_enabled(conn, domid))

        async def mostly_paged() -> bool:
            return int((await stats(conn, domid))["paged"]) > 1500

        await wait_until(mostly_paged, timeout=30)
        guest = hypervisor.guest(domid, "--duration", "2", "--balloon", "256", "--linger")
        report = guest.json_line(60)
        assert report["ok"] and report["ballooned"] == 256, report
        st = await stats(conn, domid)
        assert st["ballooned"] == 256 and st["dropped"] > 0, st
        assert st["paging"]["lost_guest"] == 0, st["paging"]
        guest.signal(signal.SIGTERM)
        assert guest.wait(15) == 0
    finally:
        await conn.close()
        for proc in (guest, pager):
            if proc is not None:
                proc.stop()


async def test_pager_shows_progress_of_its_long_operations(hypervisor: Hypervisor, tmp_path: object) -> None:
    conn = await hypervisor.tool()
    pager = None
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=2048))
        assert isinstance(reply, protocol.DomainCreated)
        domid = reply.domid
        await conn.call(protocol.SetTarget(domid=domid, pages=256))
        pager = hypervisor.pager(domid, os.path.join(str(tmp_path), "d.pages"), "--progress", "on")

        async def paged_out() -> bool:
            return int((await stats(conn, domid))["paged"]) >= 2048 - 256 - 64

        await wait_until(paged_out, timeout=30)
        time.sleep(0.3)
        pager.signal(signal.SIGTERM)
        assert pager.wait(30) == 0, pager.stderr()
        err = pager.stderr()  # not a terminal: plain lines
        assert f"dom{domid}: paging out to the target: " in err and "(100%)" in err, err
        assert f"dom{domid}: paging everything in: " in err, err
        assert int((await stats(conn, domid))["paged"]) == 0
    finally:
        await conn.close()
        if pager is not None:
            pager.stop()
