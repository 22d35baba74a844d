"""The facade the hypervisor daemon drives: domains, the host budget, the effect outbox.

Everything here is synchronous and touches no OS resource.  The daemon calls
an operation, then drains :meth:`Hypervisor.take_effects` and carries the
effects out in order (resume a blocked guest access, kick an event channel,
punch holes where frames were released, fail a crashed domain's exits).

A driver that forgets to drain must not leave a vCPU paused for ever: the
outbox calls :attr:`Hypervisor.on_effects` when it stops being empty, and
the daemon schedules a drain from it, so an effect waits at most until the
end of the event loop's current iteration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hvemu import abi
from hvemu.abi import Errno
from hvemu.core.admission import POLICIES, Policy
from hvemu.core.budget import FrameBudget
from hvemu.core.domain import MAX_GFNS, MAX_VCPUS, Domain, PauseFlag, Vcpu
from hvemu.core.effects import Effect
from hvemu.core.errors import HypervisorError
from hvemu.core.mem_event import NOTIFY_MODES, Notify
from hvemu.trace import Tracer

__all__ = ["Domain", "Hypervisor", "HypervisorError", "PauseFlag", "Policy", "Vcpu"]

log = logging.getLogger("hvemu.core.hypervisor")


class Hypervisor:
    """All domains of one host, sharing one frame budget and one admission policy."""

    def __init__(self, total_frames: int, policy: Policy = "seed", ring_size: int | None = None,
                 notify: Notify = "ring.h") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if notify not in NOTIFY_MODES:
            raise ValueError(f"notify must be one of {NOTIFY_MODES}, not {notify!r}")
        #: When a put kicks the daemon: ``ring.h``'s rule, or after every put as Xen 4.2 does.
        self.notify: Notify = notify
        if ring_size is None:
            ring_size = abi.MEM_EVENT_RING_SIZE
        if ring_size < 1 or ring_size & (ring_size - 1) or ring_size > abi.MEM_EVENT_RING_SIZE:
            raise ValueError(f"ring_size must be a power of two in 1..{abi.MEM_EVENT_RING_SIZE}, "
                             f"not {ring_size}")
        self.budget = FrameBudget(total_frames)
        self.policy: Policy = policy
        self.ring_size = ring_size
        self.domains: dict[int, Domain] = {}
        self._effects: list[Effect] = []
        #: Called (no arguments) when the outbox goes from empty to not empty: the driver's cue
        #: to make sure a drain follows (None: the caller drains after each operation itself).
        self.on_effects: Callable[[], object] | None = None
        self._next_domid = 1  # domain 0 is the toolstack's
        self._tracer: Tracer | None = None

    @property
    def tracer(self) -> Tracer | None:
        """The ring-event tracer of every domain (None: tracing off)."""
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: Tracer | None) -> None:
        self._tracer = tracer
        for dom in self.domains.values():
            dom.tracer = tracer

    def _emit(self, effect: Effect) -> None:
        first = not self._effects
        self._effects.append(effect)  # before the cue: a cue that fails must not lose the effect
        if first and self.on_effects is not None:
            self.on_effects()

    def pending_effects(self) -> bool:
        """Whether the outbox holds effects not yet taken."""
        return bool(self._effects)

    def take_effects(self) -> list[Effect]:
        """Drain the outbox, oldest first."""
        out = self._effects.copy()
        self._effects.clear()
        return out

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except (KeyError, TypeError):
            raise HypervisorError(Errno.ESRCH, f"no domain {domid!r}") from None

    def create_domain(self, max_vcpus: int, gfns: int, *, resident: int | None = None,
                      p2m_buffer: Any = None, name: str = "", ring_abi: str = abi.DEFAULT_RING_ABI) -> Domain:
        """A new domain; ``resident`` gfns (default all, clamped to the free budget) start ``ram_rw``.

        The rest start ``ram_paged`` without a frame: a pager asked for one it
        never paged out loads zeros.  ``p2m_buffer`` is where the p2m keeps its
        type and access bytes (an mmap the guest maps read-only), else private.
        """
        if not isinstance(max_vcpus, int) or not 1 <= max_vcpus <= MAX_VCPUS:
            raise HypervisorError(Errno.EINVAL, f"max_vcpus must be in 1..{MAX_VCPUS}, not {max_vcpus!r}")
        if not isinstance(gfns, int) or not 1 <= gfns <= MAX_GFNS:
            raise HypervisorError(Errno.EINVAL, f"gfns must be within 1..{MAX_GFNS}, not {gfns!r}")
        if resident is None:
            resident = gfns
        if not isinstance(resident, int) or resident < 0:
            raise HypervisorError(Errno.EINVAL, f"bad resident count {resident!r}")
        resident = min(resident, gfns, self.budget.free)
        domid = self._next_domid
        try:
            dom = Domain(domid, max_vcpus, gfns, budget=self.budget, emit=self._emit,
                         policy=self.policy, ring_size=self.ring_size, resident=resident,
                         p2m_buffer=p2m_buffer, name=name, notify=self.notify, ring_abi=ring_abi)
        except (TypeError, ValueError) as exc:
            raise HypervisorError(Errno.EINVAL, str(exc)) from exc
        dom.tracer = self._tracer
        self.budget.alloc(resident)
        self._next_domid += 1
        self.domains[domid] = dom
        log.info("created domain %d (%s): %d vCPUs, %d gfns, %d resident",
                 domid, name, max_vcpus, gfns, resident)
        return dom

    def destroy_domain(self, domid: int) -> None:
        """Free the domain's frames to the budget, tear its rings down, forget it."""
        dom = self.domain(domid)
        dom.destroy()
        del self.domains[domid]
        log.info("destroyed domain %d", domid)

    def crash_domain(self, domid: int, reason: str) -> None:
        """``domain_crash`` from outside the core (e.g. the driver's shootdown timed out)."""
        self.domain(domid).crash(reason)
