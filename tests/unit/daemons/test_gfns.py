"""GfnsOfType: the lazy view of the gfns of one p2m type that victim policies work on."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pager.gfns import GfnsOfType, gfns_in

RW, OUT = 1, 5


def _table(rw: set[int], size: int) -> bytes:
    return bytes(RW if g in rw else OUT for g in range(size))


def test_sequence_answers_without_and_with_a_list() -> None:
    view = GfnsOfType(_table({2, 3, 7}, 10), RW)
    assert len(view) == 3 and 3 in view and 4 not in view and 99 not in view and "x" not in view
    assert view._list is None, "len and membership build no list"
    assert view[0] == 2 and view[-1] == 7 and view[1:] == [3, 7] and list(view) == [2, 3, 7]
    assert GfnsOfType(b"", RW).as_list() == [] and len(GfnsOfType(b"", RW)) == 0


@given(st.sets(st.integers(0, 199)), st.integers(-5, 205))
def test_walk_is_one_turn_from_the_hand(rw: set[int], hand: int) -> None:
    view = GfnsOfType(_table(rw, 200), RW)
    h = min(max(hand, 0), 200)
    assert list(view.walk(hand)) == sorted(g for g in rw if g >= h) + sorted(g for g in rw if g < h)


@given(st.sets(st.integers(0, 299)), st.integers(0, 40), st.sets(st.integers(0, 299), max_size=30))
def test_sample_is_distinct_of_the_type_and_avoids_when_it_can(rw: set[int], count: int, avoid: set[int]) -> None:
    view = GfnsOfType(_table(rw, 300), RW)
    picked = view.sample(count, random.Random(0), avoid=avoid)
    assert len(picked) == len(set(picked)) == min(count, len(rw))
    assert set(picked) <= rw
    if len(rw - avoid) >= count:
        assert not set(picked) & avoid


@pytest.mark.parametrize("density", [0.9, 0.05])  # rejection sampling, and the fallback to the list
def test_sample_is_uniform(density: float) -> None:
    rng = random.Random(7)
    size = 400
    rw = {g for g in range(size) if rng.random() < density}
    view = GfnsOfType(_table(rw, size), RW)
    counts: Counter[int] = Counter()
    draws = 20000
    for _ in range(draws):
        counts.update(view.sample(4, rng))
    expected = draws * 4 / len(rw)
    assert set(counts) == rw
    assert max(counts.values()) < 1.35 * expected and min(counts.values()) > 0.65 * expected


def test_gfns_in_wraps_a_list() -> None:
    view = gfns_in([0, 4, 9])
    assert list(view) == [0, 4, 9] and 4 in view and 5 not in view
    assert list(view.walk(5)) == [9, 0, 4]
    assert gfns_in(view) is view and len(gfns_in([])) == 0
