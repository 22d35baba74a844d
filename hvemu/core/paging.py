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
from hvemu.core.p2m import DEFAULT_ACCESS, PAGEABLE_TYPES, RAM_TYPES, REMOVED_TYPE

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


def p2m_mem_paging_prep(dom: Domain, gfn: int) -> Errno | None:
    """Give a paged gfn a frame (``ENOMEM`` if the host budget is spent); it becomes ``ram_paging_in``.

    Idempotent for a gfn that already has its frame (a restarted pager serves
    the same request again).  ``ENOENT`` for a gfn that is not paged at all
    (e.g. already back to ``ram_rw``): the pager must then *not* fill it.
    """
    p2m = dom.p2m
    p2mt = p2m.get_type(gfn)
    if p2mt not in (P2MType.ram_paged, P2MType.ram_paging_in):
        return Errno.ENOENT
    if not p2m.has_frame(gfn):
        if not dom.alloc_frame(gfn):
            return Errno.ENOMEM
        dom.counters.prepped += 1
    p2m.set_type(gfn, P2MType.ram_paging_in)
    return None


def p2m_mem_paging_load(dom: Domain, gfn: int, fill: Callable[[int], None]) -> Errno | None:
    """Prep, ``fill(gfn)`` a frame allocated now, and make the gfn ``ram_rw`` (Xen 4.2 final's load).

    A populate still outstanding is answered later as usual: its response
    finds ``ram_rw``, leaves the p2m alone (counted stale) and unpauses.
    """
    p2m = dom.p2m
    fresh = p2m.needs_frame(gfn)
    rc = p2m_mem_paging_prep(dom, gfn)
    if rc is not None:
        return rc
    if fresh:
        fill(gfn)
    p2m.set_type(gfn, P2MType.ram_rw)
    dom.counters.loaded += 1
    dom.counters.paged_in += 1
    return None


def p2m_mem_paging_populate(dom: Domain, gfn: int, vcpu: Vcpu | None) -> None:
    """Ask the pager for ``gfn``; ``vcpu`` is the faulting guest vCPU, None for a foreign mapper.

    A guest vCPU is paused until the response (``VCPU_PAUSED``); a foreign
    mapper is not paused, gets ``ENOENT`` from its caller and retries.  A gfn
    already ``ram_paging_in`` is on its way back: a guest vCPU still sends a
    request (so that its response unpauses it), a foreign mapper does not.
    """
    med = dom.mem_paging
    if med.check_ring() is not None:
        dom.crash(f"paging gfn {gfn:#x} yet no ring in place")
        return
    p2m = dom.p2m
    p2mt = p2m.get_type(gfn)
    if p2mt not in abi.PAGING_TYPES or (vcpu is None and p2mt not in _PAGE_OUT_PATH):
        return  # not paged, or already on its way back and nobody to pause
    if med.admit(vcpu) is not None:
        return  # claim policy, foreign, no slot: nothing changed, the mapper retries
    req = MemEvent(type=MemEventType.PAGING, gfn=gfn, p2mt=p2mt,
                   vcpu_id=vcpu.vcpu_id if vcpu is not None else 0)
    if p2mt in _PAGE_OUT_PATH:
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

    Only a gfn that was prepared (``ram_paging_in`` with a frame) becomes
    ``ram_rw``; anything else is left alone and counted stale (a duplicate
    request already answered, a load that made it ``ram_rw``, a gfn dropped
    since), but the response's unpause is still honoured.
    """
    if not dom.p2m.in_range(rsp.gfn):
        return False
    if rsp.flags & _DROP_PAGE:
        return True
    p2m = dom.p2m
    if p2m.get_type(rsp.gfn) == P2MType.ram_paging_in and p2m.has_frame(rsp.gfn):
        p2m.set_type(rsp.gfn, P2MType.ram_rw)
        dom.counters.paged_in += 1
    else:
        dom.mem_paging.counters.responses_stale += 1
    return True


def p2m_mem_paging_drop_page(dom: Domain, gfn: int, p2mt: int, vcpu: Vcpu) -> None:
    """Tell the pager a paged gfn was given back; no pause, and no ring is fine here."""
    med = dom.mem_paging
    if med.check_ring() is not None:
        return
    req = MemEvent(type=MemEventType.PAGING, flags=MemEventFlag.DROP_PAGE, gfn=gfn, p2mt=p2mt,
                   vcpu_id=vcpu.vcpu_id)
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
    p2m.set_type(gfn, REMOVED_TYPE)
    p2m.set_access(gfn, DEFAULT_ACCESS)
    dom.counters.ballooned += 1
    if p2mt in abi.PAGING_TYPES:
        p2m_mem_paging_drop_page(dom, gfn, p2mt, vcpu)
    return None


def foreign_map_gfn(dom: Domain, gfn: int) -> Errno | None:
    """One gfn of a foreign mapping: RAM maps, paging types populate and answer ``ENOENT``."""
    dom.counters.foreign_maps += 1
    p2mt = dom.p2m.get_type(gfn)
    if p2mt in abi.PAGING_TYPES:
        p2m_mem_paging_populate(dom, gfn, None)
        return Errno.ENOENT
    if p2mt in RAM_TYPES and dom.p2m.has_frame(gfn):
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
            p2m.set_type(g, P2MType.ram_rw)
            n += 1
        g = raw.find(needle, g + 1)
    if n:
        log.info("domain %d: %d prepared gfns made ram_rw on paging ring disable", dom.domid, n)
    return n
