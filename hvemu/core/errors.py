"""The one exception the core raises for a whole-operation failure.

Per-gfn outcomes of batched tool ops are *returned* (``list[Errno | None]``),
because one bad gfn must not hide what happened to the others.  A failure of
the operation as a whole (unknown domain, ring not enabled, bad argument) is
raised as :class:`HypervisorError`, carrying the errno name the control plane
answers with, so the driver maps it to a reply without a lookup table.
"""

from __future__ import annotations

from hvemu.abi import Errno


class HypervisorError(Exception):
    """A hypercall/domctl failed as a whole; ``errno`` is what Xen would return."""

    def __init__(self, errno: Errno, message: str = "") -> None:
        super().__init__(f"{errno}: {message}" if message else str(errno))
        self.errno = errno
        self.message = message
