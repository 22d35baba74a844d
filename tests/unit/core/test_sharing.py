"""Sharing's ENOMEM-on-unshare event."""

from __future__ import annotations

from hvemu.abi import MemEventFlag, MemEventType, P2MType, RingKind
from hvemu.core.effects import DomainCrashed
from hvemu.core.hypervisor import Hypervisor

from ._support import Listener, W, check_accounting, make


def test_unshare_enomem_pauses_the_vcpu_until_the_sharing_daemon_answers() -> None:
    _, dom = make()
    lis = Listener(dom, RingKind.sharing)
    dom.unshare_enomem(2, 9)
    assert not dom.vcpus[2].runnable
    (req,) = lis.consume()
    assert (req.type, req.flags, req.gfn, req.p2mt, req.vcpu_id) == (
        MemEventType.SHARED, MemEventFlag.VCPU_PAUSED, 9, P2MType.ram_shared, 2)
    lis.answer()
    lis.kick()
    assert dom.vcpus[2].runnable
    check_accounting(dom)


def test_write_to_a_shared_gfn_unshares_into_a_new_frame_or_raises_enomem() -> None:
    hv = Hypervisor(4)
    dom = hv.create_domain(1, 8)  # 4 resident, budget spent
    lis = Listener(dom, RingKind.sharing)
    dom.p2m.set_type(6, P2MType.ram_shared)  # (hvemu has no nominate-for-sharing; set by hand)
    dom.guest_access(0, 6, W)
    assert lis.consume() and not dom.vcpus[0].runnable
    lis.answer()
    Listener(dom)  # a pager frees memory
    dom.paging_nominate([0])
    dom.paging_evict([0])
    lis.kick()
    dom.guest_access(0, 6, W)  # the vCPU retries
    assert dom.p2m.get_type(6) == P2MType.ram_rw and dom.p2m.has_frame(6) and dom.vcpus[0].runnable


def test_unshare_enomem_without_a_ring_crashes_the_domain_only() -> None:
    hv = Hypervisor(32)
    a = hv.create_domain(1, 8)
    b = hv.create_domain(1, 8)
    a.unshare_enomem(0, 1)
    assert a.crashed and not b.crashed
    assert DomainCrashed(a.domid, a.crash_reason) in hv.take_effects()
