"""The ring page layout of DESIGN.md section 2, checked against independent descriptions.

Two descriptions that do not come from :mod:`hvemu.abi`:

* a C struct written from DESIGN section 2 (``tests/c/mem_event_ring.h``),
  compiled with the system ``cc``; ``tests/c/abi_layout.c`` prints its
  ``offsetof``/``sizeof``, the bit positions of the bitfield, Xen's
  ``__RING_SIZE`` and the bytes of entries it builds from field values;
* bytes built by hand in this file from DESIGN's tables (``DESIGN_*`` below,
  copied from the document, not from the module).

The C tests skip cleanly when no working C compiler is present.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvemu import abi
from hvemu.abi import MemEvent, MemEventCodec, MemEventFlag, VmEvent, VmEventCodec
from hvemu.ring import SharedRing

C_DIR = Path(__file__).resolve().parents[1] / "c"

# --------------------------------------------------------------------------
# DESIGN.md section 2, transcribed by hand.
# --------------------------------------------------------------------------

#: sring header: name -> (offset, size)
DESIGN_SRING = {
    "req_prod": (0, 4),
    "req_event": (4, 4),
    "rsp_prod": (8, 4),
    "rsp_event": (12, 4),
    "pad": (16, 48),
    "ring": (64, 40),  # first entry of ring[64]
}
DESIGN_RING_ENTRIES = 64
DESIGN_ENTRY_SIZE = 40
#: mem_event_st: name -> (offset, size)
DESIGN_ENTRY = {
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
#: the u16 at 36: name -> bit
DESIGN_BITS = {"access_r": 0, "access_w": 1, "access_x": 2, "gla_valid": 3}
DESIGN_FLAGS = {"VCPU_PAUSED": 1, "DROP_PAGE": 2, "EVICT_FAIL": 4, "FOREIGN": 8, "DUMMY": 16}
DESIGN_TYPES = {"SHARED": 0, "PAGING": 1, "ACCESS": 2}
DESIGN_REASONS = {"UNKNOWN": 0, "VIOLATION": 1, "CR0": 2, "CR3": 3, "CR4": 4, "INT3": 5, "SINGLESTEP": 6}
DESIGN_P2MT = {"ram_rw": 0, "ram_paging_out": 9, "ram_paged": 10, "ram_paging_in": 11, "ram_shared": 12}


def by_hand(
    type: int = 0, flags: int = 0, vcpu_id: int = 0, gfn: int = 0, offset: int = 0, gla: int = 0,
    p2mt: int = 0, access_r: bool = False, access_w: bool = False, access_x: bool = False,
    gla_valid: bool = False, reason: int = 0,
) -> bytes:
    """A 40-byte entry assembled field by field from DESIGN's table (little-endian)."""
    out = bytearray(DESIGN_ENTRY_SIZE)
    values = {
        "type": type, "flags": flags, "vcpu_id": vcpu_id, "gfn": gfn, "offset": offset, "gla": gla,
        "p2mt": p2mt, "reason": reason,
        "bits": sum(1 << DESIGN_BITS[n] for n, v in
                    (("access_r", access_r), ("access_w", access_w), ("access_x", access_x),
                     ("gla_valid", gla_valid)) if v),
    }
    for name, (off, size) in DESIGN_ENTRY.items():
        out[off:off + size] = values[name].to_bytes(size, "little")
    return bytes(out)


FIELD_NAMES = ("type", "flags", "vcpu_id", "gfn", "offset", "gla", "p2mt",
               "access_r", "access_w", "access_x", "gla_valid", "reason")
FIELD_MAX = {"type": 0xFFFF, "flags": 0xFFFF, "vcpu_id": 0xFFFFFFFF, "gfn": 2**64 - 1,
             "offset": 2**64 - 1, "gla": 2**64 - 1, "p2mt": 0xFFFFFFFF, "reason": 0xFFFF,
             "access_r": 1, "access_w": 1, "access_x": 1, "gla_valid": 1}


def sample_events() -> list[dict[str, int]]:
    """Every field alone at a distinctive value and at its maximum, every flag and bit alone, mixes."""
    samples: list[dict[str, int]] = [{}]
    distinct = {"type": 0x0102, "flags": 0x0304, "vcpu_id": 0x05060708, "gfn": 0x090A0B0C0D0E0F10,
                "offset": 0x1112131415161718, "gla": 0x191A1B1C1D1E1F20, "p2mt": 0x21222324,
                "reason": 0x2526}
    for name in FIELD_NAMES:
        samples.append({name: FIELD_MAX[name]})
        if name in distinct:
            samples.append({name: distinct[name]})
    for value in DESIGN_FLAGS.values():
        samples.append({"flags": value})
    samples.append({"flags": sum(DESIGN_FLAGS.values())})
    for value in DESIGN_TYPES.values():
        samples.append({"type": value})
    for value in DESIGN_REASONS.values():
        samples.append({"reason": value})
    for value in DESIGN_P2MT.values():
        samples.append({"p2mt": value})
    bit_names = ("access_r", "access_w", "access_x", "gla_valid")
    for bits in range(16):
        samples.append({n: (bits >> i) & 1 for i, n in enumerate(bit_names)})
    samples.append({**distinct, "access_r": 1, "access_x": 1, "gla_valid": 1})
    samples.append({name: FIELD_MAX[name] for name in FIELD_NAMES})
    return samples


def mem_event(**fields: int) -> MemEvent:
    kw: dict[str, object] = {}
    for name, value in fields.items():
        kw[name] = bool(value) if name in DESIGN_BITS else value
    for name in FIELD_NAMES:
        kw.setdefault(name, False if name in DESIGN_BITS else 0)
    return MemEvent(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Codec against bytes built by hand (no compiler needed)
# --------------------------------------------------------------------------


def _sample_id(fields: dict[str, int]) -> str:
    return ",".join(f"{k}={v:#x}" for k, v in fields.items()) or "zero"


@pytest.mark.parametrize("fields", sample_events(), ids=_sample_id)
def test_codec_matches_bytes_built_from_design(fields: dict[str, int]) -> None:
    expected = by_hand(**{k: (bool(v) if k in DESIGN_BITS else v) for k, v in fields.items()})  # type: ignore[arg-type]
    ev = mem_event(**fields)
    assert MemEventCodec.encode(ev) == expected
    back = MemEventCodec.decode(expected)
    assert back == ev
    assert back.reserved_bits == 0


def test_entry_size_and_struct_order() -> None:
    assert MemEventCodec.size == DESIGN_ENTRY_SIZE
    assert len(MemEventCodec.encode(MemEvent())) == DESIGN_ENTRY_SIZE
    # each field, set to all-ones alone, touches exactly its DESIGN bytes
    for name, (off, size) in DESIGN_ENTRY.items():
        if name == "bits":
            continue
        raw = MemEventCodec.encode(mem_event(**{name: FIELD_MAX[name]}))
        touched = [i for i, b in enumerate(raw) if b]
        assert touched == list(range(off, off + size)), name


def test_bitfield_bits_and_reserved_bits() -> None:
    for name, bit in DESIGN_BITS.items():
        raw = MemEventCodec.encode(mem_event(**{name: 1}))
        assert int.from_bytes(raw[36:38], "little") == 1 << bit, name
        assert raw[:36] == bytes(36) and raw[38:] == bytes(2)
    # bits 4..15 are "rest 0": the codec surfaces them for a validator instead of dropping them
    flagged = bytearray(by_hand())
    flagged[36:38] = (0xFFF0).to_bytes(2, "little")
    ev = MemEventCodec.decode(bytes(flagged))
    assert ev.reserved_bits == 0xFFF
    assert not (ev.access_r or ev.access_w or ev.access_x or ev.gla_valid)
    assert MemEventCodec.encode(ev) == bytes(flagged)


def test_enum_values_are_designs() -> None:
    assert {f.name: int(f) for f in MemEventFlag} == DESIGN_FLAGS
    assert {t.name: int(t) for t in abi.MemEventType} == DESIGN_TYPES
    assert {r.name: int(r) for r in abi.MemEventReason} == DESIGN_REASONS
    for name, value in DESIGN_P2MT.items():
        assert abi.P2MType[name] == value
    assert abi.MEM_EVENT_KNOWN_FLAGS == sum(DESIGN_FLAGS.values())


def test_decode_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        MemEventCodec.decode(bytes(39))
    with pytest.raises(ValueError):
        MemEventCodec.decode(bytes(41))


def test_shared_ring_header_bytes_at_design_offsets() -> None:
    """The ring object writes each header word at DESIGN's offset, little-endian."""
    buf = bytearray(abi.PAGE_SIZE)
    sring: SharedRing[MemEvent] = SharedRing(buf, MemEventCodec)
    sring.init()
    assert buf[16:64] == bytes(48)
    for name, (off, _size) in DESIGN_SRING.items():
        if name in ("pad", "ring"):
            continue
        value = 0xA1B2C3D4 ^ off
        setattr(sring, name, value)
        assert struct.unpack_from("<I", buf, off)[0] == value, name
        struct.pack_into("<I", buf, off, value ^ 0xFFFFFFFF)
        assert getattr(sring, name) == value ^ 0xFFFFFFFF, name
    assert sring.size == DESIGN_RING_ENTRIES
    ev = mem_event(gfn=0x1234, vcpu_id=7, reason=5, gla_valid=1)
    for idx in (0, 1, 63, 64, 2**32 - 1):
        sring.write_entry(idx, ev)
        off = 64 + (idx % DESIGN_RING_ENTRIES) * DESIGN_ENTRY_SIZE
        assert bytes(buf[off:off + 40]) == by_hand(gfn=0x1234, vcpu_id=7, reason=5, gla_valid=True)
        assert sring.read_entry(idx) == ev
    # entries end exactly at the page end
    assert 64 + 63 * 40 + 40 == 2624 <= abi.PAGE_SIZE
    sring.release()


def test_shared_ring_over_mmap() -> None:
    """The ring works over an mmap (the real buffer type), not only a bytearray."""
    with mmap.mmap(-1, abi.PAGE_SIZE) as mm:
        sring: SharedRing[MemEvent] = SharedRing(mm, MemEventCodec)
        sring.init()
        sring.req_prod = 0xFFFFFFFF
        assert mm[0:4] == b"\xff\xff\xff\xff"
        assert mm[4:8] == (1).to_bytes(4, "little") and mm[12:16] == (1).to_bytes(4, "little")
        sring.release()


# --------------------------------------------------------------------------
# Ring size by Xen's rule
# --------------------------------------------------------------------------


def xen_ring_size(entry_size: int, page_size: int) -> int:
    """``__RD32((page - 64) / entry)`` by repeated halving: round down to a power of two."""
    fit = (page_size - 64) // entry_size
    p = 1
    while p * 2 <= fit:
        p *= 2
    return p if fit else 0


def test_ring_size_rule() -> None:
    assert abi.ring_size(40) == 64
    assert abi.ring_size(400) == 8  # vm_event: 10 fit, rounded down
    assert abi.ring_size(40, 64 + 4 * 40) == 4
    assert abi.ring_size(40, 64 + 7 * 40) == 4
    assert abi.ring_size(40, 64 + 8 * 40) == 8
    assert abi.ring_size(40, 64 + 40) == 1
    for page in (104, 224, 1024, 4096, 8192):
        for esz in range(1, page - 64 + 1):
            assert abi.ring_size(esz, page) == xen_ring_size(esz, page), (esz, page)
    with pytest.raises(ValueError):
        abi.ring_size(0)
    with pytest.raises(ValueError):
        abi.ring_size(41, 64 + 40)


def test_vm_event_entry_and_ring() -> None:
    assert VmEventCodec.size == 400
    buf = bytearray(abi.PAGE_SIZE)
    sring: SharedRing[VmEvent] = SharedRing(buf, VmEventCodec)
    assert sring.size == 8
    ev = VmEvent(version=7, flags=0x11, reason=3, vcpu_id=2, altp2m_idx=5, payload=b"xyz")
    sring.write_entry(9, ev)  # slot 1
    off = 64 + 400
    assert struct.unpack_from("<IIIIH", buf, off) == (7, 0x11, 3, 2, 5)
    assert bytes(buf[off + 24:off + 27]) == b"xyz"
    got = sring.read_entry(1)
    assert got.payload[:3] == b"xyz" and got.vcpu_id == 2
    sring.release()


# --------------------------------------------------------------------------
# Against the C struct
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH")
    out = tmp_path_factory.mktemp("abi_layout")
    probe = out / "probe.c"
    probe.write_text("#include <stdint.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                     "int main(void){return 0;}\n")
    if subprocess.run([cc, "-o", str(out / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cc} cannot build a trivial C program (no libc headers?)")
    exe = out / "abi_layout"
    res = subprocess.run(
        [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(C_DIR),
         "-o", str(exe), str(C_DIR / "abi_layout.c")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    return exe


def run_c(exe: Path, mode: str, stdin: str = "") -> list[list[str]]:
    res = subprocess.run([str(exe), mode], input=stdin, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [line.split() for line in res.stdout.splitlines()]


def test_c_layout_matches_abi(c_layout: Path) -> None:
    rows = run_c(c_layout, "layout")
    fields = {r[1]: (int(r[2]), int(r[3])) for r in rows if r[0] == "field"}
    bits = {r[1]: (int(r[2]), int(r[3])) for r in rows if r[0] == "bits"}
    sizes = {r[1]: int(r[2]) for r in rows if r[0] == "sizeof"}
    flags = {r[1]: int(r[2]) for r in rows if r[0] == "flag"}

    # the C description agrees with DESIGN (a sanity check of the C itself) ...
    for name, where in DESIGN_SRING.items():
        assert fields[name] == where, name
    # ... and the module agrees with the C description.
    assert (abi.REQ_PROD_OFFSET, 4) == fields["req_prod"]
    assert (abi.REQ_EVENT_OFFSET, 4) == fields["req_event"]
    assert (abi.RSP_PROD_OFFSET, 4) == fields["rsp_prod"]
    assert (abi.RSP_EVENT_OFFSET, 4) == fields["rsp_event"]
    assert (abi.PAD_OFFSET, abi.PAD_SIZE) == fields["pad"]
    assert abi.RING_ENTRIES_OFFSET == fields["ring"][0] == sizes["sring_header"]
    for word, name in ((abi.REQ_PROD_WORD, "req_prod"), (abi.REQ_EVENT_WORD, "req_event"),
                       (abi.RSP_PROD_WORD, "rsp_prod"), (abi.RSP_EVENT_WORD, "rsp_event")):
        assert word * 4 == fields[name][0], name

    assert abi.MEM_EVENT_SIZE == MemEventCodec.size == sizes["entry"] == fields["ring"][1]
    for name, where in abi.MEM_EVENT_FIELDS.items():
        if name == "bits":
            continue
        assert fields[name] == where, name
    assert set(abi.MEM_EVENT_FIELDS) - {"bits"} == {n for n in fields if n in DESIGN_ENTRY}
    bits_off, bits_size = abi.MEM_EVENT_FIELDS["bits"]
    assert (bits_off, bits_size) == (36, 2)
    for name, mask in (("access_r", abi.BIT_ACCESS_R), ("access_w", abi.BIT_ACCESS_W),
                       ("access_x", abi.BIT_ACCESS_X), ("gla_valid", abi.BIT_GLA_VALID)):
        first, width = bits[name]
        assert width == 1, name
        assert first == bits_off * 8 + mask.bit_length() - 1, name
    first, width = bits["available"]
    assert (first, width) == (bits_off * 8 + 4, 12)
    assert abi.KNOWN_BITS == (1 << 4) - 1

    assert flags == {f.name: int(f) for f in MemEventFlag}
    assert abi.ring_size(sizes["entry"]) == abi.MEM_EVENT_RING_SIZE == DESIGN_RING_ENTRIES
    assert sizes["sring_header"] + DESIGN_RING_ENTRIES * sizes["entry"] <= abi.PAGE_SIZE


def test_c_ring_size_matches_abi(c_layout: Path) -> None:
    rows = run_c(c_layout, "ringsize")
    real = {int(r[1]): int(r[3]) for r in rows if r[0] == "ringsize"}
    assert real == {40: 64, 400: 8}
    assert abi.ring_size(abi.MEM_EVENT_SIZE) == real[40] == abi.MEM_EVENT_RING_SIZE
    assert abi.ring_size(abi.VM_EVENT_SIZE) == real[400] == abi.VM_EVENT_RING_SIZE
    sweep = [(int(r[1]), int(r[2]), int(r[3])) for r in rows if r[0] == "sweep"]
    assert len(sweep) > 10000
    for esz, page, expected in sweep:
        assert abi.ring_size(esz, page) == expected, (esz, page)


def test_c_encode_matches_codec(c_layout: Path) -> None:
    samples = sample_events()
    stdin = "".join(" ".join(str(s.get(n, 0)) for n in FIELD_NAMES) + "\n" for s in samples)
    rows = run_c(c_layout, "encode", stdin)
    assert len(rows) == len(samples)
    for fields, (hexbytes,) in zip(samples, rows, strict=True):
        c_bytes = bytes.fromhex(hexbytes)
        ev = mem_event(**fields)
        assert MemEventCodec.encode(ev) == c_bytes, fields
        assert MemEventCodec.decode(c_bytes) == ev, fields


def test_c_decode_matches_codec(c_layout: Path) -> None:
    """C reads what the codec wrote, including reserved bits the codec was told to carry."""
    samples = sample_events()
    events = [mem_event(**s) for s in samples]
    ev = mem_event(gfn=1, access_w=1)
    ev.reserved_bits = 0xABC
    events.append(ev)
    stdin = "".join(MemEventCodec.encode(e).hex() + "\n" for e in events)
    rows = run_c(c_layout, "decode", stdin)
    assert len(rows) == len(events)
    for e, row in zip(events, rows, strict=True):
        values = [int(x) for x in row]
        expected = [int(getattr(e, n)) for n in FIELD_NAMES] + [e.reserved_bits]
        assert values == expected
