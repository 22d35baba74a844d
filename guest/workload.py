"""What a vCPU does: a reproducible stream of page accesses.

Patterns a pager is judged by: ``sequential`` sweeps, ``uniform`` random,
``hotcold`` skew (most accesses to a small hot set), and ``phases`` (a hot
window that moves every few thousand accesses, so the working set changes).
Each vCPU draws from its own ``random.Random`` seeded from the run's seed and
its id, so a run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import msgspec

from hvemu.names import Pattern


class WorkloadConfig(msgspec.Struct, frozen=True):
    pattern: Pattern = "hotcold"
    write_ratio: float = 0.3
    hot_fraction: float = 0.1
    hot_probability: float = 0.9
    phase_length: int = 4000
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.write_ratio <= 1.0:
            raise ValueError("write_ratio must be within [0, 1]")
        if not 0.0 < self.hot_fraction <= 1.0:
            raise ValueError("hot_fraction must be within (0, 1]")
        if self.phase_length < 1:
            raise ValueError("phase_length must be positive")


def accesses(cfg: WorkloadConfig, gfns: Sequence[int], vcpu: int) -> Iterator[tuple[int, bool]]:
    """Endless ``(gfn, is_write)`` pairs for one vCPU over the pages it may touch."""
    if not gfns:
        raise ValueError("a workload needs at least one page")
    rng = random.Random(cfg.seed * 1_000_003 + vcpu)
    n = len(gfns)
    hot = max(1, int(n * cfg.hot_fraction))
    wr = cfg.write_ratio
    i = (vcpu * n) // 7
    count = 0
    while True:
        if cfg.pattern == "sequential":
            idx = i % n
            i += 1
        elif cfg.pattern == "uniform":
            idx = rng.randrange(n)
        elif cfg.pattern == "hotcold":
            idx = rng.randrange(hot) if rng.random() < cfg.hot_probability else rng.randrange(n)
        else:  # phases: the hot window moves by one window every phase_length accesses
            base = (count // cfg.phase_length) * hot
            idx = (base + rng.randrange(hot)) % n if rng.random() < cfg.hot_probability else rng.randrange(n)
        count += 1
        yield gfns[idx], rng.random() < wr
