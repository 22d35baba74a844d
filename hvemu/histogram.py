"""A small log-bucketed latency histogram (about 3% relative error).

Fault latencies span microseconds to seconds; keeping every sample of a long
run would cost memory and a sort, so values are binned by ``log2`` with 32
sub-buckets per octave, which is plenty for p50/p99 reporting.
"""

from __future__ import annotations

import math

_SUB = 32


class Histogram:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max = 0
        self.min = 0
        self.total = 0

    @staticmethod
    def _bucket(value: int) -> int:
        return 0 if value <= 1 else int(math.log2(value) * _SUB) + 1

    @staticmethod
    def _upper(bucket: int) -> float:
        return 1.0 if bucket == 0 else 2 ** (bucket / _SUB)

    def record(self, value: int) -> None:
        b = self._bucket(value)
        self.counts[b] = self.counts.get(b, 0) + 1
        if self.n == 0 or value < self.min:
            self.min = value
        self.n += 1
        self.total += value
        if value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        if other.n and (self.n == 0 or other.min < self.min):
            self.min = other.min
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, pct: float) -> float:
        """The value below which ``pct`` percent of samples fall (0 when empty)."""
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(self.n * pct / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(self._upper(b), float(self.max))
        return float(self.max)

    def summary(self, scale: float = 1.0) -> dict[str, float]:
        """p50/p99/max/mean, each divided by ``scale`` (e.g. 1000 for ns -> us)."""
        mean = self.total / self.n if self.n else 0.0
        return {
            "n": self.n,
            "p50": round(self.percentile(50) / scale, 2),
            "p99": round(self.percentile(99) / scale, 2),
            "max": round(self.max / scale, 2),
            "mean": round(mean / scale, 2),
        }

    def to_dict(self) -> dict[str, object]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "n": self.n,
                "max": self.max, "min": self.min, "total": self.total}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Histogram:
        h = cls()
        counts = data["counts"]
        assert isinstance(counts, dict)
        h.counts = {int(k): int(v) for k, v in counts.items()}
        h.n, h.max, h.min, h.total = (int(data[k]) for k in ("n", "max", "min", "total"))  # type: ignore[call-overload]
        return h
