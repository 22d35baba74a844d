"""Page stamps: every way a page can go wrong is caught."""

from __future__ import annotations

import pytest

from guest.stamp import StampError, make_page, read_stamp, verify_page
from hvemu.abi import PAGE_SIZE


def test_page_round_trip() -> None:
    page = make_page(7, 3)
    assert len(page) == PAGE_SIZE
    assert read_stamp(page) == (7, 3)
    verify_page(page, 7, 3)


def test_zero_page_is_valid_only_before_the_first_write() -> None:
    zero = bytes(PAGE_SIZE)
    verify_page(zero, 5, 0)
    with pytest.raises(StampError, match="lost write"):
        verify_page(zero, 5, 1)


def test_stale_version_is_a_lost_write() -> None:
    with pytest.raises(StampError, match="version 2, expected 3"):
        verify_page(make_page(9, 2), 9, 3)


def test_page_of_another_gfn_is_caught() -> None:
    with pytest.raises(StampError, match="belongs to gfn 8"):
        verify_page(make_page(8, 1), 9, 1)


@pytest.mark.parametrize("offset", [0, 4, 8, 100, PAGE_SIZE - 1])
def test_any_flipped_byte_is_caught(offset: int) -> None:
    page = bytearray(make_page(3, 4))
    page[offset] ^= 0x40
    with pytest.raises(StampError):
        verify_page(bytes(page), 3, 4)


def test_torn_page_is_caught() -> None:
    torn = make_page(3, 4)[:2048] + make_page(3, 5)[2048:]
    with pytest.raises(StampError, match="checksum"):
        verify_page(torn, 3, 4)
