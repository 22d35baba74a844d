"""A bug met in a reader callback of the hypervisor: logged with its traceback, and contained.

The fault path runs in reader callbacks (a vCPU's exit, a ring's kick), not
in tasks, so nothing would await what they raise.  The hypervisor's rule
(:meth:`hvemu.hypervisor.daemon.HypervisorDaemon._event_failed`): the domain whose event
it was is crashed and every other domain goes on; when even that fails, the
error reaches the control server's task group and ``serve()`` ends with it.

The hypervisor runs in this process (to plant the bug), on real sockets,
shared memory and event channels.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest

from guest.exits import connect_vcpu
from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError
from hvemu.hypervisor.backend import DomainBackend, Exit
from hvemu.hypervisor.daemon import HypervisorDaemon


class Bug(Exception):
    """What the planted bug raises."""


class Host:
    def __init__(self, daemon: HypervisorDaemon, task: asyncio.Task[None], tool: ControlClient) -> None:
        self.daemon = daemon
        self.task = task
        self.tool = tool
        self.closing: list[ControlClient] = [tool]
        self.maps: list[mmap.mmap] = []

    async def domain(self, vcpus: int = 1, gfns: int = 16) -> int:
        reply, _ = await self.tool.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns))
        assert isinstance(reply, protocol.DomainCreated)
        return reply.domid

    async def guest_exit(self, domid: int) -> None:
        """Connect a guest and its vCPU 0 and make one access exit (raises what the exit was answered)."""
        conn = await ControlClient.connect(self.daemon.socket_path)
        self.closing.append(conn)
        reply, fds = await conn.call(protocol.GuestHello(domid=domid))
        assert isinstance(reply, protocol.Welcome)
        named = dict(zip(reply.fds, fds, strict=True))
        try:
            ioreq = mmap.mmap(named["ioreq"], abi.ioreq_page_size(reply.max_vcpus), mmap.MAP_SHARED)
        finally:
            for fd in fds:
                os.close(fd)
        self.maps.append(ioreq)
        vcpu_conn, port = await connect_vcpu(self.daemon.socket_path, domid, 0, ioreq)
        self.closing.append(vcpu_conn)
        try:
            await asyncio.wait_for(port.access(1, abi.ACCESS_W), 10)
        finally:
            port.close()

    async def crashed(self) -> dict[int, bool]:
        reply, _ = await self.tool.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply)
        return {d.domid: d.crashed for d in reply.domains}


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    run = tempfile.mkdtemp(prefix="hvemu-cb")
    daemon = HypervisorDaemon(run, 256)
    started = asyncio.Event()
    task = asyncio.create_task(daemon.serve(started.set))
    h: Host | None = None
    try:
        await asyncio.wait_for(started.wait(), 10)
        tool = await ControlClient.connect(daemon.socket_path)
        await tool.call(protocol.ToolHello())
        h = Host(daemon, task, tool)
        yield h
    finally:
        if h is not None:
            for c in h.closing:
                await c.close()
            for m in h.maps:
                m.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        shutil.rmtree(run, ignore_errors=True)


def _plant(monkeypatch: pytest.MonkeyPatch, daemon: HypervisorDaemon, domid: int) -> None:
    """A bug in the handling of ``domid``'s exits (and of no other domain's)."""
    run_exit = daemon._run_exit

    def buggy(be: DomainBackend, vcpu: int, ex: Exit) -> None:
        if be.domid == domid:
            raise Bug(f"planted in domain {domid}")
        run_exit(be, vcpu, ex)

    monkeypatch.setattr(daemon, "_run_exit", buggy)


async def test_a_bug_in_an_exit_callback_crashes_only_its_domain(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    buggy, healthy = await host.domain(), await host.domain()
    _plant(monkeypatch, host.daemon, buggy)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(ControlError) as info:
            await host.guest_exit(buggy)
    assert info.value.errno == Errno.ESRCH  # the vCPU's exit is failed with its domain
    assert "Traceback" in caplog.text and "planted in domain" in caplog.text
    await host.guest_exit(healthy)  # the other domain runs on
    crashed = await host.crashed()
    assert crashed.get(buggy, True) is True and crashed[healthy] is False, crashed
    assert not host.task.done()


async def test_a_bug_that_cannot_be_contained_stops_the_hypervisor(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    buggy = await host.domain()
    _plant(monkeypatch, host.daemon, buggy)

    def crash_fails(domid: int, reason: str) -> None:
        raise Bug("the crash failed too")

    monkeypatch.setattr(host.daemon.hv, "crash_domain", crash_fails)
    exit_task = asyncio.create_task(host.guest_exit(buggy))
    done, _ = await asyncio.wait({host.task}, timeout=10)
    assert done, "serve() did not end"
    exc = host.task.exception()
    assert isinstance(exc, BaseExceptionGroup) and exc.subgroup(Bug) is not None, exc
    assert not os.path.exists(host.daemon.socket_path)
    assert not host.daemon.backends  # every domain destroyed on the way out
    with pytest.raises((ControlError, ConnectionError)):  # ESRCH: its domain was destroyed on the way out
        await exit_task
