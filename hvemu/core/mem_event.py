"""One mem_event ring of a domain (``struct mem_event_domain``), and the rules of its admission policies.

The policies' code is :mod:`hvemu.core.admission` (one object per rule set);
the ring's mechanism, which both use, is here.

The hypervisor is the *front* end of each ring: it produces requests and
consumes responses, with :class:`hvemu.ring.FrontRing` over the page the daemon
shares.  This module is the seed patch's ``xen/arch/x86/mm/mem_event.c``,
rule by rule, plus the admission policy of later Xen beside it:

``"seed"`` (default, the reference)
    ``put_request`` returns 0, ``ENOSYS`` (no ring), ``EAGAIN`` (ring full: the
    event is *lost*, counted) or ``EBUSY`` (a guest vCPU was marked and paused
    because, after its put, fewer slots are free than the domain has vCPUs).
    ``unpause_vcpus`` wakes marked vCPUs round-robin from
    ``last_vcpu_wake_up + 1`` while the vCPUs it counts as online (every vCPU
    not marked) are fewer than the free slots.  With more vCPUs than slots
    that bound is never met and marked vCPUs sleep for good: a property of the
    seed, shown by a test, not a bug of this code.

``"claim"`` (``vm_event_claim_slot`` as in today's Xen, with the 2017 wake fix)
    A producer claims a slot *before* it changes anything.  A guest vCPU that
    finds none sleeps on the ring's wait queue with its request ready (the
    request is put when a slot is granted, so nothing is lost); a foreign
    producer gets a retryable ``EBUSY`` and has changed nothing.  After a put
    a guest vCPU gets a "black eye" (marked) if fewer slots than vCPUs are
    left, unless it is already paused for its event (its response frees the
    slot it used).  ``vm_event_wake`` runs after every put and after every
    response consumed: it grants slots to waiters first, else releases up to
    as many marked vCPUs as there are free slots (per call: the slots freed
    one response at a time add up).

Differences from the seed, each on purpose (every difference from Xen, with
its reason, is listed in ``docs/differences-from-xen.md``):

* the pause flag is per ring (Xen 4.2's ``_VPF_mem_paging/access/sharing``);
  the seed's single ``_VPF_mem_event`` let one ring wake a vCPU marked by
  another and unbalance both ``blocked`` counts;
* ``enable`` recounts ``blocked`` from the flags instead of zeroing it, so
  its wake-up really wakes vCPUs left marked (the seed zeroed the count and
  so made its own wake-up a no-op);
* ``disable`` wakes every marked vCPU (Xen 4.2 final), and refuses with
  ``EBUSY`` while vCPUs sleep on the wait queue (claim policy, as 4.2 final);
* a response's ``VCPU_PAUSED`` releases a per-vCPU *event* pause count and is
  ignored (and counted) when there is none to release, as Xen has done since
  2014 (``vm_event_vcpu_unpause``); see DESIGN section 6 for the seed's
  double unpause this prevents;
* notifications follow ``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` instead of the
  seed's (and Xen 4.2's) unconditional ``notify_via_xen_event_channel``;
  ``notify="every-put"`` restores Xen's kick after every put.

What a daemon may get wrong and the hypervisor can see crashes the domain
with the reason logged, rather than leaving vCPUs paused for ever: the
hypervisor's own ``req_prod`` rewritten under outstanding requests (a
``SHARED_RING_INIT`` on a live ring; on an idle ring it is taken as a fresh
start), and bytes written past the last slot of a ring smaller than the page
(a back ring sized for the whole page, ``BACK_RING_INIT(..., PAGE_SIZE)``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from hvemu import abi
from hvemu.abi import Errno, MemEvent, MemEventFlag, RingKind
from hvemu.core.admission import ADMISSIONS, POLICIES, Admission, Policy
from hvemu.core.effects import RingNotify
from hvemu.core.errors import HypervisorError
from hvemu.ring import FrontRing, RingCorruptError, SharedRing
from hvemu.stats import RingCounters, RingStats
from hvemu.trace import NO_VCPU, RING_CODES, TraceEvent

if TYPE_CHECKING:
    from hvemu.core.domain import Domain, PauseFlag, Vcpu

log = logging.getLogger("hvemu.core.mem_event")

#: When the hypervisor kicks a daemon after a put: as ``ring.h`` says (default), or every time (Xen 4.2).
Notify = Literal["ring.h", "every-put"]
NOTIFY_MODES: tuple[Notify, ...] = ("ring.h", "every-put")
# Plain ints for the per-response checks (an IntFlag operation costs ~1 us).
_DUMMY = int(MemEventFlag.DUMMY)
_VCPU_PAUSED = int(MemEventFlag.VCPU_PAUSED)
_FOREIGN = int(MemEventFlag.FOREIGN)

#: A ring-specific response step (the paging ring's p2m fix-up).  It returns
#: False to reject the whole response (its gfn is not one the domain has).
ResponseFixup = Callable[[MemEvent], bool]


class MemEventDomain:
    """``struct mem_event_domain``: one ring of one domain, enabled or not."""

    def __init__(self, domain: Domain, kind: RingKind, pause_flag: PauseFlag, policy: Policy,
                 ring_size: int, notify: Notify = "ring.h") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown mem_event policy {policy!r}")
        if notify not in NOTIFY_MODES:
            raise ValueError(f"unknown notify mode {notify!r}")
        self.notify_every_put = notify == "every-put"
        self.domain = domain
        self.kind = kind
        self.pause_flag = pause_flag
        self.policy: Policy = policy
        #: The admission rules (:mod:`hvemu.core.admission`): the seed's or the claim's.
        self.admission: Admission = ADMISSIONS[policy]
        #: The entry layout on the page: the domain's ring ABI (``abi.RING_ABIS``).
        self.codec = abi.entry_codec(domain.ring_abi, kind)
        self.ring_size = abi.abi_ring_slots(domain.ring_abi, ring_size)
        self.ring_bytes = abi.ring_bytes(self.ring_size, self.codec.size)
        self.front: FrontRing[MemEvent] | None = None
        #: The page's bytes past the last slot of a ring smaller than the page (None otherwise):
        #: no correct daemon writes there.
        self._tail: memoryview | None = None
        #: Number of vCPUs marked (paused) for congestion on this ring.
        self.blocked = 0
        #: Where the next round-robin wake-up scan starts (after this one).
        self.last_vcpu_wake_up = 0
        #: Claim policy: guest producers asleep until a slot frees, with their request.
        self.waiters: collections.deque[tuple[Vcpu, MemEvent]] = collections.deque()
        self.counters = RingCounters()
        self._ring_code = RING_CODES[kind]

    def trace(self, event: TraceEvent, vcpu: int, gfn: int = 0) -> None:
        tracer = self.domain.tracer
        if tracer is not None:
            tracer(event, self.domain.domid, self._ring_code, vcpu, gfn, self.occupancy())

    # ------------------------------------------------------------------ state
    @property
    def enabled(self) -> bool:
        return self.front is not None

    def check_ring(self) -> Errno | None:
        """``mem_event_check_ring``: is there a ring at all (``ENOSYS`` if not)."""
        return None if self.front is not None else Errno.ENOSYS

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS`` (0 without a ring)."""
        return self.front.free_requests() if self.front is not None else 0

    def available(self) -> int:
        """``mem_event_ring_available``: free slots not claimed.

        A claim and its put happen inside one core call here, so no claim is
        ever outstanding between calls and this equals the free slots.
        """
        return self.free_requests()

    def occupancy(self) -> int:
        return self.front.outstanding() if self.front is not None else 0

    # ------------------------------------------------------------------ producing
    def admit(self, vcpu: Vcpu | None) -> Errno | None:
        """May a producer go ahead and change state for an event?  Call before any side effect.

        Seed: yes whenever there is a ring (the seed checks space only in
        ``put_request``).  Claim: a foreign producer (``vcpu is None``) is told
        ``EBUSY`` when no slot is available, so it retries instead of losing
        its event; a guest vCPU always may (it sleeps in ``put_request``).
        """
        if self.front is None:
            return Errno.ENOSYS
        return self.admission.admit(self, vcpu)

    def put_request(self, req: MemEvent, vcpu: Vcpu | None) -> Errno | None:
        """``mem_event_put_request``; ``vcpu`` is the producing guest vCPU, None for a foreign one.

        Returns None (0), ``ENOSYS``, ``EAGAIN`` or ``EBUSY`` as the seed
        documents; under the claim policy only None, ``ENOSYS`` or (foreign,
        without a prior :meth:`admit`) ``EBUSY``.
        """
        if self.front is None:
            self.counters.no_ring += 1
            return Errno.ENOSYS
        try:
            self.front.check_req_prod()
        except RingCorruptError as exc:
            self.domain.crash(f"{self.kind} ring corrupt: {exc}")
            return Errno.ENOSYS
        return self.admission.put_request(self, req, vcpu)

    def produce(self, req: MemEvent) -> None:
        """Copy the request into the ring, push it and kick the daemon if ``ring.h`` says so."""
        front = self.front
        assert front is not None
        front.put_request(req)
        self.counters.put += 1
        if self.domain.tracer is not None:
            self.trace(TraceEvent.PUT, NO_VCPU if req.flags & _FOREIGN else req.vcpu_id, req.gfn)
        if front.push_requests_and_check_notify() or self.notify_every_put:
            self.counters.notifies += 1
            self.domain.emit(RingNotify(self.domain.domid, self.kind))
        occupancy = front.outstanding()
        if occupancy > self.counters.max_occupancy:
            self.counters.max_occupancy = occupancy

    def mark_and_pause(self, vcpu: Vcpu) -> None:
        """``mem_event_mark_and_pause``: a counted pause, taken once per mark."""
        if not vcpu.test_and_set_flag(self.pause_flag):
            vcpu.pause()
            self.blocked += 1
            self.counters.blocked_ever += 1
            self.trace(TraceEvent.BLOCK, vcpu.vcpu_id)

    # ------------------------------------------------------------------ consuming
    def get_response(self) -> MemEvent | None:
        """``mem_event_get_response``: the next response, or None when none is left.

        "None left" is decided after ``RING_FINAL_CHECK_FOR_RESPONSES``, so a
        response pushed while we re-arm ``rsp_event`` is not missed.  Raises
        :class:`RingCorruptError` if the daemon's ``rsp_prod`` answers requests
        that were never made.
        """
        front = self.front
        if front is None:
            return None
        if not front.unconsumed_responses() and not front.final_check_for_responses():
            return None
        rsp: MemEvent = front.get_response()
        front.sring.rsp_event = front.rsp_cons + 1  # as the seed: ask to be told of the next one
        self.admission.response_taken(self)
        return rsp

    def resume(self, fixup: ResponseFixup | None = None) -> None:
        """Drain *every* response, validate and obey each, then wake ring-blocked vCPUs.

        A corrupt ring crashes this domain (and only it).  Invalid responses
        are rejected and counted, never obeyed.
        """
        try:
            self.check_daemon_writes()
            while (rsp := self.get_response()) is not None:
                self._handle_response(rsp, fixup)
        except RingCorruptError as exc:
            self.domain.crash(f"{self.kind} ring corrupt: {exc}")
            return
        self.unpause_vcpus()

    def check_daemon_writes(self) -> None:
        """Raise :class:`RingCorruptError` for a daemon mistake the page shows (see the module doc)."""
        front = self.front
        if front is None:
            return
        front.check_req_prod()
        tail = self._tail
        if tail is not None and tail.tobytes().count(0) != len(tail):
            raise RingCorruptError(
                f"bytes written past slot {self.ring_size - 1} of this {self.ring_size}-slot ring: the daemon "
                f"sized its ring for more slots (BACK_RING_INIT needs abi.ring_bytes({self.ring_size}), "
                "not PAGE_SIZE)")

    def _reject(self, rsp: MemEvent, why: str) -> None:
        self.counters.responses_rejected += 1
        self.trace(TraceEvent.REJECTED, rsp.vcpu_id, rsp.gfn)
        log.warning("dom%d %s ring: response rejected (%s): %s", self.domain.domid, self.kind, why, rsp)

    def _handle_response(self, rsp: MemEvent, fixup: ResponseFixup | None) -> None:
        self.counters.responses += 1
        if self.domain.tracer is not None:
            self.trace(TraceEvent.RESPONSE, rsp.vcpu_id, rsp.gfn)
        if rsp.flags & ~abi.MEM_EVENT_KNOWN_FLAGS or rsp.reserved_bits:  # (vm_event: abi.UNKNOWN_VM_EVENT_FLAGS)
            # Xen tests the bits it knows and never looks at the others.
            self.counters.responses_unknown_bits += 1
            rsp.flags &= abi.MEM_EVENT_KNOWN_FLAGS
        if rsp.flags & _DUMMY:
            self.counters.responses_dummy += 1
            return
        if not 0 <= rsp.vcpu_id < self.domain.max_vcpus:
            self._reject(rsp, f"no vCPU {rsp.vcpu_id}")
            return
        if fixup is not None and not fixup(rsp):
            self._reject(rsp, f"gfn {rsp.gfn:#x} out of range")
            return
        if rsp.flags & _VCPU_PAUSED:
            if not self.domain.vcpus[rsp.vcpu_id].event_unpause():
                self.counters.unpause_ignored += 1
                log.info("dom%d %s ring: vCPU %d was not paused for an event; unpause ignored",
                         self.domain.domid, self.kind, rsp.vcpu_id)

    # ------------------------------------------------------------------ waking
    def unpause_vcpus(self) -> None:
        """Wake vCPUs waiting for ring space, by the policy's rule."""
        if self.front is not None:
            self.admission.unpause_vcpus(self)

    def wake_marked(self, limit: int) -> None:
        """Release up to ``limit`` vCPUs marked for congestion, round-robin from ``last_vcpu_wake_up + 1``.

        The one loop of both policies' wake-ups (the seed's
        ``mem_event_unpause_vcpus``, 4.2's ``vm_event_wake_blocked``); they
        differ only in the limit.
        """
        if limit <= 0 or not self.blocked:
            return
        vcpus = self.domain.vcpus
        n = len(vcpus)
        i = self.last_vcpu_wake_up + 1
        for j in range(n):
            if not self.blocked or limit <= 0:
                break
            k = (i + j) % n
            v = vcpus[k]
            if v.test_and_clear_flag(self.pause_flag):
                self.blocked -= 1
                limit -= 1
                self.last_vcpu_wake_up = k
                self.counters.woken += 1
                self.trace(TraceEvent.WAKE, v.vcpu_id)
                v.unpause()

    # ------------------------------------------------------------------ life
    def enable(self, buffer: Any) -> None:
        """``mem_event_enable``: ``SHARED_RING_INIT`` + ``FRONT_RING_INIT`` on the daemon's page."""
        if self.front is not None:
            raise HypervisorError(Errno.EBUSY, f"the {self.kind} ring is already enabled")
        try:
            sring: SharedRing[MemEvent] = SharedRing(buffer, self.codec, page_size=self.ring_bytes)
        except (TypeError, ValueError) as exc:
            raise HypervisorError(Errno.EINVAL, f"unusable ring buffer: {exc}") from exc
        sring.init()
        self.front = FrontRing(sring)
        page = memoryview(buffer)
        if self.ring_bytes < abi.PAGE_SIZE and page.nbytes >= abi.PAGE_SIZE:
            self._tail = page.cast("B")[self.ring_bytes:abi.PAGE_SIZE]
            self._tail[:] = bytes(len(self._tail))
        self.blocked = sum(1 for v in self.domain.vcpus if v.test_flag(self.pause_flag))
        self.unpause_vcpus()

    def disable(self) -> None:
        """``mem_event_disable``: wake vCPUs marked for space; those awaiting a response stay paused."""
        if self.front is None:
            raise HypervisorError(Errno.ENOENT, f"the {self.kind} ring is not enabled")
        if self.waiters:
            raise HypervisorError(Errno.EBUSY,
                                  f"{len(self.waiters)} vCPUs wait for a slot on the {self.kind} ring")
        self._release()
        for v in self.domain.vcpus:
            if v.test_and_clear_flag(self.pause_flag):
                self.counters.woken += 1
                self.trace(TraceEvent.WAKE, v.vcpu_id)
                v.unpause()
        self.blocked = 0

    def teardown(self) -> None:
        """Drop the ring without waking anyone (the domain is crashing or being destroyed)."""
        for vcpu, _req in self.waiters:
            vcpu.waits -= 1
        self.waiters.clear()
        self._release()

    def _release(self) -> None:
        if self._tail is not None:
            self._tail.release()
            self._tail = None
        if self.front is not None:
            self.front.sring.release()
            self.front = None

    # ------------------------------------------------------------------ stats
    def stats(self) -> RingStats:
        return RingStats(**msgspec.structs.asdict(self.counters), enabled=self.enabled, size=self.ring_size,
                         occupancy=self.occupancy(), free=self.free_requests(), blocked_now=self.blocked,
                         waiting_now=len(self.waiters))
