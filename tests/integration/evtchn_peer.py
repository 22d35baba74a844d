"""The other process of ``test_evtchn.py``: receives event-channel ends by SCM_RIGHTS and obeys commands.

Run as ``python evtchn_peer.py CTL_FD``.  ``CTL_FD`` is an inherited
``AF_UNIX`` ``SOCK_SEQPACKET`` socket; every command and every answer is one
JSON message on it (fds ride on some of them).  Commands:

``recv_channel {maxfds}``  the next message is ``{"port": P}`` plus fds, received allowing
                           ``maxfds``; the first fd becomes the channel
``drain``                  drain the channel: ``{"ports": [...], "received": n}``
``notify {n, delay}``      sleep ``delay`` s, notify ``n`` times: ``{"sent": k, "dropped": m}``
``wait {timeout}``         answer ``{"waiting": true}``, then wait on uvloop: ``{"ports": [...]}``
``new_channel {port}``     make a pair here, send the remote end back (fd on the answer)
``send_pipe``              send the read end of a new pipe back (fd on the answer)
``fds``                    ``{"fds": [open fd numbers]}``
``exit``
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvloop

from hvemu.evtchn import EventChannel
from hvemu.fdpass import TruncatedControlData, recvmsg_fds, sendmsg_fds


def open_fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


async def wait(channel: EventChannel, timeout: float, answer: Any) -> list[int]:
    task = asyncio.create_task(channel.wait())
    await asyncio.sleep(0.01)  # the reader is registered now
    answer({"waiting": True, "loop": type(asyncio.get_running_loop()).__module__})
    return sorted(await asyncio.wait_for(task, timeout))


def main() -> int:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    channel: EventChannel | None = None
    keep: list[EventChannel] = []

    def answer(obj: dict[str, Any], fds: list[int] | None = None) -> None:
        sendmsg_fds(ctl, json.dumps(obj).encode(), fds or [])

    while True:
        data, _ = recvmsg_fds(ctl, 65536, 0)  # commands carry no fds
        if not data:
            return 0
        cmd = json.loads(data)
        op = cmd["op"]
        if op == "recv_channel":
            # The next message is {"port": P} with the channel's fd (and maybe more).
            before = open_fds()
            try:
                raw, fds = recvmsg_fds(ctl, 65536, cmd["maxfds"])
            except TruncatedControlData as exc:
                answer({"error": "TruncatedControlData", "message": str(exc), "data": exc.data.decode(),
                        "leaked": open_fds() != before})
                continue
            port = json.loads(raw)["port"]
            inheritable = [os.get_inheritable(fd) for fd in fds]
            if channel is not None:
                channel.close()
            channel = EventChannel(fds[0], port)
            for fd in fds[1:]:
                os.close(fd)
            answer({"ok": True, "nfds": len(fds), "inheritable": inheritable})
            continue
        if op == "exit":
            return 0
        if op == "fds":
            answer({"fds": open_fds()})
        elif op == "send_pipe":
            r, w = os.pipe()
            os.write(w, b"from the peer")
            os.close(w)
            answer({"ok": True}, [r])
            os.close(r)
        elif op == "new_channel":
            local, remote = EventChannel.pair(cmd["port"])
            keep.append(local)
            answer({"ok": True, "port": cmd["port"]}, [remote.fileno()])
            remote.close()
        elif op == "drain_new":
            answer({"ports": sorted(keep[-1].drain()), "received": keep[-1].received})
        elif channel is None:
            answer({"error": "no channel yet"})
        elif op == "drain":
            ports = channel.drain()
            answer({"ports": sorted(ports), "received": channel.received, "peer_closed": channel.peer_closed})
        elif op == "notify":
            time.sleep(cmd.get("delay", 0))
            results = [channel.notify() for _ in range(cmd["n"])]
            answer({"sent": results.count(True), "dropped": results.count(False)})
        elif op == "wait":
            answer({"ports": uvloop.run(wait(channel, cmd["timeout"], answer))})
        else:
            answer({"error": f"unknown op {op}"})


if __name__ == "__main__":
    sys.exit(main())
