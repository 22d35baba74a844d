"""The claim policy beside the seed's: same scenarios, the expected differences asserted.

Includes the 8-slot lock-up: with more vCPUs than slots, the seed's wake rule
(it counts every unmarked vCPU as running) leaves marked vCPUs asleep on an
empty ring; the claim policy's wake rule (the 2017 fix) does not.
"""

from __future__ import annotations

import pytest

from hvemu.abi import Errno, MemEventFlag, P2MType, RingKind
from hvemu.core.domain import Domain
from hvemu.core.effects import VcpuRunnable
from hvemu.core.errors import HypervisorError

from ._support import Listener, R, W, check_accounting, make, page_out, woken

POLICIES = ["seed", "claim"]


def run_until_quiet(dom: Domain, lis: Listener, wants: dict[int, int], rounds: int = 100) -> int:
    """Scheduler + daemon loop: runnable vCPUs retry their access, the daemon serves everything.

    Returns the number of rounds in which something changed.
    """
    busy = 0
    for _ in range(rounds):
        changed = False
        for vid, gfn in list(wants.items()):
            v = dom.vcpus[vid]
            if not v.runnable:
                continue
            if dom.p2m.get_type(gfn) == P2MType.ram_rw:
                del wants[vid]  # the direct access succeeds
            else:
                dom.guest_access(vid, gfn, R)
            changed = True
        if lis.unconsumed() or lis.pending:
            lis.serve_all()
            changed = True
        check_accounting(dom)
        if not changed:
            break
        busy += 1
    return busy


@pytest.mark.parametrize("policy", POLICIES)
def test_eight_slot_ring_with_more_vcpus_than_slots(policy: str) -> None:
    """Seed: marked vCPUs sleep for good on an empty ring.  Claim: every vCPU gets its page."""
    n, slots = 12, 8
    _, dom = make(max_vcpus=n, gfns=64, ring_size=slots, policy=policy)
    lis = Listener(dom)
    gfns = list(range(16, 16 + n))
    page_out(dom, gfns)
    wants = dict(enumerate(gfns))
    for vid, gfn in wants.items():
        dom.guest_access(vid, gfn, R)
    run_until_quiet(dom, lis, wants)
    med = dom.mem_paging
    assert med.occupancy() == 0 and not lis.unconsumed() and not lis.pending, "the ring is empty"
    if policy == "seed":
        asleep = [v.vcpu_id for v in dom.vcpus if not v.runnable]
        assert asleep, "the seed's wake rule locks up with more vCPUs than slots"
        # Asleep for good: marked, or re-executing an access to a gfn whose lost event no request names.
        assert all(v.test_flag(med.pause_flag) or v.spinning_on is not None for v in dom.vcpus if not v.runnable)
        assert len(dom.vcpus) - med.blocked >= med.free_requests() == slots  # online >= free: no wake
        lis.serve_all(rounds=5)
        assert [v.vcpu_id for v in dom.vcpus if not v.runnable] == asleep, "and stays locked"
        assert med.counters.lost_guest > 0, "and it lost guest events on the full ring"
    else:
        assert all(v.runnable for v in dom.vcpus) and not wants
        assert med.counters.lost == 0 and med.counters.waited > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_lock_up_minimal_nine_vcpus_eight_slots_one_event(policy: str) -> None:
    """One DROP_PAGE (an event that does not pause) marks its vCPU under both policies.

    Seed: after the drain, online = 8 unmarked vCPUs >= 8 free slots: never woken.
    Claim: the consumed response frees a slot and the wake-up releases the vCPU.
    """
    hv, dom = make(max_vcpus=9, ring_size=8, policy=policy)
    lis = Listener(dom)
    page_out(dom, [5])
    dom.decrease_reservation(0, [5])
    v = dom.vcpus[0]
    assert (v.pause_count, v.event_pause_count) == (1, 0) and v.test_flag(dom.mem_paging.pause_flag)
    lis.serve_all(rounds=3)
    assert dom.mem_paging.occupancy() == 0
    if policy == "seed":
        assert not v.runnable and dom.mem_paging.blocked == 1  # online 8 >= free 8, forever
    else:
        assert v.runnable and VcpuRunnable(dom.domid, 0) in hv.take_effects()


def test_claim_black_eye_only_for_a_vcpu_not_paused_for_its_event() -> None:
    _, dom = make(max_vcpus=9, ring_size=8, policy="claim")
    lis = Listener(dom)
    page_out(dom, [5, 6])
    dom.guest_access(0, 5, R)  # paused for its event: its response frees the slot it used
    v0 = dom.vcpus[0]
    assert (v0.pause_count, v0.event_pause_count, v0.pause_flags) == (1, 1, v0.pause_flags.__class__(0))
    dom.decrease_reservation(1, [6])  # no event pause: black eye
    assert dom.vcpus[1].test_flag(dom.mem_paging.pause_flag)
    lis.serve_all()
    assert v0.runnable and dom.vcpus[1].runnable and dom.mem_paging.counters.unpause_ignored == 0


def test_claim_foreign_producer_gets_retryable_ebusy_and_changes_nothing() -> None:
    _, dom = make(max_vcpus=1, ring_size=8, policy="claim")
    lis = Listener(dom)
    page_out(dom, list(range(9)))
    assert dom.foreign_map(list(range(8))) == [Errno.ENOENT] * 8
    med = dom.mem_paging
    assert dom.foreign_map([8]) == [Errno.ENOENT]
    assert med.counters.refused == 1 and med.counters.lost == 0
    assert dom.p2m.get_type(8) == P2MType.ram_paged, "no slot: the p2m is untouched, the retry repopulates"
    lis.serve_all()
    assert dom.foreign_map([8]) == [Errno.ENOENT] and dom.p2m.get_type(8) == P2MType.ram_paging_in
    lis.serve_all()
    assert dom.foreign_map([8]) == [None]


def test_seed_foreign_producer_on_full_ring_loses_the_event_and_strands_the_gfn() -> None:
    """The seed's populate changes the p2m before put fails.

    The mapper then retries into a gfn that no request names, and a guest vCPU touching it
    re-executes its access (as on Xen, no request): only a pager's load recovers it.
    """
    _, dom = make(max_vcpus=1, ring_size=8, policy="seed")
    lis = Listener(dom)
    page_out(dom, list(range(9)))
    dom.foreign_map(list(range(8)))
    assert dom.foreign_map([8]) == [Errno.ENOENT]
    assert dom.mem_paging.counters.lost_foreign == 1 and dom.p2m.get_type(8) == P2MType.ram_paging_in
    lis.serve_all()
    assert dom.foreign_map([8]) == [Errno.ENOENT] and not lis.unconsumed(), "already 'on its way back'"
    dom.guest_access(0, 8, R)
    assert not lis.unconsumed() and dom.vcpus[0].spinning_on == 8, "a guest touch puts no request either"
    assert dom.paging_load([8], lambda g: None) == [None]  # a pager's sweep for stranded gfns
    assert dom.vcpus[0].runnable and dom.foreign_map([8]) == [None]


@pytest.mark.parametrize("policy", POLICIES)
def test_foreign_events_into_the_reservation_and_guest_events(policy: str) -> None:
    """Seed: foreign events can eat the per-vCPU reserve and a guest event is lost.  Claim: never."""
    _, dom = make(max_vcpus=2, ring_size=8, policy=policy)
    Listener(dom)
    page_out(dom, list(range(10)))
    dom.foreign_map(list(range(8)))  # the ring is full of foreign requests
    dom.guest_access(0, 9, R)
    c = dom.mem_paging.counters
    v = dom.vcpus[0]
    if policy == "seed":
        assert c.lost_guest == 1 and v.event_pause_count == 0 and v.pause_count == 1
    else:
        assert c.lost == 0 and c.waited == 1 and v.waits == 1 and v.event_pause_count == 1
    check_accounting(dom)


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_balloon_out_by_one_vcpu(policy: str) -> None:
    """A batch of DROP_PAGEs: the hypercall stops (a continuation) once its vCPU is paused, losing nothing.

    Xen checks for preemption before each extent; without it one call ate the
    slots reserved for the other vCPU and the seed lost 4 of 12 drops.
    """
    hv, dom = make(max_vcpus=2, gfns=32, ring_size=8, policy=policy)
    lis = Listener(dom)
    gfns = list(range(12))
    page_out(dom, gfns)
    done = dom.decrease_reservation(0, gfns)
    assert done == [None] * 7, "stopped once the 7th drop left fewer free slots than vCPUs"
    c = dom.mem_paging.counters
    assert c.lost == 0 and c.put == 7 and dom.mem_paging.free_requests() == 1, "vCPU 1 keeps its slot"
    v = dom.vcpus[0]
    assert not v.runnable
    hv.take_effects()
    lis.serve_all()
    assert v.runnable and VcpuRunnable(dom.domid, 0) in hv.take_effects()
    assert dom.decrease_reservation(0, gfns[7:]) == [None] * 5, "the continuation does the rest"
    lis.serve_all()
    assert c.put == 12 and c.lost == 0 and dom.counters.dropped == 12 and v.runnable
    check_accounting(dom)


def test_claim_wake_releases_as_many_blocked_vcpus_as_there_are_free_slots() -> None:
    hv, dom = make(max_vcpus=4, ring_size=8, policy="claim")
    Listener(dom)
    med = dom.mem_paging
    for g in range(6):  # free = 2; online would be 0 < 2 under the seed too
        med.put_request(med_req(g), None)
    for i in (0, 1, 2, 3):
        med.mark_and_pause(dom.vcpus[i])
    hv.take_effects()
    med.unpause_vcpus()
    assert woken(hv) == [1, 2]  # from last_vcpu_wake_up + 1, two slots


def test_claim_wake_is_not_bounded_by_running_vcpus() -> None:
    """The seed counts unmarked vCPUs as online and stops; the 2017 rule only counts slots."""
    for policy, expect in (("seed", 0), ("claim", 1)):
        hv, dom = make(max_vcpus=9, ring_size=8, policy=policy)
        Listener(dom)
        dom.mem_paging.mark_and_pause(dom.vcpus[3])
        hv.take_effects()
        dom.mem_paging.unpause_vcpus()
        assert len(hv.take_effects()) == expect, policy


def test_claim_disable_refuses_while_vcpus_wait_for_a_slot() -> None:
    _, dom = make(max_vcpus=1, ring_size=8, policy="claim")
    lis = Listener(dom)
    page_out(dom, list(range(9)))
    dom.foreign_map(list(range(8)))
    dom.guest_access(0, 8, W)
    with pytest.raises(HypervisorError) as err:
        dom.mem_event_disable(RingKind.paging)
    assert err.value.errno == Errno.EBUSY
    lis.serve_all()  # the waiter gets its slot: its request goes on the ring
    assert [r.gfn for r in lis.unconsumed()] == [8]
    assert lis.unconsumed()[0].flags & MemEventFlag.VCPU_PAUSED
    lis.serve_all()
    dom.mem_event_disable(RingKind.paging)
    assert dom.vcpus[0].runnable


def test_claim_waiters_are_served_in_order() -> None:
    _, dom = make(max_vcpus=4, ring_size=8, policy="claim")
    lis = Listener(dom)
    page_out(dom, list(range(12)))
    dom.foreign_map(list(range(8)))
    for vid, gfn in ((2, 8), (0, 9), (3, 10)):
        dom.guest_access(vid, gfn, R)
    assert [v.vcpu_id for v, _ in dom.mem_paging.waiters] == [2, 0, 3]
    lis.consume(2)
    lis.answer()
    lis.kick()
    assert [r.vcpu_id for r in lis.unconsumed()[-2:]] == [2, 0]
    assert [v.vcpu_id for v, _ in dom.mem_paging.waiters] == [3]


def med_req(gfn: int):  # type: ignore[no-untyped-def]
    from hvemu.abi import MemEvent, MemEventType

    return MemEvent(type=MemEventType.PAGING, gfn=gfn)
