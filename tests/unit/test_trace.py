"""The trace format, the core's tracer hooks, and what is built on them: summary, print, Chrome export."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Sequence

import numpy as np
import pytest

from hvemu import abi, trace
from hvemu.core.hypervisor import Hypervisor
from hvemu.hypervisor.trace_writer import TraceWriter
from hvemu.toolstack import tracetools
from hvemu.trace import TraceEvent


def _traced_paging_round(path: str, mask: int = trace.ALL_EVENTS) -> TraceWriter:
    """One guest fault served end to end on a sans-I/O core, traced to ``path``."""
    hv = Hypervisor(total_frames=64)
    writer = TraceWriter(path, mask=mask)
    hv.tracer = writer
    dom = hv.create_domain(2, 16)
    ring = bytearray(abi.PAGE_SIZE)
    dom.mem_event_enable(abi.RingKind.paging, ring)
    assert dom.paging_nominate([3, 4]) == [None, None]
    assert dom.paging_evict([3, 4]) == [None, None]
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


def _read(path: str) -> tracetools.Records:
    with open(path, "rb") as f:
        return tracetools.read(f)


def test_core_events_are_recorded_and_summarised(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "t.trace")
    writer = _traced_paging_round(path)
    assert os.path.getsize(path) == trace.HEADER.size + writer.records * trace.RECORD.size
    records = _read(path)
    assert records.dtype.itemsize == trace.RECORD.size
    events = [TraceEvent(e) for e in records["event"]]
    assert events == [TraceEvent.EVICT, TraceEvent.PAUSE, TraceEvent.PUT, TraceEvent.LOAD, TraceEvent.RESPONSE,
                      TraceEvent.UNPAUSE]
    evict, put, load = records[0], records[2], records[3]
    assert (evict["gfn"], evict["arg"]) == (3, 2), "an evict batch: its first gfn and its size"
    assert (load["gfn"], load["arg"]) == (3, 1)
    assert put["domid"] == 1 and put["ring"] == trace.RING_CODES[abi.RingKind.paging]
    assert put["vcpu"] == 1 and put["gfn"] == 3 and put["arg"] == 1, "a PUT records the occupancy after it"
    summary = tracetools.summarise(records)
    dom = summary["domains"]["1"]
    assert dom["events"] == {"paging.put": 1, "paging.response": 1, "paging.evict": 1, "paging.load": 1,
                             "pause": 1, "unpause": 1}
    assert dom["fault_latency_us"]["n"] == 1 and dom["max_occupancy"] == 1
    assert (np.diff(records["ts_ns"].astype(np.int64)) >= 0).all()


def test_the_event_mask_keeps_only_the_events_asked_for(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "t.trace")
    _traced_paging_round(path, mask=trace.event_mask(["put", "EVICT"]))
    assert [TraceEvent(e) for e in _read(path)["event"]] == [TraceEvent.EVICT, TraceEvent.PUT]
    with pytest.raises(ValueError, match="no trace event 'puts'"):
        trace.event_mask(["puts"])


def test_tracing_off_records_nothing(tmp_path: object) -> None:
    hv = Hypervisor(total_frames=8)
    dom = hv.create_domain(1, 4)
    assert dom.tracer is None
    path = os.path.join(str(tmp_path), "t.trace")
    hv.tracer = TraceWriter(path)
    assert dom.tracer is hv.tracer, "turning tracing on reaches existing domains"
    hv.tracer = None
    assert dom.tracer is None


def test_bad_files_are_refused() -> None:
    with pytest.raises(trace.TraceFormatError, match="shorter"):
        tracetools.read(io.BytesIO(b"HV"))
    with pytest.raises(trace.TraceFormatError, match="magic"):
        tracetools.read(io.BytesIO(b"X" * 16))
    with pytest.raises(trace.TraceFormatError, match="version"):
        tracetools.read(io.BytesIO(trace.HEADER.pack(trace.MAGIC, 9, 32)))


def _file(records: list[tuple[int, int, int, int, int, int, int]], tail: bytes = b"") -> io.BytesIO:
    data = trace.HEADER.pack(trace.MAGIC, trace.VERSION, trace.RECORD.size)
    data += b"".join(trace.RECORD.pack(*r) for r in records) + tail
    return io.BytesIO(data)


def test_truncated_last_record_is_ignored_and_unknown_events_counted() -> None:
    rec = trace.RECORD.pack(5, 1, 0, 77, 0, 0, 0)
    records = tracetools.read(_file([(5, 1, 0, 77, 0, 0, 0)], rec[:10]))
    assert len(records) == 1
    assert tracetools.summarise(records)["domains"]["1"]["events"] == {"paging.event77": 1}


def _latencies_one_by_one(records: Sequence[tuple[int, ...]]) -> list[tuple[int, int, int, float]]:
    """The oracle: the pairing rule walked record by record, as the docstring states it."""
    pending: dict[tuple[int, int], int] = {}
    out = []
    for ts, domid, _ring, event, vcpu, _gfn, arg in records:
        if vcpu == trace.NO_VCPU:
            continue
        key = (domid, vcpu)
        if event == TraceEvent.PUT and key not in pending:
            pending[key] = ts
        elif event == TraceEvent.UNPAUSE and arg == 0 and key in pending:
            start = pending.pop(key)
            out.append((start, domid, vcpu, (ts - start) / 1000.0))
    return sorted(out)


def test_vectorised_fault_latencies_match_the_rule_walked_one_record_at_a_time() -> None:
    rng = random.Random(7)
    for _ in range(30):
        ts = 0
        records = []
        for _ in range(rng.randrange(0, 400)):
            ts += rng.randrange(0, 3)  # equal timestamps too: file order decides
            event = rng.choice([TraceEvent.PUT, TraceEvent.UNPAUSE, TraceEvent.PAUSE, TraceEvent.RESPONSE])
            vcpu = rng.choice([0, 1, 2, trace.NO_VCPU])
            records.append((ts, rng.choice([1, 2]), 0, int(event), vcpu, rng.randrange(8), rng.choice([0, 0, 1])))
        begin, dom, vcpu_of, lat = tracetools.fault_latencies(tracetools.read(_file(records)))
        got = sorted(zip(begin.tolist(), dom.tolist(), vcpu_of.tolist(), lat.tolist(), strict=True))
        assert got == _latencies_one_by_one(records)


def test_print_gives_one_line_per_event(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "t.trace")
    _traced_paging_round(path)
    lines = list(tracetools.print_lines(_read(path)))
    assert len(lines) == 6
    assert lines[0].split()[:6] == ["0.000000000", "d1", "v-", "paging", "evict", "gfn=0x3"]
    assert lines[0].endswith("pages=2")
    put = lines[2].split()
    assert put[1:6] == ["d1", "v1", "paging", "put", "gfn=0x3"] and put[-1] == "occupancy=1", lines[2]
    assert lines[1].split()[2:4] == ["v1", "-"] and lines[1].endswith("pauses=1"), lines[1]


def test_chrome_export_is_trace_event_json(tmp_path: object) -> None:
    """The schema chrome://tracing and ui.perfetto.dev read: the JSON object format with typed events."""
    path = os.path.join(str(tmp_path), "t.trace")
    _traced_paging_round(path)
    doc = json.loads(json.dumps(tracetools.chrome_trace(_read(path))))
    assert set(doc) >= {"traceEvents", "displayTimeUnit"}
    events = doc["traceEvents"]
    for ev in events:
        assert ev["ph"] in {"M", "X", "C", "i"} and isinstance(ev["name"], str) and isinstance(ev["pid"], int), ev
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], int | float) and ev["ts"] >= 0, ev
        if ev["ph"] in {"X", "i", "M"}:
            assert isinstance(ev["tid"], int), ev
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], int | float) and ev["dur"] >= 0, ev
        if ev["ph"] == "C":
            assert ev["args"] and all(isinstance(v, int | float) for v in ev["args"].values()), ev
    faults = [e for e in events if e["ph"] == "X" and e["cat"] == "fault"]
    assert len(faults) == 1 and faults[0]["tid"] == 1 and faults[0]["args"]["gfn"] == "0x3"
    assert [e["args"]["requests"] for e in events if e["name"] == "paging ring occupancy"] == [1, 0]
    batches = sorted(e["name"] for e in events if e.get("cat") == "paging")
    assert batches == ["evict 2 pages", "load 1 pages"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"dom1", "vCPU 1"} <= names


def test_summaries_of_a_large_trace_are_array_operations() -> None:
    """500k records: read and summarised whole (the figures of a Python loop are checked on a slice)."""
    rng = np.random.default_rng(1)
    n = 500_000
    arr = np.zeros(n, dtype=tracetools.DTYPE)
    arr["ts_ns"] = np.cumsum(rng.integers(0, 1000, n))
    arr["domid"] = rng.integers(1, 4, n)
    arr["event"] = rng.choice([TraceEvent.PUT, TraceEvent.UNPAUSE], n)
    arr["vcpu"] = rng.integers(0, 4, n)
    data = trace.HEADER.pack(trace.MAGIC, trace.VERSION, trace.RECORD.size) + arr.tobytes()
    records = tracetools.read(io.BytesIO(data))
    assert len(records) == n and (records == arr).all()
    summary = tracetools.summarise(records)
    assert sum(sum(d["events"].values()) for d in summary["domains"].values()) == n
    head = records[:2000]
    _, _, _, lat = tracetools.fault_latencies(head)
    assert sorted(lat.tolist()) == sorted(x[3] for x in _latencies_one_by_one(head.tolist()))


def test_a_file_on_disk_reads_the_same_as_bytes(tmp_path: object) -> None:
    """The fast path (straight from the file) and the in-memory one agree, a truncated last record included."""
    data = _file([(i, 1, 0, int(TraceEvent.PUT), 0, i, 1) for i in range(100)], b"\x01" * 20).getvalue()
    path = os.path.join(str(tmp_path), "t.trace")
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        on_disk = tracetools.read(f)
    assert len(on_disk) == 100 and (on_disk == tracetools.read(io.BytesIO(data))).all()
    assert on_disk["gfn"].tolist() == list(range(100))
