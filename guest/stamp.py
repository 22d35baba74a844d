"""The integrity stamp every guest page carries.

A page written by the guest holds ``magic, crc32, gfn, version`` followed by a
body derived from ``(gfn, version)``.  The crc covers everything after itself,
so a torn, stale, zeroed or misplaced page is caught on the next read: a wrong
``gfn`` means the page landed at the wrong place, an old ``version`` means a
write was lost across page-out and page-in.  A page never written reads back
as zeros, which is valid only while its expected version is 0.
"""

from __future__ import annotations

import struct
import zlib

from hvemu.abi import PAGE_SIZE

MAGIC = 0x48565047  # "HVPG"
_HEADER = struct.Struct("<IIQQ")
HEADER_SIZE = _HEADER.size
_BODY_WORDS = (PAGE_SIZE - HEADER_SIZE) // 8
_WORD = struct.Struct("<Q")
_ZERO_PAGE = bytes(PAGE_SIZE)


class StampError(Exception):
    """A page failed verification; the message says how."""


def make_page(gfn: int, version: int) -> bytes:
    """The full contents of ``gfn`` at ``version``."""
    word = ((gfn * 0x9E3779B97F4A7C15) ^ (version * 0xC2B2AE3D27D4EB4F)) & 0xFFFFFFFFFFFFFFFF
    tail = _WORD.pack(gfn) + _WORD.pack(version) + _WORD.pack(word) * _BODY_WORDS
    crc = zlib.crc32(tail)
    return struct.pack("<II", MAGIC, crc) + tail


def read_stamp(page: bytes | memoryview) -> tuple[int, int] | None:
    """``(gfn, version)`` of a stamped page, None for a zero page; raises on corruption."""
    magic, crc, gfn, version = _HEADER.unpack_from(page, 0)
    if magic != MAGIC:
        if magic == 0 and page == _ZERO_PAGE:
            return None
        raise StampError(f"bad magic {magic:#x}")
    if zlib.crc32(page[8:]) != crc:
        raise StampError(f"checksum mismatch (stamp says gfn {gfn} version {version})")
    return gfn, version


def verify_page(page: bytes | memoryview, gfn: int, expected_version: int) -> None:
    """Raise :class:`StampError` unless ``page`` is ``gfn`` at ``expected_version``."""
    stamp = read_stamp(page)
    if stamp is None:
        if expected_version:
            raise StampError(f"gfn {gfn}: zero page, expected version {expected_version} (lost write)")
        return
    got_gfn, got_version = stamp
    if got_gfn != gfn:
        raise StampError(f"gfn {gfn}: page belongs to gfn {got_gfn} (wrong page)")
    if got_version != expected_version:
        raise StampError(f"gfn {gfn}: version {got_version}, expected {expected_version} (lost write)")
