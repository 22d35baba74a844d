"""Security: who can reach what (README, "Threat model").

* the run directory is owner-only and the control socket ``0600``; another
  user cannot even reach it, and a peer whose uid ``check_peer`` refuses gets
  ``EPERM`` and a close;
* every shared segment handed out is an anonymous, owner-only memfd (nothing
  ever named in ``/dev/shm``), the p2m table read-only, and no holder of a
  writable fd can resize one (a guest truncating its memory used to kill the
  hypervisor with ``SIGBUS``);
* a guest connection gets its own domain's segments only and may do nothing
  but exit for its own vCPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import socket
import stat
import tempfile
import time

import pytest

from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError
from hvemu.hypervisor.daemon import HypervisorDaemon, prepare_run_dir
from hvemu.hypervisor.server import ControlServer
from tests.integration.hostile import fd_targets
from tests.integration.system import Hypervisor, shm_segments

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


def _mode(fd_or_path: int | str) -> int:
    return stat.S_IMODE(os.stat(fd_or_path).st_mode)


async def _create(conn: ControlClient, vcpus: int = 2, gfns: int = 64) -> int:
    reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns))
    assert isinstance(reply, protocol.DomainCreated)
    return reply.domid


async def _guest(hv: Hypervisor, domid: int, vcpu: int | None = None) -> tuple[ControlClient, dict[str, int]]:
    conn = await ControlClient.connect(hv.socket)
    reply, fds = await conn.call(protocol.GuestHello(domid=domid, vcpu=vcpu))
    assert isinstance(reply, protocol.Welcome)
    return conn, dict(zip(reply.fds, fds, strict=True))


async def _enable(hv: Hypervisor, domid: int) -> tuple[ControlClient, protocol.MemEventEnabled, dict[str, int]]:
    conn = await hv.tool()
    reply, fds = await conn.call(protocol.MemEventEnable(domid=domid, ring=abi.RingKind.paging))
    assert isinstance(reply, protocol.MemEventEnabled)
    return conn, reply, dict(zip(reply.fds, fds, strict=True))


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


async def test_run_dir_socket_and_every_segment_are_owner_only(hypervisor: Hypervisor) -> None:
    run = os.stat(hypervisor.run_dir)
    assert run.st_uid == os.getuid() and stat.S_IMODE(run.st_mode) == 0o700
    sock = os.lstat(hypervisor.socket)
    assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == os.getuid()
    assert stat.S_IMODE(sock.st_mode) == 0o600
    tool = await hypervisor.tool()
    domid = await _create(tool, gfns=64)
    guest, gfds = await _guest(hypervisor, domid)
    daemon, info, dfds = await _enable(hypervisor, domid)
    try:
        assert set(gfds) == {"memory", "p2m", "inflight", "ioreq"}
        assert set(dfds) == {"ring", "evtchn", "memory", "p2m", "load"}  # a paging ring's load area
        for name, fd in [*gfds.items(), *dfds.items()]:
            st = os.fstat(fd)
            assert st.st_uid == os.getuid(), name
            if name == "evtchn":
                assert stat.S_ISSOCK(st.st_mode)
                continue
            assert _mode(fd) & 0o077 == 0, f"{name} segment is mode {_mode(fd):o}"
            target = os.readlink(f"/proc/self/fd/{fd}")
            if name == "memory":
                # Guest memory is a POSIX shm segment whose name was unlinked once mapped.
                assert target.startswith("/dev/shm/hvemu-") and target.endswith(" (deleted)"), target
                continue
            # An anonymous memfd: it never had a name anyone could open.
            assert target.startswith("/memfd:"), name
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW), name
        assert os.fstat(gfds["memory"]).st_size == 64 * abi.PAGE_SIZE
        assert os.fstat(dfds["ring"]).st_size == abi.PAGE_SIZE
        for p2m in (gfds["p2m"], dfds["p2m"]):
            assert fcntl.fcntl(p2m, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            with pytest.raises(PermissionError):
                mmap.mmap(p2m, abi.p2m_table_size(64), mmap.MAP_SHARED)
        assert not shm_segments(), "a segment has a name in /dev/shm"
        assert all(t.endswith(" (deleted)") for t in fd_targets(hypervisor.proc.pid) if t.startswith("/dev/shm"))
    finally:
        _close_all(gfds)
        _close_all(dfds)
        for c in (guest, daemon, tool):
            await c.close()


async def test_no_peer_can_resize_a_segment_under_the_hypervisor(hypervisor: Hypervisor) -> None:
    """ftruncate of a passed segment used to SIGBUS the hypervisor on its next access."""
    tool = await hypervisor.tool()
    domid = await _create(tool, gfns=64)
    guest, gfds = await _guest(hypervisor, domid)
    daemon, _info, dfds = await _enable(hypervisor, domid)
    try:
        for name, fd in [("inflight", gfds["inflight"]), ("ioreq", gfds["ioreq"]), ("ring", dfds["ring"]),
                         ("load", dfds["load"])]:
            for size in (0, 1, 1 << 30):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            with pytest.raises(PermissionError):  # nor lift the seals
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            assert name  # for the failure message
        for fd in (gfds["p2m"], dfds["p2m"]):
            with pytest.raises(OSError) as info:
                os.ftruncate(fd, 0)
            assert info.value.errno in (errno.EINVAL, errno.EBADF)
        # Guest memory is a POSIX segment (no seals): a guest may shrink it, but the
        # hypervisor only ever reaches it with pread/pwrite, so it gets short reads
        # (EINVAL for those gfns), never a SIGBUS.
        os.ftruncate(gfds["memory"], 16 * abi.PAGE_SIZE)
        reply, _ = await tool.call(protocol.MapForeign(domid=domid, gfns=list(range(64))))
        assert isinstance(reply, protocol.ForeignPages)
        assert reply.results == [None] * 16 + [Errno.EINVAL] * 48
        reply, _ = await tool.call(protocol.PagingNominate(domid=domid, gfns=[40, 41]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [None, None]
        reply, _ = await tool.call(protocol.PagingEvict(domid=domid, gfns=[40, 41]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [None, None]
        reply, _ = await tool.call(protocol.PagingLoad(domid=domid, gfns=[40], pages=[bytes(abi.PAGE_SIZE)]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [None]
        # The hypervisor touches the rest through mappings: ring (resume), p2m (nominate).
        reply, _ = await tool.call(protocol.PagingNominate(domid=domid, gfns=[1, 2]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [None, None]
        await tool.call(protocol.MemEventResume(domid=domid, ring=abi.RingKind.paging))
        assert hypervisor.proc.alive()
    finally:
        _close_all(gfds)
        _close_all(dfds)
        for c in (guest, daemon, tool):
            await c.close()


_libc = ctypes.CDLL(None, use_errno=True)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def _write_attempts(fd: int, size: int) -> list[str]:
    """Every way a holder of a read-only p2m fd might get to write it; the ones that worked.

    A reopen of ``/proc/self/fd/N`` gives a new open file description, with
    its own access mode: ``O_RDONLY`` on the received fd does not stop it.
    """
    worked: list[str] = []
    try:
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        rw = -1
    if rw < 0:
        return worked
    try:
        original = os.pread(rw, size, 0)
        forged = bytes([abi.P2MType.ram_paging_in]) * 8
        with contextlib.suppress(PermissionError):
            os.pwrite(rw, forged, 0)
            worked.append("pwrite")
        try:
            m = mmap.mmap(rw, size, mmap.MAP_SHARED)
        except PermissionError:
            pass
        else:
            m[0:8] = forged
            m.close()
            worked.append("mmap writable")
        if _libc.fallocate(rw, 3, 0, size) == 0:  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            worked.append("punch a hole")
        # A read-only shared mapping made writable afterwards.
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, rw, 0)
        if addr not in (None, ctypes.c_void_p(-1).value):
            if _libc.mprotect(ctypes.c_void_p(addr), size, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
                worked.append("mprotect")
            _libc.munmap(ctypes.c_void_p(addr), size)
        if worked:  # put the bytes back so that the hypervisor survives the failed test
            with contextlib.suppress(OSError):
                os.pwrite(rw, original, 0)
    finally:
        os.close(rw)
    return worked


async def test_no_holder_of_the_p2m_can_write_it(hypervisor: Hypervisor) -> None:
    """Issue 14, defect 4: the p2m fd is read-only, but a reopen through /proc was read-write.

    The hypervisor acts on the types in that table (a forged ``ram_paging_in``
    had frames allocated twice, counters gone negative); it must be the only
    writer: the memfd is sealed against every write but the hypervisor's own
    mapping (``F_SEAL_FUTURE_WRITE``).
    """
    tool = await hypervisor.tool()
    domid = await _create(tool, gfns=64)
    guest, gfds = await _guest(hypervisor, domid)
    daemon, _info, dfds = await _enable(hypervisor, domid)
    size = abi.p2m_table_size(64)
    try:
        before = os.pread(gfds["p2m"], size, 0)
        for who, fds in (("guest", gfds), ("daemon", dfds)):
            assert _write_attempts(fds["p2m"], size) == [], f"the {who} could write the p2m"
            assert fcntl.fcntl(fds["p2m"], fcntl.F_GET_SEALS) & F_SEAL_FUTURE_WRITE, who
        assert os.pread(gfds["p2m"], size, 0) == before
        # The hypervisor still writes it: nominate changes gfn 3's type under everyone's eyes.
        reply, _ = await tool.call(protocol.PagingNominate(domid=domid, gfns=[3]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [None]
        assert os.pread(dfds["p2m"], 1, abi.p2m_type_index(64, 3))[0] == abi.P2MType.ram_paging_out
    finally:
        _close_all(gfds)
        _close_all(dfds)
        for c in (guest, daemon, tool):
            await c.close()


async def test_guest_reaches_only_its_own_domain(hypervisor: Hypervisor) -> None:
    tool = await hypervisor.tool()
    mine = await _create(tool, vcpus=2, gfns=32)
    other = await _create(tool, vcpus=2, gfns=48)
    guest, gfds = await _guest(hypervisor, mine)
    other_guest, ofds = await _guest(hypervisor, other)
    vcpu = await ControlClient.connect(hypervisor.socket)
    try:
        assert os.fstat(gfds["memory"]).st_size == 32 * abi.PAGE_SIZE
        # The segments are distinct objects: what one guest writes the other never sees.
        assert os.fstat(gfds["memory"]).st_ino != os.fstat(ofds["memory"]).st_ino
        mem = mmap.mmap(gfds["memory"], 32 * abi.PAGE_SIZE, mmap.MAP_SHARED)
        mem[:8] = b"mine!!!!"
        mem.close()
        reply, _ = await tool.call(protocol.MapForeign(domid=other, gfns=[0]))
        assert isinstance(reply, protocol.ForeignPages) and reply.pages[0] == bytes(abi.PAGE_SIZE)

        tool_ops: list[protocol.Msg] = [
            protocol.DomainCreate(max_vcpus=1, gfns=1), protocol.DomainDestroy(domid=other),
            protocol.DomainList(), protocol.Stats(domid=other), protocol.DomainInfo(domid=mine),
            protocol.MemEventEnable(domid=mine, ring=abi.RingKind.paging),
            protocol.MemEventEnable(domid=other, ring=abi.RingKind.access),
            protocol.MemEventDisable(domid=other, ring=abi.RingKind.paging),
            protocol.MemEventResume(domid=other, ring=abi.RingKind.paging),
            protocol.PagingNominate(domid=other, gfns=[0]), protocol.PagingEvict(domid=other, gfns=[0]),
            protocol.PagingPrep(domid=other, gfns=[0]),
            protocol.PagingLoad(domid=other, gfns=[0], pages=[bytes(abi.PAGE_SIZE)]),
            protocol.AccessSet(domid=other, gfns=[0], access=0), protocol.AccessRequired(domid=other, required=True),
            protocol.MapForeign(domid=other, gfns=[0]), protocol.SetTarget(domid=other, pages=0),
            protocol.GetTarget(domid=other), protocol.SetHvmParam(domid=other, reason=3, mode=2),
            protocol.ToolHello(),
        ]
        for op in tool_ops:
            with pytest.raises(ControlError) as info:
                await guest.call(op)
            assert info.value.errno in (Errno.EPERM, Errno.EBUSY), (op, info.value)
        # A second owner for a domain, or vCPUs of a domain nobody owns yet: refused.
        with pytest.raises(ControlError) as info:
            await guest.call(protocol.GuestHello(domid=other))
        assert info.value.errno == Errno.EBUSY
        third = await _create(tool, vcpus=1, gfns=8)
        with pytest.raises(ControlError) as info:
            await vcpu.call(protocol.GuestHello(domid=third, vcpu=0))
        assert info.value.errno == Errno.EPERM
        # Exits name a vCPU and a gfn of the guest's own domain, nothing else.
        for bad in (protocol.GuestAccess(vcpu=2, gfn=0, access=1), protocol.GuestAccess(vcpu=-1, gfn=0, access=1),
                    protocol.GuestAccess(vcpu=0, gfn=32, access=1), protocol.GuestAccess(vcpu=0, gfn=-1, access=1),
                    protocol.GuestAccess(vcpu=0, gfn=0, access=0), protocol.GuestAccess(vcpu=0, gfn=0, access=8),
                    protocol.GuestBalloonOut(vcpu=5, gfns=[1]), protocol.GuestTrap(vcpu=0, reason=99)):
            with pytest.raises(ControlError) as info:
                await guest.call(bad)
            assert info.value.errno == Errno.EINVAL, (bad, info.value)
        reply, _ = await guest.call(protocol.GuestBalloonOut(vcpu=0, gfns=[40, 31]))
        assert isinstance(reply, protocol.BatchResult) and reply.results == [Errno.EINVAL, None]
        st, _ = await tool.call(protocol.Stats(domid=other))
        assert isinstance(st, protocol.StatsReply) and st.stats.removed == 0, "the other domain was touched"
    finally:
        _close_all(gfds)
        _close_all(ofds)
        for c in (vcpu, guest, other_guest, tool):
            await c.close()


def test_prepare_run_dir_refuses_a_directory_others_can_enter(tmp_path: object) -> None:
    base = str(tmp_path)
    fresh = os.path.join(base, "fresh")
    prepare_run_dir(fresh)
    assert _mode(fresh) == 0o700
    loose = os.path.join(base, "loose")
    os.mkdir(loose, 0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(PermissionError, match="accessible to others"):
        prepare_run_dir(loose)
    group = os.path.join(base, "group")
    os.mkdir(group)
    os.chmod(group, 0o710)
    with pytest.raises(PermissionError):
        prepare_run_dir(group)
    if os.getuid() == 0:
        foreign = os.path.join(base, "foreign")
        os.mkdir(foreign, 0o700)
        os.chown(foreign, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match="belongs to uid"):
            prepare_run_dir(foreign)


def test_prepare_run_dir_removes_a_stale_socket_only(tmp_path: object) -> None:
    run = os.path.join(str(tmp_path), "r")
    prepare_run_dir(run)
    path = protocol.socket_path(run)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # bound, never listening: what a killed hypervisor leaves
    prepare_run_dir(run)
    assert not os.path.exists(path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(path)
        live.listen(1)
        with pytest.raises(RuntimeError, match="already running"):
            prepare_run_dir(run)
        assert os.path.exists(path)
    finally:
        live.close()
        os.unlink(path)


def _as_nobody(path: str, msg: protocol.Msg, *, nobody: bool = True) -> str:
    """Connect to ``path`` from a forked child (as uid/gid nobody) and send ``msg``; what happened, as text.

    A fork, not an exec: the interpreter may live where nobody cannot read it.
    """
    data = protocol.encode(msg)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            if nobody:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)  # never hang a test run, whatever the server does
            try:
                s.connect(path)
            except OSError as e:
                os.write(w, f"connect {e.errno}".encode())
            else:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(data)  # a refused peer may already be cut off: read what it was told
                got = b""
                while len(got) < protocol.HEADER_SIZE or len(got) < protocol.HEADER_SIZE + int.from_bytes(
                        got[:protocol.HEADER_SIZE], "little"):
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    got += chunk
                os.write(w, f"reply {got[protocol.HEADER_SIZE:].hex()}".encode())
            code = 0
        except BaseException as exc:
            os.write(w, f"child failed: {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode()
    return out.decode()


@as_root
def test_another_user_cannot_reach_the_control_socket(hypervisor: Hypervisor) -> None:
    assert _as_nobody(hypervisor.socket, protocol.ToolHello()) == f"connect {errno.EACCES}"


def test_check_peer_accepts_only_our_uid() -> None:
    daemon = HypervisorDaemon(tempfile.gettempdir(), 16)
    assert daemon.check_peer(os.getuid())
    assert not daemon.check_peer(os.getuid() + 1)
    assert not daemon.check_peer(NOBODY if os.getuid() != NOBODY else 0)


@as_root
async def test_a_foreign_uid_is_refused_by_check_peer() -> None:
    """Real credentials: a socket others can reach, guarded by the hypervisor's check_peer alone."""
    where = tempfile.mkdtemp(prefix="hvemu-peer")
    os.chmod(where, 0o755)
    path = os.path.join(where, "control.sock")
    seen: list[object] = []

    async def handler(state: object, msg: protocol.Msg) -> tuple[protocol.Msg, list[int]]:
        seen.append(msg)
        return protocol.Welcome(role="tool"), []

    daemon = HypervisorDaemon(where, 16)
    try:
        async with ControlServer(path, handler, check_peer=daemon.check_peer, mode=0o666):
            out = await asyncio.to_thread(_as_nobody, path, protocol.ToolHello())
            assert out.startswith("reply ")
            reply = protocol.decode_reply(bytes.fromhex(out.split()[1]))
            assert isinstance(reply, protocol.Error) and reply.errno == Errno.EPERM
            assert str(NOBODY) in reply.message
            # Our own uid is let in by the same hook.
            conn = await ControlClient.connect(path)
            r, _ = await conn.call(protocol.ToolHello())
            assert isinstance(r, protocol.Welcome)
            await conn.close()
        assert len(seen) == 1, "the refused peer's request reached the handler"
    finally:
        import shutil

        shutil.rmtree(where, ignore_errors=True)


async def test_the_hypervisor_refuses_a_peer_its_hook_rejects(tmp_path: object) -> None:
    """The daemon itself (in this process) wired to a hook that says no: EPERM, then a close."""
    run = tempfile.mkdtemp(prefix="hvemu-hook")
    daemon = HypervisorDaemon(run, 64)
    refused: list[int] = []

    def no(uid: int) -> bool:
        refused.append(uid)
        return False

    daemon.check_peer = no  # type: ignore[method-assign]
    started = asyncio.Event()
    task = asyncio.create_task(daemon.serve(started.set))
    try:
        await asyncio.wait_for(started.wait(), 10)
        conn = await ControlClient.connect(daemon.socket_path)
        with pytest.raises(ControlError) as info:
            await conn.call(protocol.ToolHello())
        assert info.value.errno == Errno.EPERM
        await conn.close()
        assert refused == [os.getuid()]
        assert not daemon.backends
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.rmdir(run)


async def test_a_guest_pinning_a_page_in_flight_crashes_only_its_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that never leaves a page (its in-flight word held) cannot hold the host.

    The shootdown after a nominate gives up after ``SHOOTDOWN_TIMEOUT`` and crashes that domain
    alone; while it waits it must not burn a CPU (a legitimate access ends within microseconds).
    """
    from hvemu.hypervisor import backend

    monkeypatch.setattr(backend, "SHOOTDOWN_TIMEOUT", 1.0)
    run = tempfile.mkdtemp(prefix="hvemu-pin")
    daemon = HypervisorDaemon(run, 256)
    started = asyncio.Event()
    task = asyncio.create_task(daemon.serve(started.set))
    conns: list[ControlClient] = []
    fds: dict[str, int] = {}
    try:
        await asyncio.wait_for(started.wait(), 10)
        tool = await ControlClient.connect(daemon.socket_path)
        conns.append(tool)
        await tool.call(protocol.ToolHello())
        pinned = await _create(tool, vcpus=2, gfns=16)
        other = await _create(tool, vcpus=1, gfns=16)
        guest = await ControlClient.connect(daemon.socket_path)
        conns.append(guest)
        reply, got = await guest.call(protocol.GuestHello(domid=pinned))
        assert isinstance(reply, protocol.Welcome)
        fds = dict(zip(reply.fds, got, strict=True))
        inflight = mmap.mmap(fds["inflight"], abi.inflight_table_size(2), mmap.MAP_SHARED)
        words = memoryview(inflight)[: 2 * abi.INFLIGHT_WORD_SIZE].cast("Q")
        words[1] = abi.inflight_value(5)  # vCPU 1 "is inside" gfn 5, forever
        cpu0, wall0 = time.process_time(), time.monotonic()
        # A right taken away waits for the shootdown (no pager needed: paging ops need a paging ring).
        nominate = asyncio.create_task(tool.call(protocol.AccessSet(domid=pinned, gfns=[4, 5, 6],
                                                                    access=int(abi.P2MAccess.r))))
        # Meanwhile the host serves everyone else.
        await asyncio.sleep(0.2)
        for i in range(20):
            r, _ = await tool.call(protocol.AccessSet(domid=other, gfns=[1],
                                                      access=int(abi.P2MAccess.r if i % 2 else abi.P2MAccess.rwx)))
            assert isinstance(r, protocol.BatchResult) and r.results == [None]
        with pytest.raises(ControlError) as info:
            await asyncio.wait_for(nominate, 10)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        assert info.value.errno == Errno.ESRCH and "shootdown" in info.value.message
        assert wall >= 0.9
        assert cpu < 0.5 * wall, f"the shootdown wait burnt {cpu:.2f}s of CPU in {wall:.2f}s"
        words.release()
        inflight.close()
        st, _ = await tool.call(protocol.DomainList())
        assert isinstance(st, protocol.DomainListReply)
        alive = {d.domid: d.crashed for d in st.domains}
        assert alive.get(other) is False and alive.get(pinned, True) is True, alive
    finally:
        _close_all(fds)
        for c in conns:
            await c.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.rmdir(run)


def test_a_pagefile_is_never_someone_elses(tmp_path: object) -> None:
    """Guest memory goes into the pagefile: not through a planted link, not into a file others own or read."""
    from pager.pagefile import Pagefile

    base = str(tmp_path)
    target = os.path.join(base, "target")
    with open(target, "wb") as f:
        f.write(b"x")
    link = os.path.join(base, "link.pages")
    os.symlink(target, link)
    with pytest.raises(OSError) as info:
        Pagefile(link, 4)
    assert info.value.errno == errno.ELOOP
    assert open(target, "rb").read() == b"x"
    loose = os.path.join(base, "loose.pages")
    with open(loose, "wb"):
        pass
    os.chmod(loose, 0o666)
    pf = Pagefile(loose, 4)
    pf.close()
    assert _mode(loose) == 0o600, "an existing pagefile others could read was not tightened"
    if os.getuid() == 0:
        planted = os.path.join(base, "planted.pages")
        with open(planted, "wb"):
            pass
        os.chown(planted, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match="belongs to uid"):
            Pagefile(planted, 4)
        assert os.path.getsize(planted) == 0
    fresh = os.path.join(base, "fresh.pages")
    Pagefile(fresh, 4).close()
    assert _mode(fresh) == 0o600
