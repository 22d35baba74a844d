"""A daemon that leaves its ring in the worst state it can, then dies (issue 14, defect 2).

``python -m tests.integration.hangup_daemon --run-dir DIR --domid N --how HOW``
enables the paging (or ``--ring``) ring of domain N, then, by ``HOW``:

``evtchn``  sends an empty datagram on the event channel (read as a hang-up),
            then the fd of its own control connection over the event channel,
            where it sits, unread, in the hypervisor's socket buffer;
``child``   hands its control connection to a child (``sleep``) that outlives it.

It prints the pid of that child (or 0) and exits at once, without disabling
the ring.  Either way the control connection stays open after the daemon
process is gone; the ring must nevertheless go back to the hypervisor,
orphaned, for the next daemon.
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import subprocess

from hvemu import protocol
from hvemu.abi import RingKind
from hvemu.client import SyncControlClient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--how", choices=["evtchn", "child"], required=True)
    p.add_argument("--ring", choices=[k.value for k in RingKind], default="paging")
    a = p.parse_args()
    conn = SyncControlClient.connect(protocol.socket_path(a.run_dir), timeout=10)
    conn.call(protocol.ToolHello(client="hangup-daemon"))
    reply, fds = conn.call(protocol.MemEventEnable(domid=a.domid, ring=RingKind(a.ring)))
    assert isinstance(reply, protocol.MemEventEnabled)
    named = dict(zip(reply.fds, fds, strict=True))
    ctl = conn._sock
    assert ctl is not None
    child = 0
    if a.how == "evtchn":
        ev = socket.socket(fileno=named["evtchn"])
        ev.send(b"", socket.MSG_DONTWAIT)
        try:
            ev.sendmsg([b"\x01\x00\x00\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [ctl.fileno()]).tobytes())], socket.MSG_DONTWAIT)
        except OSError:
            pass  # the hypervisor already closed its end on the hang-up: nothing is queued
    else:
        keep = ctl.fileno()
        os.set_inheritable(keep, True)
        child = subprocess.Popen(["sleep", "300"], pass_fds=(keep,), start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    print(child, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
