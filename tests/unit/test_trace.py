"""The trace format, the core's tracer hooks, and the summary built on them."""

from __future__ import annotations

import io
import os

import pytest

from hvemu import abi, trace
from hvemu.core.hypervisor import Hypervisor


def _traced_paging_round(path: str) -> trace.TraceWriter:
    """One guest fault served end to end on a sans-I/O core, traced to ``path``."""
    hv = Hypervisor(total_frames=64)
    writer = trace.TraceWriter(path)
    hv.tracer = writer
    dom = hv.create_domain(2, 16)
    ring = bytearray(abi.PAGE_SIZE)
    dom.mem_event_enable(abi.RingKind.paging, ring)
    assert dom.paging_nominate([3]) == [None]
    assert dom.paging_evict([3]) == [None]
    dom.guest_access(1, 3, abi.ACCESS_R)
    assert not dom.vcpus[1].runnable
    from hvemu.ring import BackRing, SharedRing

    back: BackRing[abi.MemEvent] = BackRing(SharedRing(ring, abi.MemEventCodec, page_size=abi.ring_bytes(64)))
    req = back.get_request() if back.unconsumed_requests() else None
    assert req is not None and req.gfn == 3
    assert dom.paging_load([3], lambda g: None) == [None]
    back.put_response(abi.MemEvent(type=req.type, flags=req.flags, vcpu_id=req.vcpu_id, gfn=req.gfn))
    back.push_responses()
    dom.mem_event_resume(abi.RingKind.paging)
    assert dom.vcpus[1].runnable
    writer.close()
    return writer


def test_core_events_are_recorded_and_summarised(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "t.trace")
    writer = _traced_paging_round(path)
    assert os.path.getsize(path) == trace.HEADER.size + writer.records * trace.RECORD.size
    with open(path, "rb") as f:
        records = list(trace.read(f))
    events = [r.event for r in records]
    assert events == [trace.TraceEvent.PAUSE, trace.TraceEvent.PUT, trace.TraceEvent.RESPONSE,
                      trace.TraceEvent.UNPAUSE]
    put = records[1]
    assert put[1] == 1 and put[2] == trace.RING_CODES[abi.RingKind.paging] and put[4] == 1 and put[5] == 3
    assert put[6] == 1, "a PUT records the occupancy after it"
    summary = trace.summarise(records)
    dom = summary["domains"]["1"]
    assert dom["events"] == {"paging.put": 1, "paging.response": 1, "pause": 1, "unpause": 1}
    assert dom["fault_latency_us"]["n"] == 1 and dom["max_occupancy"] == 1
    assert [r.ts_ns for r in records] == sorted(r.ts_ns for r in records)


def test_tracing_off_records_nothing(tmp_path: object) -> None:
    hv = Hypervisor(total_frames=8)
    dom = hv.create_domain(1, 4)
    assert dom.tracer is None
    path = os.path.join(str(tmp_path), "t.trace")
    hv.tracer = trace.TraceWriter(path)
    assert dom.tracer is hv.tracer, "turning tracing on reaches existing domains"
    hv.tracer = None
    assert dom.tracer is None


def test_bad_files_are_refused() -> None:
    with pytest.raises(trace.TraceFormatError, match="shorter"):
        list(trace.read(io.BytesIO(b"HV")))
    with pytest.raises(trace.TraceFormatError, match="magic"):
        list(trace.read(io.BytesIO(b"X" * 16)))
    with pytest.raises(trace.TraceFormatError, match="version"):
        list(trace.read(io.BytesIO(trace.HEADER.pack(trace.MAGIC, 9, 32))))


def test_truncated_last_record_is_ignored_and_unknown_events_counted() -> None:
    rec = trace.RECORD.pack(5, 1, 0, 77, 0, 0, 0)
    data = trace.HEADER.pack(trace.MAGIC, trace.VERSION, trace.RECORD.size) + rec + rec[:10]
    records = list(trace.read(io.BytesIO(data)))
    assert len(records) == 1
    assert trace.summarise(records)["domains"]["1"]["events"] == {"paging.event77": 1}
