"""Ring event traces, in the spirit of ``xentrace``: the file format and the events.

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
    16  8  u64    gfn (0 when the event has none; the first gfn of an evict/load batch)
    24  4  u32    argument, by event: ring occupancy after it (put, lost, refused,
                  response, rejected, block, wake); the vCPU's pause count after it
                  (pause, unpause); pages in the batch (evict, load); the ring's
                  size in slots (ring); the paging target in pages (target)
    28  4         zero

The core (sans-I/O) calls a tracer callback; the hypervisor's
:class:`hvemu.hypervisor.trace_writer.TraceWriter` is the driver side that timestamps,
filters by event mask and buffers records.
Reading and analysing traces (numpy, vectorised) is :mod:`hvemu.toolstack.tracetools`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable

from hvemu.abi import RingKind

MAGIC = b"HVTRACE1"
VERSION = 1
HEADER = struct.Struct("<8sII")
#: The record's fields, in order, with their struct codes: the one description both the writer's
#: :data:`RECORD` and the reader's numpy dtype (:func:`hvemu.toolstack.tracetools.record_dtype`) are built from.
FIELDS: tuple[tuple[str, str], ...] = (("ts_ns", "Q"), ("domid", "H"), ("ring", "B"), ("event", "B"),
                                       ("vcpu", "I"), ("gfn", "Q"), ("arg", "I"))
RECORD = struct.Struct("<" + "".join(code for _, code in FIELDS) + "4x")
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
    EVICT = 10        # a pager's evict batch freed frames (arg: pages)
    LOAD = 11         # a pager's load batch filled frames (arg: pages)
    RING = 12         # a ring is enabled, or was when the trace started (arg: its size)
    TARGET = 13       # a paging target set, or in force when the trace started (arg: pages)


#: Every event recorded (the default mask).
ALL_EVENTS = sum(1 << e for e in TraceEvent)
#: Events always recorded whatever the mask: what a reader needs to draw the others (ring sizes, targets).
STATE_EVENTS = (1 << TraceEvent.RING) | (1 << TraceEvent.TARGET)


def event_mask(names: Iterable[str]) -> int:
    """The mask of the events named (``put``, ``unpause``...; case-insensitive); ``ValueError`` names a bad one."""
    mask = 0
    for name in names:
        try:
            mask |= 1 << TraceEvent[name.strip().upper()]
        except KeyError:
            known = ", ".join(e.name.lower() for e in TraceEvent)
            raise ValueError(f"no trace event {name.strip()!r} (events: {known})") from None
    return mask


class TraceFormatError(ValueError):
    pass
