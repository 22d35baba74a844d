"""Victim selection: which resident pages a pager evicts next.

``clock`` (the default) is xenpaging's own policy; ``random`` is the
classic alternative.  Both avoid pages paged in recently (xenpaging keeps a similar list):
evicting a page the guest just faulted back is the classic thrash.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from hvemu.names import VictimPolicyName
from pager.gfns import gfns_in

PolicyName = VictimPolicyName


class VictimPolicy(Protocol):
    def choose(self, candidates: Sequence[int], count: int) -> list[int]:
        """At most ``count`` of ``candidates`` (ascending gfns: a :class:`~pager.gfns.GfnsOfType` or a list)."""

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

    def choose(self, candidates: Sequence[int], count: int) -> list[int]:
        return gfns_in(candidates).sample(count, self._rng, avoid=self._recent)


class ClockPolicy(_RecentlyPagedIn):
    """xenpaging's default policy: a hand sweeping over gfn order, skipping recently paged-in pages.

    Victims come in gfn order, so a batch is mostly one run of gfns: the
    hypervisor gives its frames back with one hole punched per run, and
    the pagefile is written sequentially.
    """

    def __init__(self, capacity: int = 256) -> None:
        super().__init__(capacity)
        self._hand = 0

    def choose(self, candidates: Sequence[int], count: int) -> list[int]:
        """``count`` gfns from the hand on, recent ones only if short.

        Walks only as far as it must (one C-level search per gfn taken or
        skipped), never over every candidate per batch.
        """
        recent = self._recent  # a dict lookup, not a call of __contains__ per candidate
        picked: list[int] = []
        skipped: list[int] = []
        if count <= 0:
            return picked
        for g in gfns_in(candidates).walk(self._hand):
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
