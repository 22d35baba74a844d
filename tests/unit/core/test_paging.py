"""Paging transitions (DESIGN section 5), batches with per-gfn results, the frame budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvemu import abi
from hvemu.abi import Errno, MemEventFlag, P2MType, RingKind
from hvemu.core.effects import FramesReleased, VcpuRunnable
from hvemu.core.hypervisor import Hypervisor

from ._support import Listener, R, W, check_accounting, make, page_out, woken


def test_nominate_moves_ram_rw_to_paging_out_and_refuses_what_cannot_be_paged() -> None:
    _, dom = make(gfns=16)
    Listener(dom)
    assert dom.paging_nominate([1, 1, 99, -1]) == [None, Errno.EBUSY, Errno.EINVAL, Errno.EINVAL]
    assert dom.p2m.get_type(1) == P2MType.ram_paging_out
    dom.p2m.set_type(2, P2MType.ram_shared)
    assert dom.paging_nominate([2]) == [Errno.EBUSY]


def test_evict_frees_the_frame_to_the_budget_and_reports_it() -> None:
    hv, dom = make(gfns=16)
    Listener(dom)
    dom.paging_nominate([3, 4])
    hv.take_effects()
    assert hv.budget.used == 16
    assert dom.paging_evict([3, 4, 5]) == [None, None, Errno.EBUSY]
    assert hv.budget.used == 14 and dom.p2m.resident == 14
    assert dom.p2m.get_type(3) == P2MType.ram_paged and not dom.p2m.has_frame(3)
    assert hv.take_effects() == [FramesReleased(dom.domid, [3, 4])]


def test_evict_fails_ebusy_when_the_page_was_touched_after_nominate_and_populate_says_evict_fail() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    dom.paging_nominate([6])
    dom.guest_access(0, 6, R)
    assert dom.counters.evict_fails == 1, "a populate of a nominated gfn is counted"
    assert dom.paging_evict([6]) == [Errno.EBUSY]
    (req,) = lis.consume()
    assert req.flags & MemEventFlag.EVICT_FAIL and req.flags & MemEventFlag.VCPU_PAUSED
    assert req.p2mt == P2MType.ram_paging_out
    lis.answer()  # prep is a no-op (the frame is still there); resume makes it ram_rw
    lis.kick()
    assert dom.p2m.get_type(6) == P2MType.ram_rw and dom.vcpus[0].runnable


def test_guest_touch_of_paged_gfn_populates_and_pauses() -> None:
    hv, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [7])
    hv.take_effects()
    dom.guest_access(2, 7, W)
    assert not dom.vcpus[2].runnable and dom.p2m.get_type(7) == P2MType.ram_paging_in
    assert not dom.p2m.has_frame(7)
    (req,) = lis.consume()
    assert (req.gfn, req.vcpu_id, req.p2mt, req.flags) == (7, 2, P2MType.ram_paged, MemEventFlag.VCPU_PAUSED)
    assert dom.paging_prep([7]) == [None] and dom.p2m.has_frame(7)
    assert dom.p2m.get_type(7) == P2MType.ram_paging_in, "prepared, not guest-visible until resume"
    hv.take_effects()
    lis.answer()
    lis.kick()
    assert dom.p2m.get_type(7) == P2MType.ram_rw
    assert hv.take_effects() == [VcpuRunnable(dom.domid, 2)]


def test_vcpus_touching_a_gfn_already_paging_in_spin_without_a_request() -> None:
    """Xen populates only ``ram_paged``/``ram_paging_out``: later vCPUs re-execute, taking no ring slot."""
    hv, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [7])
    dom.guest_access(0, 7, R)
    free = dom.mem_paging.free_requests()
    dom.guest_access(1, 7, R)
    dom.guest_access(2, 7, W)
    reqs = lis.consume()
    assert [(r.vcpu_id, r.p2mt) for r in reqs] == [(0, P2MType.ram_paged)], "only the first populate puts"
    assert dom.mem_paging.free_requests() == free and dom.counters.spins == 2
    assert not any(dom.vcpus[i].runnable for i in (0, 1, 2))
    check_accounting(dom)
    hv.take_effects()
    lis.answer()
    lis.kick()
    c = dom.mem_paging.counters
    assert all(dom.vcpus[i].runnable for i in (0, 1, 2)), "the page settling releases the spinners"
    assert sorted(woken(hv)) == [0, 1, 2]
    assert c.responses_stale == 0 and c.responses_rejected == 0 and dom.counters.paged_in == 1
    check_accounting(dom)


def test_a_spinning_vcpu_runs_again_when_its_gfn_is_loaded_or_given_back() -> None:
    hv, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [3, 4])
    dom.foreign_map([3, 4])  # foreign populates: paging_in, nobody paused
    dom.guest_access(0, 3, R)
    dom.guest_access(1, 4, R)
    assert [r.flags for r in lis.consume()] == [MemEventFlag.FOREIGN] * 2
    hv.take_effects()
    assert dom.paging_load([3], lambda g: None) == [None]
    assert woken(hv) == [0]
    assert dom.decrease_reservation(2, [4]) == [None]
    assert woken(hv) == [1] and dom.p2m.get_type(4) == P2MType.invalid
    check_accounting(dom)


def test_foreign_map_maps_ram_and_populates_paged_gfns_without_pausing() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [1])
    assert dom.foreign_map([0, 1, 16]) == [None, Errno.ENOENT, Errno.EINVAL]
    (req,) = lis.consume()
    assert req.flags == MemEventFlag.FOREIGN and all(v.runnable for v in dom.vcpus)
    assert dom.foreign_map([1]) == [Errno.ENOENT] and not lis.unconsumed(), "on its way back: no new request"
    lis.answer()
    lis.kick()
    assert dom.foreign_map([1]) == [None]


def test_prep_is_idempotent_refuses_non_paged_gfns_and_fails_enomem_when_the_budget_is_spent() -> None:
    hv = Hypervisor(total_frames=10)
    dom = hv.create_domain(1, 16)  # only 10 resident: gfns 10..15 start paged
    Listener(dom)
    assert dom.p2m.resident == 10 and dom.p2m.get_type(12) == P2MType.ram_paged
    assert dom.paging_prep([0]) == [Errno.ENOENT]
    assert dom.paging_prep([12]) == [Errno.ENOMEM]
    page_out(dom, [0])
    assert dom.paging_prep([12, 12, 13]) == [None, None, Errno.ENOMEM]
    assert hv.budget.used == 10 and hv.budget.free == 0
    check_accounting(dom)


def test_resident_is_clamped_to_what_the_host_budget_has_left() -> None:
    hv = Hypervisor(total_frames=24)
    a = hv.create_domain(2, 16)
    b = hv.create_domain(2, 16)
    c = hv.create_domain(2, 16, resident=4)
    assert (a.p2m.resident, b.p2m.resident, c.p2m.resident) == (16, 8, 0)
    assert hv.budget.free == 0
    hv.destroy_domain(a.domid)
    assert hv.budget.free == 16
    Listener(c)
    assert c.paging_prep([0]) == [None]


def test_load_fills_only_a_fresh_frame_and_makes_the_gfn_ram_rw() -> None:
    _, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [2, 3])
    dom.guest_access(0, 3, R)  # a populate outstanding for 3
    dom.paging_prep([3])
    filled: list[int] = []
    assert dom.paging_load([2, 3, 4], filled.append) == [None, None, Errno.ENOENT]
    assert filled == [2], "3 already had its frame: never overwrite it"
    assert dom.p2m.get_type(2) == dom.p2m.get_type(3) == P2MType.ram_rw
    lis.serve_all()  # the outstanding response finds ram_rw, as loaded: it unpauses
    c = dom.mem_paging.counters
    assert dom.vcpus[0].runnable and (c.responses_loaded, c.responses_stale) == (1, 0)


def test_decrease_reservation_frees_frames_and_sends_drop_page_for_paged_gfns_without_pausing() -> None:
    hv, dom = make(gfns=16)
    lis = Listener(dom)
    page_out(dom, [4])
    dom.paging_nominate([5])
    hv.take_effects()
    assert dom.decrease_reservation(1, [3, 4, 5, 3, 99]) == [None, None, None, Errno.ENOENT, Errno.EINVAL]
    assert dom.vcpus[1].runnable
    effects = hv.take_effects()
    assert FramesReleased(dom.domid, [3, 5]) in effects
    reqs = lis.consume()
    assert [(r.gfn, r.flags, r.p2mt) for r in reqs] == [
        (4, MemEventFlag.DROP_PAGE, P2MType.ram_paged),
        (5, MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL, P2MType.ram_paging_out)]
    assert all(dom.p2m.get_type(g) == P2MType.invalid for g in (3, 4, 5)), "given back: p2m_invalid, as Xen"
    lis.answer(prep=False)
    lis.kick()
    assert dom.p2m.get_type(4) == P2MType.invalid, "a DROP_PAGE response leaves the p2m alone"
    from hvemu.core.errors import HypervisorError

    with pytest.raises(HypervisorError) as err:
        dom.guest_access(0, 3, R)
    assert err.value.errno == Errno.EINVAL
    check_accounting(dom)


def test_disabling_the_paging_ring_makes_prepared_gfns_ram_rw() -> None:
    _, dom = make(gfns=16)
    Listener(dom)
    page_out(dom, [1, 2, 3])
    dom.paging_prep([1, 2])  # a clean-stopping pager pages everything back in
    dom.foreign_map([3])  # 3: populate sent, no frame
    dom.mem_event_disable(RingKind.paging)
    assert [dom.p2m.get_type(g) for g in (1, 2, 3)] == [P2MType.ram_rw, P2MType.ram_rw, P2MType.ram_paging_in]
    assert dom.counters.finalized_on_disable == 2


def test_p2m_lives_in_the_given_buffer_with_the_abi_layout() -> None:
    hv = Hypervisor(64)
    gfns = 32
    buf = bytearray(abi.p2m_table_size(gfns))
    dom = hv.create_domain(1, gfns, p2m_buffer=buf, resident=30)
    Listener(dom)
    assert buf[abi.p2m_type_index(gfns, 31)] == P2MType.ram_paged
    assert buf[abi.p2m_access_index(gfns, 5)] == abi.P2MAccess.rwx
    dom.paging_nominate([5])
    dom.access_set([6], abi.P2MAccess.rx2rw)
    assert buf[abi.p2m_type_index(gfns, 5)] == P2MType.ram_paging_out
    assert buf[abi.p2m_access_index(gfns, 6)] == abi.P2MAccess.rx2rw
    hv.destroy_domain(dom.domid)
    buf.extend(b"x")  # the core let go of its views: the buffer can be resized (an mmap closed)


def test_p2m_buffer_too_small_or_read_only_is_einval() -> None:
    from hvemu.core.errors import HypervisorError

    hv = Hypervisor(64)
    for bad in (bytearray(10), bytes(64)):
        with pytest.raises(HypervisorError) as err:
            hv.create_domain(1, 32, p2m_buffer=bad)
        assert err.value.errno == Errno.EINVAL
    assert hv.budget.used == 0 and not hv.domains


def test_p2m_counts_follow_every_transition() -> None:
    _, dom = make(gfns=64)
    lis = Listener(dom)
    page_out(dom, list(range(10)))
    dom.paging_nominate([10, 11])
    for g in range(4):
        dom.guest_access(g % 4, g, R)
    dom.foreign_map([5, 6])
    check_accounting(dom)
    st = dom.stats()
    assert st.paging_out == 2 and st.paging_in == 6 and st.paged == 4
    lis.serve_all(rounds=2)
    check_accounting(dom)
    assert dom.stats().resident == dom.p2m.recount()[1]


_TYPES = [P2MType.ram_rw, P2MType.ram_logdirty, P2MType.ram_paging_out, P2MType.ram_paged, P2MType.ram_paging_in,
          P2MType.ram_shared, P2MType.invalid]


def _check_against_model(types: list[int], frames: list[bool], gfns: list[int], evict: bool,
                         referenced: frozenset[int] = frozenset()) -> None:
    """The batch op answers and changes exactly what applying Xen's per-gfn op in order would."""
    hv, dom = make(gfns=len(types))
    Listener(dom)
    p2m = dom.p2m
    for g in referenced:
        p2m.get_page(g)
    for g, (t, f) in enumerate(zip(types, frames, strict=True)):
        p2m.set_type(g, t)
        if not f:
            dom.free_frame(g, [])
    hv.take_effects()
    model_types, model_frames = list(types), list(frames)
    expected: list[Errno | None] = []
    freed: list[int] = []
    for g in gfns:
        if not 0 <= g < len(types):
            expected.append(Errno.EINVAL)
        elif g in referenced:
            expected.append(Errno.EBUSY)  # a foreign mapping holds the page
        elif not evict and model_frames[g] and model_types[g] in (P2MType.ram_rw, P2MType.ram_logdirty):
            model_types[g] = P2MType.ram_paging_out
            expected.append(None)
        elif evict and model_frames[g] and model_types[g] == P2MType.ram_paging_out:
            model_types[g], model_frames[g] = P2MType.ram_paged, False
            freed.append(g)
            expected.append(None)
        else:
            expected.append(Errno.EBUSY)
    used = hv.budget.used
    nominated, evicted = dom.counters.nominated, dom.counters.evicted
    assert (dom.paging_evict(gfns) if evict else dom.paging_nominate(gfns)) == expected
    done = expected.count(None)
    assert (dom.counters.nominated - nominated, dom.counters.evicted - evicted) == ((0, done) if evict else (done, 0))
    assert [p2m.get_type(g) for g in range(len(types))] == model_types
    assert [p2m.has_frame(g) for g in range(len(types))] == model_frames
    assert hv.budget.used == used - len(freed)
    assert hv.take_effects() == ([FramesReleased(dom.domid, freed)] if freed else [])
    p2m.check_counts()


_TABLES = st.lists(st.tuples(st.sampled_from(_TYPES), st.booleans()), min_size=8, max_size=8)


@given(_TABLES, st.lists(st.integers(-2, 10), max_size=12), st.booleans(), st.frozensets(st.integers(0, 7)))
def test_batched_nominate_and_evict_match_gfn_by_gfn(table: list[tuple[int, bool]], gfns: list[int],
                                                     evict: bool, referenced: frozenset[int]) -> None:
    _check_against_model([t for t, _ in table], [f for _, f in table], gfns, evict, referenced)


@given(_TABLES, st.integers(0, 7), st.integers(2, 8), st.booleans(), st.booleans(),
       st.frozensets(st.integers(0, 7), max_size=1))
def test_a_run_of_gfns_matches_gfn_by_gfn(table: list[tuple[int, bool]], start: int, length: int, evict: bool,
                                          qualify: bool, referenced: frozenset[int]) -> None:
    """Consecutive gfns (a clock pager's batch) take the slice path when all qualify; same answers."""
    run = list(range(start, min(start + length, 8)))
    types, frames = [t for t, _ in table], [f for _, f in table]
    if qualify:  # make every gfn of the run qualify, so that the slice path is taken
        for g in run:
            types[g], frames[g] = (P2MType.ram_paging_out if evict else P2MType.ram_rw), True
    _check_against_model(types, frames, run, evict, referenced)
