"""Paging: the p2m side of ``xen/arch/x86/mm/p2m.c`` (Xen 4.2 semantics, DESIGN section 5).

Transitions of one gfn::

    ram_rw --nominate--> ram_paging_out --evict--> ram_paged (frame freed)
        ^                   |                          |
        |                   +---- guest/foreign touch -+--> ram_paging_in (populate request)
        |                                                        |
        +--------- resume (response, frame present) <-- prep ----+   (frame allocated)

``ram_paging_in`` without a frame is Xen 4.2's ``ram_paging_in_start``
(populate sent), with one it is prepared (the pager fills it, then answers).
A gfn the guest gives back while paged becomes ``mmio_dm`` (no memory) and
the pager gets a ``DROP_PAGE`` request so that it can forget its copy.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hvemu import abi
from hvemu.abi import Errno, MemEvent, MemEventFlag, MemEventType, P2MType
from hvemu.core.p2m import PAGEABLE_TYPES, RAM_TYPES, REMOVED_TYPE

if TYPE_CHECKING:
    from hvemu.core.domain import Domain, Vcpu

log = logging.getLogger("hvemu.core.paging")

_PAGE_OUT_PATH = frozenset({P2MType.ram_paging_out, P2MType.ram_paged})
_NOMINATED = frozenset({P2MType.ram_paging_out})
# Plain ints on the fault path: an operation on an IntFlag member costs about
# a microsecond (Python-level enum code), on an int some 10 ns.
_VCPU_PAUSED = int(MemEventFlag.VCPU_PAUSED)
_DROP_PAGE = int(MemEventFlag.DROP_PAGE)
_EVICT_FAIL = int(MemEventFlag.EVICT_FAIL)
_FOREIGN = int(MemEventFlag.FOREIGN)


def p2m_mem_paging_nominate(dom: Domain, gfns: Sequence[int]) -> list[Errno | None]:
    """``ram_rw`` -> ``ram_paging_out`` per gfn; ``EBUSY`` for a page that cannot be paged (Xen's answer).

    Batched (the pager nominates a whole batch per domctl): the per-gfn
    checks run in one loop in :meth:`P2M.transition`.  ``gfns`` are valid.
    """
    changed = dom.p2m.transition(gfns, PAGEABLE_TYPES, P2MType.ram_paging_out)
    dom.counters.nominated += changed.count(True)
    return _results(changed, Errno.EBUSY)


def p2m_mem_paging_evict(dom: Domain, gfns: Sequence[int], released: list[int]) -> list[Errno | None]:
    """``ram_paging_out`` -> ``ram_paged`` per gfn, and the frames go back to the host.

    ``EBUSY`` if a gfn is not (or no longer) nominated: a touch after
    nominate turned it ``ram_paging_in``, so the pager's copy may be stale.
    ``gfns`` are valid.
    """
    changed = dom.p2m.transition(gfns, _NOMINATED, P2MType.ram_paged)
    freed = list(itertools.compress(gfns, changed))
    dom.budget.release(dom.p2m.drop_frames(freed))
    released += freed
    dom.counters.evicted += len(freed)
    return _results(changed, Errno.EBUSY)


def _results(changed: list[bool], failed: Errno) -> list[Errno | None]:
    """One result per gfn: ``None`` where it changed, ``failed`` elsewhere."""
    return [None if ok else failed for ok in changed]


#: What prep/load accept: a gfn on its way out or back (``ENOENT`` for anything else).
_PREPARABLE = frozenset({P2MType.ram_paged, P2MType.ram_paging_in})


def p2m_mem_paging_prep(dom: Domain, gfn: int) -> Errno | None:
    """Give a paged gfn a frame (``ENOMEM`` if the host budget is spent); it becomes ``ram_paging_in``.

    Idempotent for a gfn that already has its frame (a restarted pager serves
    the same request again).  ``ENOENT`` for a gfn that is not paged at all
    (e.g. already back to ``ram_rw``): the pager must then *not* fill it.
    """
    p2m = dom.p2m
    if p2m.get_type(gfn) not in _PREPARABLE:
        return Errno.ENOENT
    if not p2m.has_frame(gfn):
        if not dom.alloc_frame(gfn):
            return Errno.ENOMEM
        dom.counters.prepped += 1
    p2m.set_type(gfn, P2MType.ram_paging_in)
    return None


def p2m_mem_paging_load(dom: Domain, gfn: int, fill: Callable[[int], None]) -> Errno | None:
    """Xen 4.2's prep with the pager's buffer: allocate, ``fill(gfn)``, and only then make it ``ram_rw``.

    As ``p2m_mem_paging_prep`` copies the buffer before it touches the p2m, a
    fill that fails (``OSError``: e.g. ``ENOSPC`` writing guest memory under
    host memory pressure) changes nothing: the frame and its budget go back,
    the gfn keeps its type and the guest's next touch faults again instead
    of reading an empty frame.  It answers ``ENOMEM``, which a pager retries.
    A frame that already exists (nominated, then touched) holds the guest's
    data and is never filled.  A populate still outstanding is answered
    later as usual: its response finds ``ram_rw`` and only unpauses.
    """
    p2m = dom.p2m
    if p2m.get_type(gfn) not in _PREPARABLE:
        return Errno.ENOENT
    if not p2m.has_frame(gfn):
        if not dom.budget.alloc():
            return Errno.ENOMEM
        try:
            fill(gfn)
        except OSError as exc:
            dom.budget.release()
            dom.release_frames([gfn])  # give back whatever the partial fill took from the host
            log.error("domain %d: loading gfn %#x failed (%s); the gfn stays %s",
                      dom.domid, gfn, exc, P2MType(p2m.get_type(gfn)).name)
            return Errno.ENOMEM
        p2m.set_frame(gfn, True)
        dom.counters.prepped += 1
    page_in(dom, gfn)
    dom.counters.loaded += 1
    return None


def page_in(dom: Domain, gfn: int) -> None:
    """A paging gfn with its frame becomes ``ram_rw``; vCPUs spinning on it run again."""
    dom.p2m.set_type(gfn, P2MType.ram_rw)
    dom.counters.paged_in += 1
    dom.page_settled(gfn)


def p2m_mem_paging_populate(dom: Domain, gfn: int, vcpu: Vcpu | None) -> None:
    """Ask the pager for ``gfn``; ``vcpu`` is the faulting guest vCPU, None for a foreign mapper.

    Only a gfn on the page-out path (nominated or evicted) puts a request:
    a guest vCPU is paused until the response (``VCPU_PAUSED``); a foreign
    mapper is not paused, gets ``ENOENT`` from its caller and retries.  A gfn
    already ``ram_paging_in`` is on its way back: in Xen the faulting vCPU
    re-executes its access until the page is there, taking no ring slot
    (``hvm_hap_nested_page_fault`` populates only ``p2m_is_paged`` and
    ``ram_paging_out``); hvemu parks it until the gfn settles instead of
    letting it spin.
    """
    med = dom.mem_paging
    if med.check_ring() is not None:
        dom.crash(f"paging gfn {gfn:#x} yet no ring in place")
        return
    p2m = dom.p2m
    p2mt = p2m.get_type(gfn)
    if p2mt not in _PAGE_OUT_PATH:
        if p2mt == P2MType.ram_paging_in and vcpu is not None:
            dom.spin_on_page(vcpu, gfn)
        return  # not paged, or already on its way back
    if med.admit(vcpu) is not None:
        return  # claim policy, foreign, no slot: nothing changed, the mapper retries
    req = MemEvent(type=MemEventType.PAGING, gfn=gfn, p2mt=p2mt,
                   vcpu_id=vcpu.vcpu_id if vcpu is not None else 0)
    if p2mt == P2MType.ram_paging_out:
        req.flags |= _EVICT_FAIL  # evict will fail now: tell the pager
        dom.counters.evict_fails += 1
    p2m.set_type(gfn, P2MType.ram_paging_in)
    if vcpu is not None:
        vcpu.event_pause()
        req.flags |= _VCPU_PAUSED
        dom.counters.populates += 1
    else:
        req.flags |= _FOREIGN
        dom.counters.foreign_populates += 1
    if med.put_request(req, vcpu) == Errno.EBUSY and req.flags & _VCPU_PAUSED:
        # The seed: the ring is congested, the vCPU was marked and paused, so
        # drop the event pause and let it retry once woken.  The request may
        # well be on the ring: its response then finds no event pause
        # (counted as unpause_ignored), see DESIGN section 6.
        assert vcpu is not None
        vcpu.event_unpause()


def p2m_mem_paging_resume(dom: Domain, rsp: MemEvent) -> bool:
    """The p2m half of ``p2m_mem_paging_resume`` for one response; False rejects the response.

    A gfn that was prepared (``ram_paging_in`` with a frame) becomes
    ``ram_rw``.  A gfn its load already made ``ram_rw`` is the usual case
    of load-then-respond (counted ``responses_loaded``); anything else is
    left alone and counted stale (a duplicate request already answered, a
    gfn dropped or paged out again since).  The unpause is honoured either way.
    """
    if not dom.p2m.in_range(rsp.gfn):
        return False
    if rsp.flags & _DROP_PAGE:
        return True
    p2m = dom.p2m
    p2mt = p2m.get_type(rsp.gfn)
    if p2m.has_frame(rsp.gfn) and p2mt == P2MType.ram_paging_in:
        page_in(dom, rsp.gfn)
    elif p2m.has_frame(rsp.gfn) and p2mt == P2MType.ram_rw:
        dom.mem_paging.counters.responses_loaded += 1
    else:
        dom.mem_paging.counters.responses_stale += 1
    return True


def p2m_mem_paging_drop_page(dom: Domain, gfn: int, p2mt: int, vcpu: Vcpu) -> None:
    """Tell the pager a paged gfn was given back; no pause, and no ring is fine here.

    A gfn only nominated carries ``EVICT_FAIL`` as well (Xen 4.2 and later; the
    seed's drop had no such flag): the pager's evict of it will fail.
    """
    med = dom.mem_paging
    if med.check_ring() is not None:
        return
    req = MemEvent(type=MemEventType.PAGING, flags=_DROP_PAGE, gfn=gfn, p2mt=p2mt, vcpu_id=vcpu.vcpu_id)
    if p2mt == P2MType.ram_paging_out:
        req.flags |= _EVICT_FAIL  # its evict will fail now (Xen 4.2 tags the drop too)
    dom.counters.dropped += 1
    med.put_request(req, vcpu)  # "If the event is lost, tough bananas"


def guest_remove_page(dom: Domain, gfn: int, vcpu: Vcpu, released: list[int]) -> Errno | None:
    """One gfn of XENMEM_decrease_reservation: free its frame, remove it, tell the pager if paged."""
    p2m = dom.p2m
    p2mt = p2m.get_type(gfn)
    if p2mt == REMOVED_TYPE:
        return Errno.ENOENT
    if p2mt not in RAM_TYPES and p2mt not in abi.PAGING_TYPES:
        return Errno.EINVAL
    dom.free_frame(gfn, released)
    p2m.drop_refs(gfn)  # a mapper keeps its copy; the domain no longer has the page
    p2m.set_type(gfn, REMOVED_TYPE)
    p2m.set_access(gfn, dom.default_access)
    dom.counters.ballooned += 1
    dom.page_settled(gfn)
    if p2mt in abi.PAGING_TYPES:
        p2m_mem_paging_drop_page(dom, gfn, p2mt, vcpu)
    return None


def foreign_map_gfn(dom: Domain, gfn: int) -> Errno | None:
    """One gfn of a foreign mapping, as Xen 4.2's ``mmu_update`` path takes it; the caller takes the reference.

    ``ram_paged`` populates (no pause) and answers ``ENOENT``; ``ram_paging_in``
    is on its way back: ``ENOENT`` without a new request.  A gfn with a frame
    maps, nominated ones included (its evict then fails with ``EBUSY`` while
    the mapping holds the page).  Nothing mapped: ``EINVAL``.

    One difference: Xen maps a ``ram_paging_in`` gfn that has a frame, since
    its only such frame is a nominated page's own.  Here a prep allocates the
    frame before the pager fills it through its mapping, so a mapper could
    read it half-filled: it gets ``ENOENT`` and retries, as without a frame.
    """
    dom.counters.foreign_maps += 1
    p2m = dom.p2m
    p2mt = p2m.get_type(gfn)
    if p2mt == P2MType.ram_paged:
        p2m_mem_paging_populate(dom, gfn, None)
        return Errno.ENOENT
    if p2mt == P2MType.ram_paging_in:
        return Errno.ENOENT
    if p2m.has_frame(gfn) and (p2mt in RAM_TYPES or p2mt == P2MType.ram_paging_out):
        return None
    return Errno.EINVAL


def finalize_paging_in(dom: Domain) -> int:
    """On paging-ring disable: every prepared ``ram_paging_in`` gfn becomes ``ram_rw``."""
    p2m = dom.p2m
    if not p2m.type_count(P2MType.ram_paging_in):
        return 0
    n = 0
    raw = p2m.types.tobytes()
    needle = bytes([P2MType.ram_paging_in])
    g = raw.find(needle)
    while g >= 0:
        if p2m.has_frame(g):
            p2m.set_type(g, P2MType.ram_rw)  # counted as finalized_on_disable, not paged_in
            dom.page_settled(g)
            n += 1
        g = raw.find(needle, g + 1)
    if n:
        log.info("domain %d: %d prepared gfns made ram_rw on paging ring disable", dom.domid, n)
    return n
