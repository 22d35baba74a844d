"""The trimmed page-in paths: a page staged with its response, and ``PagingLoad(resume=True)``.

The built-in pager's path (``pager.base.Pager._handle_staged``) stages each
page in the paging ring's load area with its response: the hypervisor loads
it as it consumes the response, before the vCPU runs, or, with no host
memory, changes nothing and tells the pager.  The Xen-4.2-style load
(``PagingLoad(resume=True)``, kept for other daemons) relies on the
hypervisor looking at published responses only when it resumes, and
resuming after the load in the same domctl, unless a gfn got ``ENOMEM``; the
reply to such a load is held until the pager's next wake-up (or a couple of ms).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Sequence
from typing import cast

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEvent, RingKind
from hvemu.client import ControlClient
from pager.sdk import MemEventClient, RequestBatch, response_for
from tests.integration.system import Hypervisor, stats

PAGE = b"\x5a" * abi.PAGE_SIZE


async def _guest(hv: Hypervisor, domid: int) -> tuple[ControlClient, ControlClient]:
    main = await ControlClient.connect(hv.socket)
    _, fds = await main.call(protocol.GuestHello(domid=domid))
    for fd in fds:
        os.close(fd)
    vcpu = await ControlClient.connect(hv.socket)
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
        assert await client.domctl.nominate([0]) == [None] and await client.domctl.evict([0]) == [None]
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
        results = await client.domctl.load([0], [PAGE], resume=True)
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


async def _staged_fault(hv: Hypervisor, gfns: int, *, fill_host: bool) -> None:
    """A vCPU exits through its ioreq slot; the pager answers with the page staged in the load area."""
    from guest.exits import connect_vcpu
    from guest.memory import open_guest

    tool = await hv.tool()
    reply, _ = await tool.call(protocol.DomainCreate(max_vcpus=1, gfns=gfns))
    assert isinstance(reply, protocol.DomainCreated)
    domid = reply.domid
    main, mem, _welcome = await open_guest(hv.socket, domid)
    assert mem.ioreq is not None
    vconn, port = await connect_vcpu(hv.socket, domid, 0, mem.ioreq)
    client = MemEventClient(domid, RingKind.paging, run_dir=hv.run_dir)
    await client.attach()
    store = {0: PAGE}

    class Store:
        def read(self, gfn: int) -> bytes:
            return store[gfn]

        def write(self, gfn: int, data: bytes | memoryview) -> None:
            store[gfn] = bytes(data)

        def discard(self, gfns: Sequence[int]) -> None:
            for g in gfns:
                store.pop(g, None)

    filler = None
    try:
        assert client.can_stage_pages
        assert await client.domctl.nominate([0]) == [None] and await client.domctl.evict([0]) == [None]
        if fill_host:  # take the frame just freed: the staged load will find no memory
            made, _ = await tool.call(protocol.DomainCreate(max_vcpus=1, gfns=1))
            assert isinstance(made, protocol.DomainCreated)
            filler = made.domid
        requests = cast(AsyncGenerator[RequestBatch, None], client.requests())
        access = asyncio.create_task(port.access(0, abi.ACCESS_R))
        batch = await asyncio.wait_for(anext(requests), 10)
        assert [r.gfn for r in batch] == [0]
        client.respond_with_page(response_for(batch[0]), 0, Store())
        assert await client.push(), "the hypervisor asked to be notified of the response"
        await asyncio.wait_for(access, 10)  # answered on the kick: no domctl
        st = await stats(tool, domid)
        if not fill_host:
            assert mem.p2m_type(0) == abi.P2MType.ram_rw and mem.try_read(0, 0) == PAGE
            assert st["paging"]["responses"] == 1 and st["paging"]["responses_loaded"] == 1
            assert client.take_load_failures() == []
        else:
            # No memory: nothing changed (no frame, no zero page): the gfn is still on its way in,
            # the vCPU (answered by the response) finds it so and waits, and the pager is told.
            assert mem.p2m_type(0) == abi.P2MType.ram_paging_in and mem.try_read(0, 0) is None
            assert st["paging"]["responses"] == 1 and st["paging_in"] == 1
            assert st["host_frames_used"] == st["host_frames_total"], "the failed load kept a frame"
            assert len(await asyncio.wait_for(anext(requests), 10)) == 0, "woken for the failed load"
            assert client.take_load_failures() == [0] and client.take_load_failures() == []
            retry = asyncio.create_task(port.access(0, abi.ACCESS_R))  # the vCPU re-executes: it waits
            await asyncio.sleep(0.2)
            assert not retry.done()
            assert filler is not None
            await tool.call(protocol.DomainDestroy(domid=filler))  # room made
            filler = None
            assert await client.domctl.load([0], [PAGE]) == [None]
            await asyncio.wait_for(retry, 10)
            assert mem.try_read(0, 0) == PAGE
        await requests.aclose()
    finally:
        if filler is not None:
            await tool.call(protocol.DomainDestroy(domid=filler))
        await client.detach()
        port.close()
        await vconn.close()
        await main.close()
        mem.close()
        await tool.close()


async def test_a_staged_page_comes_in_with_its_response(hypervisor: Hypervisor) -> None:
    await _staged_fault(hypervisor, 64, fill_host=False)


async def test_a_staged_page_without_memory_changes_nothing_and_tells_the_pager(hypervisor: Hypervisor) -> None:
    await _staged_fault(hypervisor, 64 * 256, fill_host=True)  # the fixture's 64 MiB host, all of it
