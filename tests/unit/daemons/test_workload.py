"""Workloads are reproducible and shaped as their names say."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from guest.workload import WorkloadConfig, accesses
from hvemu.histogram import Histogram


def _take(cfg: WorkloadConfig, n: int, vcpu: int = 0, pages: int = 1000) -> list[tuple[int, bool]]:
    return list(itertools.islice(accesses(cfg, list(range(pages)), vcpu), n))


def test_same_seed_same_stream_and_vcpus_differ() -> None:
    cfg = WorkloadConfig(pattern="uniform", seed=5)
    assert _take(cfg, 200) == _take(cfg, 200)
    assert _take(cfg, 200, vcpu=0) != _take(cfg, 200, vcpu=1)
    assert _take(cfg, 200) != _take(WorkloadConfig(pattern="uniform", seed=6), 200)


def test_sequential_sweeps_in_order() -> None:
    gfns = [g for g, _ in _take(WorkloadConfig(pattern="sequential"), 20)]
    assert all(b == (a + 1) % 1000 for a, b in itertools.pairwise(gfns))


def test_hotcold_concentrates_on_the_hot_set() -> None:
    cfg = WorkloadConfig(pattern="hotcold", hot_fraction=0.1, hot_probability=0.9)
    hits = Counter(g < 100 for g, _ in _take(cfg, 20000))
    assert 0.88 < hits[True] / 20000 < 0.94


def test_phases_move_the_hot_window() -> None:
    cfg = WorkloadConfig(pattern="phases", hot_fraction=0.1, hot_probability=1.0, phase_length=1000)
    first = {g for g, _ in _take(cfg, 1000)}
    both = {g for g, _ in _take(cfg, 2000)[1000:]}
    assert first <= set(range(100)) and both <= set(range(100, 200))


def test_write_ratio_is_respected() -> None:
    writes = sum(w for _, w in _take(WorkloadConfig(pattern="uniform", write_ratio=0.25), 20000))
    assert 0.23 < writes / 20000 < 0.27


@pytest.mark.parametrize("bad", [{"write_ratio": 1.5}, {"hot_fraction": 0.0}, {"phase_length": 0}])
def test_bad_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(**bad)  # type: ignore[arg-type]


def test_histogram_percentiles_within_a_few_percent() -> None:
    h = Histogram()
    for v in range(1, 10001):
        h.record(v * 1000)
    assert abs(h.percentile(50) - 5_000_000) / 5_000_000 < 0.03
    assert abs(h.percentile(99) - 9_900_000) / 9_900_000 < 0.03
    assert h.max == 10_000_000
    other = Histogram()
    other.record(20_000_000)
    h.merge(other)
    assert h.n == 10001 and h.max == 20_000_000
    assert Histogram.from_dict(h.to_dict()).percentile(50) == h.percentile(50)
