"""The facade: domains, budget, effects, crash and destroy, errors."""

from __future__ import annotations

import msgspec
import pytest

from hvemu import abi
from hvemu.abi import Errno, MemEventReason, P2MType, RingKind
from hvemu.core.effects import DomainCrashed, FramesReleased, RingNotify, VcpuRunnable
from hvemu.core.errors import HypervisorError
from hvemu.core.hypervisor import Hypervisor
from hvemu.stats import DomainStats

from ._support import Listener, R, make, page_out


def errno_of(fn, *args, **kw) -> Errno:  # type: ignore[no-untyped-def]
    with pytest.raises(HypervisorError) as err:
        fn(*args, **kw)
    return err.value.errno


def test_domains_get_fresh_ids_and_unknown_ones_are_esrch() -> None:
    hv = Hypervisor(100)
    a = hv.create_domain(1, 8, name="a")
    b = hv.create_domain(2, 8)
    assert a.domid != b.domid and hv.domains == {a.domid: a, b.domid: b} and a.name == "a"
    assert errno_of(hv.destroy_domain, 999) == Errno.ESRCH
    assert errno_of(hv.domain, 999) == Errno.ESRCH


def test_create_domain_validates_its_arguments() -> None:
    hv = Hypervisor(100)
    assert errno_of(hv.create_domain, 0, 8) == Errno.EINVAL
    assert errno_of(hv.create_domain, 1, 0) == Errno.EINVAL
    assert errno_of(hv.create_domain, 1, 8, resident=-1) == Errno.EINVAL
    with pytest.raises(ValueError):
        Hypervisor(10, ring_size=12)
    with pytest.raises(ValueError):
        Hypervisor(10, policy="fifo")  # type: ignore[arg-type]


def test_budget_is_shared_and_destroy_returns_frames() -> None:
    hv = Hypervisor(20)
    a = hv.create_domain(1, 12)
    b = hv.create_domain(1, 12)
    assert (hv.budget.used, hv.budget.free, b.p2m.resident) == (20, 0, 8)
    hv.take_effects()
    hv.destroy_domain(a.domid)
    assert hv.budget.free == 12 and a.domid not in hv.domains
    (eff,) = hv.take_effects()
    assert isinstance(eff, FramesReleased) and eff.gfns == list(range(12))


def test_crash_stops_vcpus_tears_rings_down_returns_memory_and_spares_other_domains() -> None:
    hv = Hypervisor(64)
    a = hv.create_domain(2, 16)
    b = hv.create_domain(2, 16)
    lis_a, lis_b = Listener(a), Listener(b)
    page_out(a, [1])
    page_out(b, [1])
    a.guest_access(0, 1, R)
    b.guest_access(0, 1, R)
    hv.take_effects()
    hv.crash_domain(a.domid, "test")
    effects = hv.take_effects()
    assert effects[0] == DomainCrashed(a.domid, "test")
    assert isinstance(effects[1], FramesReleased) and len(effects[1].gfns) == 15
    assert not any(v.runnable for v in a.vcpus) and not a.mem_paging.enabled
    assert a.p2m.resident == 0 and hv.budget.used == 15
    lis_a.consume()
    lis_b.serve_all()
    assert b.vcpus[0].runnable and not b.crashed
    assert errno_of(a.guest_access, 1, 2, R) == Errno.ESRCH
    assert errno_of(a.paging_nominate, [2]) == Errno.ESRCH
    assert errno_of(a.mem_event_resume, RingKind.paging) == Errno.ESRCH
    assert a.stats().crashed is True
    assert hv.take_effects() == [VcpuRunnable(b.domid, 0)]
    hv.destroy_domain(a.domid)
    assert hv.take_effects() == [] and hv.budget.used == 16, "b paged its gfn back in"


def test_guest_ops_validate_vcpu_gfn_access_and_refuse_a_paused_vcpu() -> None:
    _, dom = make(max_vcpus=2, gfns=8)
    Listener(dom)
    assert errno_of(dom.guest_access, 2, 0, R) == Errno.EINVAL
    assert errno_of(dom.guest_access, 0, 8, R) == Errno.EINVAL
    assert errno_of(dom.guest_access, 0, 0, 0) == Errno.EINVAL
    assert errno_of(dom.guest_access, 0, 0, 8) == Errno.EINVAL
    page_out(dom, [3])
    dom.guest_access(0, 3, R)
    assert errno_of(dom.guest_access, 0, 3, R) == Errno.EBUSY
    assert errno_of(dom.decrease_reservation, 0, [1]) == Errno.EBUSY


def test_no_vcpu_runnable_effect_for_the_vcpu_whose_own_call_is_running() -> None:
    hv, dom = make(max_vcpus=2)
    dom.set_hvm_param(MemEventReason.CR4, abi.HVMPME_MODE_SYNC)
    dom.hvm_trap(1, MemEventReason.CR4, 1, 0)  # no ring: pause, put fails, unpause
    assert hv.take_effects() == [] and dom.vcpus[1].runnable


def test_effects_come_out_in_order_and_the_outbox_empties() -> None:
    hv, dom = make(max_vcpus=1, gfns=8)
    lis = Listener(dom)
    page_out(dom, [2])
    dom.guest_access(0, 2, R)
    lis.consume()
    lis.answer()
    lis.push()
    dom.mem_event_resume(RingKind.paging)
    assert hv.take_effects() == [FramesReleased(dom.domid, [2]), RingNotify(dom.domid, RingKind.paging),
                                 VcpuRunnable(dom.domid, 0)]
    assert hv.take_effects() == []


def test_ring_ops_errors() -> None:
    _, dom = make()
    assert errno_of(dom.mem_event_disable, RingKind.access) == Errno.ENOENT
    assert errno_of(dom.mem_event_resume, RingKind.access) == Errno.ENOSYS
    assert errno_of(dom.mem_event_enable, "nonsense", bytearray(4096)) == Errno.EINVAL
    assert errno_of(dom.mem_event_enable, RingKind.access, bytearray(100)) == Errno.EINVAL
    assert errno_of(dom.mem_event_enable, RingKind.access, bytes(4096)) == Errno.EINVAL
    Listener(dom, RingKind.access)
    dom.mem_event_disable("access")
    Listener(dom, RingKind.access)  # enable again on a new page


def test_ring_size_is_a_parameter_shared_with_the_daemon() -> None:
    _, dom = make(ring_size=8)
    assert dom.rings_size(RingKind.paging) == 8 == dom.mem_paging.ring_size
    lis = Listener(dom)
    assert lis.back.size == 8 and dom.mem_paging.free_requests() == 8


def test_stats_have_ring_counters_as_flat_int_dicts() -> None:
    _, dom = make()
    st = dom.stats()
    for kind in RingKind:
        ring = msgspec.structs.asdict(st.ring(kind))
        assert all(isinstance(v, int) for v in ring.values())
        for key in ("put", "lost", "refused", "blocked_now", "blocked_ever", "max_occupancy", "responses",
                    "responses_rejected", "unpause_ignored"):
            assert key in ring
    for key in ("resident", "paged", "paging_in", "faults"):
        assert isinstance(getattr(st, key), int)
    assert st.paged == dom.p2m.type_count(P2MType.ram_paged)
    assert msgspec.convert(msgspec.to_builtins(st), DomainStats) == st, "what goes on the wire comes back"


def test_the_outbox_calls_on_effects_when_it_stops_being_empty() -> None:
    """The driver's cue to drain: once per empty -> not empty, never for an effect behind others."""
    hv, dom = make(max_vcpus=1, gfns=8)
    Listener(dom)
    cues: list[bool] = []
    hv.on_effects = lambda: cues.append(hv.pending_effects())
    page_out(dom, [1, 2])  # the frames go: FramesReleased
    assert cues == [True], "called once, with the first effect queued"
    dom.guest_access(0, 1, R)  # a put and its kick, behind it
    assert cues == [True] and len(hv.take_effects()) >= 2
    dom.crash("gone")
    assert cues == [True, True] and hv.pending_effects()
