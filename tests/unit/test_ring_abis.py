"""The three ring ABIs a domain may choose: byte layouts written from Xen's headers, and the round trip.

The expected bytes are built here field by field from Xen 4.2.0's
``mem_event.h`` and Xen 4.17's ``vm_event.h`` (offsets spelled out), not with
the codecs under test.
"""

from __future__ import annotations

import struct

import pytest

from hvemu import abi
from hvemu.abi import MemEvent, MemEventFlag, MemEventReason, MemEventType, RingKind
from hvemu.core.hypervisor import Hypervisor


def test_every_abi_round_trips_every_kind_of_event() -> None:
    events = {
        RingKind.paging: [MemEvent(type=MemEventType.PAGING, flags=MemEventFlag.VCPU_PAUSED | MemEventFlag.EVICT_FAIL,
                                   vcpu_id=3, gfn=0x1234, p2mt=abi.P2MType.ram_paging_in),
                          MemEvent(type=MemEventType.PAGING, flags=MemEventFlag.DROP_PAGE, gfn=7, p2mt=10)],
        RingKind.access: [MemEvent(type=MemEventType.ACCESS, flags=MemEventFlag.VCPU_PAUSED, vcpu_id=1, gfn=5,
                                   offset=0x18, gla=0x5018, gla_valid=True, access_w=True,
                                   reason=MemEventReason.VIOLATION),
                          MemEvent(type=MemEventType.ACCESS, gfn=0x80000011, reason=MemEventReason.CR3),
                          MemEvent(type=MemEventType.ACCESS, flags=MemEventFlag.VCPU_PAUSED, gfn=9,
                                   reason=MemEventReason.INT3),
                          MemEvent(type=MemEventType.ACCESS, gfn=9, reason=MemEventReason.SINGLESTEP)],
        RingKind.sharing: [MemEvent(type=MemEventType.SHARED, flags=MemEventFlag.VCPU_PAUSED, gfn=3, p2mt=12)],
    }
    for name in abi.RING_ABIS:
        for ring, evs in events.items():
            codec = abi.entry_codec(name, ring)
            for ev in evs:
                buf = bytearray(codec.size)
                codec.pack_into(buf, 0, ev)
                assert codec.unpack_from(buf, 0) == ev, (name, ring, ev)


def test_xen_42_entry_is_u32_flags_and_no_type() -> None:
    ev = MemEvent(type=MemEventType.ACCESS, flags=MemEventFlag.VCPU_PAUSED | MemEventFlag.FOREIGN, vcpu_id=2,
                  gfn=0x55, offset=0x10, gla=0x55010, p2mt=0, access_r=True, gla_valid=True,
                  reason=MemEventReason.VIOLATION)
    buf = bytearray(40)
    abi.entry_codec("4.2", "access").pack_into(buf, 0, ev)
    # uint32_t flags; uint32_t vcpu_id; uint64_t gfn, offset, gla; uint32_t p2mt; u16 bits; u16 reason
    assert buf == struct.pack("<IIQQQIHH", 0b1001, 2, 0x55, 0x10, 0x55010, 0, 0b1001, 1)


def _vm_event(version: int, flags: int, reason: int, vcpu: int, u: bytes, regs: dict[int, int]) -> bytes:
    out = bytearray(400)
    struct.pack_into("<IIIIH", out, 0, version, flags, reason, vcpu, 0)
    out[24:24 + len(u)] = u
    for off, value in regs.items():
        struct.pack_into("<Q", out, 56 + off, value)
    return bytes(out)


RIP, CR3 = 19 * 8, 22 * 8  # vm_event_regs_x86: rax..r15, rflags, dr6, dr7, rip, cr0, cr2, cr3


@pytest.mark.parametrize(("ring", "ev", "expected"), [
    ("paging", MemEvent(type=MemEventType.PAGING, flags=MemEventFlag.VCPU_PAUSED | MemEventFlag.EVICT_FAIL,
                        vcpu_id=1, gfn=0x42, p2mt=11),
     _vm_event(7, 1, 3, 1, struct.pack("<QII", 0x42, 11, 2), {})),
    ("access", MemEvent(type=MemEventType.ACCESS, flags=MemEventFlag.VCPU_PAUSED, gfn=0x42, offset=8,
                        gla=0x42008, gla_valid=True, access_x=True, reason=MemEventReason.VIOLATION),
     _vm_event(7, 1, 1, 0, struct.pack("<QQQII", 0x42, 8, 0x42008, 4 | 8, 0), {RIP: 0x42008})),
    ("access", MemEvent(type=MemEventType.ACCESS, gfn=0x3000, reason=MemEventReason.CR3),
     _vm_event(7, 0, 4, 0, struct.pack("<IIQQ", 1, 0, 0x3000, 0), {CR3: 0x3000})),
    ("access", MemEvent(type=MemEventType.ACCESS, flags=MemEventFlag.VCPU_PAUSED, gfn=0x9, gla=0x9000,
                        gla_valid=True, reason=MemEventReason.INT3),
     _vm_event(7, 1, 6, 0, struct.pack("<QQIB", 0x9, 0, 1, 6), {RIP: 0x9000})),
    ("access", MemEvent(type=MemEventType.ACCESS, gfn=0x9, reason=MemEventReason.SINGLESTEP),
     _vm_event(7, 0, 7, 0, struct.pack("<Q", 0x9), {})),
])
def test_vm_event_requests_are_xen_417s_bytes(ring: str, ev: MemEvent, expected: bytes) -> None:
    buf = bytearray(400)
    abi.entry_codec("vm_event", ring).pack_into(buf, 0, ev)
    assert bytes(buf) == expected


def test_vm_event_responses() -> None:
    codec = abi.entry_codec("vm_event", "access")
    # Another interface version is skipped, as Xen skips it (a DUMMY for the core).
    old = codec.unpack_from(_vm_event(6, 1, 1, 0, b"", {}), 0)
    assert old.flags == MemEventFlag.DUMMY
    # A flag hvemu does not model (EMULATE) is flagged for the core to count; VCPU_PAUSED is kept.
    rsp = codec.unpack_from(_vm_event(7, 1 | abi.VM_EVENT_FLAG_EMULATE, 1, 1, struct.pack("<Q", 5), {}), 0)
    assert rsp.flags & MemEventFlag.VCPU_PAUSED and rsp.flags & abi.UNKNOWN_VM_EVENT_FLAGS and rsp.gfn == 5
    # On the paging ring, xenpaging's responses carry no version and no reason: still paging responses.
    paging = abi.entry_codec("vm_event", "paging").unpack_from(_vm_event(0, 1, 0, 1, struct.pack("<QII", 8, 0, 1),
                                                                         {}), 0)
    assert (paging.type, paging.gfn, paging.vcpu_id) == (MemEventType.PAGING, 8, 1)
    assert paging.flags == MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE


def test_a_domain_ring_follows_its_abi() -> None:
    hv = Hypervisor(64)
    seed = hv.create_domain(1, 16)
    vm = hv.create_domain(1, 16, ring_abi="vm_event")
    assert seed.rings_size("paging") == 64 and vm.rings_size("paging") == abi.VM_EVENT_RING_SIZE == 8
    assert vm.stats().abi == "vm_event"
    with pytest.raises(Exception, match="unknown ring ABI"):
        hv.create_domain(1, 16, ring_abi="4.1")
    with pytest.raises(ValueError):
        abi.entry_codec("xen", "paging")
