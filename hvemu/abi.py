"""The binary contract: ring page layout, entry codecs and every constant.

This is the *only* module that knows a byte offset or a flag value.  It is
Xen 4.2's ``public/io/ring.h`` + ``public/mem_event.h`` as the seed patch saw
them (DESIGN.md section 2), plus today's ``vm_event`` entry so that the generic
ring in :mod:`hvemu.ring` is shown to work with a second ABI.

Everything here is plain data and pure functions: the guest, the pager and any
third-party daemon may import it freely.

Why one module of ~850 lines: it is the ABI, every byte offset and number the processes and
the C headers share (the three ring entries among them), and one place for each of them is the
point (the layout tests read it whole).
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import Literal, Protocol, TypeVar

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
# The ring ABIs a domain may choose at create (``hvemu create --abi``).
#
# The core speaks :class:`MemEvent` whatever the ABI; each ABI is a codec
# between that and the entry on the page, so the core's rules stay one
# implementation.  The page header (``ring.h``'s four indices, the pad, then
# ``ring[]``) is the same for all three.
#
# ``seed``      the seed's ``mem_event_st`` (u16 ``type`` + u16 ``flags``), 40 bytes, 64 slots.
# ``4.2``       Xen 4.2.0 as released: ``mem_event_st`` with a u32 ``flags`` and no ``type``
#               (the ring says what it carries), otherwise the seed's, 40 bytes, 64 slots.
# ``vm_event``  Xen 4.17's ``vm_event_st``, ``VM_EVENT_INTERFACE_VERSION`` 7, 400 bytes,
#               8 slots (what fits a page: Xen's tools do ``BACK_RING_INIT(.., XC_PAGE_SIZE)``).
# --------------------------------------------------------------------------

RingAbi = Literal["seed", "4.2", "vm_event"]
RING_ABIS: tuple[RingAbi, ...] = ("seed", "4.2", "vm_event")
DEFAULT_RING_ABI: RingAbi = "seed"

# Xen 4.2.0 ``public/mem_event.h``: the same bits as the seed's flags, in a u32.
_MEM_EVENT_42_STRUCT = struct.Struct("<IIQQQIHH")
assert _MEM_EVENT_42_STRUCT.size == MEM_EVENT_SIZE


def _access_bits(ev: MemEvent) -> int:
    return ((BIT_ACCESS_R if ev.access_r else 0) | (BIT_ACCESS_W if ev.access_w else 0)
            | (BIT_ACCESS_X if ev.access_x else 0) | (BIT_GLA_VALID if ev.gla_valid else 0)
            | (ev.reserved_bits << 4))


class MemEvent42Codec:
    """Xen 4.2.0's ``mem_event_st``: u32 ``flags`` at 0, no ``type`` (taken from the ring)."""

    size = MEM_EVENT_SIZE

    def __init__(self, event_type: int = MemEventType.PAGING) -> None:
        self.event_type = int(event_type)

    def pack_into(self, buf: memoryview | bytearray, offset: int, ev: MemEvent) -> None:
        _MEM_EVENT_42_STRUCT.pack_into(buf, offset, ev.flags, ev.vcpu_id, ev.gfn, ev.offset, ev.gla, ev.p2mt,
                                       _access_bits(ev), ev.reason)

    def unpack_from(self, buf: memoryview | bytes | bytearray, offset: int) -> MemEvent:
        fl, vcpu, gfn, off, gla, p2mt, bits, reason = _MEM_EVENT_42_STRUCT.unpack_from(buf, offset)
        return MemEvent(self.event_type, fl, vcpu, gfn, off, gla, p2mt,
                        bool(bits & BIT_ACCESS_R), bool(bits & BIT_ACCESS_W),
                        bool(bits & BIT_ACCESS_X), bool(bits & BIT_GLA_VALID), reason, bits >> 4)


# Xen 4.17 ``public/vm_event.h`` (VM_EVENT_INTERFACE_VERSION 7).
VM_EVENT_FLAG_VCPU_PAUSED = 1 << 0
VM_EVENT_FLAG_FOREIGN = 1 << 1
VM_EVENT_FLAG_EMULATE = 1 << 2
VM_EVENT_FLAG_TOGGLE_SINGLESTEP = 1 << 4
VM_EVENT_FLAG_DENY = 1 << 6
VM_EVENT_FLAG_ALTERNATE_P2M = 1 << 7
VM_EVENT_FLAG_SET_REGISTERS = 1 << 8


class VmEventReason(enum.IntEnum):
    UNKNOWN = 0
    MEM_ACCESS = 1
    MEM_SHARING = 2
    MEM_PAGING = 3
    WRITE_CTRLREG = 4
    MOV_TO_MSR = 5
    SOFTWARE_BREAKPOINT = 6
    SINGLESTEP = 7
    GUEST_REQUEST = 8
    DEBUG_EXCEPTION = 9
    CPUID = 10
    PRIVILEGED_CALL = 11
    INTERRUPT = 12
    DESCRIPTOR_ACCESS = 13
    EMUL_UNIMPLEMENTED = 14
    VMEXIT = 15


#: ``vm_event_write_ctrlreg.index``.
VM_EVENT_X86_CR0 = 0
VM_EVENT_X86_CR3 = 1
VM_EVENT_X86_CR4 = 2
#: ``vm_event_mem_access.flags``.
MEM_ACCESS_R = 1 << 0
MEM_ACCESS_W = 1 << 1
MEM_ACCESS_X = 1 << 2
MEM_ACCESS_GLA_VALID = 1 << 3
#: ``vm_event_paging.flags``.
MEM_PAGING_DROP_PAGE = 1 << 0
MEM_PAGING_EVICT_FAIL = 1 << 1
#: ``HVMOP_TRAP_sw_exc`` / ``X86_EVENTTYPE_SW_EXCEPTION``: the ``type`` of a software breakpoint.
X86_EVENTTYPE_SW_EXCEPTION = 6

#: Field offsets inside one 400-byte ``vm_event_st``: the header, the union ``u`` (32 bytes) at 24,
#: the union ``data`` (the x86 register block, 344 bytes) at 56.
VM_EVENT_FIELDS: dict[str, tuple[int, int]] = {
    "version": (0, 4),
    "flags": (4, 4),
    "reason": (8, 4),
    "vcpu_id": (12, 4),
    "altp2m_idx": (16, 2),
    "u": (24, 32),
    "data": (56, 344),
}
VM_EVENT_U_OFFSET = 24
VM_EVENT_DATA_OFFSET = 56
#: ``data.regs.x86``: the offsets of the registers hvemu fills (every other one is zero: the guest
#: model has no registers beyond these).
VM_EVENT_REGS_X86_SIZE = 344
VM_EVENT_REGS_X86_RIP = 19 * 8
VM_EVENT_REGS_X86_CR0 = 20 * 8
VM_EVENT_REGS_X86_CR3 = 22 * 8
VM_EVENT_REGS_X86_CR4 = 23 * 8
# The payloads, each at VM_EVENT_U_OFFSET.
_VM_HEAD = struct.Struct("<IIIIH6x")
_VM_PAGING = struct.Struct("<QII")          # gfn, p2mt, flags
_VM_SHARING = struct.Struct("<QII")         # gfn, p2mt, _pad
_VM_MEM_ACCESS = struct.Struct("<QQQII")    # gfn, offset, gla, flags, _pad
_VM_CTRLREG = struct.Struct("<IIQQ")        # index, _pad, new_value, old_value
_VM_DEBUG = struct.Struct("<QQIB3x")        # gfn, pending_dbg, insn_length, type
_VM_SINGLESTEP = struct.Struct("<Q")        # gfn
_U64 = struct.Struct("<Q")
#: What our vm_event flags and MemEvent flags share, bit for bit (the rest is translated).
_VM_FLAG_TO_MEM = {VM_EVENT_FLAG_VCPU_PAUSED: int(MemEventFlag.VCPU_PAUSED),
                   VM_EVENT_FLAG_FOREIGN: int(MemEventFlag.FOREIGN)}
_CTRLREG_INDEX = {MemEventReason.CR0: VM_EVENT_X86_CR0, MemEventReason.CR3: VM_EVENT_X86_CR3,
                  MemEventReason.CR4: VM_EVENT_X86_CR4}
_CTRLREG_REASON = {v: k for k, v in _CTRLREG_INDEX.items()}
_CTRLREG_REG = {MemEventReason.CR0: VM_EVENT_REGS_X86_CR0, MemEventReason.CR3: VM_EVENT_REGS_X86_CR3,
                MemEventReason.CR4: VM_EVENT_REGS_X86_CR4}
#: A MemEvent flag bit outside the seed's set: a response carried vm_event flags hvemu does not obey
#: (EMULATE, SET_REGISTERS, ...).  The core counts it as unknown bits and obeys the rest, as Xen.
UNKNOWN_VM_EVENT_FLAGS = 1 << 15


class VmEventAbiCodec:
    """:class:`MemEvent` <-> Xen 4.17's ``vm_event_st``, for domains created with ``abi="vm_event"``.

    Requests: ``reason`` and the payload follow the event (paging, sharing,
    mem_access, write_ctrlreg with ``old_value`` 0 as the seed does not carry
    it, software_breakpoint with ``insn_length`` 1, singlestep); the register
    block is zero except ``rip`` (the gla of an access or breakpoint when
    valid) and the control register a write_ctrlreg event names.
    Responses: ``VCPU_PAUSED``, ``MEM_PAGING_DROP_PAGE`` and the gfn are
    obeyed; a response of another interface version is skipped as Xen skips
    it (decoded as ``DUMMY``); flags hvemu does not model set
    :data:`UNKNOWN_VM_EVENT_FLAGS`.  One exception, on purpose: on the
    paging ring every response is a paging response whatever its ``version``
    and ``reason`` say, because Xen 4.17's own xenpaging never fills them in
    (its ``rsp`` is a stack variable of which it sets ``flags``, ``vcpu_id``
    and ``u.mem_paging.gfn`` only); Xen 4.17 skips such a response and leaves
    the vCPU paused (see docs/differences-from-xen.md).
    """

    size = VM_EVENT_SIZE

    def __init__(self, event_type: int = MemEventType.PAGING) -> None:
        self.event_type = int(event_type)

    def pack_into(self, buf: memoryview | bytearray, offset: int, ev: MemEvent) -> None:
        buf[offset:offset + VM_EVENT_SIZE] = bytes(VM_EVENT_SIZE)
        flags = 0
        for vm, mem in _VM_FLAG_TO_MEM.items():
            if ev.flags & mem:
                flags |= vm
        u = offset + VM_EVENT_U_OFFSET
        regs = offset + VM_EVENT_DATA_OFFSET
        if ev.type == MemEventType.PAGING:
            reason = VmEventReason.MEM_PAGING
            pflags = ((MEM_PAGING_DROP_PAGE if ev.flags & MemEventFlag.DROP_PAGE else 0)
                      | (MEM_PAGING_EVICT_FAIL if ev.flags & MemEventFlag.EVICT_FAIL else 0))
            _VM_PAGING.pack_into(buf, u, ev.gfn, ev.p2mt, pflags)
        elif ev.type == MemEventType.SHARED:
            reason = VmEventReason.MEM_SHARING
            _VM_SHARING.pack_into(buf, u, ev.gfn, ev.p2mt, 0)
        elif ev.reason in _CTRLREG_INDEX:
            reason = VmEventReason.WRITE_CTRLREG
            _VM_CTRLREG.pack_into(buf, u, _CTRLREG_INDEX[MemEventReason(ev.reason)], 0, ev.gfn, 0)
            _U64.pack_into(buf, regs + _CTRLREG_REG[MemEventReason(ev.reason)], ev.gfn)
        elif ev.reason == MemEventReason.INT3:
            reason = VmEventReason.SOFTWARE_BREAKPOINT
            _VM_DEBUG.pack_into(buf, u, ev.gfn, 0, 1, X86_EVENTTYPE_SW_EXCEPTION)
        elif ev.reason == MemEventReason.SINGLESTEP:
            reason = VmEventReason.SINGLESTEP
            _VM_SINGLESTEP.pack_into(buf, u, ev.gfn)
        else:
            reason = VmEventReason.MEM_ACCESS
            aflags = ((MEM_ACCESS_R if ev.access_r else 0) | (MEM_ACCESS_W if ev.access_w else 0)
                      | (MEM_ACCESS_X if ev.access_x else 0) | (MEM_ACCESS_GLA_VALID if ev.gla_valid else 0))
            _VM_MEM_ACCESS.pack_into(buf, u, ev.gfn, ev.offset, ev.gla, aflags, 0)
        if ev.gla_valid:
            _U64.pack_into(buf, regs + VM_EVENT_REGS_X86_RIP, ev.gla)
        _VM_HEAD.pack_into(buf, offset, VM_EVENT_INTERFACE_VERSION, flags, reason, ev.vcpu_id, 0)

    def unpack_from(self, buf: memoryview | bytes | bytearray, offset: int) -> MemEvent:
        version, vflags, reason, vcpu, _idx = _VM_HEAD.unpack_from(buf, offset)
        u = offset + VM_EVENT_U_OFFSET
        flags = 0
        for vm, mem in _VM_FLAG_TO_MEM.items():
            if vflags & vm:
                flags |= mem
        if vflags & ~(VM_EVENT_FLAG_VCPU_PAUSED | VM_EVENT_FLAG_FOREIGN):
            flags |= UNKNOWN_VM_EVENT_FLAGS
        paging_ring = self.event_type == MemEventType.PAGING
        if version != VM_EVENT_INTERFACE_VERSION and not paging_ring:
            return MemEvent(self.event_type, int(MemEventFlag.DUMMY), vcpu)
        ev = MemEvent(self.event_type, flags, vcpu)
        if reason == VmEventReason.MEM_PAGING or paging_ring:
            ev.type = MemEventType.PAGING
            ev.gfn, ev.p2mt, pflags = _VM_PAGING.unpack_from(buf, u)
            if pflags & MEM_PAGING_DROP_PAGE:
                ev.flags |= MemEventFlag.DROP_PAGE
            if pflags & MEM_PAGING_EVICT_FAIL:
                ev.flags |= MemEventFlag.EVICT_FAIL
        elif reason == VmEventReason.MEM_SHARING:
            ev.type = MemEventType.SHARED
            ev.gfn, ev.p2mt, _pad = _VM_SHARING.unpack_from(buf, u)
        elif reason == VmEventReason.MEM_ACCESS:
            ev.type, ev.reason = MemEventType.ACCESS, MemEventReason.VIOLATION
            ev.gfn, ev.offset, ev.gla, aflags, _pad = _VM_MEM_ACCESS.unpack_from(buf, u)
            ev.access_r, ev.access_w = bool(aflags & MEM_ACCESS_R), bool(aflags & MEM_ACCESS_W)
            ev.access_x, ev.gla_valid = bool(aflags & MEM_ACCESS_X), bool(aflags & MEM_ACCESS_GLA_VALID)
        elif reason == VmEventReason.WRITE_CTRLREG:
            index, _pad, new, _old = _VM_CTRLREG.unpack_from(buf, u)
            ev.type, ev.gfn = MemEventType.ACCESS, new
            ev.reason = _CTRLREG_REASON.get(index, MemEventReason.UNKNOWN)
        elif reason == VmEventReason.SOFTWARE_BREAKPOINT:
            ev.type, ev.reason = MemEventType.ACCESS, MemEventReason.INT3
            ev.gfn = _VM_DEBUG.unpack_from(buf, u)[0]
        elif reason == VmEventReason.SINGLESTEP:
            ev.type, ev.reason = MemEventType.ACCESS, MemEventReason.SINGLESTEP
            ev.gfn = _VM_SINGLESTEP.unpack_from(buf, u)[0]
        return ev


MemEventEntryCodec = MemEventCodec | MemEvent42Codec | VmEventAbiCodec


def entry_codec(ring_abi: str, ring: RingKind | str = "paging") -> MemEventEntryCodec:
    """The codec of ``ring``'s entries in a domain of ABI ``ring_abi`` (``ValueError`` if unknown)."""
    event_type = RING_EVENT_TYPE[RingKind(ring)]
    if ring_abi == "seed":
        return MemEventCodec()
    if ring_abi == "4.2":
        return MemEvent42Codec(event_type)
    if ring_abi == "vm_event":
        return VmEventAbiCodec(event_type)
    raise ValueError(f"unknown ring ABI {ring_abi!r} (one of {', '.join(RING_ABIS)})")


def abi_ring_slots(ring_abi: str, wanted: int = MEM_EVENT_RING_SIZE) -> int:
    """Slots of a ring of this ABI: ``wanted`` (the host's ring size) for the 40-byte entries,
    the whole page's for ``vm_event`` (Xen's tools size their back ring for the page)."""
    if ring_abi == "vm_event":
        return VM_EVENT_RING_SIZE
    entry_codec(ring_abi)  # validates the name
    return wanted


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
