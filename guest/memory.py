"""Direct guest-memory access, gated by the p2m the hypervisor publishes.

A vCPU reads or writes a page directly in the shared memory segment when the
p2m type and access right allow it; otherwise the access *exits* (the caller
asks the hypervisor, which may pause the vCPU, and retries when resumed), just
as a hardware page walk would raise an EPT violation.

The check and the access must not race with the hypervisor taking a right away
(nominate, access restriction).  That is the in-flight handshake of
:mod:`hvemu.abi`: before looking at the p2m a vCPU publishes the gfn it is
about to touch, then a full barrier, then the p2m load; it clears the word when
the copy is done.  The hypervisor stores the new p2m entry, issues a full
barrier, and waits until no vCPU's word names the gfn.  Whichever store comes
first, one side sees the other: either the vCPU sees the new type and exits,
or the hypervisor sees the access in flight and waits for it to end.
"""

from __future__ import annotations

import mmap
import os

from hvemu import abi, protocol
from hvemu.client import ControlClient
from hvemu.ring import mb

PAGE = abi.PAGE_SIZE


def _table(pred: object) -> bytes:
    return bytes(1 if pred(i) else 0 for i in range(256))  # type: ignore[operator]


_READ_OK = _table(lambda t: t in abi.READABLE_TYPES)
_WRITE_OK = _table(lambda t: t in abi.WRITABLE_TYPES)
_RIGHTS = bytes(abi.ACCESS_RIGHTS.get(a, 0) for a in range(256))


class GuestMemory:
    """One domain's memory as its guest process sees it."""

    def __init__(self, memory: mmap.mmap, p2m: mmap.mmap, inflight: mmap.mmap, gfns: int, max_vcpus: int,
                 ioreq: mmap.mmap | None = None) -> None:
        self.gfns = gfns
        self.max_vcpus = max_vcpus
        self._mem = memoryview(memory)
        p2m_view = memoryview(p2m)
        self._types = p2m_view[abi.p2m_type_index(gfns, 0):abi.p2m_type_index(gfns, 0) + gfns]
        self._access = p2m_view[abi.p2m_access_index(gfns, 0):abi.p2m_access_index(gfns, 0) + gfns]
        d0 = abi.p2m_vcpu_debug_index(gfns, 0)
        self._debug = p2m_view[d0:d0 + max_vcpus]
        self._inflight = memoryview(inflight)[: abi.INFLIGHT_WORD_SIZE * max_vcpus].cast("Q")
        #: The exit page (one ioreq slot per vCPU, see :mod:`guest.exits`), if the hypervisor handed one.
        self.ioreq = ioreq
        self._maps = (memory, p2m, inflight) if ioreq is None else (memory, p2m, inflight, ioreq)

    def p2m_type(self, gfn: int) -> int:
        return self._types[gfn]

    def p2m_access(self, gfn: int) -> int:
        return self._access[gfn]

    def vcpu_debug(self, vcpu: int) -> int:
        """The toolstack's word for this vCPU (``abi.VCPU_DEBUG_*``): single-step, paused; 0 nearly always."""
        return self._debug[vcpu]

    def single_stepping(self, vcpu: int) -> bool:
        """Has a tool set this vCPU to single-step (it then reports every step)?"""
        return bool(self._debug[vcpu] & abi.VCPU_DEBUG_SINGLE_STEP)

    def try_read(self, vcpu: int, gfn: int, right: int = abi.ACCESS_R) -> bytes | None:
        """The page's bytes, or None if the access must exit to the hypervisor.

        ``right``: ``ACCESS_R`` for a read, ``ACCESS_X`` for an instruction fetch.
        """
        inflight = self._inflight
        inflight[vcpu] = gfn + 1
        mb()
        if _READ_OK[self._types[gfn]] and _RIGHTS[self._access[gfn]] & right:
            off = gfn * PAGE
            data = self._mem[off:off + PAGE].tobytes()
            inflight[vcpu] = abi.INFLIGHT_IDLE
            return data
        inflight[vcpu] = abi.INFLIGHT_IDLE
        return None

    def try_write(self, vcpu: int, gfn: int, data: bytes) -> bool:
        """Write the whole page; False if the access must exit to the hypervisor."""
        inflight = self._inflight
        inflight[vcpu] = gfn + 1
        mb()
        if _WRITE_OK[self._types[gfn]] and _RIGHTS[self._access[gfn]] & abi.ACCESS_W:
            off = gfn * PAGE
            self._mem[off:off + PAGE] = data
            inflight[vcpu] = abi.INFLIGHT_IDLE
            return True
        inflight[vcpu] = abi.INFLIGHT_IDLE
        return False

    def close(self) -> None:
        for view in (self._inflight, self._types, self._access, self._debug, self._mem):
            view.release()
        for m in self._maps:
            m.close()


async def open_guest(path: str, domid: int) -> tuple[ControlClient, GuestMemory, protocol.Welcome]:
    """Connect as ``domid``'s guest and map what the hypervisor hands over (memory, p2m, in-flight table,
    the exit page).

    The returned connection is the domain's lifeline: the domain lives as long as it stays open.
    """
    conn = await ControlClient.connect(path)
    reply, fds = await conn.call(protocol.GuestHello(domid=domid))
    assert isinstance(reply, protocol.Welcome)
    named = dict(zip(reply.fds, fds, strict=True))
    try:
        mem = mmap.mmap(named["memory"], reply.gfns * abi.PAGE_SIZE, mmap.MAP_SHARED)
        p2m = mmap.mmap(named["p2m"], abi.p2m_table_size(reply.gfns), mmap.MAP_SHARED, mmap.PROT_READ)
        inflight = mmap.mmap(named["inflight"], abi.inflight_table_size(reply.max_vcpus), mmap.MAP_SHARED)
        ioreq = mmap.mmap(named["ioreq"], abi.ioreq_page_size(reply.max_vcpus), mmap.MAP_SHARED)
    finally:
        for fd in fds:
            os.close(fd)
    return conn, GuestMemory(mem, p2m, inflight, reply.gfns, reply.max_vcpus, ioreq), reply
