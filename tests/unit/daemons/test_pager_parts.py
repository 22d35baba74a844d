"""The pager's pagefile and victim policies."""

from __future__ import annotations

import os

import pytest

from hvemu.abi import PAGE_SIZE
from pager.pagefile import Pagefile, PagefileMismatch, read_owner
from pager.policy import ClockPolicy, RandomPolicy, make_policy


def test_pagefile_round_trip_is_sparse_and_survives_reopen(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "pf")
    pf = Pagefile(path, 1024)
    pf.write(5, b"\x07" * PAGE_SIZE)
    pf.close()
    again = Pagefile(path, 1024)
    try:
        assert again.read(5) == b"\x07" * PAGE_SIZE
        assert again.read(6) == bytes(PAGE_SIZE), "a slot never written reads as zeros"
        assert os.stat(path).st_blocks * 512 < 64 * PAGE_SIZE, "the pagefile is not sparse"
        with pytest.raises(ValueError):
            again.read(1024)
        with pytest.raises(ValueError):
            again.write(1, b"short")
    finally:
        again.close()


A, B = "a" * 32, "b" * 32


def test_pagefile_records_its_domain_and_open_for_keeps_or_refuses(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "pf")
    assert read_owner(path, 16) is None, "no file, no owner"
    first = Pagefile.open_for(path, 16, handle=A, reattached=False, paged_out=0)
    first.write(3, b"\x03" * PAGE_SIZE)
    first.close()
    assert read_owner(path, 16) == A and read_owner(path, 32) is None, "the record names domain and size"
    # Re-attach (or pages out) with the file of this very domain: kept, pages and all.
    for reattached, paged_out in ((True, 5), (False, 5), (True, 0)):
        kept = Pagefile.open_for(path, 16, handle=A, reattached=reattached, paged_out=paged_out)
        assert kept.read(3) == b"\x03" * PAGE_SIZE
        kept.close()
    # Another domain instance with stored pages out (re-attached ring or new): refused, the file untouched.
    for reattached in (True, False):
        with pytest.raises(PagefileMismatch, match=f"handle {A}"):
            Pagefile.open_for(path, 16, handle=B, reattached=reattached, paged_out=7)
    with pytest.raises(PagefileMismatch, match="does not exist"):
        Pagefile.open_for(os.path.join(str(tmp_path), "none"), 16, handle=B, reattached=True, paged_out=1)
    assert read_owner(path, 16) == A
    # Nothing stored out (even on a re-attached ring): the stale file is started afresh for the new owner.
    fresh = Pagefile.open_for(path, 16, handle=B, reattached=True, paged_out=0)
    assert fresh.read(3) == bytes(PAGE_SIZE)
    fresh.close()
    assert read_owner(path, 16) == B
    with pytest.raises(PagefileMismatch):
        Pagefile(path, 16, owner=A)


@pytest.mark.parametrize("policy", [RandomPolicy(capacity=4, seed=1), ClockPolicy(capacity=4)])
def test_policies_avoid_pages_just_paged_in(policy: RandomPolicy | ClockPolicy) -> None:
    policy.paged_in([1, 2, 3])
    picked = policy.choose(list(range(10)), 5)
    assert len(picked) == 5 and not {1, 2, 3} & set(picked)
    # With too few fresh pages, recently paged-in ones are used rather than nothing.
    assert len(policy.choose([1, 2, 3, 4], 3)) == 3


def test_clock_hand_moves_on() -> None:
    clock = ClockPolicy()
    assert clock.choose(list(range(10)), 3) == [0, 1, 2]
    assert clock.choose(list(range(10)), 3) == [3, 4, 5]


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown victim policy"):
        make_policy("lru")  # type: ignore[arg-type]


def test_pagefile_is_locked_discarded_and_guarded(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "pf")
    mine = Pagefile.open_for(path, 16, handle=A, reattached=False, paged_out=0)
    with pytest.raises(PagefileMismatch, match="in use by another pager"):
        Pagefile.open_for(path, 16, handle=A, reattached=True, paged_out=3)
    mine.close()
    # A record of another domain that is still alive: its pages may be out, this file is theirs.
    with pytest.raises(PagefileMismatch, match="another live domain"):
        Pagefile.open_for(path, 16, handle=B, reattached=False, paged_out=0, live_handles={A, B})
    assert read_owner(path, 16) == A, "refused: the file is untouched"
    # A clean stop with everything in discards pages and record: the file no longer passes for a store.
    again = Pagefile.open_for(path, 16, handle=A, reattached=False, paged_out=0)
    again.write(1, b"\x01" * PAGE_SIZE)
    again.clear()
    again.close()
    assert read_owner(path, 16) is None and os.path.getsize(path) == 0
    with pytest.raises(PagefileMismatch, match="no record"):
        Pagefile.open_for(path, 16, handle=A, reattached=True, paged_out=2)
    # A refused open of a file that did not exist leaves none behind.
    missing = os.path.join(str(tmp_path), "missing")
    with pytest.raises(PagefileMismatch, match="does not exist"):
        Pagefile.open_for(missing, 16, handle=A, reattached=True, paged_out=2)
    assert not os.path.exists(missing)


def test_owner_record_is_only_read_where_a_record_can_be(tmp_path: object) -> None:
    """In a file of more slots, the page after slot 16 is guest data: it cannot pass for a record."""
    path = os.path.join(str(tmp_path), "pf")
    big = Pagefile(path, 32, fresh=True)
    small = Pagefile(os.path.join(str(tmp_path), "small"), 16, fresh=True, owner=A)
    forged = os.pread(small.fd, PAGE_SIZE, 16 * PAGE_SIZE)
    small.close()
    big.write(16, forged)  # a guest page that looks like a record for a 16-slot domain
    big.close()
    assert read_owner(path, 16) is None


def test_a_refused_pagefile_is_left_exactly_as_it_was(tmp_path: object) -> None:
    """A smaller domain's file, judged by a pager of a bigger one: not even its size may change."""
    path = os.path.join(str(tmp_path), "pf")
    small = Pagefile.open_for(path, 8, handle=A, reattached=False, paged_out=0)
    small.write(2, b"\x02" * PAGE_SIZE)
    small.close()
    size = os.path.getsize(path)
    with pytest.raises(PagefileMismatch):
        Pagefile.open_for(path, 16, handle=B, reattached=True, paged_out=4)
    with pytest.raises(PagefileMismatch):
        Pagefile.open_for(path, 16, handle=B, reattached=False, paged_out=0, live_handles={A})
    assert os.path.getsize(path) == size and read_owner(path, 8) == A
