"""The host-wide budget of resident guest frames.

Overcommit is the point of paging: the sum of all domains' memory may exceed
what the host will back, and the budget is what makes that real.  Every frame
a domain holds is charged here (creation, prep/load, unshare), and every frame
it gives back (evict, balloon out, crash, destroy) is returned, so a prep can
fail with ``ENOMEM`` exactly when Xen's ``alloc_domheap_page`` would.
"""

from __future__ import annotations


class FrameBudget:
    """A counter of frames, shared by all domains of one hypervisor."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"the frame budget cannot be negative ({total})")
        self.total = total
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def alloc(self, n: int = 1) -> bool:
        """Charge ``n`` frames; False (and nothing charged) if the host has not that many."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} frames")
        if n > self.free:
            return False
        self.used += n
        return True

    def release(self, n: int = 1) -> None:
        """Return ``n`` frames; more than were charged is a bookkeeping bug, not a guest error."""
        if n < 0 or n > self.used:
            raise ValueError(f"releasing {n} frames but only {self.used} are charged")
        self.used -= n

    def __repr__(self) -> str:
        return f"FrameBudget(total={self.total}, used={self.used})"
