"""Event channels across two real processes.

A child (``evtchn_peer.py``, started with ``subprocess``) gets one end of a
channel by ``SCM_RIGHTS`` over a Unix socket, and the two processes notify
each other: many notifies before the receiver looks are one event, in both
directions; received fds are not inheritable; a receiver that allows too few
fds detects the truncated control data and leaks nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvemu.evtchn import EventChannel
from hvemu.fdpass import TruncatedControlData, recvmsg_fds, sendmsg_fds

PEER = Path(__file__).with_name("evtchn_peer.py")
PORT = 7


class Peer:
    def __init__(self) -> None:
        self.ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.ctl.settimeout(10)
            self.proc = subprocess.Popen([sys.executable, str(PEER), str(child_ctl.fileno())],
                                         pass_fds=[child_ctl.fileno()])
        except BaseException:
            self.ctl.close()
            raise
        finally:
            child_ctl.close()

    def send(self, obj: dict[str, Any], fds: list[int] | None = None) -> None:
        sendmsg_fds(self.ctl, json.dumps(obj).encode(), fds or [])

    def recv(self, maxfds: int = 0) -> tuple[dict[str, Any], list[int]]:
        data, fds = recvmsg_fds(self.ctl, 65536, maxfds)
        assert data, "the peer went away"
        return json.loads(data), fds

    def cmd(self, op: str, **kw: Any) -> dict[str, Any]:
        self.send({"op": op, **kw})
        return self.recv()[0]

    def give_channel(self, chan: EventChannel, extra: list[int] | None = None,
                     maxfds: int = 4) -> dict[str, Any]:
        self.send({"op": "recv_channel", "maxfds": maxfds})
        self.send({"port": chan.port}, [chan.fileno(), *(extra or [])])
        return self.recv()[0]

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                try:
                    self.send({"op": "exit"})
                except OSError:
                    pass
                try:
                    return self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait(5)
        finally:
            self.ctl.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        status = p.stop()
        assert status == 0, f"peer exited with {status}"


@pytest.fixture
def channel(peer: Peer) -> Iterator[EventChannel]:
    """Our end of a channel whose other end is in the peer (and closed here)."""
    local, remote = EventChannel.pair(PORT)
    try:
        answer = peer.give_channel(remote)
        assert answer == {"ok": True, "nfds": 1, "inheritable": [False]}
        remote.close()
        yield local
    finally:
        remote.close()
        local.close()


def test_fd_arrives_non_inheritable_in_the_peer(peer: Peer) -> None:
    local, remote = EventChannel.pair(PORT)
    r, w = os.pipe()
    os.set_inheritable(r, True)  # inheritable here: must not be there
    try:
        answer = peer.give_channel(remote, extra=[r, w])
        assert answer == {"ok": True, "nfds": 3, "inheritable": [False, False, False]}
    finally:
        for fd in (r, w):
            os.close(fd)
        local.close()
        remote.close()


def test_many_notifies_are_one_event_in_the_peer(peer: Peer, channel: EventChannel) -> None:
    t0 = time.monotonic()
    results = [channel.notify() for _ in range(1000)]
    assert time.monotonic() - t0 < 2, "notify blocked"
    # The peer did not read while we notified: its queue filled and the rest
    # were dropped (it was pending anyway) -- without blocking or raising.
    assert results.count(False) > 0 and channel.coalesced == results.count(False)
    first = peer.cmd("drain")
    assert first["ports"] == [PORT], first
    assert first["received"] == channel.sent
    assert peer.cmd("drain")["ports"] == []  # one event, not a thousand


def test_many_notifies_from_the_peer_are_one_event_here(peer: Peer, channel: EventChannel) -> None:
    answer = peer.cmd("notify", n=50)
    assert answer == {"sent": 50, "dropped": 0}
    assert channel.drain() == {PORT}
    assert channel.received == 50
    assert channel.drain() == set()


def test_peer_waits_on_uvloop_and_wakes(peer: Peer, channel: EventChannel) -> None:
    peer.send({"op": "wait", "timeout": 5})
    ready, _ = peer.recv()
    assert ready == {"waiting": True, "loop": "uvloop"}
    time.sleep(0.05)
    for _ in range(20):
        channel.notify()
    assert peer.recv()[0] == {"ports": [PORT]}
    # It woke on one of the twenty; those sent after it drained make at most
    # one more pending event.
    after = peer.cmd("drain")
    assert after["ports"] in ([], [PORT]) and after["received"] == 20


async def test_we_wait_on_uvloop_and_wake(peer: Peer, channel: EventChannel) -> None:
    peer.send({"op": "notify", "n": 5, "delay": 0.2})
    t0 = time.monotonic()
    ports = await asyncio.wait_for(channel.wait(), 5)
    assert ports == {PORT}
    assert time.monotonic() - t0 > 0.1  # we really slept until the peer notified
    answer = await asyncio.to_thread(peer.recv)
    assert answer[0] == {"sent": 5, "dropped": 0}
    # We woke at the first of the five; those that came after we drained are
    # a new pending event (or part of the first): never more than one more.
    assert channel.drain() <= {PORT}
    assert channel.received == 5


def test_channel_made_in_the_peer_comes_back(peer: Peer) -> None:
    peer.send({"op": "new_channel", "port": 9})
    answer, fds = peer.recv(maxfds=1)
    assert answer == {"ok": True, "port": 9} and len(fds) == 1
    assert not os.get_inheritable(fds[0])
    theirs = EventChannel(fds[0], 9)
    try:
        for _ in range(10):
            theirs.notify()
        assert peer.cmd("drain_new") == {"ports": [9], "received": 10}
    finally:
        theirs.close()


def test_fd_from_the_peer_is_non_inheritable_here(peer: Peer) -> None:
    peer.send({"op": "send_pipe"})
    answer, fds = peer.recv(maxfds=1)
    try:
        assert answer == {"ok": True} and len(fds) == 1
        assert not os.get_inheritable(fds[0])
        assert os.read(fds[0], 64) == b"from the peer"
    finally:
        for fd in fds:
            os.close(fd)


def test_truncated_control_data_is_detected_in_the_peer(peer: Peer) -> None:
    local, remote = EventChannel.pair(PORT)
    r, w = os.pipe()
    try:
        before = peer.cmd("fds")["fds"]
        answer = peer.give_channel(remote, extra=[r, w], maxfds=1)
        assert answer["error"] == "TruncatedControlData", answer
        assert json.loads(answer["data"]) == {"port": PORT}
        assert answer["leaked"] is False
        assert peer.cmd("fds")["fds"] == before
        # The peer is still fine: a proper hand-over works afterwards.
        assert peer.give_channel(remote)["ok"]
    finally:
        for fd in (r, w):
            os.close(fd)
        local.close()
        remote.close()


def test_truncated_control_data_is_detected_here(peer: Peer) -> None:
    before = set(os.listdir("/proc/self/fd"))
    peer.send({"op": "send_pipe"})
    with pytest.raises(TruncatedControlData) as info:
        peer.recv(maxfds=0)
    assert json.loads(info.value.data) == {"ok": True}
    assert set(os.listdir("/proc/self/fd")) == before


def test_peer_exit_is_seen_and_notify_never_raises(peer: Peer, channel: EventChannel) -> None:
    peer.cmd("notify", n=1)
    assert peer.stop() == 0
    assert channel.drain() == {PORT}
    assert channel.drain() == set() and channel.peer_closed
    assert channel.notify() is False  # dropped, as Xen drops a send to an unbound port
