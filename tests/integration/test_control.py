"""The control protocol across two real processes, bad clients included.

A :class:`~hvemu.hypervisor.server.ControlServer` runs on uvloop in its own process
(``control_server.py``, a toy handler); the clients are here.  Every bad client
gets a clear ``Error`` or a clean close, and after each one a fresh client is
still served (the ``server`` fixture checks it after every test).  The server
is stopped with SIGTERM in the fixture: it must exit 0, leave no socket file
and no process behind, and never have logged an unhandled error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError, SyncControlClient
from hvemu.fdpass import TruncatedControlData, sendmsg_fds
from hvemu.protocol import MAX_FRAME, FrameDecoder

SERVER = Path(__file__).with_name("control_server.py")
#: Log lines that mean an error escaped the server's own handling.
UNHANDLED = ("Task exception was never retrieved", "Exception in callback",
             "Traceback (most recent call last)")


class ServerProc:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hvemu-ctl")  # short: AF_UNIX paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "control.sock")
        self.log_path = os.path.join(self.dir, "server.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(SERVER), self.path], stdout=subprocess.PIPE,
                                     stderr=self._log)
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # READY, or EOF if it died
            assert line == b"READY\n", f"server did not start: {line!r}\n{self.log()}"
            assert os.path.exists(self.path)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stats(self) -> dict[str, Any]:
        with SyncControlClient.connect(self.path, timeout=5) as conn:
            reply, _ = conn.call(protocol.Stats(domid=0))
        assert isinstance(reply, protocol.StatsReply)
        figures: dict[str, Any] = json.loads(reply.stats.name)  # the toy's figures (control_server.py)
        return figures

    def stop(self) -> int:
        """SIGTERM, wait; kill (and report failure) if it does not go."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                    return -999
            return self.proc.returncode
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server_proc() -> Iterator[ServerProc]:
    srv = ServerProc()
    try:
        yield srv
    finally:
        status = srv.stop()
        socket_left = os.path.exists(srv.path)
        log = srv.log()
        srv.cleanup()
        assert status == 0, f"server exited with {status}\n{log}"
        assert not socket_left, "socket file left behind"
        assert srv.proc.poll() is not None, "server process left behind"
        # The handler's own RuntimeError is logged with its traceback: that is expected.
        unexpected = [line for line in log.splitlines() if any(u in line for u in UNHANDLED[:2])]
        assert not unexpected, log


@pytest.fixture
def server(server_proc: ServerProc) -> Iterator[ServerProc]:
    """The shared server; after each test a fresh client must still be served."""
    assert server_proc.proc.poll() is None, server_proc.log()
    yield server_proc
    assert server_proc.proc.poll() is None, f"the server died\n{server_proc.log()}"
    with SyncControlClient.connect(server_proc.path, timeout=5) as conn:
        reply, fds = conn.call(protocol.DomainList())
    assert isinstance(reply, protocol.DomainListReply) and len(reply.domains) == 2 and fds == []


# --------------------------------------------------------------------------
# A raw client for misbehaving
# --------------------------------------------------------------------------


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.dec = FrameDecoder()
        self.frames: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> protocol.Msg:
        while not self.frames:
            data = self.sock.recv(65536)
            assert data, "connection closed instead of a reply"
            self.frames += self.dec.feed(data)
        return protocol.decode_reply(self.frames.pop(0))

    def error(self) -> protocol.Error:
        reply = self.reply()
        assert isinstance(reply, protocol.Error), reply
        return reply

    def expect_clean_eof(self) -> None:
        assert self.sock.recv(65536) == b"", "expected the server to close"
        assert not self.frames and self.dec.pending == 0

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: ServerProc) -> Iterator[Raw]:
    r = Raw(server.path)
    try:
        yield r
    finally:
        r.close()


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --------------------------------------------------------------------------
# Good clients
# --------------------------------------------------------------------------


def test_request_reply_sync(server: ServerProc) -> None:
    with SyncControlClient.connect(server.path, timeout=5) as conn:
        reply, fds = conn.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply) and fds == []
        assert [d.name for d in reply.domains] == ["alpha", "beta"]
        stats, _ = conn.call(protocol.Stats(domid=0))
        assert isinstance(stats, protocol.StatsReply)
        figures = json.loads(stats.stats.name)
        assert figures["loop"] == "uvloop"
        assert figures["uid"] == os.getuid() and figures["pid"] == os.getpid()
        assert figures["requests"] == 2


async def test_fd_passed_in_a_reply(server: ServerProc) -> None:
    async with await ControlClient.connect(server.path) as conn:
        reply, fds = await conn.call(protocol.ToolHello(client="pytest"))
        try:
            assert reply == protocol.Welcome(role="tool", fds=["memfd"])
            assert len(fds) == 1
            assert not os.get_inheritable(fds[0])
            assert os.pread(fds[0], 64, 0) == b"pytest"
        finally:
            for fd in fds:
                os.close(fd)


async def test_handler_errors_are_error_replies(server: ServerProc) -> None:
    async with await ControlClient.connect(server.path) as conn:
        cases = [
            (protocol.DomainDestroy(domid=0), Errno.EINVAL, "cannot be destroyed"),
            (protocol.DomainDestroy(domid=1), Errno.ESRCH, "no domain 1"),
            (protocol.DomainDestroy(domid=2), Errno.EINVAL, "RuntimeError"),
            (protocol.GetTarget(domid=1), Errno.ENOSYS, "not served"),
        ]
        for msg, code, text in cases:
            with pytest.raises(ControlError) as info:
                await conn.call(msg)
            assert info.value.errno is code and text in info.value.message, info.value
        assert (await conn.call(protocol.DomainList()))[0]  # the connection goes on


async def test_client_allowing_too_few_fds_detects_truncation(server: ServerProc) -> None:
    before = set(os.listdir("/proc/self/fd"))
    async with await ControlClient.connect(server.path, max_fds=0) as conn:
        with pytest.raises(TruncatedControlData) as info:
            await conn.call(protocol.ToolHello(client="x"))
        assert isinstance(info.value.reply, protocol.Welcome)
        assert (await conn.call(protocol.DomainList()))[0]
    assert set(os.listdir("/proc/self/fd")) == before


async def test_slow_request_does_not_block_other_clients(server: ServerProc) -> None:
    async with await ControlClient.connect(server.path) as slow, await ControlClient.connect(server.path) as fast:
        pending = asyncio.create_task(slow.call(protocol.DomainCreate(max_vcpus=2000, gfns=1)))
        await asyncio.sleep(0.05)
        for _ in range(20):
            await fast.call(protocol.DomainList())
        assert not pending.done()  # twenty answers on the other connection while it sleeps
        reply, _ = await asyncio.wait_for(pending, 5)
        assert reply == protocol.DomainCreated(domid=2000)


async def test_many_concurrent_clients(server: ServerProc) -> None:
    async def client(i: int) -> int:
        async with await ControlClient.connect(server.path) as conn:
            for _ in range(10):
                reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=i % 3, gfns=1))
                assert reply == protocol.DomainCreated(domid=i % 3)
            return i

    assert sorted(await asyncio.gather(*(client(i) for i in range(25)))) == list(range(25))


def test_pipelined_requests_answered_in_order(raw: Raw) -> None:
    raw.send(protocol.encode(protocol.DomainCreate(max_vcpus=50, gfns=1))  # slow first
             + protocol.encode(protocol.DomainDestroy(domid=1))
             + protocol.encode(protocol.DomainCreate(max_vcpus=1, gfns=1)))
    assert raw.reply() == protocol.DomainCreated(domid=50)
    assert raw.error().errno is Errno.ESRCH
    assert raw.reply() == protocol.DomainCreated(domid=1)


def test_request_sent_byte_by_byte(raw: Raw) -> None:
    data = protocol.encode(protocol.Stats(domid=3))
    for i in range(len(data)):
        raw.send(data[i:i + 1])
        time.sleep(0.001)
    reply = raw.reply()
    assert isinstance(reply, protocol.StatsReply) and reply.domid == 3


# --------------------------------------------------------------------------
# Bad clients: a clear Error (connection kept) ...
# --------------------------------------------------------------------------


def test_garbage_body_gets_einval_and_connection_stays(raw: Raw) -> None:
    raw.send(frame(b"\xc1\xc1\xc1\xc1\xc1"))
    err = raw.error()
    assert err.errno is Errno.EINVAL and "malformed request" in err.message
    raw.send(protocol.encode(protocol.DomainList()))
    assert isinstance(raw.reply(), protocol.DomainListReply)


@pytest.mark.parametrize("body", [
    protocol.encode(protocol.Ok())[4:],                                    # a reply type as a request
    protocol.encode(protocol.DomainListReply(domains=[]))[4:],
    msgspec.msgpack.encode({"op": "domain_list", "extra": 1}),             # unknown field
    msgspec.msgpack.encode({"op": "stats", "domid": "three"}),             # wrong field type
    msgspec.msgpack.encode({"op": "launch_missiles"}),                     # unknown op
    msgspec.msgpack.encode(42),                                            # not a map at all
    b"",                                                                   # empty frame
], ids=["reply-type", "reply-type-2", "unknown-field", "wrong-field-type", "unknown-op", "not-a-map",
        "empty"])
def test_wrong_message_gets_einval_and_connection_stays(raw: Raw, body: bytes) -> None:
    raw.send(frame(body) + protocol.encode(protocol.DomainList()))
    err = raw.error()
    assert err.errno is Errno.EINVAL and "malformed request" in err.message
    assert isinstance(raw.reply(), protocol.DomainListReply)


def test_request_carrying_fds_is_refused(raw: Raw) -> None:
    r, w = os.pipe()
    try:
        sendmsg_fds(raw.sock, protocol.encode(protocol.DomainList()), [r, w])
    finally:
        os.close(r)
        os.close(w)
    err = raw.error()
    assert err.errno is Errno.EINVAL and "file descriptors" in err.message
    raw.send(protocol.encode(protocol.DomainList()))
    assert isinstance(raw.reply(), protocol.DomainListReply)


# --------------------------------------------------------------------------
# ... or an Error and a clean close, when the stream cannot be trusted
# --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"\xff\xff\xff\xff" + b"x" * 100,
    struct.pack("<I", MAX_FRAME + 1) + b"x" * 1000,
    b"GET / HTTP/1.1\r\nHost: hvemu\r\n\r\n",  # "GET " is a 542 MB length prefix
], ids=["4GiB", "max+1", "http"])
def test_huge_length_prefix_gets_error_then_close(raw: Raw, data: bytes) -> None:
    raw.send(data)
    err = raw.error()
    assert err.errno is Errno.EINVAL and "exceeds" in err.message
    raw.expect_clean_eof()


def test_good_request_before_a_huge_prefix_is_answered_first(raw: Raw) -> None:
    raw.send(protocol.encode(protocol.DomainList()) + b"\xff\xff\xff\xff")
    assert isinstance(raw.reply(), protocol.DomainListReply)
    assert "exceeds" in raw.error().message
    raw.expect_clean_eof()


def test_truncated_frame_then_half_close_gets_error(raw: Raw) -> None:
    raw.send(protocol.encode(protocol.DomainList()) + struct.pack("<I", 100) + b"only ten b")
    raw.sock.shutdown(socket.SHUT_WR)
    assert isinstance(raw.reply(), protocol.DomainListReply)
    err = raw.error()
    assert err.errno is Errno.EINVAL and "truncated frame" in err.message
    raw.expect_clean_eof()


# --------------------------------------------------------------------------
# ... or nobody to answer: the server just cleans up
# --------------------------------------------------------------------------


def test_truncated_frame_then_close(server: ServerProc) -> None:
    before = server.stats()["disconnects"]
    r = Raw(server.path)
    r.send(struct.pack("<I", 100) + b"only ten b")
    r.close()
    wait_for(lambda: server.stats()["disconnects"] >= before + 2)  # ours and the stats client's


def test_connect_and_close_at_once(server: ServerProc) -> None:
    for _ in range(20):
        Raw(server.path).close()


def test_client_leaving_during_a_slow_request_cancels_it(server: ServerProc) -> None:
    before = server.stats()
    r = Raw(server.path)
    r.send(protocol.encode(protocol.DomainCreate(max_vcpus=3000, gfns=1)))
    wait_for(lambda: server.stats()["slow_started"] == before["slow_started"] + 1)
    r.close()
    wait_for(lambda: server.stats()["cancelled"] == before["cancelled"] + 1)


def test_client_not_reading_its_replies(server: ServerProc) -> None:
    # Floods requests and never reads: the server must block only that connection.
    r = Raw(server.path)
    r.sock.setblocking(False)
    data = protocol.encode(protocol.DomainList()) * 2000
    try:
        try:
            while data:
                data = data[r.sock.send(data):]
        except BlockingIOError:
            pass
        with SyncControlClient.connect(server.path, timeout=5) as other:
            assert isinstance(other.call(protocol.DomainList())[0], protocol.DomainListReply)
    finally:
        r.close()


def quiet_stats(server: ServerProc) -> dict[str, Any]:
    """Stats taken while the asking connection is the only one (earlier ones fully closed)."""
    deadline = time.monotonic() + 5
    while (stats := server.stats())["active"] != 1:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)
    return stats


def test_no_fd_leak_in_the_server(server: ServerProc) -> None:
    before = quiet_stats(server)["open_fds"]
    for data in (b"\xff\xff\xff\xff", frame(b"\xc1"), struct.pack("<I", 9) + b"abc"):
        r = Raw(server.path)
        r.send(data)
        r.close()
    r = Raw(server.path)
    pr, pw = os.pipe()
    sendmsg_fds(r.sock, protocol.encode(protocol.ToolHello()), [pr, pw])
    os.close(pr)
    os.close(pw)
    r.error()
    r.send(protocol.encode(protocol.ToolHello(client="leak?")))
    assert isinstance(r.reply(), protocol.Welcome)
    r.close()
    assert quiet_stats(server)["open_fds"] == before


# --------------------------------------------------------------------------
# Shutdown with work in progress
# --------------------------------------------------------------------------


async def test_sigterm_with_busy_clients_stops_cleanly() -> None:
    srv = ServerProc()
    try:
        conns = [await ControlClient.connect(srv.path) for _ in range(3)]
        calls = [asyncio.create_task(c.call(protocol.DomainCreate(max_vcpus=60_000, gfns=1))) for c in conns]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(srv.proc.wait, 10)
        assert status == 0 and time.monotonic() - t0 < 5
        assert not os.path.exists(srv.path)
        for call in calls:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(call, 5)
        for c in conns:
            await c.close()
    finally:
        srv.stop()
        log = srv.log()
        srv.cleanup()
    assert not [line for line in log.splitlines() if any(u in line for u in UNHANDLED)], log
