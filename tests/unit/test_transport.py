"""The control transport in one process: fd passing, fd/frame association, FramedStream, ControlClient and
ControlServer.

The two-process versions are in ``tests/integration/test_control.py`` and
``test_evtchn.py``; these cover the corners that are easier to reach in-process
(peer-credential refusal, cancellation, hang-ups, handler misbehaviour).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError, SyncControlClient
from hvemu.fdpass import (
    ConnectionClosed,
    FdLike,
    OwnedFd,
    TransportError,
    TruncatedControlData,
    peer_credentials,
    recvmsg_fds,
    sendmsg_fds,
)
from hvemu.framing import FrameAssembler, TruncatedFrame
from hvemu.hypervisor.server import ConnState, ControlServer, errno_of
from hvemu.protocol import HEADER_SIZE, MAX_FRAME, FrameDecoder, ProtocolError
from hvemu.stream import FramedStream


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def stream_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------
# One syscall with fds
# --------------------------------------------------------------------------


def test_fds_arrive_non_inheritable(stream_pair: tuple[socket.socket, socket.socket],
                                    pipe: tuple[int, int]) -> None:
    a, b = stream_pair
    r, w = pipe
    os.set_inheritable(r, True)
    sendmsg_fds(a, b"x", [r, w])
    data, fds = recvmsg_fds(b, 16, 4)
    try:
        assert data == b"x" and len(fds) == 2
        assert not any(os.get_inheritable(fd) for fd in fds)
        os.write(w, b"hello")
        assert os.read(fds[0], 5) == b"hello"
    finally:
        for fd in fds:
            os.close(fd)


def test_truncated_control_data_is_detected_and_nothing_leaks(
        stream_pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]) -> None:
    a, b = stream_pair
    r, w = pipe
    before = open_fds()
    sendmsg_fds(a, b"abc", [r, w, r])
    with pytest.raises(TruncatedControlData) as info:
        recvmsg_fds(b, 16, 1)
    assert info.value.data == b"abc"
    assert "truncated control data" in str(info.value)
    assert open_fds() == before
    sendmsg_fds(a, b"d", [r])
    with pytest.raises(TruncatedControlData):
        recvmsg_fds(b, 16, 0)  # no fds allowed at all
    assert open_fds() == before


def test_peer_credentials(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    assert peer_credentials(stream_pair[0]) == (os.getpid(), os.getuid(), os.getgid())


# --------------------------------------------------------------------------
# FrameAssembler: which frame do fds belong to?
# --------------------------------------------------------------------------


def _frame(msg: protocol.Msg) -> bytes:
    return protocol.encode(msg)


def test_fds_go_to_the_frame_starting_in_their_chunk(pipe: tuple[int, int]) -> None:
    f1, f2 = _frame(protocol.Ok()), _frame(protocol.DomainCreated(domid=1))
    asm = FrameAssembler()
    # The tail of f1 (no fds) glued to all of f2 (fds on its first byte).
    assert asm.feed(f1[:3]) == []
    frames = asm.feed(f1[3:] + f2, [pipe[0]])
    assert [f.fds for f in frames] == [[], [pipe[0]]]


def test_fds_of_an_incomplete_frame_wait_for_it(pipe: tuple[int, int]) -> None:
    f1, f2 = _frame(protocol.Ok()), _frame(protocol.DomainCreated(domid=1))
    asm = FrameAssembler()
    frames = asm.feed(f1 + f2[:2], [pipe[0], pipe[1]])
    assert [f.fds for f in frames] == [[]]
    frames = asm.feed(f2[2:])
    assert [f.fds for f in frames] == [[pipe[0], pipe[1]]]


def test_ctrunc_marks_its_frame() -> None:
    asm = FrameAssembler()
    frames = asm.feed(_frame(protocol.Ok()), (), ctrunc=True)
    assert frames[0].ctrunc and frames[0].fds == []


def test_fds_in_the_middle_of_a_frame_are_fatal_and_closed(pipe: tuple[int, int]) -> None:
    f = _frame(protocol.Stats(domid=1))
    asm = FrameAssembler()
    asm.feed(f[:5])
    with pytest.raises(ProtocolError) as info:
        asm.feed(f[5:], [pipe[0]])
    assert info.value.fatal
    assert not is_open(pipe[0])


def test_close_releases_held_fds(pipe: tuple[int, int]) -> None:
    asm = FrameAssembler()
    asm.feed(_frame(protocol.Ok())[:2], [pipe[0]])
    assert asm.pending == 2
    asm.close()
    assert not is_open(pipe[0])


def test_oversized_frame_after_good_ones(pipe: tuple[int, int]) -> None:
    good = _frame(protocol.Ok())
    asm = FrameAssembler()
    frames = asm.feed(good + struct.pack("<I", MAX_FRAME + 1) + b"x", [pipe[0]])
    assert [f.body for f in frames] == [good[HEADER_SIZE:]]
    # The fds rode on the last frame starting in the chunk: the bad one; closed with it.
    assert frames[0].fds == [] and not is_open(pipe[0])
    assert asm.fatal is not None and asm.fatal.fatal
    with pytest.raises(ProtocolError):
        asm.feed(b"more", [pipe[1]])
    assert not is_open(pipe[1])


def test_kernel_never_glues_past_an_fd_carrying_message(
        stream_pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]) -> None:
    """The assumption the association rests on, checked against this kernel."""
    a, b = stream_pair
    f1, f2, f3 = (_frame(protocol.DomainCreated(domid=i)) for i in range(3))
    a.sendall(f1)
    sendmsg_fds(a, f2, [pipe[0]])
    a.sendall(f3)
    asm = FrameAssembler()
    got: list[tuple[int, list[int]]] = []
    while len(got) < 3:
        data, fds = recvmsg_fds(b, 65536, 4)
        for fr in asm.feed(data, fds):
            reply = protocol.decode_reply(fr.body)
            assert isinstance(reply, protocol.DomainCreated)
            got.append((reply.domid, fr.fds))
    assert [d for d, _ in got] == [0, 1, 2]
    assert [len(fds) for _, fds in got] == [0, 1, 0]
    for _, fds in got:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------
# FramedStream: the asyncio driver both ends use
# --------------------------------------------------------------------------


async def test_framed_stream_with_fds_and_a_frame_larger_than_the_socket_buffer(
        stream_pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]) -> None:
    a, b = (FramedStream(s) for s in stream_pair)
    big = protocol.ForeignPages(results=[None] * 300, pages=[b"\xab" * 4096] * 300)  # > socket buffer
    welcome = protocol.Welcome(role="tool", fds=["r", "w"])

    async def sender() -> None:
        await a.send(protocol.encode(welcome), pipe)
        await a.send(protocol.encode(big))
        await a.send(protocol.encode(protocol.Ok()))

    try:
        task = asyncio.create_task(sender())
        frame = await b.recv_frame()
        assert protocol.decode_reply(frame.body) == welcome and len(frame.fds) == 2
        for fd in frame.fds:
            assert not os.get_inheritable(fd)
            os.close(fd)
        for expected in (big, protocol.Ok()):
            frame = await b.recv_frame()
            assert (protocol.decode_reply(frame.body), frame.fds) == (expected, [])
        await task
        a.close()
        with pytest.raises(ConnectionClosed):
            await b.recv_frame()
    finally:
        a.close()
        b.close()


async def test_framed_stream_close_wakes_its_reader(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    stream = FramedStream(stream_pair[0])
    reader = asyncio.create_task(stream.recv_frame())
    await asyncio.sleep(0.01)
    stream.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(reader, 1)


async def test_framed_stream_truncated_frame(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = stream_pair
    stream = FramedStream(b)
    a.sendall(protocol.encode(protocol.Stats(domid=1))[:-1])
    a.close()
    with pytest.raises(TruncatedFrame):
        await stream.recv_frame()
    stream.close()


# --------------------------------------------------------------------------
# errno mapping
# --------------------------------------------------------------------------


class WithErrno(Exception):
    def __init__(self, code: object) -> None:
        super().__init__("x")
        self.errno = code


@pytest.mark.parametrize("exc, expected", [
    (WithErrno(Errno.EBUSY), Errno.EBUSY),
    (WithErrno("ESRCH"), Errno.ESRCH),
    (WithErrno("EWHAT"), Errno.EINVAL),
    (OSError(errno.ENOMEM, "x"), Errno.ENOMEM),
    (OSError(errno.EIO, "x"), Errno.EINVAL),
    (ValueError("x"), Errno.EINVAL),
    (KeyError("x"), Errno.EINVAL),
    (MemoryError(), Errno.ENOMEM),
    (NotImplementedError(), Errno.ENOSYS),
    (PermissionError(errno.EACCES, "x"), Errno.EPERM),
    (ControlError(Errno.EAGAIN, "later"), Errno.EAGAIN),
])
def test_errno_of(exc: BaseException, expected: Errno) -> None:
    assert errno_of(exc) is expected


def test_control_error_text() -> None:
    err = ControlError("EBUSY", "touched", request=protocol.PagingEvict(domid=1, gfns=[2]))
    assert err.errno is Errno.EBUSY and err.message == "touched"
    assert str(err) == "PagingEvict: EBUSY: touched"


# --------------------------------------------------------------------------
# ControlServer + ControlClient, in-process
# --------------------------------------------------------------------------


class Toy:
    """A handler with knobs, recording what happened."""

    def __init__(self) -> None:
        self.disconnected: list[ConnState] = []
        self.cancelled = 0
        self.running = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, state: ConnState, msg: protocol.Msg) -> tuple[protocol.Msg, Sequence[FdLike]]:
        if isinstance(msg, protocol.DomainList):
            return protocol.DomainListReply(domains=[]), []
        if isinstance(msg, protocol.GetTarget):
            return protocol.TargetReply(domid=msg.domid, pages=state.requests), []
        if isinstance(msg, protocol.ToolHello):
            r, w = os.pipe()
            os.write(w, msg.client.encode())
            os.close(w)
            return protocol.Welcome(role="tool", fds=["pipe"]), [OwnedFd(r)]
        if isinstance(msg, protocol.DomainCreate):  # blocks until released
            self.started.set()
            self.running += 1
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return protocol.DomainCreated(domid=1), []
        if isinstance(msg, protocol.DomainDestroy):
            if msg.domid == 0:
                raise ValueError("no such thing")
            if msg.domid == 1:
                raise WithErrno(Errno.ESRCH)
            if msg.domid == 2:
                return "not a reply", []  # type: ignore[return-value]
            if msg.domid == 3:
                return protocol.Welcome(role="tool", fds=["a", "b"]), []
            if msg.domid == 5:
                r, w = os.pipe()
                os.close(r)
                os.close(w)
                return protocol.Welcome(role="tool", fds=["closed"]), [r]  # a bad fd
            r, w = os.pipe()
            os.close(w)
            return protocol.Ok(), [OwnedFd(r)]  # announces none
        raise NotImplementedError(type(msg).__name__)

    def on_disconnect(self, state: ConnState) -> None:
        self.disconnected.append(state)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="hvemu-t")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(sock_dir: str) -> AsyncIterator[tuple[ControlServer, Toy]]:
    toy = Toy()
    server = ControlServer(os.path.join(sock_dir, "c.sock"), toy.handle, on_disconnect=toy.on_disconnect,
                           check_peer=lambda uid: uid == os.getuid())
    async with server:
        yield server, toy
    assert not os.path.exists(server.path)


async def test_request_reply_and_fds(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served
    async with await ControlClient.connect(server.path) as conn:
        assert await conn.call(protocol.DomainList()) == (protocol.DomainListReply(domains=[]), [])
        reply, fds = await conn.call(protocol.ToolHello(client="pager"))
        assert reply == protocol.Welcome(role="tool", fds=["pipe"])
        try:
            assert not os.get_inheritable(fds[0])
            assert os.read(fds[0], 16) == b"pager"
        finally:
            os.close(fds[0])


async def test_handler_errors_become_error_replies(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served
    async with await ControlClient.connect(server.path) as conn:
        expected = {0: Errno.EINVAL, 1: Errno.ESRCH, 2: Errno.EINVAL, 3: Errno.EINVAL, 4: Errno.EINVAL,
                    5: Errno.EINVAL}
        for domid, code in expected.items():
            with pytest.raises(ControlError) as info:
                await conn.call(protocol.DomainDestroy(domid=domid))
            assert info.value.errno is code, domid
            assert isinstance(info.value.request, protocol.DomainDestroy)
        with pytest.raises(ControlError) as info:
            await conn.call(protocol.Stats(domid=0))
        assert info.value.errno is Errno.ENOSYS
        assert "no such thing" in str(await _err(conn, protocol.DomainDestroy(domid=0)))
        assert await conn.call(protocol.DomainList())  # still fine


async def _err(conn: ControlClient, msg: protocol.Msg) -> ControlError:
    with pytest.raises(ControlError) as info:
        await conn.call(msg)
    return info.value


async def test_refused_peer_gets_eperm(sock_dir: str) -> None:
    toy = Toy()
    path = os.path.join(sock_dir, "c.sock")
    async with ControlServer(path, toy.handle, on_disconnect=toy.on_disconnect, check_peer=lambda uid: False):
        conn = await ControlClient.connect(path)
        try:
            with pytest.raises(ControlError) as info:
                await conn.call(protocol.DomainList())
            assert info.value.errno is Errno.EPERM
            with pytest.raises((ConnectionError, TransportError)):
                await conn.call(protocol.DomainList())
        finally:
            await conn.close()
    assert toy.disconnected == []


async def test_socket_file_mode_and_stale_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "c.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: what a killed server leaves
    toy = Toy()
    async with ControlServer(path, toy.handle) as server:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(RuntimeError, match="already listening"):
            async with ControlServer(path, toy.handle):
                pass
        assert server.serving
    assert not os.path.exists(path)


async def test_on_disconnect_and_peer_state(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    conn = await ControlClient.connect(server.path)
    await conn.call(protocol.DomainList())
    [state] = server.connections
    assert (state.pid, state.uid, state.gid) == (os.getpid(), os.getuid(), os.getgid())
    await conn.close()
    for _ in range(100):
        if toy.disconnected:
            break
        await asyncio.sleep(0.01)
    assert toy.disconnected == [state]
    assert server.connections == []


async def test_slow_handler_blocks_only_its_connection(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    async with await ControlClient.connect(server.path) as slow, await ControlClient.connect(server.path) as fast:
        pending = asyncio.create_task(slow.call(protocol.DomainCreate(max_vcpus=1, gfns=1)))
        await asyncio.wait_for(toy.started.wait(), 2)
        for _ in range(20):
            await asyncio.wait_for(fast.call(protocol.DomainList()), 2)
        assert not pending.done()
        toy.release.set()
        assert (await asyncio.wait_for(pending, 2))[0] == protocol.DomainCreated(domid=1)


async def test_hangup_cancels_the_handler(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    conn = await ControlClient.connect(server.path)
    pending = asyncio.create_task(conn.call(protocol.DomainCreate(max_vcpus=1, gfns=1)))
    await asyncio.wait_for(toy.started.wait(), 2)
    await conn.close()
    with pytest.raises(ConnectionError):
        await pending
    for _ in range(200):
        if toy.disconnected:
            break
        await asyncio.sleep(0.01)
    assert toy.cancelled == 1 and len(toy.disconnected) == 1


async def test_half_close_still_gets_its_replies(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served

    def client() -> list[protocol.Msg]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(server.path)
            raw.sendall(protocol.encode(protocol.DomainList()) + protocol.encode(protocol.GetTarget(domid=4)))
            raw.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := raw.recv(65536):
                data += chunk
        return [protocol.decode_reply(b) for b in FrameDecoder().feed(data)]

    replies = await asyncio.to_thread(client)
    assert replies == [protocol.DomainListReply(domains=[]), protocol.TargetReply(domid=4, pages=2)]


async def test_cancelled_call_leaves_the_connection_usable(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    async with await ControlClient.connect(server.path) as conn:
        pending = asyncio.create_task(conn.call(protocol.DomainCreate(max_vcpus=1, gfns=1)))
        await asyncio.wait_for(toy.started.wait(), 2)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        toy.release.set()  # its reply comes now and must be skipped
        assert await conn.call(protocol.GetTarget(domid=1)) == (protocol.TargetReply(domid=1, pages=2), [])


async def test_truncated_control_data_on_a_connection(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served
    before = open_fds()
    async with await ControlClient.connect(server.path, max_fds=0) as conn:
        with pytest.raises(TruncatedControlData) as info:
            await conn.call(protocol.ToolHello())
        assert isinstance(info.value.reply, protocol.Welcome)
        assert await conn.call(protocol.DomainList())  # the stream is still in step
    await asyncio.sleep(0.05)
    assert open_fds() == before


async def test_request_with_fds_is_refused(served: tuple[ControlServer, Toy], pipe: tuple[int, int]) -> None:
    server, _ = served
    async with await ControlClient.connect(server.path) as conn:
        with pytest.raises(ControlError) as info:
            await conn.call(protocol.DomainList(), fds=[pipe[0]])
        assert info.value.errno is Errno.EINVAL and "file descriptors" in info.value.message
        assert await conn.call(protocol.DomainList())


async def test_close_cancels_everything(sock_dir: str) -> None:
    toy = Toy()
    path = os.path.join(sock_dir, "c.sock")
    async with ControlServer(path, toy.handle, on_disconnect=toy.on_disconnect) as server:
        conns = [await ControlClient.connect(path) for _ in range(3)]
        calls = [asyncio.create_task(c.call(protocol.DomainCreate(max_vcpus=1, gfns=1))) for c in conns]
        for _ in range(500):
            if toy.running == 3:
                break
            await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            await server.close()
        await server.close()  # idempotent
        assert len(toy.disconnected) == 3 and toy.cancelled == 3
    assert not os.path.exists(path)
    for call in calls:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(call, 2)
    for c in conns:
        await c.close()


async def test_close_wakes_a_pending_call(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    conn = await ControlClient.connect(server.path)
    pending = asyncio.create_task(conn.call(protocol.DomainCreate(max_vcpus=1, gfns=1)))
    await asyncio.wait_for(toy.started.wait(), 2)
    await conn.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(ConnectionClosed):
        await conn.call(protocol.DomainList())


async def test_sync_connection(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served

    def client() -> tuple[protocol.Msg, bytes, Errno]:
        with SyncControlClient.connect(server.path, timeout=5) as conn:
            reply, fds = conn.call(protocol.ToolHello(client="sync"))
            try:
                assert not os.get_inheritable(fds[0])
                data = os.read(fds[0], 16)
            finally:
                os.close(fds[0])
            try:
                conn.call(protocol.DomainDestroy(domid=1))
            except ControlError as exc:
                return reply, data, exc.errno
            raise AssertionError("no error")

    reply, data, code = await asyncio.to_thread(client)
    assert reply == protocol.Welcome(role="tool", fds=["pipe"]) and data == b"sync" and code is Errno.ESRCH


async def test_sync_connection_timeout_then_late_reply_skipped(served: tuple[ControlServer, Toy]) -> None:
    server, toy = served
    loop = asyncio.get_running_loop()

    def client() -> protocol.Msg:
        with SyncControlClient.connect(server.path, timeout=0.2) as conn:
            with pytest.raises(TimeoutError):
                conn.call(protocol.DomainCreate(max_vcpus=1, gfns=1))
            loop.call_soon_threadsafe(toy.release.set)
            conn._sock.settimeout(5)  # type: ignore[union-attr]
            return conn.call(protocol.GetTarget(domid=2))[0]

    assert await asyncio.to_thread(client) == protocol.TargetReply(domid=2, pages=2)


# --------------------------------------------------------------------------
# ControlClient against a scripted peer
# --------------------------------------------------------------------------


async def test_undecodable_reply_is_control_error_with_cause(
        stream_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = stream_pair
    conn = ControlClient(a)
    try:
        b.sendall(struct.pack("<I", 3) + b"\xc1\xc1\xc1")
        with pytest.raises(ControlError) as info:
            await asyncio.wait_for(conn.call(protocol.DomainList()), 2)
        assert info.value.errno is Errno.EINVAL and "undecodable reply" in info.value.message
        assert isinstance(info.value.__cause__, ProtocolError)
        b.sendall(protocol.encode(protocol.Ok()))
        assert await asyncio.wait_for(conn.call(protocol.DomainList()), 2) == (protocol.Ok(), [])
    finally:
        await conn.close()


async def test_reply_with_the_wrong_number_of_fds(stream_pair: tuple[socket.socket, socket.socket],
                                                  pipe: tuple[int, int]) -> None:
    a, b = stream_pair
    conn = ControlClient(a)
    before = open_fds()
    try:
        sendmsg_fds(b, protocol.encode(protocol.Welcome(role="tool", fds=["one"])), list(pipe))
        with pytest.raises(TransportError, match="announces 1 fds"):
            await asyncio.wait_for(conn.call(protocol.ToolHello()), 2)
        assert open_fds() == before
        sendmsg_fds(b, protocol.encode(protocol.Ok()), [pipe[0]])  # fds with a reply that has no fds field
        with pytest.raises(TransportError, match="announces 0 fds"):
            await asyncio.wait_for(conn.call(protocol.DomainList()), 2)
        assert open_fds() == before
    finally:
        await conn.close()


async def test_peer_closing_is_connection_closed(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = stream_pair
    conn = ControlClient(a)
    b.close()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(conn.call(protocol.DomainList()), 2)
    assert conn.closed
    with pytest.raises(ConnectionClosed):
        await conn.call(protocol.DomainList())


async def test_truncated_reply_frame(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = stream_pair
    conn = ControlClient(a)
    b.sendall(protocol.encode(protocol.Ok())[:-1])
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(conn.call(protocol.DomainList()), 2)
    assert isinstance(info.value.__cause__, TruncatedFrame)
    await conn.close()


async def test_calls_from_many_tasks_are_serialised(served: tuple[ControlServer, Toy]) -> None:
    server, _ = served
    async with await ControlClient.connect(server.path) as conn:
        replies = await asyncio.gather(*(conn.call(protocol.GetTarget(domid=i)) for i in range(50)))
    assert [r[0] for r in replies] == [protocol.TargetReply(domid=i, pages=i + 1) for i in range(50)]


async def test_fail_ends_the_server_with_its_error(sock_dir: str) -> None:
    """What the server's owner learns outside any task (a reader callback) ends the ``async with``, body first."""
    toy = Toy()
    path = os.path.join(sock_dir, "c.sock")
    before = asyncio.all_tasks()
    with pytest.raises(BaseExceptionGroup) as info:
        async with ControlServer(path, toy.handle, on_disconnect=toy.on_disconnect) as server:
            conn = await ControlClient.connect(path)
            pending = asyncio.create_task(conn.call(protocol.DomainCreate(max_vcpus=1, gfns=1)))
            await asyncio.wait_for(toy.started.wait(), 2)
            server.fail(LookupError("a bug met in a callback"))
            await asyncio.sleep(10)  # cancelled by the server's task group
    assert info.value.subgroup(LookupError) is not None
    assert toy.cancelled == 1 and len(toy.disconnected) == 1
    assert not os.path.exists(path)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(pending, 2)
    await conn.close()
    assert asyncio.all_tasks() == before, "the server left a task behind"
