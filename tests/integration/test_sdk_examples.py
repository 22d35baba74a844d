"""The daemon-writer's kit, as real processes: the SDK's scoped attachment, the raw attach
(``pager.attach``) and the examples under ``pager/examples/`` against a real hypervisor and guest."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEventReason, P2MAccess, P2MType, RingKind
from hvemu.client import ControlClient
from pager.sdk import AttachError, MemEventClient, response_for
from tests.integration.system import ROOT, Hypervisor, Proc, ring_enabled, stats, wait_until

GFNS_8M = 2048


async def _domain(hv: Hypervisor, vcpus: int = 2, gfns: int = GFNS_8M, target: int | None = None) -> int:
    conn = await hv.tool()
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns))
        assert isinstance(reply, protocol.DomainCreated)
        await conn.call(protocol.SetTarget(domid=reply.domid, pages=gfns if target is None else target))
        return reply.domid
    finally:
        await conn.close()


async def _guest_conns(hv: Hypervisor, domid: int, vcpu: int) -> tuple[ControlClient, ControlClient]:
    """Be the guest of ``domid`` (its main connection) and one of its vCPUs."""
    main = await ControlClient.connect(hv.socket)
    _, fds = await main.call(protocol.GuestHello(domid=domid))
    for fd in fds:
        os.close(fd)
    conn = await ControlClient.connect(hv.socket)
    await conn.call(protocol.GuestHello(domid=domid, vcpu=vcpu))
    return main, conn


async def _wait_ring(hv: Hypervisor, domid: int, ring: str, proc: Proc) -> None:
    conn = await hv.tool()
    try:
        async def up() -> bool:
            assert proc.alive(), f"{proc.argv[:3]} exited: {proc.stderr()[-2000:]}"
            return await ring_enabled(conn, domid, ring)

        await wait_until(up, timeout=15)
    finally:
        await conn.close()


def _guest_report(guest: Proc, timeout: float = 60) -> dict[str, Any]:
    out, err = guest.communicate(timeout)
    assert guest.p.returncode == 0, err[-3000:]
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert report["ok"] and report["integrity_failures"] == 0, report
    return report


def _last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line in {text[-2000:]!r}"
    data: dict[str, Any] = json.loads(lines[-1])
    return data


# --------------------------------------------------------------------------- SDK


async def test_context_manager_disables_the_ring_even_on_error(hypervisor: Hypervisor) -> None:
    domid = await _domain(hypervisor, gfns=64)
    conn = await hypervisor.tool()
    try:
        with pytest.raises(RuntimeError, match="daemon bug"):
            async with MemEventClient(domid, RingKind.access, run_dir=hypervisor.run_dir) as client:
                assert await ring_enabled(conn, domid, "access")
                with pytest.raises(AttachError) as busy:  # one daemon per ring
                    await MemEventClient(domid, RingKind.access, run_dir=hypervisor.run_dir).attach()
                assert busy.value.errno == Errno.EBUSY
                raise RuntimeError("daemon bug")
        assert client.state.value == "detached"
        assert not await ring_enabled(conn, domid, "access"), "the ring outlived its daemon's error"
        with pytest.raises(AttachError) as missing:
            await MemEventClient(999, RingKind.paging, run_dir=hypervisor.run_dir).attach()
        assert missing.value.errno == Errno.ESRCH
    finally:
        await conn.close()


async def test_detach_keeps_a_paging_ring_with_pages_out_unless_forced(hypervisor: Hypervisor) -> None:
    """Disabled, the ring would crash the domain at the next touch of a page out; kept, it waits for a pager."""
    domid = await _domain(hypervisor, gfns=64)
    conn = await hypervisor.tool()
    try:
        async with MemEventClient(domid, RingKind.paging, run_dir=hypervisor.run_dir) as client:
            assert await client.stored_pages_out() == 0
            assert await client.domctl.nominate([1, 2]) == [None, None]
            assert await client.domctl.evict([1, 2]) == [None, None]
            assert await client.stored_pages_out() == 2
        assert await ring_enabled(conn, domid, "paging"), "the ring was disabled with pages out"

        async def orphaned() -> bool:
            return bool((await stats(conn, domid))["rings_orphaned"] == ["paging"])

        await wait_until(orphaned, timeout=5)
        client = MemEventClient(domid, RingKind.paging, run_dir=hypervisor.run_dir)
        await client.attach()
        assert client.info is not None and client.info.reattached
        await client.detach(force=True)
        assert not await ring_enabled(conn, domid, "paging")
    finally:
        await conn.close()


async def test_clean_detach_publishes_queued_responses(hypervisor: Hypervisor) -> None:
    """A daemon that queued answers but never pushed them does not strand its vCPUs on detach."""
    domid = await _domain(hypervisor, gfns=64)
    main, vcpu = await _guest_conns(hypervisor, domid, 0)
    try:
        async with MemEventClient(domid, RingKind.access, run_dir=hypervisor.run_dir) as client:
            assert await client.domctl.access_set([7], P2MAccess.r) == [None]
            assert client.p2m_access(7) == P2MAccess.r
            access = asyncio.create_task(vcpu.call(protocol.GuestAccess(vcpu=0, gfn=7, access=abi.ACCESS_W,
                                                                        gla=0x7123, offset=0x123)))
            batch = await asyncio.wait_for(anext(client.requests()), 10)
            [req] = batch.violations
            assert (req.gfn, req.access_w, req.gla_valid, req.gla, req.offset) == (7, True, True, 0x7123, 0x123)
            assert batch.paused == [req] and client.outstanding == 1
            await client.domctl.access_set([7], P2MAccess.rwx)
            client.respond(response_for(req))  # queued, never pushed by the daemon
            assert client.unanswered() == 1
        await asyncio.wait_for(access, 10)  # detach pushed and resumed before disabling
    finally:
        await vcpu.close()
        await main.close()


# --------------------------------------------------------------------------- examples


async def test_minimal_pager_example(hypervisor: Hypervisor, tmp_path: Path) -> None:
    domid = await _domain(hypervisor, target=512)
    pager = Proc("-m", "pager.examples.minimal_pager", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                 "--pagefile", str(tmp_path / "d.pages"))
    guest: Proc | None = None
    try:
        await _wait_ring(hypervisor, domid, "paging", pager)
        guest = hypervisor.guest(domid, "--duration", "2", "--pattern", "uniform", "--write-ratio", "0.5")
        report = _guest_report(guest)
        assert int(report["faults"]) > 0, "nothing was paged"
        out, err = pager.communicate(20)  # the guest's exit destroyed the domain: the pager ends
        assert pager.p.returncode == 0, err[-3000:]
        summary = _last_json(out)
        assert int(summary["pages_out"]) > 0 and int(summary["pages_in"]) > 0, summary
    finally:
        if guest is not None:
            guest.stop()
        pager.stop()


async def test_access_listener_example(hypervisor: Hypervisor, tmp_path: Path) -> None:
    domid = await _domain(hypervisor, vcpus=2, gfns=512)
    log = tmp_path / "events.log"
    # Event lines go to a file: a pipe nobody reads until the end would fill
    # up and block the listener (and with it every vCPU waiting for an answer).
    listener = Proc("-m", "pager.examples.access_listener", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                    "--gfns", "0-127", "--access", "rx", "--cr3", "--int3", "--log", str(log))
    guest: Proc | None = None
    vcpu1: ControlClient | None = None
    tool: ControlClient | None = None
    try:
        ready = listener.json_line(20)
        assert ready["ready"] and ready["restricted"] == 128, ready
        # The guest runs on vCPU 0 only and lingers after its report, keeping the domain alive.
        guest = hypervisor.guest(domid, "--vcpus", "1", "--duration", "1.5", "--pattern", "uniform",
                                 "--write-ratio", "0.5", "--trap-every", "25", "--linger")
        report = guest.json_line(60)
        assert report["integrity_failures"] == 0 and report["ok"], report
        assert report["vcpus"][0]["traps"] > 0, report
        # vCPU 1 is ours: a write with a guest linear address, and a breakpoint.
        vcpu1 = await ControlClient.connect(hypervisor.socket)
        await vcpu1.call(protocol.GuestHello(domid=domid, vcpu=1))
        tool = await hypervisor.tool()
        await tool.call(protocol.AccessSet(domid=domid, gfns=[300], access=int(P2MAccess.r)))
        await asyncio.wait_for(vcpu1.call(protocol.GuestAccess(vcpu=1, gfn=300, access=abi.ACCESS_W,
                                                               gla=0x12C123, offset=0x123)), 10)
        await asyncio.wait_for(vcpu1.call(protocol.GuestTrap(vcpu=1, reason=int(MemEventReason.INT3),
                                                             value=0x401, gla=0x401000)), 10)
        st = await stats(tool, domid)
        assert st["access"]["enabled"] and st["access"]["responses"] > 0, st
        listener.signal(signal.SIGTERM)
        out, err = listener.communicate(20)
        assert listener.p.returncode == 0, err[-3000:]
        lines = log.read_text().splitlines()
        violations = [ln for ln in lines if ln.startswith("PAGE ACCESS:")]
        assert violations, out[-2000:]
        assert all(" -w- for GFN " in ln for ln in violations), "the guest only writes violate rx"
        assert any("for GFN 0x12c (offset 0x000123) gla 0x000000000012c123 (vcpu 1) [-> rwx]" in ln
                   for ln in violations), violations[-5:]
        assert any(ln.startswith("CR3 write:") for ln in lines)
        assert "INT3: GFN 0x401 gla 0x0000000000401000 (vcpu 1)" in lines
        summary = _last_json(out)
        assert summary["VIOLATION"] == len(violations) and summary["INT3"] == 1 and summary["CR3"] > 0, summary
        st = await stats(tool, domid)
        assert not st["access"]["enabled"], "the listener did not disable its ring"
        assert st["vcpus_paused"] == 0, st
        # It gave the restricted pages their rights back (read off the p2m by a paging client).
        async with MemEventClient(domid, RingKind.paging, run_dir=hypervisor.run_dir) as peek:
            assert {peek.p2m_access(g) for g in range(128)} == {P2MAccess.rwx}
    finally:
        for c in (vcpu1, tool):
            if c is not None:
                await c.close()
        if guest is not None:
            guest.stop()
        listener.stop()


async def test_access_listener_as_xen_access_default_access_int3_reinjection_and_single_step(
        hypervisor: Hypervisor, tmp_path: Path) -> None:
    """What xen-access needs: ``~0`` sets the default access, INT3s are re-injected, vCPUs single-step."""
    domid = await _domain(hypervisor, vcpus=1, gfns=256)
    log = tmp_path / "events.log"
    listener = Proc("-m", "pager.examples.access_listener", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                    "--gfns", "all", "--access", "rx", "--int3", "--singlestep", "--log", str(log))
    guest: Proc | None = None
    tool: ControlClient | None = None
    try:
        ready = listener.json_line(20)
        assert ready["ready"] and ready["traps"] == ["INT3", "SINGLESTEP"], ready
        tool = await hypervisor.tool()
        reply, _ = await tool.call(protocol.AccessGet(domid=domid, gfn=abi.DEFAULT_ACCESS_GFN))
        assert isinstance(reply, protocol.AccessReply) and reply.access == P2MAccess.rx, reply
        guest = hypervisor.guest(domid, "--vcpus", "1", "--duration", "1.0", "--pattern", "uniform",
                                 "--write-ratio", "0.3", "--int3-every", "7", "--linger")
        report = guest.json_line(60)
        vcpu = report["vcpus"][0]
        assert report["integrity_failures"] == 0 and report["ok"], report
        assert vcpu["traps"] > 0 and vcpu["traps_delivered"] == vcpu["traps"], "every INT3 came back to the guest"
        assert vcpu["steps"] == vcpu["accesses"], "single-stepping reports every step"
        listener.signal(signal.SIGTERM)
        out, err = listener.communicate(20)
        assert listener.p.returncode == 0, err[-3000:]
        summary = _last_json(out)
        assert summary["INT3"] == summary["reinjected"] == vcpu["traps"], summary
        assert summary["SINGLESTEP"] == vcpu["steps"], summary
        assert any(ln.startswith("SINGLESTEP: GFN ") for ln in log.read_text().splitlines())
        reply, _ = await tool.call(protocol.AccessGet(domid=domid, gfn=abi.DEFAULT_ACCESS_GFN))
        assert isinstance(reply, protocol.AccessReply) and reply.access == P2MAccess.rwx, "default restored"
    finally:
        if tool is not None:
            await tool.close()
        if guest is not None:
            guest.stop()
        listener.stop()


@pytest.fixture(scope="module")
def c_pager(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH")
    out = tmp_path_factory.mktemp("c_pager") / "c_pager"
    src = os.path.join(ROOT, "pager", "examples", "c_pager.c")
    include = os.path.join(ROOT, "hvemu", "include")  # the header hvemu ships, its macros Xen's
    built = subprocess.run([cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", include, "-o", str(out),
                            src], capture_output=True, text=True)
    if built.returncode:
        if "No such file" in built.stderr and ".h" in built.stderr:
            pytest.skip(f"{cc} has no libc headers: {built.stderr[:200]}")
        pytest.fail(f"c_pager.c does not build:\n{built.stderr}")
    return out


async def test_c_pager_example_through_raw_attach(hypervisor: Hypervisor, tmp_path: Path, c_pager: Path) -> None:
    domid = await _domain(hypervisor, target=512)
    attach = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid), "--ring", "paging",
                  "--", str(c_pager), str(tmp_path / "c.pages"))
    guest: Proc | None = None
    try:
        await _wait_ring(hypervisor, domid, "paging", attach)
        conn = await hypervisor.tool()
        try:  # the C pager brings the domain down to its target before the guest starts
            async def at_target() -> bool:
                assert attach.alive(), attach.stderr()[-2000:]
                return int((await stats(conn, domid))["resident"]) <= 600

            await wait_until(at_target, timeout=20)
        finally:
            await conn.close()
        guest = hypervisor.guest(domid, "--duration", "2", "--pattern", "uniform", "--write-ratio", "0.5")
        report = _guest_report(guest)
        assert int(report["faults"]) > 0
        out, err = attach.communicate(20)
        assert attach.p.returncode == 0, err[-3000:]
        summary = _last_json(out)
        assert summary["c_pager"] and summary["domain_gone"], summary
        assert int(summary["pages_out"]) >= GFNS_8M - 600 and int(summary["pages_in"]) > 0, summary
    finally:
        if guest is not None:
            guest.stop()
        attach.stop()


async def test_c_pager_pages_everything_in_on_sigterm(hypervisor: Hypervisor, tmp_path: Path, c_pager: Path) -> None:
    """SIGTERM to attach reaches the C pager, which pages everything back in; attach then disables the ring."""
    domid = await _domain(hypervisor, gfns=512, target=128)
    main, vcpu = await _guest_conns(hypervisor, domid, 0)  # keeps the domain alive
    attach = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                  "--", str(c_pager), str(tmp_path / "c.pages"))
    conn = await hypervisor.tool()
    try:
        await _wait_ring(hypervisor, domid, "paging", attach)

        async def paged() -> bool:
            return int((await stats(conn, domid))["paged"]) >= 300

        await wait_until(paged, timeout=20)
        attach.signal(signal.SIGTERM)
        out, err = attach.communicate(30)
        assert attach.p.returncode == 0, err[-3000:]
        summary = _last_json(out)
        assert not summary["domain_gone"] and summary["pages_in"] == summary["pages_out"], summary
        st = await stats(conn, domid)
        assert st["paged"] == 0 and st["paging_out"] == 0 and not st["paging"]["enabled"], st
    finally:
        await conn.close()
        await vcpu.close()
        await main.close()
        attach.stop()


# --------------------------------------------------------------------------- raw attach contract

_PROBE = textwrap.dedent('''
    import json, mmap, os, socket, stat, struct, sys
    e = {k: v for k, v in os.environ.items() if k.startswith("HVEMU_")}
    page, gfns = int(e["HVEMU_PAGE_SIZE"]), int(e["HVEMU_GFNS"])
    ring = mmap.mmap(int(e["HVEMU_RING_FD"]), page, mmap.MAP_SHARED)
    idx = struct.unpack_from("<4I", ring, 0)
    mem = mmap.mmap(int(e["HVEMU_MEMORY_FD"]), gfns * page, mmap.MAP_SHARED, mmap.PROT_READ)
    p2m_fd = int(e["HVEMU_P2M_FD"])
    p2m = mmap.mmap(p2m_fd, 2 * gfns, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        mmap.mmap(p2m_fd, 2 * gfns, mmap.MAP_SHARED)
        p2m_writable = True
    except OSError:
        p2m_writable = False
    ev = socket.socket(fileno=int(e["HVEMU_EVTCHN_FD"]))
    ctl = socket.socket(fileno=int(e["HVEMU_CTL_FD"]))
    rfile = ctl.makefile("rb")
    def cmd(line, data=b""):
        ctl.sendall(line.encode() + b"\\n" + data)
        return rfile.readline().decode().rstrip("\\n")
    replies = {
        "hello": cmd("hello"), "target": cmd("target 40"), "nominate": cmd("nominate 5 6 0x7 99999"),
        "evict": cmd("evict 5 6 7"), "bogus": cmd("frobnicate 1"), "bad_gfn": cmd("evict five"),
        "load": cmd("load 5 6", b"\\xab" * page + b"\\xcd" * page),
        "bad_load": cmd("load 1 x", bytes(2 * page)), "ping": cmd("ping"),
    }
    out = dict(env=e, idx=idx, p2m_writable=p2m_writable, ev_type=int(ev.type), replies=replies,
               gfn5=mem[5 * page:5 * page + 2].hex(), gfn6=mem[6 * page] , gfn7=mem[7 * page],
               types=[p2m[5], p2m[6], p2m[7]])
    print(json.dumps(out), flush=True)
    sys.exit(3)
''')


async def test_raw_attach_contract(hypervisor: Hypervisor) -> None:
    domid = await _domain(hypervisor, vcpus=3, gfns=256)
    attach = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                  "--", sys.executable, "-c", _PROBE)
    conn = await hypervisor.tool()
    try:
        out, err = attach.communicate(30)
        assert attach.p.returncode == 3, f"the program's status is not forwarded: {err[-3000:]}"
        probe = _last_json(out)
        env = probe["env"]
        assert isinstance(env, dict)
        assert env["HVEMU_DOMID"] == str(domid) and env["HVEMU_RING"] == "paging"
        assert env["HVEMU_GFNS"] == "256" and env["HVEMU_MAX_VCPUS"] == "3" and env["HVEMU_RING_SIZE"] == "64"
        assert env["HVEMU_PAGE_SIZE"] == str(abi.PAGE_SIZE) and env["HVEMU_REATTACHED"] == "0"
        assert env["HVEMU_SOCKET"] == hypervisor.socket and env["HVEMU_RUN_DIR"] == hypervisor.run_dir
        assert int(env["HVEMU_PORT"]) > 0
        assert probe["idx"] == [0, 1, 0, 1], "a fresh ring is SHARED_RING_INIT'ed (events armed at 1)"
        assert not probe["p2m_writable"] and probe["ev_type"] == 5  # SOCK_SEQPACKET
        r = probe["replies"]
        assert isinstance(r, dict)
        assert r["hello"] == "ok hvemu-attach 1" and r["ping"] == "ok" and r["target"] == "ok 40"
        assert r["nominate"] == "ok 0 0 0 EINVAL"
        assert r["evict"] == "ok 0 0 0"
        assert r["bogus"].startswith("EINVAL unknown command 'frobnicate'")
        assert r["bad_gfn"].startswith("EINVAL gfn 'five'")
        assert r["load"] == "ok 0 0"
        assert r["bad_load"].startswith("EINVAL"), "a malformed load is refused, and its pages skipped"
        assert probe["gfn5"] == "abab" and probe["gfn6"] == 0xCD and probe["gfn7"] == 0
        assert probe["types"] == [P2MType.ram_rw, P2MType.ram_rw, P2MType.ram_paged]
        st = await stats(conn, domid)
        # gfn 7 is still paged out: attach keeps the ring (orphaned) for a pager that holds it,
        # rather than disable it and let a guest touching gfn 7 crash its domain.
        assert st["paging"]["enabled"] and st["rings_orphaned"] == ["paging"], st
        assert "1 pages are still out; the paging ring is kept" in err, err[-3000:]
    finally:
        await conn.close()
        attach.stop()


_SLEEPER = textwrap.dedent('''
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    print("ready", flush=True)
    time.sleep(60)
''')


async def test_raw_attach_forwards_sigterm_and_program_errors(hypervisor: Hypervisor) -> None:
    domid = await _domain(hypervisor, gfns=64)
    conn = await hypervisor.tool()
    attach = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid), "--ring", "access",
                  "--", sys.executable, "-c", _SLEEPER)
    missing = busy = None
    try:
        assert attach.p.stdout is not None
        line = await asyncio.to_thread(attach.p.stdout.readline)
        assert line.strip() == "ready", attach.stderr()
        # A second daemon on the same ring is refused, whatever it is.
        busy = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid), "--ring", "access",
                    "--", "true")
        _, err = busy.communicate(20)
        assert busy.p.returncode == 1 and "EBUSY" in err, err
        attach.signal(signal.SIGTERM)
        assert attach.wait(20) == 7, attach.stderr()
        assert not (await stats(conn, domid))["access"]["enabled"]
        missing = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                       "--", "/nonexistent/daemon")
        _, err = missing.communicate(20)
        assert missing.p.returncode == 127 and "cannot run" in err, err
        assert not (await stats(conn, domid))["paging"]["enabled"], "a program that never ran left the ring on"
    finally:
        await conn.close()
        for p in (attach, busy, missing):
            if p is not None:
                p.stop()


async def test_raw_attach_keeps_a_ring_with_unanswered_requests(hypervisor: Hypervisor) -> None:
    """A program that exits with requests unanswered leaves the ring for the next daemon, which serves them."""
    domid = await _domain(hypervisor, gfns=64)
    main, vcpu = await _guest_conns(hypervisor, domid, 0)
    tool = await hypervisor.tool()
    quitter = textwrap.dedent('''
        import os, socket
        ctl = socket.socket(fileno=int(os.environ["HVEMU_CTL_FD"]))
        ctl.sendall(b"access r 9\\n")
        print(ctl.makefile("rb").readline().decode().strip(), flush=True)
        os.read(0, 1)  # wait until told to go, then leave the request unanswered
    ''')
    attach = subprocess.Popen([sys.executable, "-m", "pager.attach", "--run-dir", hypervisor.run_dir,
                               "--domid", str(domid), "--ring", "access", "--", sys.executable, "-c", quitter],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    access: asyncio.Task[object] | None = None
    try:
        assert attach.stdout is not None and attach.stdin is not None
        assert (await asyncio.to_thread(attach.stdout.readline)).strip() == "ok 0"
        access = asyncio.create_task(vcpu.call(protocol.GuestAccess(vcpu=0, gfn=9, access=abi.ACCESS_W)))

        async def queued() -> bool:
            return int((await stats(tool, domid))["access"]["occupancy"]) == 1

        await wait_until(queued)
        # The program exits without answering.
        _, err = await asyncio.to_thread(attach.communicate, "go", 20)
        assert attach.returncode == 0, err
        assert "1 requests unanswered" in err and "kept" in err, err
        st = await stats(tool, domid)
        assert st["access"]["enabled"] and st["rings_orphaned"] == ["access"], st
        assert not access.done()
        async with MemEventClient(domid, RingKind.access, run_dir=hypervisor.run_dir) as client:
            assert client.info is not None and client.info.reattached
            batch = await asyncio.wait_for(anext(client.requests()), 10)
            assert [r.gfn for r in batch.violations] == [9]
            await client.domctl.access_set([9], P2MAccess.rwx)
            client.respond_all(batch)
            await client.push()
            await asyncio.wait_for(access, 10)
    finally:
        if access is not None and not access.done():
            access.cancel()
        await tool.close()
        await vcpu.close()
        await main.close()
        if attach.poll() is None:
            attach.kill()
        attach.wait(5)
        for f in (attach.stdin, attach.stdout, attach.stderr):
            if f is not None and not f.closed:
                f.close()


async def test_c_pager_stops_cleanly_while_the_guest_faults(hypervisor: Hypervisor, tmp_path: Path,
                                                             c_pager: Path) -> None:
    """SIGTERM lands while the C pager waits for a command's reply: it still answers everything and pages all in.

    Three attach/stop cycles under one faulting guest, so that the signal
    meets a pending reply (it did, in most stops, before the handler had
    ``SA_RESTART``: ``fgets`` failed with ``EINTR`` and the pager died with
    requests unanswered).
    """
    domid = await _domain(hypervisor, gfns=2048, target=256)
    guest: Proc | None = None
    conn = await hypervisor.tool()
    try:
        for cycle in range(3):
            attach = Proc("-m", "pager.attach", "--run-dir", hypervisor.run_dir, "--domid", str(domid),
                          "--ring", "paging", "--", str(c_pager), str(tmp_path / "c.pages"))
            try:
                await _wait_ring(hypervisor, domid, "paging", attach)
                if guest is None:
                    guest = hypervisor.guest(domid, "--duration", "30", "--pattern", "uniform",
                                             "--write-ratio", "0.5")
                start = int((await stats(conn, domid))["populates"])

                async def faulting(start: int = start) -> bool:
                    return int((await stats(conn, domid))["populates"]) >= start + 200

                await wait_until(faulting, timeout=20)
                attach.signal(signal.SIGTERM)
                out, err = attach.communicate(30)
                assert attach.p.returncode == 0, f"cycle {cycle}: {err[-3000:]}"
                summary = _last_json(out)
                assert not summary["domain_gone"], summary
                st = await stats(conn, domid)
                assert st["paged"] == 0 and st["paging_out"] == 0 and not st["paging"]["enabled"], st
                assert st["vcpus_paused"] == 0, f"cycle {cycle}: a vCPU was left paused: {st}"
            finally:
                attach.stop()
        assert guest is not None
        guest.stop()
    finally:
        await conn.close()
        if guest is not None:
            guest.stop()
