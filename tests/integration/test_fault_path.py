"""The trimmed page-in path: responses published first, then one ``PagingLoad(resume=True)``.

The pager's fast path (see ``pager.base.Pager._handle``) relies on the
hypervisor looking at published responses only when it resumes, and resuming
after the load in the same domctl, unless a gfn got ``ENOMEM``; the reply to
such a load is held until the pager's next wake-up (or a couple of ms).
"""

from __future__ import annotations

import asyncio
import os

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, RingKind
from hvemu.transport import Connection
from pager.sdk import MemEventClient
from tests.integration.system import Hypervisor, stats

PAGE = b"\x5a" * abi.PAGE_SIZE


async def _guest(hv: Hypervisor, domid: int) -> tuple[Connection, Connection]:
    main = await Connection.connect(hv.socket)
    _, fds = await main.call(protocol.GuestHello(domid=domid))
    for fd in fds:
        os.close(fd)
    vcpu = await Connection.connect(hv.socket)
    await vcpu.call(protocol.GuestHello(domid=domid, vcpu=0))
    return main, vcpu


async def _fault(hv: Hypervisor, gfns: int, *, fill_host: bool) -> None:
    tool = await hv.tool()
    reply, _ = await tool.call(protocol.DomainCreate(max_vcpus=1, gfns=gfns))
    assert isinstance(reply, protocol.DomainCreated)
    domid = reply.domid
    main, vcpu = await _guest(hv, domid)
    client = MemEventClient(domid, RingKind.paging, run_dir=hv.run_dir)
    await client.attach()
    try:
        assert await client.nominate([0]) == [None] and await client.evict([0]) == [None]
        if fill_host:  # take the frame just freed: the load will find no memory
            filler, _ = await tool.call(protocol.DomainCreate(max_vcpus=1, gfns=1))
            assert isinstance(filler, protocol.DomainCreated)
        access = asyncio.create_task(vcpu.call(protocol.GuestAccess(vcpu=0, gfn=0, access=abi.ACCESS_R)))
        batch = await asyncio.wait_for(anext(client.requests()), 10)
        assert [r.gfn for r in batch] == [0]
        req = batch[0]
        client.respond(MemEvent(type=req.type, flags=req.flags, vcpu_id=req.vcpu_id, gfn=req.gfn, p2mt=req.p2mt))
        await client.push(notify=False)
        await asyncio.sleep(0.2)
        assert not access.done(), "a published response was acted on before any resume"
        results = await client.load([0], [PAGE], resume=True)
        if not fill_host:
            assert results == [None]
            # The vCPU's exit is answered first; the pager's reply is held for
            # its next wake-up (a request on the ring), or a couple of ms.
            await asyncio.sleep(0)
            assert access.done(), "the pager's load was answered before the vCPU it resumed"
            await asyncio.wait_for(access, 10)  # resumed by the load, no kick
            assert client.memory is not None and client.memory[:abi.PAGE_SIZE] == PAGE
            st = await stats(tool, domid)
            assert st["paging"]["responses"] == 1 and st["paging"]["unpause_ignored"] == 0
        else:
            assert results == [Errno.ENOMEM]
            await asyncio.sleep(0.2)
            assert not access.done(), "the hypervisor resumed although the load found no memory"
            client.kick()  # the pager's fallback once it gave up making room
            await asyncio.wait_for(access, 10)
            st = await stats(tool, domid)
            assert st["paging"]["responses"] == 1 and st["paged"] == 0 and st["paging_in"] == 1
    finally:
        await client.detach()
        await vcpu.close()
        await main.close()
        await tool.close()


async def test_load_with_resume_runs_the_vcpu_without_a_kick(hypervisor: Hypervisor) -> None:
    await _fault(hypervisor, 64, fill_host=False)


async def test_load_with_resume_leaves_the_ring_alone_on_enomem(hypervisor: Hypervisor) -> None:
    await _fault(hypervisor, 64 * 256, fill_host=True)  # the fixture's 64 MiB host, all of it
