"""Ring event traces, in the spirit of ``xentrace``: the file format and its readers.

A trace file is a 16-byte header followed by fixed-size little-endian records,
so it can be read from any language and appended to cheaply while the
hypervisor runs:

header (16 bytes)::

    0   8  magic  b"HVTRACE1"
    8   4  u32    format version (1)
    12  4  u32    record size (32)

record (32 bytes)::

    0   8  u64    timestamp, ns, CLOCK_MONOTONIC of the hypervisor host
    8   2  u16    domid
    10  1  u8     ring: 0 paging, 1 access, 2 sharing, 255 none (vCPU events)
    11  1  u8     event (:class:`TraceEvent`)
    12  4  u32    vCPU id, 0xFFFFFFFF for a foreign producer / none
    16  8  u64    gfn (0 when the event has none)
    24  4  u32    argument: ring occupancy after the event (ring events) or
                  the vCPU's pause count after it (pause/unpause)
    28  4         zero

The core (sans-I/O) calls a tracer callback; :class:`TraceWriter` is the
driver side that timestamps and buffers records.  ``summarise`` and
``fault_latencies`` are what ``hvemu trace summary`` and ``hvemu trace plot``
are built on.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from hvemu.abi import RingKind

MAGIC = b"HVTRACE1"
VERSION = 1
HEADER = struct.Struct("<8sII")
RECORD = struct.Struct("<QHBBIQI4x")
assert HEADER.size == 16 and RECORD.size == 32

NO_VCPU = 0xFFFFFFFF
NO_RING = 255
RING_CODES: dict[RingKind, int] = {RingKind.paging: 0, RingKind.access: 1, RingKind.sharing: 2}
RING_NAMES = {v: k.value for k, v in RING_CODES.items()} | {NO_RING: "-"}


#: What the core calls: ``tracer(event, domid, ring, vcpu, gfn, arg)``.
Tracer = Callable[[int, int, int, int, int, int], None]


class TraceEvent(enum.IntEnum):
    PUT = 1           # a request went on the ring
    LOST = 2          # ring full, event dropped (seed EAGAIN)
    REFUSED = 3       # claim policy: foreign producer told EBUSY
    RESPONSE = 4      # a response was consumed
    REJECTED = 5      # a response was refused (bad vCPU/gfn/flags)
    BLOCK = 6         # mark_and_pause: a vCPU paused for ring congestion
    WAKE = 7          # a congestion-paused vCPU released
    PAUSE = 8         # vcpu_pause (any reason)
    UNPAUSE = 9       # vcpu_unpause


_EVENT_CODES = frozenset(int(e) for e in TraceEvent)


class TraceRecord(tuple[int, int, int, int, int, int, int]):
    """``(ts_ns, domid, ring, event, vcpu, gfn, arg)``."""

    __slots__ = ()

    @property
    def ts_ns(self) -> int:
        return self[0]

    @property
    def event(self) -> TraceEvent:
        return TraceEvent(self[3])


class TraceWriter:
    """Buffered writer: the hypervisor's tracer callback."""

    FLUSH_AT = 1 << 16

    def __init__(self, path: str, *, exclusive: bool = False) -> None:
        """Open ``path`` owner-only; ``exclusive``: only as a new file (never truncate one, never follow a link)."""
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_EXCL | os.O_NOFOLLOW if exclusive else os.O_TRUNC
        self._fd = os.open(path, flags, 0o600)
        self._buf = bytearray(HEADER.pack(MAGIC, VERSION, RECORD.size))
        self.records = 0

    def __call__(self, event: int, domid: int, ring: int, vcpu: int, gfn: int, arg: int) -> None:
        self._buf += RECORD.pack(time.monotonic_ns(), domid & 0xFFFF, ring, event,
                                 vcpu & 0xFFFFFFFF, gfn & 0xFFFFFFFFFFFFFFFF, arg & 0xFFFFFFFF)
        self.records += 1
        if len(self._buf) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done:])

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1


class TraceFormatError(ValueError):
    pass


def read(f: BinaryIO) -> Iterator[TraceRecord]:
    """Every record of a trace file (a truncated last record is ignored)."""
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise TraceFormatError("not a trace file: shorter than its header")
    magic, version, size = HEADER.unpack(head)
    if magic != MAGIC:
        raise TraceFormatError(f"not a trace file: magic {magic!r}")
    if version != VERSION or size != RECORD.size:
        raise TraceFormatError(f"unsupported trace format version {version}, record size {size}")
    while True:
        chunk = f.read(RECORD.size * 4096)
        usable = len(chunk) - len(chunk) % RECORD.size
        for rec in RECORD.iter_unpack(chunk[:usable]):
            yield TraceRecord(rec)
        if len(chunk) < RECORD.size * 4096:
            return


def fault_latencies(records: list[TraceRecord]) -> list[tuple[int, int, float]]:
    """``(ts_ns, domid, latency_us)`` of each guest event: from its PUT to its vCPU's next UNPAUSE to 0."""
    pending: dict[tuple[int, int], int] = {}
    out: list[tuple[int, int, float]] = []
    for r in records:
        ts, domid, _ring, event, vcpu, _gfn, arg = r
        if vcpu == NO_VCPU:
            continue
        key = (domid, vcpu)
        if event == TraceEvent.PUT and key not in pending:
            pending[key] = ts
        elif event == TraceEvent.UNPAUSE and arg == 0 and key in pending:
            start = pending.pop(key)
            out.append((start, domid, (ts - start) / 1000.0))
    return out


def summarise(records: list[TraceRecord]) -> dict[str, Any]:
    """Counts per event and ring, per domain, with fault latency percentiles."""
    if not records:
        return {"records": 0, "domains": {}}
    by_dom: dict[int, Counter[str]] = {}
    occupancy: dict[int, int] = {}
    for r in records:
        _, domid, ring, event, _vcpu, _gfn, arg = r
        name = TraceEvent(event).name.lower() if event in _EVENT_CODES else f"event{event}"
        key = f"{RING_NAMES.get(ring, '?')}.{name}" if ring != NO_RING else name
        by_dom.setdefault(domid, Counter())[key] += 1
        if event == TraceEvent.PUT:
            occupancy[domid] = max(occupancy.get(domid, 0), arg)
    lat: dict[int, list[float]] = {}
    for _, domid, us in fault_latencies(records):
        lat.setdefault(domid, []).append(us)
    domains: dict[str, Any] = {}
    for domid, counts in sorted(by_dom.items()):
        entry: dict[str, Any] = {"events": dict(sorted(counts.items())),
                                 "max_occupancy": occupancy.get(domid, 0)}
        samples = sorted(lat.get(domid, []))
        if samples:
            entry["fault_latency_us"] = {
                "n": len(samples), "p50": round(samples[len(samples) // 2], 2),
                "p99": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
                "max": round(samples[-1], 2)}
        domains[str(domid)] = entry
    return {"records": len(records), "duration_s": round((records[-1][0] - records[0][0]) / 1e9, 3),
            "domains": domains}
