"""The driver's hole punching: freed gfns coalesced into runs, one madvise per run."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hvemu.hypervisor.backend import _runs


def test_runs_of_a_batch() -> None:
    assert _runs([]) == []
    assert _runs([7, 5, 6]) == [(5, 3)], "a clock pager's batch is one run, whatever the order"
    assert _runs([1, 3, 4, 9]) == [(1, 1), (3, 2), (9, 1)]
    assert _runs([5, 5, 7]) == [(5, 1), (7, 1)], "a gfn named twice is still one page: 6 is not punched"


@given(st.lists(st.integers(0, 200)))
def test_runs_cover_exactly_the_gfns(gfns: list[int]) -> None:
    runs = _runs(gfns)
    covered = [g for start, length in runs for g in range(start, start + length)]
    assert covered == sorted(set(gfns))
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:], strict=False)), "runs are maximal"
