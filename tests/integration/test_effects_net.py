"""An effect the driver forgot to drain is still carried out (issue 15: the outbox cannot be forgotten).

The hypervisor process runs in this process so that a core operation can be
called the way a forgetful entry point would: straight on the core, with no
drain after it.  The outbox's ``on_effects`` hook must schedule the drain.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from hvemu import protocol
from hvemu.client import ControlClient
from hvemu.hypervisor.daemon import HypervisorDaemon


async def _domain_with_guest(daemon: HypervisorDaemon) -> tuple[int, ControlClient, ControlClient]:
    tool = await ControlClient.connect(daemon.socket_path)
    await tool.call(protocol.ToolHello())
    reply, _ = await tool.call(protocol.DomainCreate(max_vcpus=1, gfns=16))
    assert isinstance(reply, protocol.DomainCreated)
    guest = await ControlClient.connect(daemon.socket_path)
    _, fds = await guest.call(protocol.GuestHello(domid=reply.domid))
    for fd in fds:
        os.close(fd)
    return reply.domid, tool, guest


@pytest.mark.parametrize("net", [True, False])
async def test_an_undrained_crash_still_hangs_up_on_the_guest(net: bool) -> None:
    run = tempfile.mkdtemp(prefix="hvemu-net")
    daemon = HypervisorDaemon(run, 64)
    if not net:
        daemon.hv.on_effects = None  # what the driver was before: each path had to drain by hand
    started = asyncio.Event()
    task = asyncio.create_task(daemon.serve(started.set))
    conns: list[ControlClient] = []
    try:
        await asyncio.wait_for(started.wait(), 10)
        domid, tool, guest = await _domain_with_guest(daemon)
        conns += [tool, guest]
        daemon.hv.crash_domain(domid, "crashed by a path that does not drain")  # no _after_op
        for _ in range(100):  # the hang-up, then the guest's connection closing, destroys the domain
            await asyncio.sleep(0.02)
            if domid not in daemon.backends:
                break
        assert daemon.hv.pending_effects() is not net
        assert (domid not in daemon.backends) is net, "the crash was carried out only if the net drained it"
    finally:
        for c in conns:
            await c.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for name in os.listdir(run):
            os.unlink(os.path.join(run, name))
        os.rmdir(run)
