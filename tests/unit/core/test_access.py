"""mem_access: violations, the automatic conversions, and hvm_memory_event_traps."""

from __future__ import annotations

import pytest

from hvemu import abi
from hvemu.abi import Errno, MemEventFlag, MemEventReason, MemEventType, P2MAccess, RingKind
from hvemu.core.access import is_violation
from hvemu.core.errors import HypervisorError

from ._support import Listener, R, W, X, check_accounting, make


@pytest.mark.parametrize(("p2ma", "allowed"), [
    (P2MAccess.n, 0), (P2MAccess.r, R), (P2MAccess.w, W), (P2MAccess.rw, R | W), (P2MAccess.x, X),
    (P2MAccess.rx, R | X), (P2MAccess.wx, W | X), (P2MAccess.rwx, R | W | X), (P2MAccess.rx2rw, R | X),
    (P2MAccess.n2rwx, 0),
])
def test_violation_table_matches_xen(p2ma: int, allowed: int) -> None:
    for access in (R, W, X, R | W, R | X, W | X, R | W | X):
        assert is_violation(access, p2ma) == bool(access & ~allowed)


def test_violation_pauses_the_vcpu_and_reports_rwx_gla_and_offset() -> None:
    hv, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.access_set([5], P2MAccess.r)
    dom.guest_access(1, 5, W | X, gla=0x7FFF_1234, offset=0x234)
    assert not dom.vcpus[1].runnable
    (req,) = lis.consume()
    assert (req.type, req.reason) == (MemEventType.ACCESS, MemEventReason.VIOLATION)
    assert (req.gfn, req.vcpu_id) == (5, 1)
    assert (req.access_r, req.access_w, req.access_x) == (False, True, True)
    assert req.gla_valid and req.gla == 0x7FFF_1234 and req.offset == 0x234
    assert req.flags == MemEventFlag.VCPU_PAUSED
    lis.answer()
    lis.kick()
    assert dom.vcpus[1].runnable and dom.p2m.get_access(5) == P2MAccess.r, "the listener decides the right"


def test_allowed_access_is_a_spurious_fault_and_the_guest_retries() -> None:
    hv, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.access_set([5], P2MAccess.rx)
    dom.guest_access(0, 5, R | X)
    assert dom.vcpus[0].runnable and not lis.unconsumed() and hv.take_effects() == []


def test_rx2rw_write_converts_to_rw_silently() -> None:
    hv, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.access_set([3], P2MAccess.rx2rw)
    dom.guest_access(0, 3, R)
    assert dom.p2m.get_access(3) == P2MAccess.rx2rw, "a read is allowed"
    dom.guest_access(0, 3, W)
    assert dom.p2m.get_access(3) == P2MAccess.rw
    assert dom.vcpus[0].runnable and not lis.unconsumed()


def test_n2rwx_converts_to_rwx_and_reports_without_pausing() -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.access_set([3], P2MAccess.n2rwx)
    dom.guest_access(2, 3, R)
    assert dom.p2m.get_access(3) == P2MAccess.rwx and dom.vcpus[2].runnable
    (req,) = lis.consume()
    assert req.flags == 0 and req.access_r and req.reason == MemEventReason.VIOLATION
    lis.answer()
    lis.kick()
    assert dom.mem_access.counters.unpause_ignored == 0


def test_access_violation_on_a_paged_gfn_populates_first() -> None:
    """No frame: the access right is checked once the page is back (Xen checks only valid mfns)."""
    _, dom = make()
    acc = Listener(dom, RingKind.access)
    pag = Listener(dom)
    dom.paging_nominate([4])
    dom.paging_evict([4])
    dom.access_set([4], P2MAccess.n)
    dom.guest_access(0, 4, R)
    assert pag.consume() and not acc.unconsumed()
    pag.answer()
    pag.kick()
    dom.guest_access(0, 4, R)
    assert acc.consume() and not dom.vcpus[0].runnable


def test_access_set_validates_the_right_and_reports_bad_gfns() -> None:
    _, dom = make(gfns=8)
    assert dom.access_set([1, 8], P2MAccess.rw) == [None, Errno.EINVAL]
    with pytest.raises(HypervisorError) as err:
        dom.access_set([1], 11)
    assert err.value.errno == Errno.EINVAL
    dom.access_required = True
    assert dom.access_required


@pytest.mark.parametrize("reason", [MemEventReason.CR0, MemEventReason.CR3, MemEventReason.CR4])
def test_cr_write_traps_sync_async_and_onchangeonly(reason: MemEventReason) -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.hvm_trap(0, reason, 1, 0)
    assert not lis.unconsumed(), "mode disabled: nothing"
    dom.set_hvm_param(reason, abi.HVMPME_MODE_ASYNC)
    dom.hvm_trap(0, reason, 0x80000011, 0x11)
    assert dom.vcpus[0].runnable
    dom.set_hvm_param(reason, abi.HVMPME_MODE_SYNC | abi.HVMPME_ONCHANGEONLY)
    dom.hvm_trap(1, reason, 7, 7)  # unchanged: skipped
    dom.hvm_trap(1, reason, 8, 7)
    assert not dom.vcpus[1].runnable
    reqs = lis.consume()
    assert [(r.reason, r.gfn, r.flags, r.vcpu_id) for r in reqs] == [
        (reason, 0x80000011, 0, 0), (reason, 8, MemEventFlag.VCPU_PAUSED, 1)]
    assert all(r.type == MemEventType.ACCESS for r in reqs)
    lis.answer()
    lis.kick()
    assert dom.vcpus[1].runnable
    check_accounting(dom)


def test_a_ctrlreg_mask_hides_writes_that_change_only_its_bits() -> None:
    """Xen 4.17's write_ctrlreg_mask (xen-access write_ctrlreg_cr4 masks CR4.PGE): only other bits report."""
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    pge = 0x80
    dom.set_hvm_param(MemEventReason.CR4, abi.HVMPME_MODE_ASYNC | abi.HVMPME_ONCHANGEONLY, pge)
    dom.hvm_trap(0, MemEventReason.CR4, 0x20 | pge, 0x20)  # a global TLB flush toggles PGE: no event
    dom.hvm_trap(0, MemEventReason.CR4, 0x20, 0x20 | pge)
    assert not lis.unconsumed()
    dom.hvm_trap(0, MemEventReason.CR4, 0x20 | 0x200 | pge, 0x20)  # OSFXSR too: reported
    assert [r.gfn for r in lis.consume()] == [0x20 | 0x200 | pge]
    dom.set_hvm_param(MemEventReason.CR4, abi.HVMPME_MODE_ASYNC)  # the mask goes with a new setting
    dom.hvm_trap(0, MemEventReason.CR4, 0x20 | pge, 0x20)
    assert len(lis.consume()) == 1
    for bad in (-1, 1 << 64, "x"):
        with pytest.raises(HypervisorError) as err:
            dom.set_hvm_param(MemEventReason.CR4, abi.HVMPME_MODE_ASYNC, bad)  # type: ignore[arg-type]
        assert err.value.errno == Errno.EINVAL
    with pytest.raises(HypervisorError):
        dom.set_hvm_param(MemEventReason.INT3, abi.HVMPME_MODE_SYNC, pge)  # a breakpoint has no bits


def test_int3_trap_carries_the_gla() -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.access)
    dom.set_hvm_param(MemEventReason.INT3, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(3, MemEventReason.INT3, 0x42, 0, gla=0x42_0ABC)
    (req,) = lis.consume()
    assert (req.reason, req.gfn, req.gla, req.offset, req.gla_valid) == (
        MemEventReason.INT3, 0x42, 0x42_0ABC, 0xABC, True)


def test_bad_trap_reasons_and_modes_are_einval() -> None:
    _, dom = make()
    for reason in (MemEventReason.VIOLATION, MemEventReason.UNKNOWN, 77):
        with pytest.raises(HypervisorError):
            dom.set_hvm_param(reason, abi.HVMPME_MODE_SYNC)
        with pytest.raises(HypervisorError):
            dom.hvm_trap(0, reason, 1, 0)
    for mode in (3, 1 << 5, -1):
        with pytest.raises(HypervisorError):
            dom.set_hvm_param(MemEventReason.CR3, mode)
