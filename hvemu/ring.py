"""Xen's ``io/ring.h`` over any writable buffer, with real memory barriers.

The hypervisor is the *front* end (it produces requests and consumes
responses); a daemon is the *back* end.  Both ends are plain objects over a
buffer (an ``mmap`` of a POSIX shm segment in real use, a ``bytearray`` in unit
tests), generic over the entry codec of :mod:`hvemu.abi` so that the 40-byte
``mem_event`` entry and the 400-byte ``vm_event`` entry share this code.

Indices
    ``req_prod``, ``req_event``, ``rsp_prod`` and ``rsp_event`` are read and
    written as aligned 4-byte words through a ``memoryview`` cast to ``'I'``:
    a single load or store each, which never tears (``struct.unpack_from`` on
    the mapping was seen to tear under a concurrent writer).  They are
    free-running u32 counters; every difference is taken modulo 2**32.

Barriers (the ``mb()`` of ``ring.h``)
    x86 is TSO: stores are not reordered with stores and loads not with loads,
    so ``wmb()``/``rmb()`` only have to stop the *compiler*, which the
    interpreter already does (each index access is an opaque C call).  But a
    load may pass an earlier store to another location, which is exactly
    "publish ``*_prod`` then read the peer's ``*_event``".  :func:`mb` must
    therefore be a real full fence.  We use the acquire and release of an
    uncontended ``threading.Lock``: CPython implements it with a POSIX
    semaphore whose fast paths are ``lock cmpxchg`` / ``lock xadd``, and a
    locked instruction is a full barrier on x86.  It costs well under a
    microsecond and needs no syscall.  On any other architecture ``wmb`` and
    ``rmb`` become full fences as well (correct, if slower).  The stress test
    ``tests/integration/test_ring_stress.py`` drives two processes through a
    tiny ring with notification suppression and fails (by timeout) on a lost
    wake-up.

Corrupt indices
    A daemon may write anything into the page.  The consumer-side checks
    (:meth:`BackRing.unconsumed_requests`, :meth:`FrontRing.unconsumed_responses`)
    raise :class:`RingCorruptError` instead of ever indexing past the ring.
"""

from __future__ import annotations

import platform
import sys
import threading
from typing import Any, Generic, TypeVar

from hvemu import abi

if sys.byteorder != "little":  # pragma: no cover - the ABI is little-endian
    raise ImportError("hvemu's ring ABI is little-endian; a memoryview 'I' cast would be wrong here")

_MASK = abi.RING_IDX_MASK
_fence = threading.Lock()


def mb() -> None:
    """Full memory barrier (see module docstring for why this is one)."""
    _fence.acquire()
    _fence.release()


def _compiler_barrier() -> None:
    """On TSO hardware the interpreter's opaque calls are barrier enough."""


if platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}:
    wmb = _compiler_barrier
    rmb = _compiler_barrier
else:  # pragma: no cover - weakly ordered hosts pay for full fences
    wmb = mb
    rmb = mb


class RingCorruptError(Exception):
    """The peer wrote indices that no correct implementation could produce."""


E = TypeVar("E")


class SharedRing(Generic[E]):
    """The shared page: header indices plus ``ring[]`` of codec entries."""

    def __init__(self, buf: Any, codec: Any, page_size: int = abi.PAGE_SIZE) -> None:
        view = memoryview(buf)
        if view.readonly:
            raise ValueError("the ring buffer must be writable")
        if len(view) < page_size:
            raise ValueError(f"the ring buffer is {len(view)} bytes, a page is {page_size}")
        self._view = view[:page_size]
        self._idx = self._view[: abi.RING_ENTRIES_OFFSET].cast("I")
        self.codec = codec
        self.entry_size: int = codec.size
        self.size: int = abi.ring_size(codec.size, page_size)
        self.mask: int = self.size - 1

    # --- SHARED_RING_INIT -------------------------------------------------
    def init(self) -> None:
        """``SHARED_RING_INIT``: zero the page, events armed at 1."""
        self._view[:] = bytes(len(self._view))
        self._idx[abi.REQ_EVENT_WORD] = 1
        self._idx[abi.RSP_EVENT_WORD] = 1

    # --- the four header words -------------------------------------------
    @property
    def req_prod(self) -> int:
        return self._idx[abi.REQ_PROD_WORD]

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        self._idx[abi.REQ_PROD_WORD] = value & _MASK

    @property
    def req_event(self) -> int:
        return self._idx[abi.REQ_EVENT_WORD]

    @req_event.setter
    def req_event(self, value: int) -> None:
        self._idx[abi.REQ_EVENT_WORD] = value & _MASK

    @property
    def rsp_prod(self) -> int:
        return self._idx[abi.RSP_PROD_WORD]

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        self._idx[abi.RSP_PROD_WORD] = value & _MASK

    @property
    def rsp_event(self) -> int:
        return self._idx[abi.RSP_EVENT_WORD]

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        self._idx[abi.RSP_EVENT_WORD] = value & _MASK

    # --- entries -----------------------------------------------------------
    def slot_offset(self, idx: int) -> int:
        return abi.RING_ENTRIES_OFFSET + (idx & self.mask) * self.entry_size

    def write_entry(self, idx: int, entry: E) -> None:
        self.codec.pack_into(self._view, self.slot_offset(idx), entry)

    def read_entry(self, idx: int) -> E:
        entry: E = self.codec.unpack_from(self._view, self.slot_offset(idx))
        return entry

    def read_slot(self, idx: int) -> bytes:
        """The raw bytes of slot ``idx`` (a private copy)."""
        off = self.slot_offset(idx)
        return bytes(self._view[off:off + self.entry_size])

    def write_slot(self, idx: int, raw: bytes) -> None:
        off = self.slot_offset(idx)
        self._view[off:off + self.entry_size] = raw

    def release(self) -> None:
        """Drop the views so that the underlying mmap can be closed."""
        self._idx.release()
        self._view.release()


class FrontRing(Generic[E]):
    """``mem_event_front_ring_t``: the hypervisor's end."""

    def __init__(self, sring: SharedRing[E]) -> None:
        self.sring = sring
        self.size = sring.size
        self.req_prod_pvt = 0
        self.rsp_cons = 0
        #: The last value this end published as ``req_prod``: the shared copy
        #: may be scribbled on by the back end, this one cannot.
        self.req_prod_published = 0
        #: A private copy of every request still in a slot, so that a slot a
        #: dead daemon overwrote with an unpublished response can be restored.
        self._shadow: list[bytes | None] = [None] * sring.size

    @classmethod
    def attach(cls, sring: SharedRing[E]) -> FrontRing[E]:
        """``FRONT_RING_ATTACH``: pick up a live ring from its shared indices."""
        ring = cls(sring)
        ring.req_prod_pvt = ring.req_prod_published = sring.req_prod
        ring.rsp_cons = sring.rsp_prod
        return ring

    # RING_FREE_REQUESTS / RING_FULL
    def free_requests(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _MASK)

    def full(self) -> bool:
        return self.free_requests() == 0

    def outstanding(self) -> int:
        """Requests produced and not yet answered."""
        return (self.req_prod_pvt - self.rsp_cons) & _MASK

    def put_request(self, entry: E) -> None:
        """Copy into ``RING_GET_REQUEST(req_prod_pvt)`` and advance the private index."""
        if self.full():
            raise OverflowError("ring full: the caller must check free_requests() first")
        self.sring.write_entry(self.req_prod_pvt, entry)
        self._shadow[self.req_prod_pvt & self.sring.mask] = self.sring.read_slot(self.req_prod_pvt)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK

    def push_requests(self) -> None:
        """``RING_PUSH_REQUESTS``."""
        wmb()
        self.sring.req_prod = self.req_prod_published = self.req_prod_pvt

    def push_requests_and_check_notify(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: True if the back end must be kicked."""
        sring = self.sring
        old = sring.req_prod
        new = self.req_prod_pvt
        wmb()
        sring.req_prod = self.req_prod_published = new
        mb()
        return ((new - sring.req_event) & _MASK) < ((new - old) & _MASK)

    def restore_unanswered(self) -> int:
        """Rewrite every published, unanswered request slot from the private copy.

        Requests and responses share slots, so a daemon that dies after
        writing a response but before publishing ``rsp_prod`` leaves response
        bytes where a request was.  Called before a new daemon attaches (it
        resumes at ``rsp_prod``), this makes it see the original requests.
        Returns how many slots were rewritten.
        """
        count = (self.req_prod_published - self.rsp_cons) & _MASK
        if count > self.size:
            raise RingCorruptError(f"{count} requests outstanding on a {self.size}-slot ring")
        for i in range(count):
            idx = (self.rsp_cons + i) & _MASK
            raw = self._shadow[idx & self.sring.mask]
            if raw is not None:
                self.sring.write_slot(idx, raw)
        wmb()
        self.sring.rsp_prod = self.rsp_cons
        self.sring.req_prod = self.req_prod_published
        return count

    def check_req_prod(self) -> None:
        """Refuse a shared ``req_prod`` the back end rewrote (only the front end writes it).

        A ``SHARED_RING_INIT`` by the daemon zeroes it: on an idle ring (no
        request outstanding, ``rsp_prod`` zeroed too) the front end starts
        afresh from 0; under outstanding requests it is corrupt, since the
        daemon can no longer see them.
        """
        shared = self.sring.req_prod
        if shared == self.req_prod_published:
            return
        if shared == 0 and self.sring.rsp_prod == 0 and self.outstanding() == 0:
            self.req_prod_pvt = self.req_prod_published = self.rsp_cons = 0
            return
        raise RingCorruptError(
            f"req_prod is {shared} but {self.req_prod_published} was published, with "
            f"{self.outstanding()} requests outstanding (SHARED_RING_INIT on a live ring?)")

    def unconsumed_responses(self) -> int:
        """``RING_HAS_UNCONSUMED_RESPONSES``, refusing a ``rsp_prod`` that answers unasked requests."""
        avail = (self.sring.rsp_prod - self.rsp_cons) & _MASK
        published = (self.req_prod_published - self.rsp_cons) & _MASK
        if avail > published:
            raise RingCorruptError(
                f"rsp_prod={self.sring.rsp_prod} is {avail} ahead of rsp_cons={self.rsp_cons} "
                f"but only {published} published requests are unanswered"
            )
        if avail:
            rmb()
        return avail

    def get_response(self) -> E:
        """Copy ``RING_GET_RESPONSE(rsp_cons)`` and advance; call only when one is unconsumed."""
        entry = self.sring.read_entry(self.rsp_cons)
        self.rsp_cons = (self.rsp_cons + 1) & _MASK
        return entry

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: re-arm ``rsp_event`` without missing a response."""
        if self.unconsumed_responses():
            return True
        self.sring.rsp_event = self.rsp_cons + 1
        mb()
        return self.unconsumed_responses() > 0


class BackRing(Generic[E]):
    """``mem_event_back_ring_t``: a daemon's end."""

    def __init__(self, sring: SharedRing[E]) -> None:
        self.sring = sring
        self.size = sring.size
        self.rsp_prod_pvt = 0
        self.req_cons = 0

    @classmethod
    def attach(cls, sring: SharedRing[E]) -> BackRing[E]:
        """``BACK_RING_ATTACH`` for a restarted daemon.

        Everything up to the shared ``rsp_prod`` was answered; every request
        after it is unanswered and will be consumed again.
        """
        ring = cls(sring)
        ring.rsp_prod_pvt = sring.rsp_prod
        ring.req_cons = sring.rsp_prod
        return ring

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``, refusing a ``req_prod`` beyond the ring."""
        req_prod = self.sring.req_prod
        req = (req_prod - self.req_cons) & _MASK
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & _MASK)
        # RING_REQUEST_PROD_OVERFLOW: the producer may be at most one ring
        # ahead of the last response *we* produced, never further.
        if req > self.size or ((req_prod - self.rsp_prod_pvt) & _MASK) > self.size or rsp < 0:
            raise RingCorruptError(
                f"req_prod={req_prod} is {req} ahead of req_cons={self.req_cons} and "
                f"{(req_prod - self.rsp_prod_pvt) & _MASK} ahead of rsp_prod_pvt={self.rsp_prod_pvt}, "
                f"more than the {self.size} slots of the ring"
            )
        n = min(req, rsp)
        if n:
            rmb()
        return n

    def request_cons_overflow(self, cons: int) -> bool:
        """``RING_REQUEST_CONS_OVERFLOW``."""
        return ((cons - self.rsp_prod_pvt) & _MASK) >= self.size

    def get_request(self) -> E:
        entry = self.sring.read_entry(self.req_cons)
        self.req_cons = (self.req_cons + 1) & _MASK
        return entry

    def free_responses(self) -> int:
        """Responses that may be produced now: one per consumed, unanswered request."""
        return (self.req_cons - self.rsp_prod_pvt) & _MASK

    def put_response(self, entry: E) -> None:
        if self.free_responses() == 0:
            raise OverflowError("no consumed request is waiting for a response")
        self.sring.write_entry(self.rsp_prod_pvt, entry)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK

    def push_responses(self) -> None:
        """``RING_PUSH_RESPONSES``."""
        wmb()
        self.sring.rsp_prod = self.rsp_prod_pvt

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: True if the front end must be kicked."""
        sring = self.sring
        old = sring.rsp_prod
        new = self.rsp_prod_pvt
        wmb()
        sring.rsp_prod = new
        mb()
        return ((new - sring.rsp_event) & _MASK) < ((new - old) & _MASK)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: re-arm ``req_event`` without missing a request."""
        if self.unconsumed_requests():
            return True
        self.sring.req_event = self.req_cons + 1
        mb()
        return self.unconsumed_requests() > 0
