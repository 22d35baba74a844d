"""Reading and analysing ring traces (:mod:`hvemu.trace`'s format), vectorised with numpy.

A trace is read into one numpy structured array whose fields are the
record's (``ts_ns domid ring event vcpu gfn arg``): half a million records
read in a few tens of milliseconds, where a Python loop over tuples takes
seconds, and every analysis here is array operations over whole columns.
What is built on it: ``hvemu trace summary`` (:func:`summarise`), ``trace
print`` (:func:`print_lines`, one line per event as ``xentrace_format``
prints them), ``trace export --chrome`` (:func:`chrome_trace`, the trace-event
JSON that ui.perfetto.dev and chrome://tracing open) and ``trace plot``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from hvemu.trace import (
    FIELDS,
    HEADER,
    MAGIC,
    NO_RING,
    NO_VCPU,
    RECORD,
    RING_NAMES,
    VERSION,
    TraceEvent,
    TraceFormatError,
)

#: A trace's records: a structured array with :data:`hvemu.trace.FIELDS`.
Records = npt.NDArray[np.void]

_NP_CODES = {"Q": "<u8", "I": "<u4", "H": "<u2", "B": "u1"}


def record_dtype() -> np.dtype[np.void]:
    """The numpy dtype of one record, from the same field list as the writer's struct (padding included)."""
    offsets, at = [], 0
    for _, code in FIELDS:
        offsets.append(at)
        at += np.dtype(_NP_CODES[code]).itemsize
    return np.dtype({"names": [n for n, _ in FIELDS], "formats": [_NP_CODES[c] for _, c in FIELDS],
                     "offsets": offsets, "itemsize": RECORD.size})


DTYPE = record_dtype()


def read(f: BinaryIO) -> Records:
    """Every record of a trace file as one structured array (a truncated last record is ignored)."""
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise TraceFormatError("not a trace file: shorter than its header")
    magic, version, size = HEADER.unpack(head)
    if magic != MAGIC:
        raise TraceFormatError(f"not a trace file: magic {magic!r}")
    if version != VERSION or size != RECORD.size:
        raise TraceFormatError(f"unsupported trace format version {version}, record size {size}")
    try:
        size = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):  # not a file on disk (a pipe, BytesIO)
        data = f.read()
        return np.frombuffer(data, dtype=DTYPE, count=len(data) // RECORD.size).copy()
    # Straight from the file into the array: ten times faster than reading bytes and copying them.
    return np.fromfile(f, dtype=DTYPE, count=size // RECORD.size)


def event_name(event: int) -> str:
    return TraceEvent(event).name.lower() if event in _EVENT_CODES else f"event{event}"


_EVENT_CODES = frozenset(int(e) for e in TraceEvent)
_RING_EVENTS = np.array([TraceEvent.PUT, TraceEvent.LOST, TraceEvent.REFUSED, TraceEvent.RESPONSE,
                         TraceEvent.REJECTED], dtype=np.uint8)


def fault_latencies(records: Records) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint16],
                                               npt.NDArray[np.uint32], npt.NDArray[np.float64]]:
    """Each guest event's ``(start ns, domid, vcpu, latency us)``: from its PUT to its vCPU's next UNPAUSE to 0.

    Per vCPU, the first PUT after the vCPU last ran opens a fault and the
    next UNPAUSE that leaves it runnable closes it; further PUTs before that
    (a retried access) and further UNPAUSEs after it change nothing.  Done
    on whole arrays: order each vCPU's PUTs and final UNPAUSEs in time, keep
    the first of each run of the same kind, and pair a PUT with the UNPAUSE
    right after it.
    """
    ev = records["event"]
    sel = records[(records["vcpu"] != NO_VCPU)
                  & ((ev == TraceEvent.PUT) | ((ev == TraceEvent.UNPAUSE) & (records["arg"] == 0)))]
    group = sel["domid"].astype(np.uint64) << np.uint64(32) | sel["vcpu"].astype(np.uint64)
    order = np.lexsort((np.arange(len(sel)), sel["ts_ns"], group))  # by vCPU, then time, then file order
    sel, group = sel[order], group[order]
    is_put = sel["event"] == TraceEvent.PUT
    head = np.ones(len(sel), dtype=bool)
    head[1:] = (is_put[1:] != is_put[:-1]) | (group[1:] != group[:-1])
    sel, group, is_put = sel[head], group[head], is_put[head]
    start = np.flatnonzero(is_put[:-1] & ~is_put[1:] & (group[:-1] == group[1:]))
    begin, end = sel["ts_ns"][start], sel["ts_ns"][start + 1]
    return begin, sel["domid"][start], sel["vcpu"][start], (end - begin).astype(np.float64) / 1000.0


def _percentiles(samples: npt.NDArray[np.float64]) -> dict[str, float]:
    """p50/p99/max as the other summaries compute them (the sample at n/2, at 99 % of n)."""
    s = np.sort(samples)
    n = len(s)
    return {"n": n, "p50": round(float(s[n // 2]), 2), "p99": round(float(s[min(n - 1, int(n * 0.99))]), 2),
            "max": round(float(s[-1]), 2)}


def summarise(records: Records) -> dict[str, Any]:
    """Counts per event and ring, per domain, with the largest ring occupancy and fault latency percentiles."""
    if not len(records):
        return {"records": 0, "domains": {}}
    key = (records["domid"].astype(np.uint32) << np.uint32(16)) | (records["ring"].astype(np.uint32) << np.uint32(8)) \
        | records["event"].astype(np.uint32)
    keys, counts = np.unique(key, return_counts=True)
    by_dom: dict[int, dict[str, int]] = {}
    for k, n in zip(keys.tolist(), counts.tolist(), strict=True):
        domid, ring, event = k >> 16, (k >> 8) & 0xFF, k & 0xFF
        name = event_name(event)
        label = f"{RING_NAMES.get(ring, '?')}.{name}" if ring != NO_RING else name
        by_dom.setdefault(domid, {})[label] = n
    puts = records[records["event"] == TraceEvent.PUT]
    _, dom_of, _, lat = fault_latencies(records)
    domains: dict[str, Any] = {}
    for domid, counts_of in sorted(by_dom.items()):
        mine = puts["arg"][puts["domid"] == domid]
        entry: dict[str, Any] = {"events": dict(sorted(counts_of.items())),
                                 "max_occupancy": int(mine.max()) if len(mine) else 0}
        samples = lat[dom_of == domid]
        if len(samples):
            entry["fault_latency_us"] = _percentiles(samples)
        domains[str(domid)] = entry
    ts = records["ts_ns"]
    return {"records": len(records), "duration_s": round(float(ts[-1] - ts[0]) / 1e9, 3), "domains": domains}


def _argument(event: int, arg: int) -> str:
    if event in (TraceEvent.PAUSE, TraceEvent.UNPAUSE):
        return f"pauses={arg}"
    if event in (TraceEvent.EVICT, TraceEvent.LOAD):
        return f"pages={arg}"
    if event == TraceEvent.RING:
        return f"size={arg}"
    if event == TraceEvent.TARGET:
        return f"target={arg}"
    return f"occupancy={arg}"


def print_lines(records: Records) -> Iterator[str]:
    """One line per event, as ``xentrace_format`` prints: seconds since the first, domain, vCPU, what, gfn, arg.

    ``    0.001234567 d1 v2   paging put      gfn=0x1f3 occupancy=1``; a vCPU of
    none (a foreign producer, a batch) is ``v-``, a vCPU event's ring ``-``.
    """
    if not len(records):
        return
    t0 = int(records["ts_ns"][0])
    for ts, domid, ring, event, vcpu, gfn, arg in records.tolist():
        who = "v-" if vcpu == NO_VCPU else f"v{vcpu}"
        gfn_text = f"gfn={gfn:#x}" if gfn or event not in (TraceEvent.PAUSE, TraceEvent.UNPAUSE, TraceEvent.RING,
                                                             TraceEvent.TARGET, TraceEvent.BLOCK,
                                                             TraceEvent.WAKE) else ""
        yield (f"{(ts - t0) / 1e9:14.9f} d{domid:<3} {who:<4} {RING_NAMES.get(ring, '?'):>7} {event_name(event):<8} "
               f"{gfn_text:<14} {_argument(event, arg)}").rstrip()


def chrome_trace(records: Records) -> dict[str, Any]:
    """The trace as Chrome/Perfetto trace-event JSON (the "JSON object format").

    One process per domain (``pid`` = domid) with a thread per vCPU (``tid``
    = vCPU id) and one for the pager (``tid`` = :data:`PAGER_TID`);
    timestamps are microseconds since the first record.

    - fault spans: a complete event (``ph: "X"``) per guest fault, on its vCPU,
      from the request put to the vCPU runnable again;
    - ring occupancy: a counter (``ph: "C"``) per ring, after each ring event;
    - evict and load batches: complete events on the pager thread (pages in
      ``args``); lost, refused and rejected events, congestion blocks and
      wakes: instant events (``ph: "i"``) on the vCPU (or the pager thread
      for a foreign producer); target changes and ring sizes: counters.
    """
    events: list[dict[str, Any]] = []
    if not len(records):
        return {"traceEvents": events, "displayTimeUnit": "ms"}
    t0 = int(records["ts_ns"][0])

    def us(ts: int) -> float:
        return round((ts - t0) / 1000.0, 3)

    for domid in np.unique(records["domid"]).tolist():
        events.append({"ph": "M", "name": "process_name", "pid": domid, "tid": 0, "args": {"name": f"dom{domid}"}})
        mine = records[(records["domid"] == domid) & (records["vcpu"] != NO_VCPU)]
        for vcpu in np.unique(mine["vcpu"]).tolist():
            events.append({"ph": "M", "name": "thread_name", "pid": domid, "tid": vcpu,
                           "args": {"name": f"vCPU {vcpu}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": domid, "tid": PAGER_TID,
                       "args": {"name": "pager / foreign"}})
    begin, dom_of, vcpu_of, lat = fault_latencies(records)
    faults = records[(records["event"] == TraceEvent.PUT) & (records["vcpu"] != NO_VCPU)]
    gfn_at = {(int(r[0]), int(r[1]), int(r[4])): int(r[5]) for r in faults.tolist()}
    for ts, domid, vcpu, dur in zip(begin.tolist(), dom_of.tolist(), vcpu_of.tolist(), lat.tolist(), strict=True):
        gfn = gfn_at.get((ts, domid, vcpu), 0)
        events.append({"ph": "X", "name": "fault", "cat": "fault", "pid": domid, "tid": vcpu, "ts": us(ts),
                       "dur": round(dur, 3), "args": {"gfn": hex(gfn)}})
    for ts, domid, ring, event, vcpu, gfn, arg in records.tolist():
        tid = PAGER_TID if vcpu == NO_VCPU else vcpu
        ring_name = RING_NAMES.get(ring, "?")
        if event in _RING_EVENTS_SET:
            events.append({"ph": "C", "name": f"{ring_name} ring occupancy", "pid": domid, "ts": us(ts),
                           "args": {"requests": arg}})
            if event in (TraceEvent.LOST, TraceEvent.REFUSED, TraceEvent.REJECTED):
                events.append({"ph": "i", "s": "t", "name": f"{ring_name} {event_name(event)}", "cat": "ring",
                               "pid": domid, "tid": tid, "ts": us(ts), "args": {"gfn": hex(gfn)}})
        elif event in (TraceEvent.BLOCK, TraceEvent.WAKE):
            events.append({"ph": "i", "s": "t", "name": f"{ring_name} {event_name(event)}", "cat": "congestion",
                           "pid": domid, "tid": tid, "ts": us(ts), "args": {"occupancy": arg}})
        elif event in (TraceEvent.EVICT, TraceEvent.LOAD):
            events.append({"ph": "X", "name": f"{event_name(event)} {arg} pages", "cat": "paging", "pid": domid,
                           "tid": PAGER_TID, "ts": us(ts), "dur": 0, "args": {"pages": arg, "first_gfn": hex(gfn)}})
        elif event == TraceEvent.TARGET:
            events.append({"ph": "C", "name": "paging target (pages)", "pid": domid, "ts": us(ts),
                           "args": {"pages": arg}})
        elif event == TraceEvent.RING:
            events.append({"ph": "C", "name": f"{ring_name} ring size", "pid": domid, "ts": us(ts),
                           "args": {"slots": arg}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "hvemu trace", "records": len(records)}}


#: The thread of a domain's pager (and foreign producers) in :func:`chrome_trace`: above any vCPU id.
PAGER_TID = 1 << 20
_RING_EVENTS_SET = frozenset(int(e) for e in _RING_EVENTS)

