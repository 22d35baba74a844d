"""The gfns of one p2m type, as a read-only sequence that builds no list unless asked.

Eviction chooses a batch of victims among every resident gfn, once per
batch.  Listing every resident gfn (a whole guest, when it is about to be
paged out) costs more than copying the batch, so it cannot be done per
batch.  :class:`GfnsOfType` answers what a victim policy asks -- how many,
is this gfn one of them, the next ones from a clock hand, some at random --
with C-level scans of a snapshot of the p2m type array, and builds the full
list only when it is indexed or iterated (a custom policy may do either).
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Container, Iterator, Sequence
from typing import overload

# Rejection sampling is sized for at least this share of all gfns matching: it
# then needs a handful of draws per gfn picked, instead of a full listing.
_DENSE = 1 / 8


@functools.cache
def _selector(value: int) -> bytes:
    """A ``bytes.translate`` table mapping ``value`` to 1 and every other byte to 0."""
    return bytes(1 if i == value else 0 for i in range(256))


@functools.cache
def _finder(value: int) -> re.Pattern[bytes]:
    return re.compile(re.escape(bytes([value])))


class GfnsOfType(Sequence[int]):
    """Every gfn whose p2m type was ``p2mt`` in ``table`` (one byte per gfn), ascending.

    ``table`` is a snapshot: the hypervisor changes types at any time, and a
    gfn chosen from here may no longer qualify when it is acted on (a
    nominate then answers ``EBUSY``, which is harmless).
    """

    def __init__(self, table: bytes, p2mt: int) -> None:
        self._table = table
        self._value = p2mt
        self._byte = bytes([p2mt])
        self._count = -1  # counted on first use: a clock hand's walk never needs it
        self._list: list[int] | None = None

    # ------------------------------------------------------------- Sequence
    def __len__(self) -> int:
        if self._count < 0:
            self._count = self._table.count(self._byte)
        return self._count

    def __contains__(self, gfn: object) -> bool:
        return isinstance(gfn, int) and 0 <= gfn < len(self._table) and self._table[gfn] == self._value

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self.as_list()[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.as_list())

    def __repr__(self) -> str:
        return f"GfnsOfType(p2mt={self._value}, {len(self)} of {len(self._table)} gfns)"

    def as_list(self) -> list[int]:
        """All of them, ascending (built once, on first use)."""
        if self._list is None:
            table = self._table
            if len(self) * 5 >= len(table):
                # Many matches: one translate + compress pass over every byte.
                self._list = list(itertools.compress(range(len(table)), table.translate(_selector(self._value))))
            else:
                # Few: a search that touches only the matches.
                self._list = [m.start() for m in _finder(self._value).finditer(table)]
        return self._list

    # ------------------------------------------------------------- policies' questions
    def walk(self, start: int) -> Iterator[int]:
        """The gfns from ``start`` on, ascending, then from 0 up to ``start``: one full turn of a clock hand."""
        table, byte = self._table, self._byte
        find = table.find
        n = len(table)
        start = min(max(start, 0), n)
        for lo, hi in ((start, n), (0, start)):
            i = find(byte, lo, hi)
            while i >= 0:
                yield i
                i = find(byte, i + 1, hi)

    def sample(self, count: int, rng: random.Random, avoid: Container[int] = ()) -> list[int]:
        """Up to ``count`` distinct gfns, uniformly at random; gfns in ``avoid`` only when too few others.

        When the type is common (the usual case: most of a guest is
        resident), random gfns are drawn and the wrong ones rejected, a few
        draws per gfn picked.  Otherwise, or when a bounded number of draws
        falls short (most are in ``avoid``), it samples the full list.
        """
        n = len(self._table)
        if count <= 0 or not n:
            return []
        if count * 8 <= len(self) and len(self) >= _DENSE * n:
            table, value, rnd = self._table, self._value, rng.random
            picked: dict[int, None] = {}
            # i.i.d. uniform draws, first occurrences of the right ones kept: a
            # uniform sample without replacement.  The cap allows 1/_DENSE draws
            # per pick four times over.
            for _ in range(int(count / _DENSE) * 4 + 64):
                g = int(rnd() * n)
                if table[g] == value and g not in avoid:
                    picked[g] = None
                    if len(picked) == count:
                        return list(picked)
        every = self.as_list()
        fresh = [g for g in every if g not in avoid]
        if len(fresh) >= count:
            return rng.sample(fresh, count)
        # Too few fresh ones: all of them, then avoided ones to make up the count.
        avoided = [g for g in every if g in avoid]
        return fresh + rng.sample(avoided, min(count - len(fresh), len(avoided)))


def gfns_in(candidates: Sequence[int], p2mt: int = 0) -> GfnsOfType:
    """``candidates`` (ascending gfns, e.g. a plain list in a test) as a :class:`GfnsOfType`."""
    if isinstance(candidates, GfnsOfType):
        return candidates
    size = (max(candidates) + 1) if len(candidates) else 0
    table = bytearray([p2mt ^ 0xFF]) * size
    for g in candidates:
        table[g] = p2mt
    return GfnsOfType(bytes(table), p2mt)
