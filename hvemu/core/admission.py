"""The two admission policies of a mem_event ring: who may put a request, and who is woken when.

A ring (:class:`hvemu.core.mem_event.MemEventDomain`) owns the mechanism:
the front ring, ``_produce`` (copy, push, kick), ``mark_and_pause`` and
``wake_marked`` (the round-robin release of congestion-marked vCPUs).  A
policy decides when each runs.  Both are stateless: one instance serves
every ring, and the state they read (waiters, marks, counters) is the ring's.

:class:`Seed` is the seed patch's ``mem_event.c``; :class:`Claim` is
``vm_event_claim_slot`` with the 2017 wake fix.  The rules of each are
described in :mod:`hvemu.core.mem_event`'s docstring, which is the one
place they are explained.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hvemu.abi import Errno, MemEvent
from hvemu.names import ADMISSION_POLICIES
from hvemu.names import AdmissionPolicy as Policy
from hvemu.trace import NO_VCPU, TraceEvent

if TYPE_CHECKING:
    from hvemu.core.domain import Vcpu
    from hvemu.core.mem_event import MemEventDomain

log = logging.getLogger("hvemu.core.mem_event")

class Admission:
    """What differs between the policies; each hook is called by the ring at the seed's call site."""

    name: Policy

    def admit(self, med: MemEventDomain, vcpu: Vcpu | None) -> Errno | None:
        """May a producer change state for an event (the ring exists)?  None: go ahead."""
        return None

    def put_request(self, med: MemEventDomain, req: MemEvent, vcpu: Vcpu | None) -> Errno | None:
        raise NotImplementedError

    def response_taken(self, med: MemEventDomain) -> None:
        """A response was consumed: its slot is free."""

    def unpause_vcpus(self, med: MemEventDomain) -> None:
        """After a resume (and on enable): wake producers waiting for ring space."""
        raise NotImplementedError


class Seed(Admission):
    """Put whenever there is a slot, else lose the event; mark a guest vCPU that leaves too few."""

    name: Policy = "seed"

    def put_request(self, med: MemEventDomain, req: MemEvent, vcpu: Vcpu | None) -> Errno | None:
        ret: Errno | None = None
        if med.free_requests() == 0:
            # "This *may* happen, but only when foreign mappings generate events."
            log.warning("dom%d %s ring: possible lost mem_event (ring full, %s producer)",
                        med.domain.domid, med.kind, "foreign" if vcpu is None else f"vcpu{vcpu.vcpu_id}")
            med.counters.lost += 1
            if vcpu is None:
                med.counters.lost_foreign += 1
            else:
                med.counters.lost_guest += 1
            med.trace(TraceEvent.LOST, NO_VCPU if vcpu is None else vcpu.vcpu_id, req.gfn)
            ret = Errno.EAGAIN
        else:
            med.produce(req)
        # Every vCPU must keep a slot for one event that cannot be replayed:
        # pause this one, *after* its event, if that is no longer true.
        if vcpu is not None and med.free_requests() < med.domain.max_vcpus:
            med.mark_and_pause(vcpu)
            ret = Errno.EBUSY  # for a guest vCPU, overwrites EAGAIN
        return ret

    def unpause_vcpus(self, med: MemEventDomain) -> None:
        """``mem_event_unpause_vcpus``: round-robin while the vCPUs it counts online are fewer than free slots."""
        if not med.blocked:
            return
        vcpus = med.domain.vcpus
        online = len(vcpus) - sum(1 for v in vcpus if v.test_flag(med.pause_flag))
        med.wake_marked(med.free_requests() - online)


class Claim(Admission):
    """Claim a slot before changing anything: guests sleep for one, foreign producers retry."""

    name: Policy = "claim"

    def admit(self, med: MemEventDomain, vcpu: Vcpu | None) -> Errno | None:
        if vcpu is None and med.available() == 0:
            med.counters.refused += 1
            med.trace(TraceEvent.REFUSED, NO_VCPU)
            return Errno.EBUSY
        return None

    def put_request(self, med: MemEventDomain, req: MemEvent, vcpu: Vcpu | None) -> Errno | None:
        if med.available() == 0:
            if vcpu is None:
                med.counters.refused += 1
                med.trace(TraceEvent.REFUSED, NO_VCPU, req.gfn)
                return Errno.EBUSY
            # wait_event(med->wq, grab_slot() != -EBUSY): the vCPU sleeps with
            # its request; _wake_queued puts it when a slot is granted.
            med.waiters.append((vcpu, req))
            vcpu.waits += 1
            vcpu.pause()
            med.counters.waited += 1
            return None
        med.produce(req)
        self.wake(med)  # vm_event_release_slot: "Kick any waiters"
        self._black_eye(med, vcpu)
        return None

    def response_taken(self, med: MemEventDomain) -> None:
        self.wake(med)  # a slot just freed: kick any waiters (vm_event_get_response)

    def unpause_vcpus(self, med: MemEventDomain) -> None:
        self.wake(med)

    def wake(self, med: MemEventDomain) -> None:
        """``vm_event_wake``: queued producers first, then vCPUs marked for congestion."""
        if med.waiters:
            self._wake_queued(med)
        else:
            med.wake_marked(med.available())  # vm_event_wake_blocked: as many as there are free slots

    def _black_eye(self, med: MemEventDomain, vcpu: Vcpu | None) -> None:
        """Mark a guest vCPU on its way out if the ring is overly full.

        Not one already paused for its event: its response will free the slot it used.
        """
        if vcpu is not None and med.available() < med.domain.max_vcpus and not vcpu.event_pause_count:
            med.mark_and_pause(vcpu)

    def _wake_queued(self, med: MemEventDomain) -> None:
        """``wake_up_nr(&med->wq, avail)``: each woken waiter grabs a slot and finishes its put.

        Its put wakes again ("they will go through code paths that will
        eventually call vm_event_wake() again"): once the queue is empty,
        marked vCPUs get the slots that are left.
        """
        while med.waiters and med.available() > 0:
            vcpu, req = med.waiters.popleft()
            vcpu.waits -= 1
            med.produce(req)
            self._black_eye(med, vcpu)  # before the unpause, so the vCPU never runs in between
            vcpu.unpause()
        if not med.waiters:
            med.wake_marked(med.available())


#: One instance of each policy, by the name ``hvemu start --admission`` takes.
ADMISSIONS: dict[Policy, Admission] = {a.name: a for a in (Seed(), Claim())}
POLICIES = ADMISSION_POLICIES
assert set(ADMISSIONS) == set(POLICIES), "a policy name without its rules, or rules without a name"
