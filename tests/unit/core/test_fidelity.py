"""Fidelity round 2: each case where hvemu differed from Xen, driven and asserted as Xen behaves.

The reference is Xen 4.2.0 (``xen/arch/x86/mm/p2m.c``, ``hvm/hvm.c``, ``common/memory.c``,
``arch/x86/mm.c``), the era the paging semantics of DESIGN section 5 follow.
"""

from __future__ import annotations

import errno
import pathlib

import pytest

from hvemu import abi
from hvemu.abi import Errno, MemEventFlag, MemEventReason, P2MAccess, P2MType, RingKind
from hvemu.core.effects import FramesReleased, RingNotify
from hvemu.core.errors import HypervisorError
from hvemu.core.hypervisor import Hypervisor

from ._support import Listener, R, W, check_accounting, echo, make, page_out, woken

#: ``p2m_type_t`` of RELEASE-4.2.0's ``xen/include/asm-x86/p2m.h``, copied by hand.
XEN_4_2_P2M_TYPES = {
    "ram_rw": 0, "invalid": 1, "ram_logdirty": 2, "ram_ro": 3, "mmio_dm": 4, "mmio_direct": 5,
    "populate_on_demand": 6, "grant_map_rw": 7, "grant_map_ro": 8, "ram_paging_out": 9, "ram_paged": 10,
    "ram_paging_in": 11, "ram_shared": 12, "ram_broken": 13,
}


def raises(errno_: Errno, fn: object, *args: object) -> None:
    with pytest.raises(HypervisorError) as err:
        fn(*args)  # type: ignore[operator]
    assert err.value.errno == errno_, err.value


# 1 ---------------------------------------------------------------------------------------------------
def test_a_failed_load_exposes_no_empty_frame() -> None:
    hv, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [5])
    dom.guest_access(0, 5, R)
    (req,) = lis.consume()
    used = hv.budget.used
    hv.take_effects()

    def fill(gfn: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    assert dom.paging_load([5], fill) == [Errno.ENOMEM]
    assert hv.budget.used == used and not dom.p2m.has_frame(5), "the frame and its budget went back"
    assert dom.p2m.get_type(5) == P2MType.ram_paging_in
    assert FramesReleased(dom.domid, [5]) in hv.take_effects(), "whatever the partial fill took is punched out"
    lis.respond(echo(req))  # the pager answers anyway
    lis.kick()
    assert dom.p2m.get_type(5) != P2MType.ram_rw, "never ram_rw over an empty frame"
    assert dom.vcpus[0].runnable
    dom.guest_access(0, 5, R)  # the guest's next touch faults again: no direct read of zeros
    assert not dom.vcpus[0].runnable and dom.vcpus[0].spinning_on == 5
    assert dom.paging_load([5], lambda g: None) == [None]  # the pager retries
    assert dom.vcpus[0].runnable and dom.p2m.get_type(5) == P2MType.ram_rw
    check_accounting(dom)


# 2 ---------------------------------------------------------------------------------------------------
def test_p2m_type_numbers_are_xens() -> None:
    assert {t.name: int(t) for t in P2MType} == XEN_4_2_P2M_TYPES


def test_a_ballooned_out_gfn_is_p2m_invalid() -> None:
    _, dom = make(gfns=8)
    assert dom.decrease_reservation(0, [3]) == [None]
    assert dom.p2m.get_type(3) == P2MType.invalid == 1


def test_the_c_header_has_xens_p2m_numbers() -> None:
    header = (pathlib.Path(abi.__file__).parent / "include" / "hvemu_mem_event.h").read_text()
    for name, value in XEN_4_2_P2M_TYPES.items():
        assert f"p2m_{name} = {value}," in header, name


# 3 (see also test_policies.test_batched_balloon_out_by_one_vcpu) --------------------------------------
def test_decrease_reservation_stops_at_the_vcpus_mark_and_other_vcpus_keep_their_slot() -> None:
    hv, dom = make(max_vcpus=2, gfns=32, ring_size=8)
    lis = Listener(dom)
    page_out(dom, list(range(12)))
    assert len(dom.decrease_reservation(0, list(range(12)))) == 7
    assert dom.mem_paging.free_requests() == 1
    page_out(dom, [20])
    dom.guest_access(1, 20, R)  # vCPU 1's event still finds its slot
    assert dom.mem_paging.counters.lost == 0 and lis.unconsumed()[-1].gfn == 20


# 4 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", [MemEventReason.INT3, MemEventReason.SINGLESTEP])
def test_int3_and_singlestep_refuse_onchangeonly(reason: MemEventReason) -> None:
    _, dom = make()
    raises(Errno.EINVAL, dom.set_hvm_param, reason, abi.HVMPME_MODE_SYNC | abi.HVMPME_ONCHANGEONLY)
    assert reason not in dom.hvm_params
    dom.set_hvm_param(reason, abi.HVMPME_MODE_SYNC)


# 5 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["seed", "claim"])
def test_drop_page_of_a_nominated_gfn_carries_evict_fail(policy: str) -> None:
    _, dom = make(gfns=8, policy=policy)
    lis = Listener(dom)
    page_out(dom, [1])
    dom.paging_nominate([2])
    dom.decrease_reservation(0, [1, 2])
    flags = {r.gfn: r.flags for r in lis.consume()}
    assert flags == {1: MemEventFlag.DROP_PAGE, 2: MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL}


# 6 ---------------------------------------------------------------------------------------------------
def test_access_event_offset_is_the_gpa_within_the_page_with_or_without_a_gla() -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.access_set([5, 6], P2MAccess.r)
    dom.guest_access(0, 5, W, offset=0x7F8)
    dom.guest_access(1, 6, W, gla=0xDEAD_B000, offset=0x10)
    got = [(r.gfn, r.offset, r.gla_valid, r.gla) for r in lis.consume()]
    assert got == [(5, 0x7F8, False, 0), (6, 0x10, True, 0xDEAD_B000)]
    raises(Errno.EINVAL, dom.guest_access, 2, 5, W, None, abi.PAGE_SIZE)


# 7 ---------------------------------------------------------------------------------------------------
def test_unknown_response_flag_bits_are_ignored_and_the_known_ones_obeyed() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [5])
    dom.guest_access(0, 5, R)
    (req,) = lis.consume()
    dom.paging_prep([5])
    lis.respond(echo(req, flags=int(req.flags) | 0x8000))
    lis.kick()
    c = dom.mem_paging.counters
    assert dom.vcpus[0].runnable, "the vCPU no longer hangs"
    assert (c.responses_unknown_bits, c.responses_rejected) == (1, 0)


# 8 and 12 ------------------------------------------------------------------------------------------------
def test_foreign_map_of_a_nominated_gfn_maps_and_its_evict_is_ebusy_until_unmapped() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    dom.paging_nominate([4])
    assert dom.foreign_map([4]) == [None], "a nominated page still has its frame: it maps"
    assert dom.p2m.get_type(4) == P2MType.ram_paging_out and not lis.unconsumed(), "no populate"
    assert dom.paging_evict([4]) == [Errno.EBUSY], "the mapping holds the page"
    assert dom.foreign_unmap([4]) == [None]
    assert dom.foreign_unmap([4]) == [Errno.ENOENT]
    assert dom.paging_evict([4]) == [None]


def test_a_referenced_page_cannot_be_nominated_until_every_mapping_is_gone() -> None:
    _, dom = make(gfns=16)
    Listener(dom)
    assert dom.foreign_map([3, 3]) == [None, None]
    assert dom.paging_nominate([2, 3, 4]) == [None, Errno.EBUSY, None]
    dom.foreign_unmap([3])
    assert dom.paging_nominate([3]) == [Errno.EBUSY], "one mapping is left"
    dom.foreign_unmap([3])
    assert dom.paging_nominate([3]) == [None] and not dom.p2m.refs


def test_foreign_map_of_paging_in_without_a_frame_is_enoent_without_a_request() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [6])
    dom.guest_access(0, 6, R)
    lis.consume()
    assert dom.foreign_map([6]) == [Errno.ENOENT] and not lis.unconsumed()
    dom.paging_prep([6])
    assert dom.foreign_map([6]) == [Errno.ENOENT], "prepared: its frame may be half-filled by the pager"
    assert not lis.unconsumed() and not dom.p2m.refs


# 9 (see also test_paging.test_vcpus_touching_a_gfn_already_paging_in_spin_without_a_request) -----------
def test_a_spinning_vcpu_takes_no_slot_even_on_a_congested_ring() -> None:
    _, dom = make(max_vcpus=4, gfns=32, ring_size=8)
    lis = Listener(dom)
    page_out(dom, [1])
    dom.guest_access(0, 1, R)
    for v in (1, 2, 3):
        dom.guest_access(v, 1, R)
    assert len(lis.unconsumed()) == 1 and dom.mem_paging.blocked == 0
    check_accounting(dom)


# 10 --------------------------------------------------------------------------------------------------
def test_paging_ops_without_a_paging_ring_are_enodev_and_change_nothing() -> None:
    hv, dom = make(gfns=16, total=32)
    for op in (dom.paging_nominate, dom.paging_evict, dom.paging_prep):
        raises(Errno.ENODEV, op, [1])
    raises(Errno.ENODEV, dom.paging_load, [1], lambda g: None)
    assert dom.p2m.get_type(1) == P2MType.ram_rw and dom.counters.nominated == 0
    assert not dom.crashed and hv.budget.used == 16
    dom.guest_access(0, 1, R)  # the guest's touch finds ram_rw: it does not crash the domain
    assert not dom.crashed


# 11 --------------------------------------------------------------------------------------------------
def test_load_then_respond_counts_the_response_as_loaded_not_stale() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [2, 3])
    dom.guest_access(0, 2, R)
    dom.guest_access(1, 3, R)
    reqs = lis.consume()
    assert dom.paging_load([2, 3], lambda g: None) == [None, None]
    for r in reqs:
        lis.respond(echo(r))
    lis.kick()
    c = dom.mem_paging.counters
    assert (c.responses_loaded, c.responses_stale) == (2, 0)


# 13 --------------------------------------------------------------------------------------------------
def test_default_access_set_and_get_with_xens_all_ones_gfn() -> None:
    _, dom = make(gfns=8)
    Listener(dom)
    assert dom.access_get(abi.DEFAULT_ACCESS_GFN) == P2MAccess.rwx
    assert dom.access_set([abi.DEFAULT_ACCESS_GFN], P2MAccess.rx) == [None]
    assert dom.access_get(abi.DEFAULT_ACCESS_GFN) == P2MAccess.rx
    assert dom.access_get(3) == P2MAccess.rwx, "setting the default changes no page"
    assert dom.access_set([3, 4], abi.ACCESS_DEFAULT) == [None, None]
    assert dom.access_get(3) == dom.access_get(4) == P2MAccess.rx
    dom.decrease_reservation(0, [5])
    assert dom.p2m.get_access(5) == P2MAccess.rx, "a gfn given back gets the default"
    page_out(dom, [6])
    raises(Errno.ESRCH, dom.access_get, 6)  # no frame behind it
    raises(Errno.EINVAL, dom.access_get, 8)


def test_int3_event_then_reinjection_reaches_the_guest_once() -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.set_hvm_param(MemEventReason.INT3, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(2, MemEventReason.INT3, 0x42, 0, gla=0x42_0007)
    (req,) = lis.consume()
    assert (req.reason, req.gfn, req.offset) == (MemEventReason.INT3, 0x42, 7)
    dom.inject_trap(2, 3)  # xen-access: xc_hvm_inject_trap(..., 3, HVMOP_TRAP_sw_exc, ...)
    raises(Errno.EBUSY, dom.inject_trap, 2, 3)
    lis.answer()
    lis.kick()
    assert dom.vcpus[2].runnable
    assert dom.take_pending_trap(2) == 3 and dom.take_pending_trap(2) is None
    assert dom.counters.traps_injected == 1
    raises(Errno.EINVAL, dom.inject_trap, 2, 256)


def test_single_step_reports_each_step_only_while_enabled_and_is_published_to_the_guest() -> None:
    hv = Hypervisor(64)
    buf = bytearray(abi.p2m_table_size(16))
    dom = hv.create_domain(2, 16, p2m_buffer=buf)
    lis = Listener(dom, RingKind.access)
    dom.set_hvm_param(MemEventReason.SINGLESTEP, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(1, MemEventReason.SINGLESTEP, 3, 0, gla=0x3000)
    assert not lis.unconsumed(), "not single-stepping: no event"
    dom.debug_control(1, True)
    assert buf[abi.p2m_vcpu_debug_index(16, 1)] == abi.VCPU_DEBUG_SINGLE_STEP
    assert buf[abi.p2m_vcpu_debug_index(16, 0)] == 0
    dom.hvm_trap(1, MemEventReason.SINGLESTEP, 3, 0, gla=0x3000)
    (req,) = lis.consume()
    assert (req.reason, req.gfn, req.gla, req.vcpu_id) == (MemEventReason.SINGLESTEP, 3, 0x3000, 1)
    assert req.flags & MemEventFlag.VCPU_PAUSED and not dom.vcpus[1].runnable
    lis.answer()
    lis.kick()
    dom.debug_control(1, False)
    assert buf[abi.p2m_vcpu_debug_index(16, 1)] == 0
    assert dom.counters.single_steps == 1


# The daemon's mistakes the hypervisor can see --------------------------------------------------------
def test_shared_ring_init_under_outstanding_requests_crashes_the_domain() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [1])
    dom.guest_access(0, 1, R)
    lis.sring.req_prod = lis.sring.rsp_prod = 0  # SHARED_RING_INIT on the live page
    dom.mem_event_resume(RingKind.paging)
    assert dom.crashed and "SHARED_RING_INIT" in dom.crash_reason


def test_shared_ring_init_on_an_idle_ring_is_a_fresh_start() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [1, 2])
    dom.guest_access(0, 1, R)
    lis.serve_all()
    lis.sring.init()  # nothing outstanding: the daemon may start the ring again
    lis.back.req_cons = lis.back.rsp_prod_pvt = 0
    dom.guest_access(1, 2, R)
    assert not dom.crashed and [r.gfn for r in lis.consume()] == [2]
    lis.answer()
    lis.kick()
    assert not dom.crashed and dom.vcpus[1].runnable


def test_a_back_ring_sized_for_the_whole_page_on_a_small_ring_crashes_the_domain() -> None:
    _, dom = make(gfns=64, ring_size=8)
    lis = Listener(dom)
    page_out(dom, list(range(10)))
    lis.page[abi.ring_bytes(8) + 5] = 1  # a response written into slot 8 of a 64-slot view
    dom.mem_event_resume(RingKind.paging)
    assert dom.crashed and "abi.ring_bytes(8)" in dom.crash_reason


# Notifications ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("notify", "kicks"), [("ring.h", 1), ("every-put", 3)])
def test_notify_on_every_put_is_xen_4_2s_option(notify: str, kicks: int) -> None:
    hv = Hypervisor(16, notify=notify)  # type: ignore[arg-type]
    dom = hv.create_domain(4, 16)
    Listener(dom)
    page_out(dom, [1, 2, 3])
    hv.take_effects()
    for v, g in enumerate((1, 2, 3)):
        dom.guest_access(v, g, R)
    assert sum(isinstance(e, RingNotify) for e in hv.take_effects()) == kicks
    assert woken(hv) == []


# xl pause / unpause --------------------------------------------------------------------------------
def test_pause_by_controller_holds_one_counted_pause_per_vcpu_and_is_idempotent() -> None:
    hv = Hypervisor(64)
    buf = bytearray(abi.p2m_table_size(16))
    dom = hv.create_domain(3, 16, p2m_buffer=buf)
    lis = Listener(dom)
    page_out(dom, [4])
    dom.guest_access(1, 4, R)  # vCPU 1 also waits for the pager
    hv.take_effects()
    dom.pause_by_controller()
    dom.pause_by_controller()
    assert [v.pause_count for v in dom.vcpus] == [1, 2, 1] and dom.stats().paused
    assert all(buf[abi.p2m_vcpu_debug_index(16, i)] & abi.VCPU_DEBUG_PAUSED for i in range(3))
    check_accounting(dom)
    lis.serve_all()
    assert not dom.vcpus[1].runnable, "answered, but still paused by the toolstack"
    assert woken(hv) == []
    dom.debug_control(2, True)
    dom.unpause_by_controller()
    dom.unpause_by_controller()
    assert all(v.runnable for v in dom.vcpus) and sorted(woken(hv)) == [0, 1, 2]
    assert buf[abi.p2m_vcpu_debug_index(16, 2)] == abi.VCPU_DEBUG_SINGLE_STEP, "the single-step bit is kept"
    assert not any(buf[abi.p2m_vcpu_debug_index(16, i)] for i in (0, 1))
    check_accounting(dom)
