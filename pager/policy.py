"""Victim selection: which resident pages a pager evicts next.

Both policies avoid pages paged in recently (xenpaging keeps a similar list):
evicting a page the guest just faulted back is the classic thrash.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal, Protocol

PolicyName = Literal["random", "clock"]


class VictimPolicy(Protocol):
    def choose(self, candidates: list[int], count: int) -> list[int]: ...

    def paged_in(self, gfns: Iterable[int]) -> None: ...


class _RecentlyPagedIn:
    """A bounded set of gfns paged in lately, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._recent: OrderedDict[int, None] = OrderedDict()

    def paged_in(self, gfns: Iterable[int]) -> None:
        for g in gfns:
            self._recent[g] = None
            self._recent.move_to_end(g)
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)

    def __contains__(self, gfn: object) -> bool:
        return gfn in self._recent


class RandomPolicy(_RecentlyPagedIn):
    """Uniform random victims among resident pages not paged in lately."""

    def __init__(self, capacity: int = 256, seed: int | None = None) -> None:
        super().__init__(capacity)
        self._rng = random.Random(seed)

    def choose(self, candidates: list[int], count: int) -> list[int]:
        recent = self._recent  # a dict lookup, not a call of __contains__ per candidate
        # Draw a few more than needed and drop the recent ones: a uniform
        # choice among the fresh candidates at the cost of the draw, not of a
        # pass over every candidate (there may be a whole guest of them).
        n = len(candidates)
        if n > 4 * len(recent) and n > 8 * count:  # most draws are fresh and distinct: worth trying
            # i.i.d. uniform indices, first occurrences kept in draw order: a
            # uniform sample without replacement, at a C-level random() per
            # draw instead of random.sample's Python-level _randbelow.
            rnd = self._rng.random
            drawn = dict.fromkeys(int(rnd() * n) for _ in range(2 * count + 16))
            picked = [g for i in drawn if (g := candidates[i]) not in recent][:count]
            if len(picked) == count:
                return picked
        fresh = [g for g in candidates if g not in recent]
        pool = fresh if len(fresh) >= count else candidates
        return self._rng.sample(pool, min(count, len(pool)))


class ClockPolicy(_RecentlyPagedIn):
    """A sweeping hand over gfn order, skipping recently paged-in pages."""

    def __init__(self, capacity: int = 256) -> None:
        super().__init__(capacity)
        self._hand = 0

    def choose(self, candidates: list[int], count: int) -> list[int]:
        """``count`` gfns from the hand on (``candidates`` ascending), recent ones only if short.

        Walks only as far as it must (a binary search for the hand, then one
        step per gfn taken or skipped), not over every candidate per batch.
        """
        n = len(candidates)
        if not n:
            return []
        recent = self._recent
        start = bisect.bisect_left(candidates, self._hand)
        if start == n:
            start = 0
        picked: list[int] = []
        skipped: list[int] = []
        for i in range(start - n, start):  # negative indices wrap around: one full turn from start
            g = candidates[i]
            if g in recent:
                if len(skipped) < count:
                    skipped.append(g)
            else:
                picked.append(g)
                if len(picked) == count:
                    break
        if len(picked) < count:
            picked += skipped[: count - len(picked)]
        if picked:
            self._hand = picked[-1] + 1
        return picked


def make_policy(name: PolicyName, *, seed: int | None = None, recent: int = 256) -> VictimPolicy:
    if name == "random":
        return RandomPolicy(recent, seed)
    if name == "clock":
        return ClockPolicy(recent)
    raise ValueError(f"unknown victim policy {name!r} (choose random or clock)")
