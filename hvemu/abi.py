"""The binary contract: ring page layout, entry codecs and every constant.

This is the *only* module that knows a byte offset or a flag value.  It is
Xen 4.2's ``public/io/ring.h`` + ``public/mem_event.h`` as the seed patch saw
them (DESIGN.md section 2), plus today's ``vm_event`` entry so that the generic
ring in :mod:`hvemu.ring` is shown to work with a second ABI.

Everything here is plain data and pure functions: the guest, the pager and any
third-party daemon may import it freely.

Why one module of ~600 lines: it is the ABI, every byte offset and number the processes and
the C header share, and one place for each of them is the point (the layout tests read it whole).
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import Protocol, TypeVar

import msgspec

# --------------------------------------------------------------------------
# Page and shared-ring header (struct mem_event_sring, DEFINE_RING_TYPES)
# --------------------------------------------------------------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MiB = 1 << 20


def mib_to_pages(mib: float) -> int:
    """Whole pages in ``mib`` MiB (rounded down: a size never claims memory it was not given)."""
    return int(mib * MiB) // PAGE_SIZE


def pages_to_mib(pages: float) -> float:
    return pages * PAGE_SIZE / MiB


#: Offsets of the four u32 indices of the shared ring header.
REQ_PROD_OFFSET = 0
REQ_EVENT_OFFSET = 4
RSP_PROD_OFFSET = 8
RSP_EVENT_OFFSET = 12
#: Private/pad area of the sring header (always zero here).
PAD_OFFSET = 16
PAD_SIZE = 48
#: ``ring[]`` starts here.
RING_ENTRIES_OFFSET = 64
#: Header word indexes in a memoryview cast to ``'I'`` (offset / 4).
REQ_PROD_WORD = REQ_PROD_OFFSET // 4
REQ_EVENT_WORD = REQ_EVENT_OFFSET // 4
RSP_PROD_WORD = RSP_PROD_OFFSET // 4
RSP_EVENT_WORD = RSP_EVENT_OFFSET // 4

#: RING_IDX is a free-running u32.
RING_IDX_MASK = 0xFFFFFFFF


def ring_size(entry_size: int, page_size: int = PAGE_SIZE) -> int:
    """Xen's ``__RING_SIZE``: the largest power of two that fits the page."""
    if entry_size <= 0:
        raise ValueError(f"entry size must be positive, not {entry_size}")
    fit = (page_size - RING_ENTRIES_OFFSET) // entry_size
    if fit < 1:
        raise ValueError(f"a {entry_size}-byte entry does not fit a {page_size}-byte page")
    return 1 << (fit.bit_length() - 1)


# --------------------------------------------------------------------------
# mem_event_st (the seed's era)
# --------------------------------------------------------------------------


class MemEventType(enum.IntEnum):
    SHARED = 0
    PAGING = 1
    ACCESS = 2


class MemEventFlag(enum.IntFlag):
    VCPU_PAUSED = 1 << 0
    DROP_PAGE = 1 << 1
    EVICT_FAIL = 1 << 2
    FOREIGN = 1 << 3
    DUMMY = 1 << 4


#: Every flag bit this ABI defines; other bits in a response are ignored (and counted), as Xen does.
MEM_EVENT_KNOWN_FLAGS = int(
    MemEventFlag.VCPU_PAUSED
    | MemEventFlag.DROP_PAGE
    | MemEventFlag.EVICT_FAIL
    | MemEventFlag.FOREIGN
    | MemEventFlag.DUMMY
)


class MemEventReason(enum.IntEnum):
    UNKNOWN = 0
    VIOLATION = 1
    CR0 = 2
    CR3 = 3
    CR4 = 4
    INT3 = 5
    SINGLESTEP = 6


class P2MType(enum.IntEnum):
    """Xen's ``p2m_type_t``, number for number (``xen/include/asm-x86/p2m.h`` of RELEASE-4.2.0).

    ABI: daemons read these bytes from the shared p2m table.  ``invalid``
    (nothing mapped) is what a gfn the guest gave back becomes.
    """

    ram_rw = 0
    invalid = 1
    ram_logdirty = 2
    ram_ro = 3
    mmio_dm = 4
    mmio_direct = 5
    populate_on_demand = 6
    grant_map_rw = 7
    grant_map_ro = 8
    ram_paging_out = 9
    ram_paged = 10
    ram_paging_in = 11
    ram_shared = 12
    ram_broken = 13


class P2MAccess(enum.IntEnum):
    """Xen's ``p2m_access_t``: r=1, w=2, x=4 bits plus two automatic kinds."""

    n = 0
    r = 1
    w = 2
    rw = 3
    x = 4
    rx = 5
    wx = 6
    rwx = 7
    rx2rw = 8
    n2rwx = 9


ACCESS_R = 1
ACCESS_W = 2
ACCESS_X = 4

#: ``HVMMEM_access_default``: as the access of a set, "the p2m's default access".
ACCESS_DEFAULT = 10
#: The gfn (``~0ull``) that makes ``set_mem_access`` / ``get_mem_access`` address the
#: p2m's default access instead of a page (Xen's convention, used by xen-access).
DEFAULT_ACCESS_GFN = (1 << 64) - 1

#: Rights each ``p2m_access_t`` grants *without* an event.  ``rx2rw`` grants
#: r+x and converts to rw on a write (no event); ``n2rwx`` grants nothing and
#: converts to rwx on any access (event sent, vCPU not paused).
ACCESS_RIGHTS: dict[int, int] = {
    P2MAccess.n: 0,
    P2MAccess.r: ACCESS_R,
    P2MAccess.w: ACCESS_W,
    P2MAccess.rw: ACCESS_R | ACCESS_W,
    P2MAccess.x: ACCESS_X,
    P2MAccess.rx: ACCESS_R | ACCESS_X,
    P2MAccess.wx: ACCESS_W | ACCESS_X,
    P2MAccess.rwx: ACCESS_R | ACCESS_W | ACCESS_X,
    P2MAccess.rx2rw: ACCESS_R | ACCESS_X,
    P2MAccess.n2rwx: 0,
}

#: p2m types a vCPU may read directly, and the one it may also write.
READABLE_TYPES = frozenset({P2MType.ram_rw, P2MType.ram_ro, P2MType.ram_shared, P2MType.ram_logdirty})
WRITABLE_TYPES = frozenset({P2MType.ram_rw})
#: The paging types (``p2m_is_paging``).
PAGING_TYPES = frozenset({P2MType.ram_paging_out, P2MType.ram_paged, P2MType.ram_paging_in})

# --------------------------------------------------------------------------
# The p2m table as the guest sees it: a shared, read-only (for the guest)
# segment.  The hypervisor is its only writer.
#   [0, gfns)                      p2m_type of each gfn (u8, P2MType)
#   [gfns, 2*gfns)                 p2m_access of each gfn (u8, P2MAccess)
#   [2*gfns, 2*gfns+HVM_MAX_VCPUS) debug state of each vCPU (u8, VCPU_DEBUG_*),
#                                  latched by the guest before each step
# --------------------------------------------------------------------------

#: HVM_MAX_VCPUS of the era: the most vCPUs a domain may have.
HVM_MAX_VCPUS = 128
P2M_BYTES_PER_GFN = 2
#: The vCPU single-steps (XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON): it reports each step.
VCPU_DEBUG_SINGLE_STEP = 1 << 0
#: The toolstack paused the domain (``xl pause``): the vCPU stops at its next step, until unpaused.
VCPU_DEBUG_PAUSED = 1 << 1


def p2m_table_size(gfns: int) -> int:
    return P2M_BYTES_PER_GFN * gfns + HVM_MAX_VCPUS


def p2m_type_index(gfns: int, gfn: int) -> int:
    return gfn


def p2m_access_index(gfns: int, gfn: int) -> int:
    return gfns + gfn


def p2m_vcpu_debug_index(gfns: int, vcpu: int) -> int:
    return P2M_BYTES_PER_GFN * gfns + vcpu


# --------------------------------------------------------------------------
# hvm_memory_event_traps: HVM_PARAM_MEMORY_EVENT_* values (hvm/params.h)
# --------------------------------------------------------------------------

HVMPME_MODE_MASK = 3
HVMPME_MODE_DISABLED = 0
HVMPME_MODE_ASYNC = 1
HVMPME_MODE_SYNC = 2
HVMPME_ONCHANGEONLY = 1 << 2

# Bit positions in the u16 at entry offset 36.
BIT_ACCESS_R = 1 << 0
BIT_ACCESS_W = 1 << 1
BIT_ACCESS_X = 1 << 2
BIT_GLA_VALID = 1 << 3
KNOWN_BITS = BIT_ACCESS_R | BIT_ACCESS_W | BIT_ACCESS_X | BIT_GLA_VALID

#: Field offsets inside one 40-byte ``mem_event_st``.
MEM_EVENT_FIELDS: dict[str, tuple[int, int]] = {
    "type": (0, 2),
    "flags": (2, 2),
    "vcpu_id": (4, 4),
    "gfn": (8, 8),
    "offset": (16, 8),
    "gla": (24, 8),
    "p2mt": (32, 4),
    "bits": (36, 2),
    "reason": (38, 2),
}
MEM_EVENT_SIZE = 40
_MEM_EVENT_STRUCT = struct.Struct("<HHIQQQIHH")
assert _MEM_EVENT_STRUCT.size == MEM_EVENT_SIZE


class MemEvent(msgspec.Struct, gc=False):
    """One ``mem_event_request_t`` / ``mem_event_response_t`` (same struct)."""

    type: int = MemEventType.PAGING
    flags: int = 0
    vcpu_id: int = 0
    gfn: int = 0
    offset: int = 0
    gla: int = 0
    p2mt: int = 0
    access_r: bool = False
    access_w: bool = False
    access_x: bool = False
    gla_valid: bool = False
    reason: int = MemEventReason.UNKNOWN
    #: Bits 4..15 of the bitfield word: must be zero; kept so that a
    #: validator can reject an entry that sets them.
    reserved_bits: int = 0


class EntryCodec(Protocol):
    """What the generic ring needs from an entry definition."""

    size: int

    def pack_into(self, buf: memoryview, offset: int, entry: object) -> None: ...

    def unpack_from(self, buf: memoryview, offset: int) -> object: ...


E = TypeVar("E")


class MemEventCodec:
    """Encode/decode :class:`MemEvent` to the 40-byte little-endian entry."""

    size = MEM_EVENT_SIZE

    @staticmethod
    def pack_into(buf: memoryview | bytearray, offset: int, ev: MemEvent) -> None:
        bits = (
            (BIT_ACCESS_R if ev.access_r else 0)
            | (BIT_ACCESS_W if ev.access_w else 0)
            | (BIT_ACCESS_X if ev.access_x else 0)
            | (BIT_GLA_VALID if ev.gla_valid else 0)
            | (ev.reserved_bits << 4)
        )
        _MEM_EVENT_STRUCT.pack_into(
            buf, offset, ev.type, ev.flags, ev.vcpu_id, ev.gfn, ev.offset,
            ev.gla, ev.p2mt, bits, ev.reason,
        )

    @staticmethod
    def unpack_from(buf: memoryview | bytes | bytearray, offset: int) -> MemEvent:
        t, fl, vcpu, gfn, off, gla, p2mt, bits, reason = _MEM_EVENT_STRUCT.unpack_from(buf, offset)
        return MemEvent(
            t, fl, vcpu, gfn, off, gla, p2mt,
            bool(bits & BIT_ACCESS_R), bool(bits & BIT_ACCESS_W),
            bool(bits & BIT_ACCESS_X), bool(bits & BIT_GLA_VALID),
            reason, bits >> 4,
        )

    @classmethod
    def encode(cls, ev: MemEvent) -> bytes:
        out = bytearray(MEM_EVENT_SIZE)
        cls.pack_into(out, 0, ev)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> MemEvent:
        if len(data) != MEM_EVENT_SIZE:
            raise ValueError(f"mem_event entry is {MEM_EVENT_SIZE} bytes, got {len(data)}")
        return cls.unpack_from(data, 0)


MEM_EVENT_RING_SIZE = ring_size(MEM_EVENT_SIZE)
assert MEM_EVENT_RING_SIZE == 64

# --------------------------------------------------------------------------
# vm_event_st (Xen >= 4.5): a second entry definition for the same ring code.
# Only the common header is decoded; the per-reason union and the register
# block travel as an opaque payload.
# --------------------------------------------------------------------------

VM_EVENT_SIZE = 400
VM_EVENT_INTERFACE_VERSION = 0x00000007
_VM_EVENT_HEADER = struct.Struct("<IIIIH6x")
VM_EVENT_PAYLOAD_SIZE = VM_EVENT_SIZE - _VM_EVENT_HEADER.size


class VmEvent(msgspec.Struct, gc=False):
    version: int = VM_EVENT_INTERFACE_VERSION
    flags: int = 0
    reason: int = 0
    vcpu_id: int = 0
    altp2m_idx: int = 0
    payload: bytes = b""


class VmEventCodec:
    size = VM_EVENT_SIZE

    @staticmethod
    def pack_into(buf: memoryview | bytearray, offset: int, ev: VmEvent) -> None:
        if len(ev.payload) > VM_EVENT_PAYLOAD_SIZE:
            raise ValueError(f"vm_event payload is at most {VM_EVENT_PAYLOAD_SIZE} bytes")
        _VM_EVENT_HEADER.pack_into(buf, offset, ev.version, ev.flags, ev.reason, ev.vcpu_id, ev.altp2m_idx)
        start = offset + _VM_EVENT_HEADER.size
        payload = ev.payload.ljust(VM_EVENT_PAYLOAD_SIZE, b"\0")
        buf[start:start + VM_EVENT_PAYLOAD_SIZE] = payload

    @staticmethod
    def unpack_from(buf: memoryview | bytes | bytearray, offset: int) -> VmEvent:
        version, flags, reason, vcpu, idx = _VM_EVENT_HEADER.unpack_from(buf, offset)
        start = offset + _VM_EVENT_HEADER.size
        return VmEvent(version, flags, reason, vcpu, idx, bytes(buf[start:start + VM_EVENT_PAYLOAD_SIZE]))


VM_EVENT_RING_SIZE = ring_size(VM_EVENT_SIZE)
assert VM_EVENT_RING_SIZE == 8

# --------------------------------------------------------------------------
# Errno names: the only error vocabulary of put_request and the control plane.
# --------------------------------------------------------------------------


class Errno(enum.StrEnum):
    ENOSYS = "ENOSYS"
    EBUSY = "EBUSY"
    EAGAIN = "EAGAIN"
    ENOMEM = "ENOMEM"
    EINVAL = "EINVAL"
    ENOENT = "ENOENT"
    EPERM = "EPERM"
    ESRCH = "ESRCH"
    EEXIST = "EEXIST"
    ENODEV = "ENODEV"


class RingKind(enum.StrEnum):
    """The three mem_event rings a domain can have."""

    paging = "paging"
    access = "access"
    sharing = "sharing"


#: Which MemEventType each ring carries.
RING_EVENT_TYPE: dict[RingKind, MemEventType] = {
    RingKind.paging: MemEventType.PAGING,
    RingKind.access: MemEventType.ACCESS,
    RingKind.sharing: MemEventType.SHARED,
}

# --------------------------------------------------------------------------
# The in-flight access table (the shootdown handshake of DESIGN section 5).
# One aligned u64 word per vCPU in a segment the guest writes and the
# hypervisor reads: ``gfn + 1`` while that vCPU is between its p2m check and
# the end of its memory access, 0 otherwise.  Guest: store word, mb(), load
# p2m.  Hypervisor: store p2m, mb(), wait until no word names the gfn.
# --------------------------------------------------------------------------

INFLIGHT_WORD_SIZE = 8
INFLIGHT_IDLE = 0


def inflight_table_size(max_vcpus: int) -> int:
    return max(INFLIGHT_WORD_SIZE * max_vcpus, PAGE_SIZE)


def inflight_value(gfn: int) -> int:
    return gfn + 1


# --------------------------------------------------------------------------
# Rings with fewer slots than fit the page (appended for hvemu.core).
# --------------------------------------------------------------------------


def ring_bytes(entries: int, entry_size: int = MEM_EVENT_SIZE) -> int:
    """Bytes of a shared ring with exactly ``entries`` slots: header plus ``ring[entries]``.

    The layout is the page's own, only shorter: a ring of 8 ``mem_event_st``
    slots (the slot count of ``vm_event`` since Xen 4.5) is a ``SharedRing``
    over the first ``ring_bytes(8)`` bytes of the page, so both ends pass this
    as ``page_size`` and ``ring_size(entry_size, ring_bytes(n)) == n``.
    """
    if entries < 1 or entries & (entries - 1):
        raise ValueError(f"a ring has a power-of-two number of slots, not {entries}")
    size = RING_ENTRIES_OFFSET + entries * entry_size
    if size > PAGE_SIZE:
        raise ValueError(f"{entries} slots of {entry_size} bytes do not fit a {PAGE_SIZE}-byte page")
    return size


# --------------------------------------------------------------------------
# The vCPU exit page: Xen's shared ioreq page (``public/hvm/ioreq.h``,
# ``shared_iopage_t``: one ``ioreq_t`` per vCPU, each with its own event
# channel, ``vp_eport``).  Here the roles are those of an EPT violation
# handled in user space: the vCPU (the guest process) writes its exit into
# its slot and kicks its event channel; the hypervisor handles it and
# answers by writing the slot's response and kicking back.  One 64-byte slot
# per vCPU (a cache line), slot i at ``i * IOREQ_SLOT_SIZE``, little-endian:
#
# | offset | size | field |
# |---|---|---|
# | 0  | 4 | ``state``: IoreqState (Xen's STATE_IOREQ_* numbers) |
# | 4  | 4 | ``type``: ExitType |
# | 8  | 8 | ACCESS: ``gfn``; TRAP: ``value`` (new register value, or the gfn of an INT3/step) |
# | 16 | 8 | ``gla`` (valid if EXIT_GLA_VALID) |
# | 24 | 8 | ACCESS: ``offset`` within the page; TRAP: ``old`` register value |
# | 32 | 4 | ACCESS: ``access`` bits (ACCESS_R/W/X); TRAP: ``reason`` (MemEventReason) |
# | 36 | 4 | ``flags``: EXIT_GLA_VALID, rest 0 |
# | 40 | 4 | response ``result``: ExitResult |
# | 44 | 4 | response ``value``: the vector (TRAP_INJECTED) or a Linux errno number (ERROR) |
# | 48 | 16 | zero |
#
# The state word is an aligned u32 loaded and stored through a memoryview
# cast to ``'I'``; the fields around it change hands with it: the vCPU writes
# the exit, then ``state = READY``, then notifies (a syscall: the full
# barrier); the hypervisor copies the slot once, validates the copy, sets
# ``INPROCESS``, and when the vCPU may run writes the response, then
# ``state = RESP_READY``, then notifies.  The hypervisor never trusts the
# page for its own bookkeeping (which vCPU has an exit in process is kept
# privately), so a guest scribbling on its page can only confuse its own vCPUs.
# --------------------------------------------------------------------------


class IoreqState(enum.IntEnum):
    """``STATE_IOREQ_NONE`` ... ``STATE_IORESP_READY`` of Xen's ``ioreq.h``."""

    NONE = 0
    READY = 1
    INPROCESS = 2
    RESP_READY = 3


class ExitType(enum.IntEnum):
    #: An EPT violation: the p2m type or access right refused a direct access (``hvm_hap_nested_page_fault``).
    ACCESS = 1
    #: A CR0/CR3/CR4 write, an INT3 or a single step (``hvm_memory_event_traps``).
    TRAP = 2


class ExitResult(enum.IntEnum):
    #: The vCPU may go on (retry its access).
    OK = 0
    #: It goes on and first takes the trap a tool injected (``HVMOP_inject_trap``); the vector is in ``value``.
    TRAP_INJECTED = 1
    #: The exit was refused; ``value`` is the Linux errno number of an :class:`Errno` name.
    ERROR = 2

#: The same numbers as plain ints, for the compares made on every exit (an IntEnum's cost more).
IOREQ_NONE, IOREQ_READY, IOREQ_INPROCESS, IOREQ_RESP_READY = (int(s) for s in IoreqState)
EXIT_ACCESS, EXIT_TRAP = int(ExitType.ACCESS), int(ExitType.TRAP)
RESULT_OK, RESULT_TRAP_INJECTED, RESULT_ERROR = (int(r) for r in ExitResult)

IOREQ_SLOT_SIZE = 64
IOREQ_STATE_OFFSET = 0
#: Everything the vCPU writes after the state word: type, three u64 operands, access/reason, flags.
IOREQ_EXIT_OFFSET = 4
IOREQ_RESPONSE_OFFSET = 40
EXIT_GLA_VALID = 1 << 0
_IOREQ_EXIT = struct.Struct("<IQQQII")
_IOREQ_SLOT = struct.Struct("<IIQQQII")  # the state word too: what the hypervisor copies and reads
_IOREQ_RESPONSE = struct.Struct("<II")
assert IOREQ_EXIT_OFFSET + _IOREQ_EXIT.size == IOREQ_RESPONSE_OFFSET == _IOREQ_SLOT.size
assert IOREQ_RESPONSE_OFFSET + _IOREQ_RESPONSE.size <= IOREQ_SLOT_SIZE

#: The errno names' Linux numbers (what an ERROR response carries), and back.
ERRNO_NUMBERS: dict[Errno, int] = {e: getattr(_errno, e.value) for e in Errno}
ERRNO_NAMES: dict[int, Errno] = {n: e for e, n in ERRNO_NUMBERS.items()}


def ioreq_page_size(max_vcpus: int) -> int:
    """Bytes of a domain's exit page(s): one slot per vCPU, at least a page."""
    return max(IOREQ_SLOT_SIZE * max_vcpus, PAGE_SIZE)


def ioreq_slot_offset(vcpu: int) -> int:
    return vcpu * IOREQ_SLOT_SIZE


def ioreq_state_word(vcpu: int) -> int:
    """Index of a slot's state word in the page as a memoryview cast to ``'I'``."""
    return (vcpu * IOREQ_SLOT_SIZE + IOREQ_STATE_OFFSET) // 4


def ioreq_pack_exit(buf: memoryview | bytearray, vcpu: int, kind: int, a: int, gla: int | None, c: int,
                    d: int) -> None:
    """The vCPU's half: write its exit's fields (not the state word: store READY after this)."""
    _IOREQ_EXIT.pack_into(buf, vcpu * IOREQ_SLOT_SIZE + IOREQ_EXIT_OFFSET, kind, a,
                          0 if gla is None else gla, c, d, 0 if gla is None else EXIT_GLA_VALID)


def ioreq_unpack_slot(slot: bytes) -> tuple[int, int, int, int, int, int, int]:
    """``(state, type, a, gla, c, d, flags)`` of a slot's private copy (the hypervisor validates it)."""
    return _IOREQ_SLOT.unpack_from(slot, 0)


def ioreq_pack_response(buf: memoryview | bytearray, vcpu: int, result: int, value: int = 0) -> None:
    """The hypervisor's half: write the response (store RESP_READY after this)."""
    _IOREQ_RESPONSE.pack_into(buf, vcpu * IOREQ_SLOT_SIZE + IOREQ_RESPONSE_OFFSET, result, value)


def ioreq_unpack_response(buf: memoryview | bytes | bytearray, vcpu: int) -> tuple[int, int]:
    """``(result, value)`` of a slot whose state is RESP_READY."""
    return _IOREQ_RESPONSE.unpack_from(buf, vcpu * IOREQ_SLOT_SIZE + IOREQ_RESPONSE_OFFSET)


# --------------------------------------------------------------------------
# The paging ring's load area: where a pager puts the page a response brings
# in, so that no page travels in a message.  Xen 4.2's
# ``p2m_mem_paging_load`` takes the page from a buffer the pager names; here
# the buffer is one page per ring slot in a segment the hypervisor hands out
# with the paging ring (the fd named ``load``).  Layout:
#
#   [0, PAGE_SIZE)                  one u64 word per ring slot (aligned, via a memoryview cast to 'Q')
#   [PAGE_SIZE * (1 + s), +PAGE)    the page staged for the response in ring slot s
#
# The pager writes the page, then ``word[s] = gfn + 1``, then the response
# into ring slot s, and pushes it (ring.h's barrier, then the kick).  The
# hypervisor, as it consumes that response (on the kick), loads the page
# with ``p2m_mem_paging_load`` (allocate, copy, retype: a failure changes
# nothing) and sets ``word[s] = 0``; if the host had no memory (``ENOMEM``)
# it sets ``LOAD_ENOMEM | (gfn + 1)`` instead and kicks the pager, which
# makes room and loads that gfn with a ``PagingLoad`` domctl (its vCPU waits
# on the gfn meanwhile).  A word that does not match its response's gfn, or
# a response that is not a paging one, is ignored.
# --------------------------------------------------------------------------

LOAD_WORD_SIZE = 8
#: Set in a load word by the hypervisor: this staged page found no host memory.
LOAD_ENOMEM = 1 << 63


def load_area_size(ring_slots: int) -> int:
    return PAGE_SIZE * (1 + ring_slots)


def load_page_offset(slot: int) -> int:
    return PAGE_SIZE * (1 + slot)


def load_word(gfn: int) -> int:
    """What a staged page's word holds: ``gfn + 1`` (0 is "nothing staged")."""
    return gfn + 1
