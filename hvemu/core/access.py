"""mem_access: ``p2m_mem_access_check``, ``p2m_set_mem_access`` and ``hvm_memory_event_traps``.

Events go on the domain's *access* ring with type ``ACCESS``.  A violation
pauses the vCPU until the listener answers (except ``n2rwx``, which converts
the right and only reports); ``rx2rw`` converts silently on a write.  With no
listener, ``access_required`` crashes the domain, otherwise the restriction is
dropped (``rwx``) so that the guest can go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvemu import abi
from hvemu.abi import Errno, MemEvent, MemEventFlag, MemEventReason, MemEventType, P2MAccess

if TYPE_CHECKING:
    from hvemu.core.domain import Domain, Vcpu

_PAGE_OFFSET_MASK = abi.PAGE_SIZE - 1


def is_violation(access: int, p2ma: int) -> bool:
    """Does an access (``abi.ACCESS_*`` bits) need a right that ``p2ma`` does not grant?"""
    return bool(access & ~abi.ACCESS_RIGHTS.get(p2ma, 0))


def p2m_set_mem_access(dom: Domain, gfn: int, access: int) -> Errno | None:
    dom.p2m.set_access(gfn, access)
    return None


def p2m_mem_access_check(dom: Domain, vcpu: Vcpu, gfn: int, offset: int, access: int, gla: int | None) -> None:
    """An access violation at ``offset`` in ``gfn``: convert automatically, or send a VIOLATION event.

    The event's ``offset`` is the guest-physical address within the page
    (Xen's ``gpa & 0xfff``), whether or not a linear address is known.
    """
    p2m = dom.p2m
    p2ma = p2m.get_access(gfn)
    # First, handle rx2rw conversion automatically.
    if access & abi.ACCESS_W and p2ma == P2MAccess.rx2rw:
        p2m.set_access(gfn, P2MAccess.rw)
        return
    # n2rwx: any access promotes to rwx; the event is sent without pausing.
    if p2ma == P2MAccess.n2rwx:
        p2m.set_access(gfn, P2MAccess.rwx)
    med = dom.mem_access
    if med.check_ring() is not None:
        med.counters.no_ring += 1
        if dom.access_required:
            dom.crash(f"memory access permissions failure on gfn {gfn:#x} (vCPU {vcpu.vcpu_id}), "
                      "no mem_event listener")
        else:
            p2m.set_access(gfn, P2MAccess.rwx)  # a listener is not required: clear the restriction
        return
    req = MemEvent(type=MemEventType.ACCESS, reason=MemEventReason.VIOLATION, gfn=gfn, offset=offset,
                   vcpu_id=vcpu.vcpu_id, p2mt=p2m.get_type(gfn),
                   access_r=bool(access & abi.ACCESS_R), access_w=bool(access & abi.ACCESS_W),
                   access_x=bool(access & abi.ACCESS_X))
    if gla is not None:
        req.gla, req.gla_valid = gla, True
    if p2ma != P2MAccess.n2rwx:
        vcpu.event_pause()
        req.flags |= MemEventFlag.VCPU_PAUSED
    # If the ring was busy, this vCPU got marked and paused: drop our event pause.
    if med.put_request(req, vcpu) == Errno.EBUSY and req.flags & MemEventFlag.VCPU_PAUSED:
        vcpu.event_unpause()


def hvm_memory_event_traps(dom: Domain, vcpu: Vcpu, param: int, reason: MemEventReason, value: int,
                           old: int, gla: int | None, mask: int = 0) -> bool:
    """A register write or INT3 under ``HVM_PARAM_MEMORY_EVENT_*``; True if it was handled.

    Sync mode pauses the vCPU until the listener answers, async only reports;
    ``onchangeonly`` skips writes that do not change the value, and a
    ``mask`` (Xen 4.17's ``write_ctrlreg_mask``) those that change only its
    bits.  As in the
    seed, ``req.gfn`` carries the new value and ``old`` is not sent; with no
    ring the event is dropped (and a sync pause released).
    """
    mode = param & abi.HVMPME_MODE_MASK
    if mode == abi.HVMPME_MODE_DISABLED:
        return False
    if param & abi.HVMPME_ONCHANGEONLY and value == old:
        return True
    if mask and not (value ^ old) & ~mask:
        return True
    req = MemEvent(type=MemEventType.ACCESS, reason=reason, gfn=value & 0xFFFFFFFFFFFFFFFF,
                   vcpu_id=vcpu.vcpu_id)
    if mode == abi.HVMPME_MODE_SYNC:
        req.flags |= MemEventFlag.VCPU_PAUSED
        vcpu.event_pause()
    if gla is not None:
        req.gla, req.gla_valid, req.offset = gla, True, gla & _PAGE_OFFSET_MASK
    rc = dom.mem_access.put_request(req, vcpu)
    if rc is not None and req.flags & MemEventFlag.VCPU_PAUSED:
        # ENOSYS: nobody listens, carry on.  EBUSY: marked and paused for space,
        # it retries when woken (the listener may have lost this one).
        vcpu.event_unpause()
    return True
