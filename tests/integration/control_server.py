"""A toy control server process for ``test_control.py``: a :class:`ControlServer` on uvloop.

Run as ``python control_server.py SOCKET_PATH``; prints ``READY`` on stdout
once listening; SIGTERM/SIGINT close it (socket file removed) and exit 0.

The handler answers:

* ``DomainList``          two made-up domains;
* ``ToolHello``           ``Welcome(fds=["memfd"])`` with a memfd holding the client's name;
* ``Stats``               the server's counters and its open-fd count (for leak checks);
* ``DomainCreate``        after sleeping ``max_vcpus`` milliseconds (a slow handler);
* ``DomainDestroy``       raises: domid 0 ValueError, 1 an ``errno=ESRCH`` error, 2 RuntimeError;
* anything else           ``NotImplementedError`` (-> ``ENOSYS``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvloop

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.fdpass import FdLike, OwnedFd
from hvemu.hypervisor.server import ConnState, ControlServer
from hvemu.stats import DomainStats


class NoSuchDomain(Exception):
    errno = Errno.ESRCH


class Toy:
    def __init__(self) -> None:
        self.server: ControlServer | None = None
        self.accepted: set[int] = set()
        self.disconnects = 0
        self.cancelled = 0
        self.slow_done = 0
        self.slow_started = 0

    async def handle(self, state: ConnState, msg: protocol.Msg) -> tuple[protocol.Msg, Sequence[FdLike]]:
        self.accepted.add(state.id)
        if isinstance(msg, protocol.DomainList):
            return protocol.DomainListReply(domains=[
                protocol.DomainSummary(domid=1, name="alpha", max_vcpus=2, gfns=256, resident=100),
                protocol.DomainSummary(domid=2, name="beta", max_vcpus=4, gfns=512, resident=512),
            ]), []
        if isinstance(msg, protocol.ToolHello):
            fd = os.memfd_create("toy")
            os.write(fd, msg.client.encode())
            return protocol.Welcome(role="tool", fds=["memfd"]), [OwnedFd(fd)]
        if isinstance(msg, protocol.Stats):
            assert self.server is not None
            # The toy's own figures ride in the name of a DomainStats (a real Stats reply is typed).
            return protocol.StatsReply(domid=msg.domid, stats=DomainStats(domid=msg.domid, name=json.dumps({
                "connections": len(self.accepted),
                "disconnects": self.disconnects,
                "active": len(self.server.connections),
                "cancelled": self.cancelled,
                "slow_done": self.slow_done,
                "slow_started": self.slow_started,
                "open_fds": len(os.listdir("/proc/self/fd")),
                "uid": state.uid,
                "pid": state.pid,
                "requests": state.requests,
                "loop": type(asyncio.get_running_loop()).__module__,
            }))), []
        if isinstance(msg, protocol.DomainCreate):
            self.slow_started += 1
            try:
                await asyncio.sleep(msg.max_vcpus / 1000)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            self.slow_done += 1
            return protocol.DomainCreated(domid=msg.max_vcpus), []
        if isinstance(msg, protocol.DomainDestroy):
            if msg.domid == 0:
                raise ValueError("domain 0 cannot be destroyed")
            if msg.domid == 1:
                raise NoSuchDomain("no domain 1")
            raise RuntimeError("a bug in the handler")
        raise NotImplementedError(f"{type(msg).__name__} is not served here")

    def on_disconnect(self, state: ConnState) -> None:
        self.disconnects += 1


async def serve(path: str) -> None:
    toy = Toy()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = ControlServer(path, toy.handle, on_disconnect=toy.on_disconnect,
                           check_peer=lambda uid: uid == os.getuid())
    toy.server = server
    async with server:
        print("READY", flush=True)
        await stop.wait()
    logging.getLogger("toy").info("stopped")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="server %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
