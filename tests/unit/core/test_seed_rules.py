"""One named test per rule of the seed patch (mem_event.c, p2m.c, hvm.c, mem_sharing.c)."""

from __future__ import annotations

import pytest

from hvemu import abi
from hvemu.abi import (
    Errno,
    MemEvent,
    MemEventFlag,
    MemEventReason,
    MemEventType,
    P2MAccess,
    P2MType,
    RingKind,
)
from hvemu.core.domain import Domain
from hvemu.core.effects import DomainCrashed, RingNotify, VcpuRunnable

from ._support import Listener, R, W, check_accounting, echo, make, page_out, woken


def req(gfn: int = 0, vcpu: int = 0) -> MemEvent:
    return MemEvent(type=MemEventType.PAGING, gfn=gfn, vcpu_id=vcpu)


# --------------------------------------------------------------------------
# put_request: its four outcomes
# --------------------------------------------------------------------------


def test_put_request_returns_0_and_copies_the_request_when_there_is_room() -> None:
    _, dom = make(max_vcpus=2)
    lis = Listener(dom)
    v = dom.vcpus[0]
    assert dom.mem_paging.put_request(req(5, 0), v) is None
    assert [r.gfn for r in lis.consume()] == [5]
    assert v.pause_count == 0 and dom.mem_paging.counters.put == 1


def test_check_ring_and_put_request_return_enosys_without_a_ring() -> None:
    _, dom = make()
    assert dom.mem_paging.check_ring() == Errno.ENOSYS
    assert dom.mem_paging.put_request(req(), dom.vcpus[0]) == Errno.ENOSYS
    assert dom.mem_paging.put_request(req(), None) == Errno.ENOSYS
    assert dom.mem_paging.counters.no_ring == 2
    assert dom.vcpus[0].pause_count == 0


def test_put_request_eagain_for_a_foreign_producer_on_a_full_ring_loses_and_counts_the_event() -> None:
    _, dom = make(max_vcpus=1, ring_size=8)
    lis = Listener(dom)
    med = dom.mem_paging
    for i in range(8):
        assert med.put_request(req(i), None) is None
    assert med.put_request(req(99), None) == Errno.EAGAIN
    assert med.counters.lost == med.counters.lost_foreign == 1 and med.counters.put == 8
    assert 99 not in [r.gfn for r in lis.consume()]


def test_put_request_ebusy_marks_and_pauses_a_guest_vcpu_when_free_slots_drop_below_vcpus() -> None:
    _, dom = make(max_vcpus=4, ring_size=8)
    Listener(dom)
    med = dom.mem_paging
    v = dom.vcpus[0]
    for i in range(4):  # free after each put: 7, 6, 5, 4 -> never below 4
        assert med.put_request(req(i), v) is None
    assert v.pause_count == 0
    assert med.put_request(req(4), v) == Errno.EBUSY  # free 3 < 4 vCPUs
    assert v.test_flag(med.pause_flag) and v.pause_count == 1 and med.blocked == 1
    assert med.counters.put == 5, "EBUSY after a successful put: the request *is* on the ring"


def test_put_request_on_a_full_ring_from_a_guest_vcpu_loses_the_event_and_returns_ebusy() -> None:
    """EAGAIN is overwritten by EBUSY for a guest vCPU, but the event is lost all the same."""
    _, dom = make(max_vcpus=1, ring_size=8)
    Listener(dom)
    med = dom.mem_paging
    for i in range(8):
        med.put_request(req(i), None)
    v = dom.vcpus[0]
    assert med.put_request(req(8), v) == Errno.EBUSY
    assert med.counters.lost_guest == 1 and med.counters.put == 8 and v.pause_count == 1


def test_foreign_producers_are_never_marked_or_paused() -> None:
    _, dom = make(max_vcpus=4, ring_size=8)
    Listener(dom)
    med = dom.mem_paging
    results = [med.put_request(req(i), None) for i in range(9)]
    assert results == [None] * 8 + [Errno.EAGAIN]
    assert med.blocked == 0 and all(v.pause_count == 0 for v in dom.vcpus)


# --------------------------------------------------------------------------
# mark_and_pause, counted pauses
# --------------------------------------------------------------------------


def test_mark_and_pause_pauses_once_per_mark_and_counts_blocked() -> None:
    _, dom = make(max_vcpus=2)
    med = dom.mem_paging
    v = dom.vcpus[1]
    med.mark_and_pause(v)
    med.mark_and_pause(v)  # test_and_set_bit: already marked, no second pause
    assert v.pause_count == 1 and med.blocked == 1 and med.counters.blocked_ever == 1


def test_counted_pause_vcpu_paused_by_event_and_congestion_runs_only_when_both_are_released() -> None:
    hv, dom = make(max_vcpus=2)
    v = dom.vcpus[0]
    v.event_pause()
    dom.mem_paging.mark_and_pause(v)
    assert v.pause_count == 2
    assert v.event_unpause()
    assert not v.runnable and hv.take_effects() == []
    assert v.test_and_clear_flag(dom.mem_paging.pause_flag)
    v.unpause()
    assert v.runnable and hv.take_effects() == [VcpuRunnable(dom.domid, 0)]
    # and in the other order
    v.event_pause()
    v.pause()
    v.unpause()
    assert not v.runnable
    v.event_unpause()
    assert v.runnable


def test_an_unpause_with_nothing_to_release_is_refused_by_the_event_pause_count() -> None:
    _, dom = make()
    v = dom.vcpus[0]
    v.pause()  # a congestion-style pause, not an event pause
    assert not v.event_unpause()
    assert v.pause_count == 1


# --------------------------------------------------------------------------
# The callers' EBUSY handling, and DESIGN section 6's double unpause
# --------------------------------------------------------------------------


def test_populate_on_ebusy_drops_the_event_pause_so_the_vcpu_waits_only_for_congestion() -> None:
    _, dom = make(max_vcpus=8, ring_size=8)
    Listener(dom)
    page_out(dom, [3])
    dom.guest_access(0, 3, R)
    v = dom.vcpus[0]
    assert v.pause_count == 1 and v.event_pause_count == 0 and v.test_flag(dom.mem_paging.pause_flag)
    check_accounting(dom)


def test_double_unpause_response_to_an_ebusy_request_is_ignored_and_counted() -> None:
    """DESIGN section 6: EBUSY although the request *was* put.

    The caller dropped the event pause, the request still says VCPU_PAUSED.
    Its response must not release the congestion pause (the vCPU would run
    while marked, and the wake-up would later unpause it a second time).
    """
    hv, dom = make(max_vcpus=8, ring_size=8, gfns=64)
    lis = Listener(dom)
    page_out(dom, [3, 4])
    dom.guest_access(0, 3, R)  # put, then free 7 < 8 vCPUs -> EBUSY, event pause dropped
    v = dom.vcpus[0]
    assert (v.pause_count, v.event_pause_count) == (1, 0)
    assert dom.foreign_map([4]) == [Errno.ENOENT]  # a foreign request keeps a slot busy: free 6
    first = lis.consume(1)
    assert first[0].flags & MemEventFlag.VCPU_PAUSED and first[0].vcpu_id == 0
    lis.answer()
    hv.take_effects()
    lis.kick()
    c = dom.mem_paging.counters
    assert c.unpause_ignored == 1
    # online = 7 unmarked vCPUs >= free = 7: the seed does not wake it yet,
    # and the ignored response did not either.
    assert v.pause_count == 1 and v.test_flag(dom.mem_paging.pause_flag)
    assert not [e for e in hv.take_effects() if isinstance(e, VcpuRunnable)]
    assert dom.p2m.get_type(3) == P2MType.ram_rw
    lis.serve_all()  # the foreign request answered: free 8 > online 7 -> woken, once
    assert v.runnable and v.pause_count == 0 and dom.mem_paging.blocked == 0
    assert hv.take_effects().count(VcpuRunnable(dom.domid, 0)) == 1
    check_accounting(dom)


def test_access_check_on_ebusy_drops_the_event_pause() -> None:
    _, dom = make(max_vcpus=8, ring_size=8)
    Listener(dom, RingKind.access)
    dom.access_set([1], P2MAccess.r)
    dom.guest_access(2, 1, W)
    v = dom.vcpus[2]
    assert (v.pause_count, v.event_pause_count) == (1, 0) and dom.mem_access.blocked == 1


def test_sync_trap_on_ebusy_drops_the_event_pause() -> None:
    _, dom = make(max_vcpus=8, ring_size=8)
    Listener(dom, RingKind.access)
    dom.set_hvm_param(MemEventReason.CR3, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(1, MemEventReason.CR3, 0x2000, 0x1000)
    v = dom.vcpus[1]
    assert (v.pause_count, v.event_pause_count) == (1, 0)


def test_sharing_enomem_on_ebusy_keeps_the_event_pause() -> None:
    """The seed's sharing caller does not unpause on EBUSY: its response releases the event pause."""
    hv, dom = make(max_vcpus=8, ring_size=8)
    lis = Listener(dom, RingKind.sharing)
    dom.unshare_enomem(0, 7)
    v = dom.vcpus[0]
    assert (v.pause_count, v.event_pause_count) == (2, 1)
    lis.serve_all()
    assert v.runnable and dom.mem_share.counters.unpause_ignored == 0


# --------------------------------------------------------------------------
# get_response, resume
# --------------------------------------------------------------------------


def test_get_response_returns_none_when_no_response_is_left() -> None:
    _, dom = make()
    lis = Listener(dom)
    assert dom.mem_paging.get_response() is None
    dom.mem_paging.put_request(req(1), None)
    lis.consume()
    lis.answer(prep=False)
    lis.push()
    assert dom.mem_paging.get_response() is not None
    assert dom.mem_paging.get_response() is None
    # re-armed: the daemon's next push notifies
    assert lis.sring.rsp_event == dom.mem_paging.front.rsp_cons + 1  # type: ignore[union-attr]


def test_resume_drains_every_response_of_one_notification() -> None:
    _, dom = make(max_vcpus=4)
    lis = Listener(dom)
    page_out(dom, [1, 2, 3])
    for vcpu, gfn in enumerate([1, 2, 3]):
        dom.guest_access(vcpu, gfn, R)
    lis.consume()
    lis.answer()
    lis.kick()  # one push, one resume
    assert all(v.runnable for v in dom.vcpus)
    assert [dom.p2m.get_type(g) for g in (1, 2, 3)] == [P2MType.ram_rw] * 3
    assert dom.mem_paging.counters.responses == 3 and dom.mem_paging.occupancy() == 0


def test_resume_picks_up_responses_pushed_while_it_rearms_rsp_event() -> None:
    """The final check: a response that lands after the drain but before re-arming is not missed."""
    _, dom = make()
    lis = Listener(dom)
    med = dom.mem_paging
    for g in range(3):
        med.put_request(req(g), None)
    lis.consume()
    lis.answer(prep=False)
    lis.push()
    assert [med.get_response() for _ in range(3)].count(None) == 0
    assert med.get_response() is None


# --------------------------------------------------------------------------
# unpause_vcpus: round robin and its bound
# --------------------------------------------------------------------------


def _mark(dom, *ids: int) -> None:  # type: ignore[no-untyped-def]
    for i in ids:
        dom.mem_paging.mark_and_pause(dom.vcpus[i])


def test_wake_up_goes_round_robin_from_the_vcpu_after_the_last_woken() -> None:
    hv, dom = make(max_vcpus=4, ring_size=8)
    lis = Listener(dom)
    med = dom.mem_paging
    for i in range(5):  # five foreign requests: free = 3
        med.put_request(req(i), None)
    _mark(dom, 0, 1, 2, 3)  # online 0 < free 3: the next wake-up releases three
    med.last_vcpu_wake_up = 1
    hv.take_effects()
    med.unpause_vcpus()
    assert woken(hv) == [2, 3, 0] and med.last_vcpu_wake_up == 0
    lis.serve_all()
    assert woken(hv) == [1]


def test_wake_up_stops_when_online_vcpus_reach_free_slots() -> None:
    hv, dom = make(max_vcpus=4, ring_size=8)
    Listener(dom)
    med = dom.mem_paging
    for i in range(6):  # free = 2
        med.put_request(req(i), None)
    _mark(dom, 1, 2, 3)  # online = 1
    hv.take_effects()
    med.unpause_vcpus()
    assert med.blocked == 2, "online 1 < free 2 wakes one; online 2 >= free 2 stops"
    assert woken(hv) == [1]


def test_wake_up_does_nothing_when_no_vcpu_is_blocked() -> None:
    hv, dom = make()
    Listener(dom)
    dom.mem_paging.unpause_vcpus()
    assert hv.take_effects() == []


# --------------------------------------------------------------------------
# no ring, per event type
# --------------------------------------------------------------------------


def paged_out_without_a_ring(dom: Domain, gfns: list[int]) -> None:
    """Page out with a pager, which then goes away (paging ops themselves need the ring)."""
    Listener(dom)
    page_out(dom, gfns)
    dom.mem_event_disable(RingKind.paging)


def test_no_ring_paging_populate_from_a_guest_crashes_the_domain() -> None:
    hv, dom = make()
    other = hv.create_domain(1, 8)
    paged_out_without_a_ring(dom, [2])
    dom.guest_access(0, 2, R)
    assert dom.crashed and not other.crashed
    assert any(isinstance(e, DomainCrashed) for e in hv.take_effects())


def test_no_ring_paging_populate_from_a_foreign_mapper_crashes_the_domain() -> None:
    _, dom = make()
    paged_out_without_a_ring(dom, [2])
    assert dom.foreign_map([2, 3]) == [Errno.ENOENT, Errno.ESRCH]
    assert dom.crashed


def test_no_ring_drop_page_is_silently_skipped() -> None:
    _, dom = make()
    paged_out_without_a_ring(dom, [2])
    assert dom.decrease_reservation(0, [2]) == [None]
    assert not dom.crashed and dom.p2m.get_type(2) == P2MType.invalid and dom.vcpus[0].runnable


def test_no_ring_access_violation_with_access_required_crashes_the_domain() -> None:
    _, dom = make()
    dom.access_required = True
    dom.access_set([1], P2MAccess.r)
    dom.guest_access(0, 1, W)
    assert dom.crashed


def test_no_ring_access_violation_without_access_required_relaxes_to_rwx() -> None:
    _, dom = make()
    dom.access_set([1], P2MAccess.r)
    dom.guest_access(0, 1, W)
    assert not dom.crashed and dom.p2m.get_access(1) == P2MAccess.rwx and dom.vcpus[0].runnable


def test_no_ring_sharing_enomem_crashes_the_domain() -> None:
    _, dom = make()
    dom.unshare_enomem(0, 1)
    assert dom.crashed


def test_no_ring_sync_trap_is_dropped_and_its_pause_released() -> None:
    hv, dom = make()
    dom.set_hvm_param(MemEventReason.CR0, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(0, MemEventReason.CR0, 1, 0)
    assert dom.vcpus[0].runnable and not dom.crashed
    assert hv.take_effects() == [], "a pause taken and dropped inside the call is not a wake-up"


# --------------------------------------------------------------------------
# enable / disable, notification
# --------------------------------------------------------------------------


def test_enable_wakes_vcpus_left_blocked() -> None:
    hv, dom = make(max_vcpus=2)
    _mark(dom, 1)
    assert dom.mem_paging.blocked == 1
    Listener(dom)
    assert dom.vcpus[1].runnable and dom.mem_paging.blocked == 0
    assert VcpuRunnable(dom.domid, 1) in hv.take_effects()


def test_enable_twice_is_ebusy() -> None:
    from hvemu.core.errors import HypervisorError

    _, dom = make()
    Listener(dom)
    with pytest.raises(HypervisorError) as err:
        dom.mem_event_enable(RingKind.paging, bytearray(abi.PAGE_SIZE))
    assert err.value.errno == Errno.EBUSY


def test_disable_wakes_ring_blocked_vcpus_and_leaves_event_paused_ones_paused() -> None:
    _, dom = make(max_vcpus=8, ring_size=8)
    Listener(dom)
    page_out(dom, [1, 2])
    dom.paging_nominate([3])
    dom.guest_access(0, 1, R)  # EBUSY: congestion only
    dom.vcpus[5].event_pause()  # a vCPU waiting for a response
    dom.mem_event_disable(RingKind.paging)
    assert dom.vcpus[0].runnable
    assert not dom.vcpus[5].runnable
    check_accounting(dom)


def test_put_request_notifies_only_when_ring_h_says_so() -> None:
    hv, dom = make()
    lis = Listener(dom)
    med = dom.mem_paging
    med.put_request(req(1), None)
    assert hv.take_effects() == [RingNotify(dom.domid, RingKind.paging)]
    med.put_request(req(2), None)  # the daemon has not consumed: req_event still passed
    assert hv.take_effects() == []
    lis.consume()
    assert not lis.back.final_check_for_requests()  # re-arm req_event
    med.put_request(req(3), None)
    assert hv.take_effects() == [RingNotify(dom.domid, RingKind.paging)]


def test_responses_echo_round_trip_through_the_codec() -> None:
    _, dom = make()
    lis = Listener(dom)
    page_out(dom, [9])
    dom.guest_access(1, 9, R)
    (r,) = lis.consume()
    assert (r.type, r.vcpu_id, r.gfn, r.p2mt) == (MemEventType.PAGING, 1, 9, P2MType.ram_paged)
    assert echo(r).flags == MemEventFlag.VCPU_PAUSED
