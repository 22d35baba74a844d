"""The physical-to-machine table of one domain, at three bytes per gfn.

A 1 GiB guest has 262,144 gfns; a Python object per gfn would cost well over a
hundred bytes each and minutes of GC time.  So the table is flat bytes:

* the p2m *type* and *access* of every gfn live in one buffer with the layout
  of :func:`hvemu.abi.p2m_type_index` / :func:`hvemu.abi.p2m_access_index`.
  The driver passes an mmap of a shared segment that the guest maps read-only
  (the guest checks it before touching memory directly); the hypervisor is its
  only writer, one aligned byte store per change.
* whether the gfn has a frame (its ``mfn_valid``) is private: a ``bytearray``.
  In Xen a ``ram_paging_in`` entry with a valid mfn is "prepared", without one
  it is Xen 4.2's ``ram_paging_in_start``; hvemu keeps the single type of
  DESIGN section 5 and tells the two apart by this byte.

Page references taken by foreign mappings (Xen's ``get_page`` on the frame)
are a sparse count per gfn: a referenced page cannot be nominated or evicted
(``EBUSY``), so a mapper and a pager meet as on Xen.

Per-type counts and the resident count are kept incrementally, so ``stats()``
never scans; :meth:`P2M.recount` scans (in C, via ``bytes.count``) to check them.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from typing import Any

from hvemu import abi
from hvemu.abi import P2MAccess, P2MType

#: Xen's ``p2m->default_access``: what a fresh or re-populated entry gets.
DEFAULT_ACCESS = P2MAccess.rwx
#: p2m types that are RAM backed by a frame of the domain (``p2m_is_ram`` minus paging).
RAM_TYPES = frozenset({P2MType.ram_rw, P2MType.ram_logdirty, P2MType.ram_ro, P2MType.ram_shared})
#: ``p2m_is_pageable``: what nominate accepts.
PAGEABLE_TYPES = frozenset({P2MType.ram_rw, P2MType.ram_logdirty})
#: What a gfn given back by the guest (XENMEM_decrease_reservation) becomes:
#: nothing mapped, as ``guest_physmap_remove_page`` leaves it in Xen.
REMOVED_TYPE = P2MType.invalid

_TYPE_VALUES = frozenset(int(t) for t in P2MType)
_ACCESS_VALUES = frozenset(int(a) for a in P2MAccess)


class P2M:
    """Types, access rights and frame presence of ``gfns`` guest frames."""

    def __init__(self, gfns: int, buffer: Any = None) -> None:
        if gfns <= 0:
            raise ValueError(f"a p2m needs at least one gfn, not {gfns}")
        size = abi.p2m_table_size(gfns)
        if buffer is None:
            buffer = bytearray(size)
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("the p2m buffer must be writable")
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if len(view) < size:
            raise ValueError(f"the p2m buffer is {len(view)} bytes, {gfns} gfns need {size}")
        # The abi owns the layout; the table is two contiguous byte arrays
        # (checked here, so that a layout change fails loudly, not silently).
        t0 = abi.p2m_type_index(gfns, 0)
        a0 = abi.p2m_access_index(gfns, 0)
        if gfns > 1 and (abi.p2m_type_index(gfns, gfns - 1) != t0 + gfns - 1
                         or abi.p2m_access_index(gfns, gfns - 1) != a0 + gfns - 1):
            raise ValueError("hvemu.core.p2m expects the type and access arrays to be contiguous")
        self.gfns = gfns
        self._buffer_view = view
        self.types: memoryview = view[t0:t0 + gfns]
        self.access: memoryview = view[a0:a0 + gfns]
        d0 = abi.p2m_vcpu_debug_index(gfns, 0)
        #: Per-vCPU debug state the guest reads (single-step), one byte each.
        self.vcpu_debug: memoryview = view[d0:d0 + abi.HVM_MAX_VCPUS]
        self.frames = bytearray(gfns)
        self._type_counts = [0] * 256
        self.resident = 0
        #: Page references held by foreign mappings, per gfn (absent: none).
        self.refs: dict[int, int] = {}

    # ------------------------------------------------------------------ set-up
    def initialise(self, resident: int, default_access: int = DEFAULT_ACCESS) -> None:
        """gfns ``[0, resident)`` are ``ram_rw`` with a frame, the rest ``ram_paged`` without."""
        if not 0 <= resident <= self.gfns:
            raise ValueError(f"resident must be within 0..{self.gfns}, not {resident}")
        paged = self.gfns - resident
        self.types[:] = bytes([P2MType.ram_rw]) * resident + bytes([P2MType.ram_paged]) * paged
        self.access[:] = bytes([default_access]) * self.gfns
        self.frames[:] = b"\x01" * resident + b"\x00" * paged
        self.vcpu_debug[:] = bytes(len(self.vcpu_debug))
        self._type_counts = [0] * 256
        self._type_counts[P2MType.ram_rw] = resident
        self._type_counts[P2MType.ram_paged] = paged
        self.resident = resident

    # ------------------------------------------------------------------ queries
    def in_range(self, gfn: int) -> bool:
        return 0 <= gfn < self.gfns

    def get_type(self, gfn: int) -> int:
        return self.types[gfn]

    def get_access(self, gfn: int) -> int:
        return self.access[gfn]

    def has_frame(self, gfn: int) -> bool:
        return self.frames[gfn] != 0

    def needs_frame(self, gfn: int) -> bool:
        """True when a prep of ``gfn`` would allocate a frame now (a paging type without one).

        The driver's load uses it to fill only frames that prep just allocated:
        a frame that already exists holds the guest's data, never overwrite it.
        """
        return self.types[gfn] in abi.PAGING_TYPES and not self.frames[gfn]

    def type_count(self, p2mt: int) -> int:
        return self._type_counts[p2mt]

    # ------------------------------------------------------------------ updates
    def set_type(self, gfn: int, p2mt: int) -> None:
        """One byte store in the shared table (the guest may be reading it concurrently)."""
        old = self.types[gfn]
        if old == p2mt:
            return
        self.types[gfn] = p2mt
        self._type_counts[old] -= 1
        self._type_counts[p2mt] += 1

    def transition(self, gfns: Sequence[int], from_types: Collection[int], to: int) -> list[bool]:
        """Per gfn in order: a gfn with a frame and a type in ``from_types`` becomes ``to``.

        Returns, per gfn, whether it changed.  The batch form of ``has_frame`` +
        ``get_type`` + ``set_type``, for the pager's nominate and evict of a
        whole batch: one tight loop instead of a few method calls per gfn,
        and slice operations for a run of consecutive gfns that all qualify
        (a clock pager's batch).  A gfn named twice is judged each time on
        its type at that point, as the per-gfn form would.  A page a foreign
        mapping references never changes (Xen's page count check).
        """
        types, frames, counts, refs = self.types, self.frames, self._type_counts, self.refs
        n = len(gfns)
        if (n > 1 and gfns[n - 1] - gfns[0] == n - 1 and list(gfns) == list(range(gfns[0], gfns[0] + n))
                and not any(gfns[0] <= g < gfns[0] + n for g in refs)):
            lo, hi = gfns[0], gfns[0] + n
            before = types[lo:hi].tobytes()
            moved = {t: before.count(t) for t in from_types if t != to}
            if sum(moved.values()) == n and frames.find(0, lo, hi) < 0:
                types[lo:hi] = bytes([to]) * n
                for t, k in moved.items():
                    counts[t] -= k
                counts[to] += n
                return [True] * n
        changed: list[bool] = []
        for g in gfns:
            old = types[g]
            if frames[g] and old in from_types and old != to and g not in refs:
                types[g] = to
                counts[old] -= 1
                counts[to] += 1
                changed.append(True)
            else:
                changed.append(False)
        return changed

    def drop_frames(self, gfns: Sequence[int]) -> int:
        """Mark the frames of ``gfns`` (each present, each named once) absent; returns how many.

        The resident count and the frame budget follow the return value, so a
        gfn without a frame (or named twice) is a bookkeeping bug: refused.
        """
        frames = self.frames
        if len(set(gfns)) != len(gfns) or not all(frames[g] for g in gfns):
            raise ValueError("drop_frames: every gfn must have a frame and be named once")
        for g in gfns:
            frames[g] = 0
        self.resident -= len(gfns)
        return len(gfns)

    def get_page(self, gfn: int) -> None:
        """Take a reference on ``gfn``'s frame (a foreign mapping of it)."""
        self.refs[gfn] = self.refs.get(gfn, 0) + 1

    def put_page(self, gfn: int) -> bool:
        """Drop one reference; False (nothing done) if ``gfn`` holds none."""
        n = self.refs.get(gfn, 0)
        if n == 0:
            return False
        if n == 1:
            del self.refs[gfn]
        else:
            self.refs[gfn] = n - 1
        return True

    def drop_refs(self, gfn: int) -> None:
        """The gfn's page left the domain (given back): its references go with it."""
        self.refs.pop(gfn, None)

    def set_access(self, gfn: int, access: int) -> None:
        self.access[gfn] = access

    def set_vcpu_debug(self, vcpu: int, flags: int) -> None:
        self.vcpu_debug[vcpu] = flags

    def set_frame(self, gfn: int, present: bool) -> bool:
        """Mark the frame present or absent; True if that changed anything."""
        was = self.frames[gfn] != 0
        if was == present:
            return False
        self.frames[gfn] = 1 if present else 0
        self.resident += 1 if present else -1
        return True

    def clear_frames(self) -> list[int]:
        """Drop every frame at once (crash, destroy); returns the gfns that had one."""
        had = list(itertools.compress(range(self.gfns), self.frames))
        self.frames[:] = bytes(self.gfns)
        self.resident = 0
        self.refs.clear()
        return had

    # ------------------------------------------------------------------ checks
    @staticmethod
    def valid_type(value: int) -> bool:
        return value in _TYPE_VALUES

    @staticmethod
    def valid_access(value: int) -> bool:
        return value in _ACCESS_VALUES

    def recount(self) -> tuple[dict[int, int], int]:
        """Scan the whole table (C speed) and return (count per type, resident frames)."""
        raw = self.types.tobytes()
        counts = {int(t): raw.count(bytes([t])) for t in P2MType}
        return {t: n for t, n in counts.items() if n}, self.frames.count(1)

    def check_counts(self) -> None:
        """Assert the incremental counts agree with a scan (tests and debugging)."""
        counts, resident = self.recount()
        kept = {t: n for t, n in enumerate(self._type_counts) if n}
        if counts != kept or resident != self.resident:
            raise AssertionError(f"p2m counts drifted: kept {kept}/{self.resident}, "
                                 f"scanned {counts}/{resident}")

    def private_bytes_per_gfn(self) -> int:
        return len(self.frames) // self.gfns

    def release(self) -> None:
        """Drop the views into the driver's buffer so that its mmap can be closed."""
        self.types.release()
        self.access.release()
        self.vcpu_debug.release()
        self._buffer_view.release()
