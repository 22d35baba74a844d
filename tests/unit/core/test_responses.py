"""Response validation: nothing the daemon writes is obeyed blindly, nothing escapes resume."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvemu import abi
from hvemu.abi import MemEvent, MemEventFlag, P2MType, RingKind
from hvemu.core.effects import DomainCrashed

from ._support import Listener, R, check_accounting, echo, make, page_out


def paused_fault(gfn: int = 5, vcpu: int = 0):  # type: ignore[no-untyped-def]
    hv, dom = make(max_vcpus=2, gfns=16)
    lis = Listener(dom)
    page_out(dom, [gfn])
    dom.guest_access(vcpu, gfn, R)
    (req,) = lis.consume()
    dom.paging_prep([gfn])
    return hv, dom, lis, req


def test_response_naming_a_vcpu_that_does_not_exist_is_rejected() -> None:
    _, dom, lis, req = paused_fault()
    lis.respond(echo(req, vcpu_id=7))
    lis.kick()
    c = dom.mem_paging.counters
    assert c.responses_rejected == 1 and not dom.vcpus[0].runnable
    assert dom.p2m.get_type(5) == P2MType.ram_paging_in, "a rejected response changes nothing"


def test_response_with_gfn_out_of_range_is_rejected() -> None:
    _, dom, lis, req = paused_fault()
    lis.respond(echo(req, gfn=1 << 40))
    lis.kick()
    assert dom.mem_paging.counters.responses_rejected == 1 and not dom.vcpus[0].runnable


def test_response_for_a_gfn_not_in_paging_in_leaves_the_p2m_alone_but_unpauses() -> None:
    _, dom, lis, req = paused_fault()
    dom.paging_nominate([3])
    lis.respond(echo(req, gfn=3))  # gfn 3 is only nominated: neither prepared nor loaded
    lis.kick()
    c = dom.mem_paging.counters
    assert c.responses_stale == 1 and c.responses_rejected == 0 and c.responses_loaded == 0
    assert dom.p2m.get_type(3) == P2MType.ram_paging_out and dom.p2m.get_type(5) == P2MType.ram_paging_in
    assert dom.vcpus[0].runnable, "the pause was the response's to release"


def test_response_for_paging_in_without_a_frame_is_stale() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [5])
    dom.guest_access(0, 5, R)
    lis.consume()
    lis.answer(prep=False)  # a daemon that forgot to prep
    lis.kick()
    assert dom.p2m.get_type(5) == P2MType.ram_paging_in and dom.mem_paging.counters.responses_stale == 1


def test_response_with_unknown_flags_or_reserved_bits_is_obeyed_and_counted() -> None:
    """Xen tests only the flag bits it knows: unknown ones are ignored (counted), the known ones obeyed."""
    _, dom, lis, req = paused_fault()
    dom.paging_prep([req.gfn])
    bad_flag = echo(req)
    bad_flag.flags |= 1 << 9
    assert bad_flag.flags & ~abi.MEM_EVENT_KNOWN_FLAGS, "bit 9 is no flag of this ABI"
    lis.respond(bad_flag)
    lis.kick()
    c = dom.mem_paging.counters
    assert (c.responses_rejected, c.responses_unknown_bits) == (0, 1)
    assert dom.vcpus[0].runnable and dom.p2m.get_type(req.gfn) == P2MType.ram_rw
    # a second request/response for the reserved bits of the bitfield word
    dom2 = make(max_vcpus=1, gfns=16)[1]
    lis2 = Listener(dom2)
    page_out(dom2, [5])
    dom2.guest_access(0, 5, R)
    (r2,) = lis2.consume()
    dom2.paging_prep([5])
    lis2.respond(echo(r2, reserved_bits=1))
    lis2.kick()
    c2 = dom2.mem_paging.counters
    assert (c2.responses_rejected, c2.responses_unknown_bits) == (0, 1) and dom2.vcpus[0].runnable


def test_dummy_response_is_consumed_and_ignored() -> None:
    _, dom, lis, req = paused_fault()
    flags = MemEventFlag.DUMMY | MemEventFlag.VCPU_PAUSED
    lis.respond(MemEvent(type=req.type, flags=flags, vcpu_id=0, gfn=5))
    lis.kick()
    c = dom.mem_paging.counters
    assert c.responses == 1 and c.responses_dummy == 1 and c.responses_rejected == 0
    assert not dom.vcpus[0].runnable and dom.p2m.get_type(5) == P2MType.ram_paging_in
    assert dom.mem_paging.occupancy() == 0, "the slot is free again"


def test_unpause_of_a_vcpu_not_paused_for_an_event_is_ignored_and_counted() -> None:
    _, dom = make(max_vcpus=2, gfns=16)
    lis = Listener(dom)
    page_out(dom, [5])
    dom.foreign_map([5])
    (req,) = lis.consume()
    dom.paging_prep([5])
    lis.respond(echo(req, flags=MemEventFlag.VCPU_PAUSED, vcpu_id=1))  # vCPU 1 was never paused
    lis.kick()
    c = dom.mem_paging.counters
    assert c.unpause_ignored == 1 and dom.vcpus[1].pause_count == 0
    assert dom.p2m.get_type(5) == P2MType.ram_rw
    check_accounting(dom)


def test_corrupt_rsp_prod_crashes_that_domain_only() -> None:
    hv, dom, lis, req = paused_fault()
    other = hv.create_domain(1, 4)
    hv.take_effects()
    lis.sring.rsp_prod = lis.sring.rsp_prod + 40  # answers 40 requests never made
    dom.mem_event_resume(RingKind.paging)  # returns normally
    assert dom.crashed and not other.crashed
    effects = hv.take_effects()
    assert isinstance(effects[0], DomainCrashed) and "corrupt" in effects[0].reason
    assert not dom.rings[RingKind.paging].enabled


def test_access_ring_responses_are_not_checked_against_the_p2m() -> None:
    """An access/trap response's gfn is informational (for a CR trap it is the register value)."""
    from hvemu.abi import MemEventReason

    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.set_hvm_param(MemEventReason.CR3, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(0, MemEventReason.CR3, 0xFFFF_F000_0000, 0)
    lis.consume()
    lis.answer()
    lis.kick()
    assert dom.vcpus[0].runnable and dom.mem_access.counters.responses_rejected == 0


entry = st.builds(
    MemEvent,
    type=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFFFF), vcpu_id=st.integers(0, 0xFFFFFFFF),
    gfn=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**64 - 1), gla=st.integers(0, 2**64 - 1),
    p2mt=st.integers(0, 0xFFFFFFFF), access_r=st.booleans(), access_w=st.booleans(), access_x=st.booleans(),
    gla_valid=st.booleans(), reason=st.integers(0, 0xFFFF), reserved_bits=st.integers(0, 0xFFF),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(entry, min_size=1, max_size=6), rsp_prod_skew=st.integers(-3, 70),
       rsp_event=st.integers(0, 2**32 - 1), ring=st.sampled_from(list(RingKind)))
def test_resume_never_raises_whatever_the_daemon_writes(junk: list[MemEvent], rsp_prod_skew: int,
                                                         rsp_event: int, ring: RingKind) -> None:
    _, dom = make(max_vcpus=3, gfns=16)
    lis = Listener(dom, ring)
    med = dom.rings[ring]
    if ring != RingKind.paging:
        Listener(dom)  # paging ops need a pager
    page_out(dom, [1, 2, 3])
    for i, g in enumerate((1, 2, 3)):
        med.put_request(MemEvent(type=abi.RING_EVENT_TYPE[ring], gfn=g, vcpu_id=i), None)
    for i, e in enumerate(junk):
        lis.sring.write_entry(i, e)
    lis.sring.rsp_prod = (lis.sring.rsp_prod + rsp_prod_skew) & abi.RING_IDX_MASK
    lis.sring.rsp_event = rsp_event
    dom.mem_event_resume(ring)
    if not dom.crashed:
        check_accounting(dom)
        assert med.counters.responses == max(0, min(rsp_prod_skew, 3))
