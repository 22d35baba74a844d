"""What the sans-I/O core asks its driver to do, in order.

The core never touches a socket, an event channel or a memory mapping; it
appends effects to an outbox that the driver drains with
:meth:`hvemu.core.hypervisor.Hypervisor.take_effects` after each operation and
carries out in order.  Keeping them as plain ``msgspec`` structs makes them
cheap, comparable in tests and loggable as they are.
"""

from __future__ import annotations

import msgspec

from hvemu.abi import RingKind


class VcpuRunnable(msgspec.Struct, frozen=True):
    """The vCPU's pause count reached 0: resume the guest's blocked access.

    Not emitted for the vCPU whose own guest operation is running (its driver
    checks ``vcpus[i].runnable`` when the call returns), so a pause taken and
    dropped inside one call never produces a spurious wake-up.
    """

    domid: int
    vcpu_id: int


class RingNotify(msgspec.Struct, frozen=True):
    """Kick the daemon's event channel: ``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` said so."""

    domid: int
    ring: RingKind


class FramesReleased(msgspec.Struct, frozen=True):
    """Frames given back to the host (evict, balloon out, crash, destroy): punch holes."""

    domid: int
    gfns: list[int]


class DomainCrashed(msgspec.Struct, frozen=True):
    """``domain_crash()``: the domain's vCPUs will never run again."""

    domid: int
    reason: str


Effect = VcpuRunnable | RingNotify | FramesReleased | DomainCrashed
