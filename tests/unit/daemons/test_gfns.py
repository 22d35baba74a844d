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
def test_sample_is_distinct_of_the_type_and_fresh_first(rw: set[int], count: int, avoid: set[int]) -> None:
    view = GfnsOfType(_table(rw, 300), RW)
    picked = view.sample(count, random.Random(0), avoid=avoid)
    assert len(picked) == len(set(picked)) == min(count, len(rw))
    assert set(picked) <= rw
    fresh = rw - avoid
    if len(fresh) >= count:
        assert not set(picked) & avoid
    else:
        assert fresh <= set(picked), "every fresh gfn is taken before any avoided one"


@pytest.mark.parametrize("size", [40, 2000])  # 20 of 40: drawn; 20 of 2000: too sparse, from the list
def test_sample_is_uniform_over_pairs(size: int) -> None:
    """Every pair equally likely: a sampler of neighbours, or of a biased start, would fail this."""
    rng = random.Random(7)
    rw = rng.sample(range(size), 20)
    view = GfnsOfType(_table(set(rw), size), RW)
    pairs: Counter[tuple[int, int]] = Counter()
    draws = 19000
    for _ in range(draws):
        a, b = view.sample(2, rng)
        pairs[(min(a, b), max(a, b))] += 1
    expected = draws / (20 * 19 / 2)
    assert len(pairs) == 190
    assert max(pairs.values()) < 1.6 * expected and min(pairs.values()) > 0.4 * expected
    assert (view._list is None) == (size == 40), "the path this case is meant to test"


def test_drawn_samples_avoid_what_they_are_told_to() -> None:
    """The draw path (a dense table: a real guest) skips avoided gfns, e.g. a policy's recently paged-in ones."""
    view = GfnsOfType(_table(set(range(4000)), 4000), RW)
    avoid = set(range(0, 4000, 2))
    for seed in range(50):
        picked = view.sample(64, random.Random(seed), avoid=avoid)
        assert len(picked) == 64 and not set(picked) & avoid
    assert view._list is None, "drawn, not listed"


def test_sample_draws_when_dense_and_lists_when_sparse() -> None:
    dense = GfnsOfType(_table(set(range(0, 1000, 2)), 1000), RW)
    assert len(dense.sample(16, random.Random(1))) == 16 and dense._list is None, "dense: drawn, no list"
    sparse = GfnsOfType(_table({3, 500, 999}, 100_000), RW)
    assert sorted(sparse.sample(5, random.Random(1))) == [3, 500, 999] and sparse._list is not None


def test_gfns_in_wraps_a_list() -> None:
    view = gfns_in([0, 4, 9])
    assert list(view) == [0, 4, 9] and 4 in view and 5 not in view
    assert list(view.walk(5)) == [9, 0, 4]
    assert gfns_in(view) is view and len(gfns_in([])) == 0
