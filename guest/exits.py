"""A vCPU's exits through its slot of the ioreq page and its own event channel.

The hypervisor hands the domain's exit page (Xen's ioreq page, laid out in
:mod:`hvemu.abi`) to the guest's first connection, and each vCPU's event
channel to that vCPU's hello.  An exit is: write the slot, store ``READY``,
kick; then sleep until the hypervisor has stored ``RESP_READY`` and kicked
back (a persistent reader on the channel wakes the one exit waiting), read
the response and store ``NONE``.  No control message, no frame to
reassemble, one notification each way: what a real vCPU's exit to a
user-space handler costs in Xen.
"""

from __future__ import annotations

import asyncio
import mmap

from hvemu import abi, protocol
from hvemu.abi import (
    EXIT_ACCESS,
    EXIT_TRAP,
    IOREQ_NONE,
    IOREQ_READY,
    IOREQ_RESP_READY,
    RESULT_ERROR,
    RESULT_TRAP_INJECTED,
)
from hvemu.client import ControlClient, ControlError
from hvemu.evtchn import EventChannel
from hvemu.fdpass import close_fds


class ExitPort:
    """One vCPU's exit path: its ioreq slot and its event channel (one exit at a time)."""

    def __init__(self, vcpu: int, ioreq: mmap.mmap, evtchn: EventChannel) -> None:
        self.vcpu = vcpu
        self._view = memoryview(ioreq)
        self._states = self._view.cast("I")
        self._word = abi.ioreq_state_word(vcpu)
        self._evtchn = evtchn
        self._waiter: asyncio.Future[None] | None = None
        #: Held by each exit, and by a hypercall the vCPU makes on the control socket (a balloon):
        #: a vCPU executes one thing at a time, and the hypervisor refuses (EBUSY) a paused vCPU's hypercall.
        self.lock = asyncio.Lock()
        evtchn.watch(self._kicked, on_close=self._closed)

    def _kicked(self, _ports: set[int]) -> None:
        fut = self._waiter
        if fut is not None and not fut.done() and self._states[self._word] == IOREQ_RESP_READY:
            fut.set_result(None)

    def _closed(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionResetError(f"the hypervisor closed vCPU {self.vcpu}'s event channel"))

    async def _exit(self, kind: int, a: int, gla: int | None, c: int, d: int) -> int | None:
        async with self.lock:
            return await self._exit_locked(kind, a, gla, c, d)

    async def _exit_locked(self, kind: int, a: int, gla: int | None, c: int, d: int) -> int | None:
        """Exit and wait to be resumed; the vector of a trap a tool injected meanwhile, or None.

        A refused exit raises :class:`~hvemu.client.ControlError` with its
        errno name, as the same exit over the control socket would.
        """
        if self._waiter is not None:
            raise RuntimeError(f"vCPU {self.vcpu} already has an exit in process")
        evtchn = self._evtchn
        if evtchn.closed or evtchn.peer_closed:
            raise ConnectionResetError(f"the hypervisor closed vCPU {self.vcpu}'s event channel")
        abi.ioreq_pack_exit(self._view, self.vcpu, kind, a, gla, c, d)
        self._states[self._word] = IOREQ_READY
        fut = self._waiter = asyncio.get_running_loop().create_future()
        try:
            evtchn.notify()  # a syscall: the full barrier between the slot's stores and the hypervisor's loads
            await fut
        finally:
            self._waiter = None
        result, value = abi.ioreq_unpack_response(self._view, self.vcpu)
        self._states[self._word] = IOREQ_NONE
        if result == RESULT_TRAP_INJECTED:
            return value
        if result == RESULT_ERROR:
            errno = abi.ERRNO_NAMES.get(value, abi.Errno.EINVAL)
            raise ControlError(errno, f"vCPU {self.vcpu}'s exit was refused")
        return None

    async def access(self, gfn: int, access: int, gla: int | None = None, offset: int = 0) -> int | None:
        """An EPT violation on ``gfn`` (``access``: ACCESS_R/W/X bits)."""
        return await self._exit(EXIT_ACCESS, gfn, gla, offset, access)

    async def trap(self, reason: int, value: int = 0, old: int = 0, gla: int | None = None) -> int | None:
        """A CR write, an INT3 or a single step (``hvm_memory_event_traps``)."""
        return await self._exit(EXIT_TRAP, value, gla, old, reason)

    def close(self) -> None:
        """Stop the reader and close the channel (an exit waiting is failed)."""
        self._evtchn.close()
        self._states.release()
        self._view.release()


async def connect_vcpu(path: str, domid: int, vcpu: int, ioreq: mmap.mmap) -> tuple[ControlClient, ExitPort]:
    """Say the vCPU's hello on a connection of its own and bind its exit port.

    The connection stays open for the vCPU's life: the hypervisor unbinds the
    vCPU's channel when it ends (it still takes hypercalls such as a balloon).
    """
    conn = await ControlClient.connect(path)
    try:
        reply, fds = await conn.call(protocol.GuestHello(domid=domid, vcpu=vcpu))
        try:
            if not isinstance(reply, protocol.Welcome) or reply.port is None or reply.fds != ["evtchn"]:
                raise ConnectionError(f"vCPU {vcpu}'s hello carried no event channel")
            chan = EventChannel(fds[0], reply.port)
        except BaseException:
            close_fds(fds)
            raise
        return conn, ExitPort(vcpu, ioreq, chan)
    except BaseException:
        await conn.close()
        raise
