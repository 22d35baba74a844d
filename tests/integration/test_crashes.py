"""Crashes: pagers killed at every point of their work, guests killed, the hypervisor killed.

* A pager is killed with SIGKILL many times in one run, at precise points
  (``crashy_pager.py``: after nominate, mid-copy to the pagefile, after an
  evict, after a load, mid-batch of responses, after a push) or at a random
  moment, each time while the guest faults hard; each is followed by a
  restart on the same pagefile.  The guest (every page stamped and read back
  at the end) must find every write, no guest event may be lost, and no
  response may ever be rejected.  ``HVEMU_CRASH_CASES`` sets how many kills.
* A guest killed while its pager pages hard: the domain goes, its pager exits
  cleanly, every frame returns to the host budget and every fd is closed.
* The hypervisor killed: guests and pagers exit at once with a clear message,
  nothing is left in ``/dev/shm`` and nothing but the inert socket file in the
  run directory, which the next hypervisor removes before it serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time

import pytest

from hvemu import protocol
from hvemu.abi import RingKind
from hvemu.client import ControlError
from tests.integration.crashy_pager import POINTS
from tests.integration.hostile import CRASH_CASES_ENV, env_count, env_seed, open_fds, wait_proc
from tests.integration.system import Hypervisor, Proc, ring_enabled, shm_segments, stats, wait_until

KILLS = env_count(CRASH_CASES_ENV, 8)


async def _domain(hv: Hypervisor, vcpus: int, gfns: int, target: int) -> int:
    return await hv.create_domain(vcpus, gfns, target)


def _crashy(hv: Hypervisor, domid: int, pagefile: str, point: str, hit: int) -> Proc:
    return Proc("-m", "tests.integration.crashy_pager", "--die-at", point, "--hit", str(hit),
                "--run-dir", hv.run_dir, "--domid", str(domid), "--pagefile", pagefile, "--batch", "16")


async def _attached(hv: Hypervisor, domid: int, pager: Proc, timeout: float = 15) -> bool:
    """Wait until the pager owns the ring (False if it died first)."""
    conn = await hv.tool()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply, _ = await conn.call(protocol.Stats(domid=domid))
            assert isinstance(reply, protocol.StatsReply)
            if reply.stats.ring_owned("paging", pager.pid):
                return True
            if not pager.alive():
                return False
            await asyncio.sleep(0.02)
        raise AssertionError("the pager did not attach")
    finally:
        await conn.close()


@pytest.mark.timeout(120 + KILLS * 10)
async def test_pager_killed_at_every_point_loses_nothing(tmp_path: object) -> None:
    seed = env_seed()
    rng = random.Random(seed)
    hv = Hypervisor(os.path.join(str(tmp_path), "run"), memory_mib=32)
    procs: list[Proc] = []
    kills: dict[str, int] = {}
    rounds = 0
    try:
        while sum(kills.values()) < KILLS:
            rounds += 1
            domid = await _domain(hv, vcpus=4, gfns=1024, target=96)
            pagefile = os.path.join(str(tmp_path), f"d{domid}.pages")
            first = hv.pager(domid, pagefile, "--batch", "16")
            procs.append(first)
            assert await _attached(hv, domid, first)
            round_seconds = min(8.0, 2.0 + 0.8 * (KILLS - sum(kills.values())))
            guest = hv.guest(domid, "--duration", str(round_seconds), "--pattern", "uniform",
                             "--write-ratio", "0.5", "--seed", str(seed % 1000 + rounds), "--balloon", "16")
            procs.append(guest)
            end = time.monotonic() + round_seconds - 1.0
            current = first
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            while time.monotonic() < end and sum(kills.values()) < KILLS:
                # Kill the running pager: a random moment, or let the next one die at a chosen point.
                current.signal(signal.SIGKILL)
                assert await wait_proc(current, 10) == -signal.SIGKILL
                point = rng.choice([*POINTS, "random"])
                if point == "random":
                    current = hv.pager(domid, pagefile, "--batch", "16")
                    procs.append(current)
                    await asyncio.sleep(rng.uniform(0.05, 0.6))
                    kills["random"] = kills.get("random", 0) + 1
                    continue
                current = _crashy(hv, domid, pagefile, point, rng.randint(1, 6))
                procs.append(current)
                deadline = time.monotonic() + 3
                while current.alive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                if not current.alive():
                    status = current.wait(1)
                    assert status == -signal.SIGKILL, f"crashy pager exited {status}: {current.stderr()[-2000:]}"
                    kills[point] = kills.get(point, 0) + 1
                # else: the point was not reached in time; it is killed at a random moment next.
            if current.alive():
                current.signal(signal.SIGKILL)
                await wait_proc(current, 10)
            # A last pager that lives: the guest's final pass reads back every page it wrote.
            last = hv.pager(domid, pagefile, "--batch", "16")
            procs.append(last)
            status = await wait_proc(guest, 120)
            out, err = guest.communicate(5)
            assert status == 0, f"guest exited {status} after kills {kills}: {err[-3000:]}"
            report = json.loads(out.strip().splitlines()[-1])
            assert report["ok"] and report["integrity_failures"] == 0, report
            assert report["faults"] > 0
            assert await wait_proc(last, 30) == 0, last.stderr()[-3000:]
        err = hv.proc.stderr()
        assert "response rejected" not in err, "a killed pager left a response the hypervisor rejected"
        assert "lost mem_event" not in err, "a guest event was lost"
        assert "crashed" not in err, err[-3000:]
        print(f"pager kills: {kills} over {rounds} rounds (seed {seed})")
    finally:
        for p in procs:
            p.stop()
        assert hv.stop() == 0


async def test_guest_killed_while_paging_returns_everything(tmp_path: object) -> None:
    hv = Hypervisor(os.path.join(str(tmp_path), "run"), memory_mib=16)
    procs: list[Proc] = []
    try:
        baseline = open_fds(hv.proc.pid)
        conn = await hv.tool()
        domid = await _domain(hv, vcpus=4, gfns=2048, target=128)
        pager, guest = await _paging_under_guest(hv, conn, domid, os.path.join(str(tmp_path), "d.pages"), 30,
                                                 procs)
        guest.signal(signal.SIGKILL)
        assert await wait_proc(guest, 10) == -signal.SIGKILL
        # The domain goes with its guest; its pager sees that and exits cleanly.
        assert await wait_proc(pager, 30) == 0, pager.stderr()[-3000:]
        summary = json.loads(pager.communicate(5)[0].strip().splitlines()[-1])
        assert summary["pages_out"] > 0
        reply, _ = await conn.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply) and not reply.domains
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8))
        assert isinstance(reply, protocol.DomainCreated)
        st = await stats(conn, reply.domid)
        assert st["host_frames_used"] == 8, "the killed domain's frames were not returned"
        await conn.call(protocol.DomainDestroy(domid=reply.domid))
        await conn.close()
        deadline = time.monotonic() + 10
        while open_fds(hv.proc.pid) > baseline and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert open_fds(hv.proc.pid) <= baseline, "the domain's fds were not all closed"
    finally:
        for p in procs:
            p.stop()
        assert hv.stop() == 0


async def _paging_under_guest(hv: Hypervisor, conn: object, domid: int, pagefile: str, duration: float,
                              procs: list[Proc]) -> tuple[Proc, Proc]:
    """A pager (batches of 32) and a guest writing uniformly, once pages go out and come back in."""
    pager = hv.pager(domid, pagefile, "--batch", "32")
    procs.append(pager)
    await wait_until(lambda: ring_enabled(conn, domid))  # type: ignore[arg-type]
    guest = hv.guest(domid, "--duration", str(duration), "--pattern", "uniform", "--write-ratio", "0.5")
    procs.append(guest)
    await wait_until(lambda: _paged_out(conn, domid), timeout=20)
    return pager, guest


async def _paged_out_at_all(conn: object, domid: int) -> bool:
    return int((await stats(conn, domid))["paged"]) > 100  # type: ignore[arg-type]


async def _paged_out(conn: object, domid: int) -> bool:
    st = await stats(conn, domid)  # type: ignore[arg-type]
    return int(st["evicted"]) > 200 and int(st["populates"]) > 20


async def test_hypervisor_killed_everyone_exits_and_nothing_is_left(tmp_path: object) -> None:
    run_dir = os.path.join(str(tmp_path), "run")
    hv = Hypervisor(run_dir, memory_mib=16)
    procs: list[Proc] = []
    second: Hypervisor | None = None
    try:
        conn = await hv.tool()
        doms = [await _domain(hv, vcpus=2, gfns=1024, target=128) for _ in range(2)]
        for d in doms:
            pager = hv.pager(d, os.path.join(str(tmp_path), f"d{d}.pages"), "--batch", "32")
            procs.append(pager)
            await wait_until(lambda d=d: ring_enabled(conn, d))  # type: ignore[misc]
        guests = [hv.guest(d, "--duration", "60", "--pattern", "uniform") for d in doms]
        procs += guests
        await wait_until(lambda: _paged_out(conn, doms[0]), timeout=20)
        await conn.close()
        hv.proc.signal(signal.SIGKILL)
        assert hv.proc.wait(10) == -signal.SIGKILL
        for p in procs:
            status = await wait_proc(p, 15)
            err = p.stderr()
            assert status != 0 and "Traceback" not in err, (p.argv, status, err[-2000:])
            assert err.strip(), f"{p.argv[:2]} exited {status} without a word"
        for p in procs:
            assert "hypervisor" in p.stderr(), (p.argv[:2], p.stderr())
        for g in guests:
            assert "lost the hypervisor" in g.stderr(), g.stderr()
        # Nothing of the dead hypervisor in /dev/shm, nothing in the run directory: its
        # janitor removed the socket file.
        assert not shm_segments(hv.proc.pid)
        deadline = time.monotonic() + 10
        while os.listdir(run_dir) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert os.listdir(run_dir) == []
        # Had the janitor died too (say the whole process group was killed), the socket
        # file would stay, inert; the next hypervisor removes it before it serves.
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(protocol.socket_path(run_dir))
        dead.close()
        second = Hypervisor(run_dir, memory_mib=16)  # returns once it listens (its ready fd), stale file or not
        tool = await second.tool()
        reply, _ = await tool.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply) and not reply.domains
        await tool.close()
        assert second.stop() == 0
        assert os.listdir(run_dir) == []
        second = None
    finally:
        for p in procs:
            p.stop()
        hv.stop()
        if second is not None:
            second.stop()


async def test_a_pager_without_the_pages_refuses_the_orphaned_ring(hypervisor: Hypervisor, tmp_path: object) -> None:
    """kill -9 the pager, re-attach one with another (or a stale) pagefile: it refuses and the ring waits.

    Serving the ring from a store that does not hold the paged-out pages
    would give the guest zeros or stale bytes without a word.  The refusal
    leaves the ring and its requests for the pager that has the pages;
    attached, it serves them and the guest sees every byte it wrote.
    """
    hv = hypervisor
    right = os.path.join(str(tmp_path), "right.pages")
    wrong = os.path.join(str(tmp_path), "wrong.pages")
    same = os.path.join(str(tmp_path), "same-domain-earlier.pages")
    conn = await hv.tool()
    procs: list[Proc] = []
    try:
        domid = await _domain(hv, vcpus=2, gfns=1024, target=128)
        # A stale pagefile of another domain instance (an earlier run's domain with this id).
        other = await _domain(hv, vcpus=1, gfns=1024, target=1024)
        stale = hv.pager(other, wrong)
        procs.append(stale)
        await wait_until(lambda: ring_enabled(conn, other))
        stale.signal(signal.SIGTERM)
        assert await wait_proc(stale, 20) == 0, stale.stderr()[-2000:]
        # A pagefile of this very domain, from an earlier pager that paged out and stopped cleanly.
        earlier = hv.pager(domid, same, "--batch", "32")
        procs.append(earlier)
        await wait_until(lambda: _paged_out_at_all(conn, domid), timeout=20)
        earlier.signal(signal.SIGTERM)
        # A clean stop pages ~900 pages back in: a hang detector, with room for a busy machine.
        assert await wait_proc(earlier, 60) == 0, earlier.stderr()[-2000:]
        pager, guest = await _paging_under_guest(hv, conn, domid, right, 4, procs)
        pager.signal(signal.SIGKILL)
        assert await wait_proc(pager, 10) == -signal.SIGKILL
        for path in (wrong, same, os.path.join(str(tmp_path), "missing.pages")):
            refused = hv.pager(domid, path)
            procs.append(refused)
            assert await wait_proc(refused, 20) == 1
            err = refused.stderr()
            assert "pages are out" in err and "the ring is left as it is" in err, err[-2000:]
            assert "Traceback" not in err and err.count(f"dom{domid}:") == 1, err[-2000:]
            st = await stats(conn, domid)
            assert st["paging"]["enabled"] and "paging" in st["rings_orphaned"], st
        good = hv.pager(domid, right, "--batch", "32")
        procs.append(good)
        out, err = guest.communicate(60)
        assert guest.p.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["ok"] and report["integrity_failures"] == 0, report
        assert await wait_proc(good, 30) == 0, good.stderr()[-3000:]
    finally:
        await conn.close()
        for p in procs:
            p.stop()


async def test_domain_handles_name_instances(hypervisor: Hypervisor) -> None:
    """Xen's domain handle: given or picked at create, refused when malformed, reported to daemons."""
    conn = await hypervisor.tool()
    try:
        given = "0123456789abcdef" * 2
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8, handle=given.upper()))
        assert isinstance(reply, protocol.DomainCreated)
        assert (await stats(conn, reply.domid))["handle"] == given
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8))
        assert isinstance(reply, protocol.DomainCreated)
        picked_domid = reply.domid
        picked = (await stats(conn, reply.domid))["handle"]
        assert len(picked) == 32 and picked != given
        with pytest.raises(ControlError) as bad:
            await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8, handle="not-a-uuid"))
        assert bad.value.errno == "EINVAL"
        with pytest.raises(ControlError) as twice:
            await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8, handle=given))
        assert twice.value.errno == "EEXIST"
        dashed = "12345678-1234-5678-1234-567812345678"
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=1, gfns=8, handle=dashed))
        assert isinstance(reply, protocol.DomainCreated)
        assert (await stats(conn, reply.domid))["handle"] == dashed.replace("-", "")
        listed, _ = await conn.call(protocol.DomainList())
        assert isinstance(listed, protocol.DomainListReply)
        assert dashed.replace("-", "") in {d.handle for d in listed.domains}
        enabled, fds = await conn.call(protocol.MemEventEnable(domid=picked_domid, ring=RingKind.paging))
        for fd in fds:
            os.close(fd)
        assert isinstance(enabled, protocol.MemEventEnabled) and enabled.domain_handle == picked
    finally:
        await conn.close()
