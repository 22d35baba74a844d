"""Domains and vCPUs: counted pauses, pause flags, crash, and the hypercall surface.

A vCPU runs only when its pause count is 0 (Xen's ``vcpu_pause`` /
``vcpu_unpause``): a vCPU paused for its event *and* for ring congestion runs
only once both are released, in any order.  Pause *flags* (the seed's
``_VPF_mem_event``, per ring here) say why a vCPU was marked; the *event*
pause count (Xen's ``vm_event_pause_count`` since 2014) says how many
responses may still unpause it, so a response with nothing to release is
ignored rather than stealing another pause.

:class:`Domain` is the API the hypervisor daemon drives.  Every method is
synchronous and sans-I/O; what the driver must do afterwards is in the
hypervisor's effect outbox.  Guest-originated calls (``guest_access``,
``hvm_trap``, ``decrease_reservation``, ``unshare_enomem``) run "as" the
vCPU: when one returns, the driver replies to the guest at once if
``vcpus[i].runnable``, and otherwise when a :class:`VcpuRunnable` effect names
it (none is emitted for a pause taken and dropped within the call).

Why one module of ~650 lines: it is Xen's ``struct domain`` and ``struct vcpu`` with the entry
points a guest, a tool and a daemon reach; the rules themselves are in the modules it calls
(:mod:`~hvemu.core.paging`, :mod:`~hvemu.core.access`, :mod:`~hvemu.core.mem_event`...).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec

from hvemu import abi
from hvemu.abi import Errno, MemEventReason, P2MType, RingKind
from hvemu.core import access as _access
from hvemu.core import paging as _paging
from hvemu.core import sharing as _sharing
from hvemu.core.admission import Policy
from hvemu.core.budget import FrameBudget
from hvemu.core.effects import DomainCrashed, Effect, FramesReleased, VcpuRunnable
from hvemu.core.errors import HypervisorError
from hvemu.core.mem_event import MemEventDomain, Notify, ResponseFixup
from hvemu.core.p2m import DEFAULT_ACCESS, P2M, REMOVED_TYPE
from hvemu.stats import DomainCounters, DomainStats
from hvemu.trace import NO_RING, NO_VCPU, RING_CODES, TraceEvent, Tracer

log = logging.getLogger("hvemu.core.domain")


class PauseFlag(enum.Flag):
    """``v->pause_flags`` bits hvemu models: marked for congestion on one ring (Xen 4.2's names)."""

    MEM_PAGING = enum.auto()
    MEM_ACCESS = enum.auto()
    MEM_SHARING = enum.auto()


RING_PAUSE_FLAG: dict[RingKind, PauseFlag] = {
    RingKind.paging: PauseFlag.MEM_PAGING,
    RingKind.access: PauseFlag.MEM_ACCESS,
    RingKind.sharing: PauseFlag.MEM_SHARING,
}


class Vcpu:
    """One vCPU: a counted pause, its pause flags and its event-pause count."""

    __slots__ = ("domain", "vcpu_id", "pause_count", "pause_flags", "event_pause_count", "waits",
                 "spinning_on", "single_step", "pending_trap")

    def __init__(self, domain: Domain, vcpu_id: int) -> None:
        self.domain = domain
        self.vcpu_id = vcpu_id
        #: ``v->pause_count``: the vCPU runs only at 0.
        self.pause_count = 0
        self.pause_flags = PauseFlag(0)
        #: Pauses taken for an event whose response will release them.
        self.event_pause_count = 0
        #: Requests of this vCPU asleep on a ring's wait queue (claim policy); one pause each.
        self.waits = 0
        #: The ``ram_paging_in`` gfn this vCPU re-executes its access on (one pause), or None.
        self.spinning_on: int | None = None
        #: ``v->arch.hvm_vcpu.single_step`` (XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON/OFF).
        self.single_step = False
        #: A trap a tool injected (``HVMOP_inject_trap``), delivered on the next return to the guest.
        self.pending_trap: int | None = None

    @property
    def runnable(self) -> bool:
        return self.pause_count == 0 and not self.domain.crashed

    def pause(self) -> None:
        """``vcpu_pause_nosync``: takes effect when the vCPU next leaves the hypervisor."""
        self.pause_count += 1
        tracer = self.domain.tracer
        if tracer is not None:
            tracer(TraceEvent.PAUSE, self.domain.domid, NO_RING, self.vcpu_id, 0, self.pause_count)

    def unpause(self) -> None:
        """``vcpu_unpause``: at 0 the vCPU may run (the driver is told, see module doc)."""
        if self.pause_count <= 0:
            raise AssertionError(f"dom{self.domain.domid} vCPU {self.vcpu_id}: unpause without a pause")
        self.pause_count -= 1
        tracer = self.domain.tracer
        if tracer is not None:
            tracer(TraceEvent.UNPAUSE, self.domain.domid, NO_RING, self.vcpu_id, 0, self.pause_count)
        if self.pause_count == 0:
            self.domain._vcpu_runnable(self)

    def event_pause(self) -> None:
        """``vm_event_vcpu_pause``: a pause that a response's ``VCPU_PAUSED`` will release."""
        self.event_pause_count += 1
        self.pause()

    def event_unpause(self) -> bool:
        """``vm_event_vcpu_unpause``: release one event pause; False (nothing done) if there is none."""
        if self.event_pause_count == 0:
            return False
        self.event_pause_count -= 1
        self.unpause()
        return True

    def test_flag(self, flag: PauseFlag) -> bool:
        return bool(self.pause_flags & flag)

    def test_and_set_flag(self, flag: PauseFlag) -> bool:
        was = bool(self.pause_flags & flag)
        self.pause_flags |= flag
        return was

    def test_and_clear_flag(self, flag: PauseFlag) -> bool:
        was = bool(self.pause_flags & flag)
        self.pause_flags &= ~flag
        return was

    def __repr__(self) -> str:
        return (f"Vcpu(d{self.domain.domid}v{self.vcpu_id}, pause={self.pause_count}, "
                f"event={self.event_pause_count}, flags={self.pause_flags}, waits={self.waits}, "
                f"spinning_on={self.spinning_on})")


#: Reasons ``hvm_memory_event_traps`` knows, each with its own HVM param.
TRAP_REASONS = frozenset({MemEventReason.CR0, MemEventReason.CR3, MemEventReason.CR4, MemEventReason.INT3,
                          MemEventReason.SINGLESTEP})
#: Params that refuse ``HVMPME_onchangeonly`` (``EINVAL``): an INT3 or a step has no old value.
NO_ONCHANGEONLY = frozenset({MemEventReason.INT3, MemEventReason.SINGLESTEP})
MAX_VCPUS = abi.HVM_MAX_VCPUS
_PAGING_RING = RING_CODES[RingKind.paging]  # evict and load batches are traced as the paging ring's
MAX_GFNS = 1 << 22  # 16 GiB of guest memory: a p2m of 12 MiB, a guest segment the host can still map


class Domain:
    """A guest: vCPUs, its p2m, its three mem_event rings."""

    def __init__(self, domid: int, max_vcpus: int, gfns: int, *, budget: FrameBudget,
                 emit: Callable[[Effect], None], policy: Policy, ring_size: int, resident: int,
                 p2m_buffer: Any = None, name: str = "", notify: Notify = "ring.h",
                 ring_abi: str = abi.DEFAULT_RING_ABI) -> None:
        if ring_abi not in abi.RING_ABIS:
            raise ValueError(f"unknown ring ABI {ring_abi!r} (one of {', '.join(abi.RING_ABIS)})")
        self.domid = domid
        #: The layout of this domain's ring entries (``abi.RING_ABIS``), chosen at create.
        self.ring_abi = ring_abi
        self.name = name
        self.max_vcpus = max_vcpus
        self.gfns = gfns
        self.policy: Policy = policy
        self.budget = budget
        self.emit = emit
        self.crashed = False
        self.crash_reason = ""
        #: Optional ring-event tracer (see :mod:`hvemu.trace`); None costs one check per event.
        self.tracer: Tracer | None = None
        self.destroyed = False
        #: ``p2m->access_required``: no access listener -> crash instead of relaxing to rwx.
        self.access_required = False
        #: ``p2m->default_access``: what a gfn gets when it is (re)populated or set to "default".
        self.default_access = int(DEFAULT_ACCESS)
        #: ``d->is_paused_by_controller``: ``xl pause`` holds one pause on every vCPU.
        self.paused_by_controller = False
        #: vCPUs re-executing an access to a ``ram_paging_in`` gfn, per gfn (see ``spin_on_page``).
        self.spinners: dict[int, list[Vcpu]] = {}
        #: HVM_PARAM_MEMORY_EVENT_{CR0,CR3,CR4,INT3}.
        self.hvm_params: dict[MemEventReason, int] = {}
        #: Per control register: bits whose changes alone send no event (Xen 4.17's ``write_ctrlreg_mask``).
        self.ctrlreg_masks: dict[MemEventReason, int] = {}
        self.counters = DomainCounters()
        self.vcpus = [Vcpu(self, i) for i in range(max_vcpus)]
        self.p2m = P2M(gfns, p2m_buffer)
        self.p2m.initialise(resident)
        self.rings: dict[RingKind, MemEventDomain] = {
            kind: MemEventDomain(self, kind, RING_PAUSE_FLAG[kind], policy, ring_size, notify)
            for kind in RingKind
        }
        self._current: Vcpu | None = None

    # ------------------------------------------------------------------ rings by Xen's names
    @property
    def mem_paging(self) -> MemEventDomain:
        return self.rings[RingKind.paging]

    @property
    def mem_access(self) -> MemEventDomain:
        return self.rings[RingKind.access]

    @property
    def mem_share(self) -> MemEventDomain:
        return self.rings[RingKind.sharing]

    def rings_size(self, ring: RingKind | str) -> int:
        """Slots of a ring (the daemon tells its peer; both build the ring over ``abi.ring_bytes``)."""
        return self._ring(ring).ring_size

    # ------------------------------------------------------------------ internal helpers
    def _vcpu_runnable(self, vcpu: Vcpu) -> None:
        if not self.crashed and vcpu is not self._current:
            self.emit(VcpuRunnable(self.domid, vcpu.vcpu_id))

    def _live(self) -> None:
        if self.crashed:
            what = "destroyed" if self.destroyed else f"crashed ({self.crash_reason})"
            raise HypervisorError(Errno.ESRCH, f"domain {self.domid} {what}")

    def _vcpu(self, vcpu_id: int) -> Vcpu:
        if not isinstance(vcpu_id, int) or not 0 <= vcpu_id < self.max_vcpus:
            raise HypervisorError(Errno.EINVAL, f"domain {self.domid} has no vCPU {vcpu_id!r}")
        return self.vcpus[vcpu_id]

    def _gfn(self, gfn: int) -> int:
        if not isinstance(gfn, int) or not 0 <= gfn < self.gfns:
            raise HypervisorError(Errno.EINVAL,
                                  f"gfn {gfn!r} is outside domain {self.domid} (0..{self.gfns - 1})")
        return gfn

    def _ring(self, ring: RingKind | str) -> MemEventDomain:
        try:
            return self.rings[RingKind(ring)]
        except ValueError:
            raise HypervisorError(Errno.EINVAL, f"no such ring {ring!r}") from None

    @contextlib.contextmanager
    def _as_guest(self, vcpu_id: int) -> Iterator[Vcpu]:
        """Run a guest-originated operation as ``current``; a paused vCPU cannot exit."""
        self._live()
        v = self._vcpu(vcpu_id)
        if v.pause_count:
            raise HypervisorError(Errno.EBUSY, f"domain {self.domid} vCPU {vcpu_id} is paused")
        self._current = v
        try:
            yield v
        finally:
            self._current = None

    def _batch(self, gfns: Sequence[int], op: Callable[[int], Errno | None]) -> list[Errno | None]:
        """Apply a per-gfn op; a crash part-way answers the rest ``ESRCH``."""
        self._live()
        out: list[Errno | None] = []
        for g in gfns:
            if self.crashed:
                out.append(Errno.ESRCH)
            elif not isinstance(g, int) or not 0 <= g < self.gfns:
                out.append(Errno.EINVAL)
            else:
                out.append(op(g))
        return out

    def _batch_valid(self, gfns: Sequence[int],
                     op: Callable[[list[int]], list[Errno | None]]) -> list[Errno | None]:
        """Apply a batch op to the valid gfns at once; an invalid gfn answers ``EINVAL`` in its place.

        For ops that cannot crash the domain part-way (nominate, evict), so
        the whole batch runs in one call of a tight loop.
        """
        self._live()
        n = self.gfns
        if not gfns or (set(map(type, gfns)) == {int} and min(gfns) >= 0 and max(gfns) < n):
            return op(list(gfns))  # all valid (the usual case), checked in C
        valid = [g for g in gfns if type(g) is int and 0 <= g < n]
        if len(valid) == len(gfns):
            return op(valid)
        results = iter(op(valid))
        return [next(results) if type(g) is int and 0 <= g < n else Errno.EINVAL for g in gfns]

    def free_frame(self, gfn: int, released: list[int]) -> None:
        """Give ``gfn``'s frame back to the host (the caller emits FramesReleased)."""
        if self.p2m.set_frame(gfn, False):
            self.budget.release()
            released.append(gfn)

    def alloc_frame(self, gfn: int) -> bool:
        """Charge a frame for ``gfn``; False if the host budget is spent (``ENOMEM``)."""
        if self.p2m.has_frame(gfn):
            return True
        if not self.budget.alloc():
            return False
        self.p2m.set_frame(gfn, True)
        return True

    def spin_on_page(self, vcpu: Vcpu, gfn: int) -> None:
        """A vCPU touched a gfn already on its way back: it waits for the page without a ring slot.

        Xen's vCPU re-executes the access (faulting again) until the type
        settles; a paused vCPU woken by :meth:`page_settled` does the same
        without burning a CPU in between.
        """
        self.counters.spins += 1
        vcpu.spinning_on = gfn
        vcpu.pause()
        self.spinners.setdefault(gfn, []).append(vcpu)

    def page_settled(self, gfn: int) -> None:
        """``gfn`` left ``ram_paging_in`` (paged in or given back): vCPUs spinning on it retry."""
        for v in self.spinners.pop(gfn, ()):
            v.spinning_on = None
            v.unpause()

    def release_frames(self, released: list[int]) -> None:
        if released:
            self.emit(FramesReleased(self.domid, released))

    # ------------------------------------------------------------------ crash / destroy
    def crash(self, reason: str) -> None:
        """``domain_crash``: every vCPU stops for good, rings go, memory returns to the host."""
        if self.crashed:
            return
        log.error("domain %d crashed: %s", self.domid, reason)
        self.crashed = True
        self.crash_reason = reason
        self.spinners.clear()
        for med in self.rings.values():
            med.teardown()
        released = self._drop_all_frames()
        self.emit(DomainCrashed(self.domid, reason))
        self.release_frames(released)

    def destroy(self) -> None:
        """Tear everything down (called by the hypervisor, which forgets the domain)."""
        released: list[int] = []
        if not self.crashed:
            self.crashed = True
            self.crash_reason = "destroyed"
            self.spinners.clear()
            for med in self.rings.values():
                med.teardown()
            released = self._drop_all_frames()
        self.destroyed = True
        self.release_frames(released)
        self.p2m.release()

    def _drop_all_frames(self) -> list[int]:
        released = self.p2m.clear_frames()
        self.budget.release(len(released))
        return released

    # ------------------------------------------------------------------ guest exits
    def guest_access(self, vcpu_id: int, gfn: int, access: int, gla: int | None = None, offset: int = 0) -> None:
        """``hvm_hap_nested_page_fault``: the vCPU could not access ``gfn`` directly.

        ``offset`` is where in the page the access went (``gpa & 0xfff``, what
        an access event reports).  With a frame present, an access the p2m
        access right forbids goes to ``p2m_mem_access_check``; otherwise a
        paging type populates (pausing the vCPU); a write to a shared page
        unshares; anything else was a spurious fault and the guest simply retries.
        """
        all_bits = abi.ACCESS_R | abi.ACCESS_W | abi.ACCESS_X
        if not isinstance(access, int) or access <= 0 or access & ~all_bits:
            raise HypervisorError(Errno.EINVAL, f"bad access bits {access!r}")
        if not isinstance(offset, int) or not 0 <= offset < abi.PAGE_SIZE:
            raise HypervisorError(Errno.EINVAL, f"offset {offset!r} is not within a page")
        with self._as_guest(vcpu_id) as v:
            self._gfn(gfn)
            self.counters.faults += 1
            p2m = self.p2m
            p2mt = p2m.get_type(gfn)
            if p2m.has_frame(gfn) and _access.is_violation(access, p2m.get_access(gfn)):
                self.counters.access_violations += 1
                _access.p2m_mem_access_check(self, v, gfn, offset, access, gla)
            elif p2mt in abi.PAGING_TYPES:
                _paging.p2m_mem_paging_populate(self, gfn, v)
            elif p2mt == P2MType.ram_shared and access & abi.ACCESS_W:
                _sharing.mem_sharing_unshare_page(self, v, gfn)
            elif p2mt == REMOVED_TYPE:
                raise HypervisorError(Errno.EINVAL, f"gfn {gfn:#x} of domain {self.domid} has no memory")
            # else: spurious (already fixed up); the guest retries

    def hvm_trap(self, vcpu_id: int, reason: MemEventReason | int, value: int, old: int,
                 gla: int | None = None) -> None:
        """``hvm_memory_event_traps``: a CR0/CR3/CR4 write or an INT3.

        ``value``/``old`` are the new and previous register values; for INT3
        and SINGLESTEP pass the instruction's gfn as ``value`` (Xen's
        ``paging_gva_to_gfn`` of ``gla``; hvemu has no guest page tables) and
        0 as ``old``.  A step is reported only while the vCPU single-steps.
        """
        reason = self._trap_reason(reason)
        with self._as_guest(vcpu_id) as v:
            if reason == MemEventReason.SINGLESTEP:
                if not v.single_step:
                    return  # no monitor trap flag set: the instruction just ran
                self.counters.single_steps += 1
            self.counters.traps += 1
            _access.hvm_memory_event_traps(self, v, self.hvm_params.get(reason, 0), reason, value, old, gla,
                                           self.ctrlreg_masks.get(reason, 0))

    def decrease_reservation(self, vcpu_id: int, gfns: Sequence[int]) -> list[Errno | None]:
        """XENMEM_decrease_reservation: the guest gives gfns back (balloon out).

        A paged-out gfn has nothing to free but the pager's copy: a
        ``DROP_PAGE`` request tells it (no pause, the seed's "tough bananas"
        if it is lost).  Like Xen's, the hypercall is preemptible: before each
        extent it checks whether it must stop, and it stops once a put has
        paused this vCPU (marked for ring congestion, or asleep for a slot),
        so one call never eats the slots reserved for other vCPUs.  The
        result is then shorter than ``gfns``: a continuation, which the guest
        issues with the rest once its vCPU runs again.
        """
        with self._as_guest(vcpu_id) as v:
            released: list[int] = []
            out: list[Errno | None] = []
            for g in gfns:
                if v.pause_count:  # hypercall_preempt_check(): continue later
                    break
                out += self._batch([g], lambda g: _paging.guest_remove_page(self, g, v, released))
            self.release_frames(released)
            return out

    def unshare_enomem(self, vcpu_id: int, gfn: int) -> None:
        """The ENOMEM-on-unshare event of ``mem_sharing_alloc_page`` (no ring: the domain crashes)."""
        with self._as_guest(vcpu_id) as v:
            self._gfn(gfn)
            _sharing.mem_sharing_notify_enomem(self, v, gfn)

    # ------------------------------------------------------------------ tool ops
    def foreign_map(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Map gfns from another domain; each gfn mapped holds a page reference until :meth:`foreign_unmap`.

        Paged ones populate (no pause) and answer ``ENOENT``; while a mapping
        references a page, nominate and evict of it answer ``EBUSY``.
        """
        def map_one(g: int) -> Errno | None:
            rc = _paging.foreign_map_gfn(self, g)
            if rc is None:
                self.p2m.get_page(g)
            return rc
        return self._batch(gfns, map_one)

    def foreign_unmap(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Drop one mapping's reference per gfn (``ENOENT`` where none is held)."""
        return self._batch(gfns, lambda g: None if self.p2m.put_page(g) else Errno.ENOENT)

    def _paging_ring(self) -> None:
        """Paging domctls need a pager: ``ENODEV`` without a paging ring (Xen 4.2's ``mem_paging_memop``)."""
        self._live()
        if not self.mem_paging.enabled:
            raise HypervisorError(Errno.ENODEV, f"domain {self.domid} has no paging ring")

    def paging_nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        self._paging_ring()
        return self._batch_valid(gfns, lambda valid: _paging.p2m_mem_paging_nominate(self, valid))

    def paging_evict(self, gfns: Sequence[int]) -> list[Errno | None]:
        self._paging_ring()
        released: list[int] = []
        out = self._batch_valid(gfns, lambda valid: _paging.p2m_mem_paging_evict(self, valid, released))
        self.release_frames(released)
        if self.tracer is not None and released:
            self.tracer(TraceEvent.EVICT, self.domid, _PAGING_RING, NO_VCPU, released[0], len(released))
        return out

    def paging_prep(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Allocate frames for paged gfns; they stay ``ram_paging_in`` until a response resumes them."""
        self._paging_ring()
        return self._batch(gfns, lambda g: _paging.p2m_mem_paging_prep(self, g))

    def paging_load(self, gfns: Sequence[int], fill: Callable[[int], None]) -> list[Errno | None]:
        """Allocate, let ``fill(gfn)`` write the frame, then make it ``ram_rw`` (Xen 4.2's prep with a buffer).

        ``fill`` is called only for a frame allocated by this call: an existing
        frame holds the guest's data and is never overwritten.  A fill raising
        ``OSError`` leaves that gfn as it was (``ENOMEM``).
        """
        self._paging_ring()
        out = self._batch(gfns, lambda g: _paging.p2m_mem_paging_load(self, g, fill))
        if self.tracer is not None and None in out:
            first = next(g for g, r in zip(gfns, out, strict=True) if r is None)
            self.tracer(TraceEvent.LOAD, self.domid, _PAGING_RING, NO_VCPU, first, out.count(None))
        return out

    def access_set(self, gfns: Sequence[int], access: int) -> list[Errno | None]:
        """``p2m_set_mem_access`` on each gfn (any type: the right applies once it has a frame).

        As in Xen, ``access`` may be ``abi.ACCESS_DEFAULT`` (the p2m's default
        access) and the gfn ``abi.DEFAULT_ACCESS_GFN`` (``~0``) sets the default
        itself, which a gfn gets when it is given back and populated again.
        """
        if access == abi.ACCESS_DEFAULT:
            access = self.default_access
        if not isinstance(access, int) or not P2M.valid_access(access):
            raise HypervisorError(Errno.EINVAL, f"bad p2m access {access!r}")
        self._live()
        pages = [g for g in gfns if g != abi.DEFAULT_ACCESS_GFN]
        if len(pages) < len(gfns):
            self.default_access = access
        results = iter(self._batch(pages, lambda g: _access.p2m_set_mem_access(self, g, access)))
        return [None if g == abi.DEFAULT_ACCESS_GFN else next(results) for g in gfns]

    def access_get(self, gfn: int) -> int:
        """``p2m_get_mem_access``: the gfn's access (the default for ``abi.DEFAULT_ACCESS_GFN``).

        ``ESRCH`` for a gfn with no frame behind it, as Xen answers for an invalid mfn.
        """
        self._live()
        if gfn == abi.DEFAULT_ACCESS_GFN:
            return self.default_access
        self._gfn(gfn)
        if not self.p2m.has_frame(gfn):
            raise HypervisorError(Errno.ESRCH, f"gfn {gfn:#x} of domain {self.domid} has no frame")
        return self.p2m.get_access(gfn)

    def pause_by_controller(self) -> None:
        """``domain_pause_by_systemcontroller`` (``xl pause``): one counted pause on every vCPU.

        Idempotent, as Xen's.  A guest vCPU running on shared memory latches it
        at its next step (the p2m segment's vCPU byte) and waits in an exit.
        """
        self._live()
        if self.paused_by_controller:
            return
        self.paused_by_controller = True
        for v in self.vcpus:
            self.p2m.set_vcpu_debug(v.vcpu_id, self.p2m.vcpu_debug[v.vcpu_id] | abi.VCPU_DEBUG_PAUSED)
            v.pause()

    def unpause_by_controller(self) -> None:
        """``domain_unpause_by_systemcontroller`` (``xl unpause``): release that pause (idempotent)."""
        self._live()
        if not self.paused_by_controller:
            return
        self.paused_by_controller = False
        for v in self.vcpus:
            self.p2m.set_vcpu_debug(v.vcpu_id, self.p2m.vcpu_debug[v.vcpu_id] & ~abi.VCPU_DEBUG_PAUSED)
            v.unpause()

    def debug_control(self, vcpu_id: int, single_step: bool) -> None:
        """XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON/OFF for one vCPU (the guest latches it on its next step)."""
        self._live()
        v = self._vcpu(vcpu_id)
        v.single_step = bool(single_step)
        flags = self.p2m.vcpu_debug[vcpu_id] & ~abi.VCPU_DEBUG_SINGLE_STEP
        self.p2m.set_vcpu_debug(vcpu_id, flags | (abi.VCPU_DEBUG_SINGLE_STEP if single_step else 0))

    def inject_trap(self, vcpu_id: int, vector: int) -> None:
        """``HVMOP_inject_trap``: deliver ``vector`` to the vCPU when it next enters the guest.

        ``EBUSY`` while one is still pending, as in Xen.  xen-access re-injects
        the INT3 it was told about, so the guest's own handler still runs.
        """
        self._live()
        v = self._vcpu(vcpu_id)
        if not isinstance(vector, int) or not 0 <= vector < 256:
            raise HypervisorError(Errno.EINVAL, f"bad trap vector {vector!r}")
        if v.pending_trap is not None:
            raise HypervisorError(Errno.EBUSY, f"vCPU {vcpu_id} of domain {self.domid} has a trap pending")
        v.pending_trap = vector
        self.counters.traps_injected += 1

    def take_pending_trap(self, vcpu_id: int) -> int | None:
        """The trap to deliver as the vCPU returns to the guest (the driver calls it on each exit's reply)."""
        v = self.vcpus[vcpu_id]
        vector, v.pending_trap = v.pending_trap, None
        return vector

    def set_hvm_param(self, reason: MemEventReason | int, mode_flags: int, mask: int = 0) -> None:
        """HVM_PARAM_MEMORY_EVENT_*: ``abi.HVMPME_*`` mode (disabled/async/sync) and onchangeonly.

        ``mask`` (CR0/CR3/CR4 only): a write that changes only these bits sends
        no event, as Xen 4.17's ``xc_monitor_write_ctrlreg(..., bitmask, ...)``.
        """
        self._live()
        reason = self._trap_reason(reason)
        valid = abi.HVMPME_MODE_MASK | abi.HVMPME_ONCHANGEONLY
        mode = mode_flags & abi.HVMPME_MODE_MASK if isinstance(mode_flags, int) else -1
        if mode not in (abi.HVMPME_MODE_DISABLED, abi.HVMPME_MODE_ASYNC, abi.HVMPME_MODE_SYNC) \
                or mode_flags & ~valid:
            raise HypervisorError(Errno.EINVAL, f"bad HVMPME mode flags {mode_flags!r}")
        if reason in NO_ONCHANGEONLY and mode_flags & abi.HVMPME_ONCHANGEONLY:
            raise HypervisorError(Errno.EINVAL, f"{reason.name} does not take onchangeonly")
        if not isinstance(mask, int) or not 0 <= mask < 1 << 64 or (mask and reason in NO_ONCHANGEONLY):
            raise HypervisorError(Errno.EINVAL, f"bad bitmask {mask!r} for {reason.name} (CR0/CR3/CR4 take one)")
        self.hvm_params[reason] = mode_flags
        self.ctrlreg_masks[reason] = mask

    def _trap_reason(self, reason: MemEventReason | int) -> MemEventReason:
        try:
            r = MemEventReason(reason)
        except ValueError:
            r = MemEventReason.UNKNOWN
        if r not in TRAP_REASONS:
            raise HypervisorError(Errno.EINVAL, f"{reason!r} is not a CR0/CR3/CR4/INT3/SINGLESTEP trap")
        return r

    # ------------------------------------------------------------------ mem_event domctls
    def mem_event_enable(self, ring: RingKind | str, buffer: Any) -> None:
        """Enable a ring over the daemon's page (``EBUSY`` if it already is)."""
        self._live()
        self._ring(ring).enable(buffer)

    def mem_event_disable(self, ring: RingKind | str) -> None:
        """Disable a ring (``ENOENT`` if it is not enabled).

        Disabling the paging ring also makes every ``ram_paging_in`` gfn that
        has a frame ``ram_rw``: the pager prepared and filled it and no response
        can come any more (this is how a pager's clean stop pages everything
        back in with prep alone).  gfns without a frame stay as they are.
        """
        self._live()
        med = self._ring(ring)
        med.disable()
        if med.kind == RingKind.paging:
            self.counters.finalized_on_disable += _paging.finalize_paging_in(self)

    def mem_event_resume(self, ring: RingKind | str) -> None:
        """Drain *all* responses, validate each, then wake ring-blocked vCPUs.

        Whatever the daemon wrote, this returns normally: bad responses are
        rejected and counted, a corrupt ring crashes this domain only.
        """
        self._live()
        med = self._ring(ring)
        if not med.enabled:
            raise HypervisorError(Errno.ENOSYS, f"the {med.kind} ring of domain {self.domid} is not enabled")
        fixup: ResponseFixup | None = None
        if med.kind == RingKind.paging:
            fixup = functools.partial(_paging.p2m_mem_paging_resume, self)
        try:
            med.resume(fixup)
        except Exception as exc:  # never let daemon input escape as anything but a crash
            log.exception("domain %d: resume of the %s ring failed", self.domid, med.kind)
            self.crash(f"{med.kind} resume failed: {exc!r}")

    # ------------------------------------------------------------------ stats
    def stats(self) -> DomainStats:
        """Counters for users, each ring's under its name (the hypervisor process adds its own facts)."""
        p2m = self.p2m
        paging, access, sharing = (self.rings[k].stats() for k in (RingKind.paging, RingKind.access,
                                                                   RingKind.sharing))
        rings = (paging, access, sharing)
        return DomainStats(
            **msgspec.structs.asdict(self.counters), paging=paging, access=access, sharing=sharing,
            domid=self.domid, name=self.name, policy=self.policy, abi=self.ring_abi, max_vcpus=self.max_vcpus,
            gfns=self.gfns,
            crashed=self.crashed, paused=self.paused_by_controller, resident=p2m.resident,
            ram_rw=p2m.type_count(P2MType.ram_rw), paging_out=p2m.type_count(P2MType.ram_paging_out),
            paged=p2m.type_count(P2MType.ram_paged), paging_in=p2m.type_count(P2MType.ram_paging_in),
            removed=p2m.type_count(REMOVED_TYPE),
            vcpus_paused=sum(1 for v in self.vcpus if v.pause_count),
            vcpus_blocked=sum(1 for v in self.vcpus if v.pause_flags),
            events_put=sum(r.put for r in rings), events_lost=sum(r.lost for r in rings))
