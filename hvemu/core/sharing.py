"""Memory sharing's one event: no frame to unshare into (``mem_sharing_alloc_page``).

hvemu does not share pages between domains; it models the event a guest
write to a shared page raises when the host has no frame left: the vCPU
pauses and a ``SHARED`` request asks the sharing daemon to free memory.  No
ring means no way out: the domain crashes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvemu.abi import Errno, MemEvent, MemEventFlag, MemEventType, P2MType

if TYPE_CHECKING:
    from hvemu.core.domain import Domain, Vcpu


def mem_sharing_unshare_page(dom: Domain, vcpu: Vcpu, gfn: int) -> None:
    """A guest write to a ``ram_shared`` gfn: give it a private frame, or raise the ENOMEM event."""
    if dom.alloc_frame(gfn):
        dom.p2m.set_type(gfn, P2MType.ram_rw)
        return
    mem_sharing_notify_enomem(dom, vcpu, gfn)


def mem_sharing_notify_enomem(dom: Domain, vcpu: Vcpu, gfn: int) -> None:
    """Pause the vCPU and put the ENOMEM request; the response unpauses it, it then retries."""
    dom.counters.unshare_enomem += 1
    vcpu.event_pause()
    req = MemEvent(type=MemEventType.SHARED, flags=MemEventFlag.VCPU_PAUSED, gfn=gfn,
                   p2mt=P2MType.ram_shared, vcpu_id=vcpu.vcpu_id)
    rc = dom.mem_share.put_request(req, vcpu)
    if rc == Errno.ENOSYS:
        # "If there is no ring, and we're out of memory, then there is no way out."
        dom.crash(f"failed alloc on unshare path for gfn {gfn:#x} and no ring to upcall")
    # EBUSY: unlike its paging and access siblings, the seed keeps the event
    # pause here; the response releases it and the wake-up the congestion.
