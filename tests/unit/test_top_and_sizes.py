"""``hvemu top`` fitted to a terminal, and the one size parser."""

from __future__ import annotations

import re

import msgspec
import pytest

from hvemu import protocol
from hvemu.stats import DomainStats
from hvemu.toolstack import sizes, top


def _host() -> protocol.HostInfoReply:
    return protocol.HostInfoReply(total_frames=24576, used_frames=24000, policy="seed", ring_size=64, domains=12)


def _stats(domid: int, big: bool) -> DomainStats:
    n = 987_654_321 if big else 3
    return msgspec.convert({
            "domid": domid, "name": f"a-very-long-domain-name-{domid}", "max_vcpus": 128, "vcpus_paused": 100,
            "vcpus_blocked": 99, "gfns": 1 << 22, "resident": 4095, "paged": 123_456, "paging_in": 64,
            "target": 2048, "faults": n, "paged_in": n, "evicted": n, "events_put": n, "events_lost": n,
            "fault_latency_us": {"p50": 123_456.7, "p99": 9_876_543.2},
            "paging": {"enabled": True, "occupancy": 63, "size": 64, "max_occupancy": 64, "put": n, "lost": n,
                       "refused": n, "blocked_now": 120, "blocked_ever": n, "responses": n,
                       "responses_rejected": n}}, DomainStats)


def test_top_fits_80x24_without_cutting_a_number() -> None:
    before = {d: _stats(d, False) for d in range(1, 13)}
    now = [_stats(d, True) for d in range(1, 13)]
    lines = top.screen(_host(), now, before, 0.5, "12:00:00", (80, 24))
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines), lines
    assert lines[-1].startswith("... ") and "more line(s)" in lines[-1], "rows left out are said"
    header = lines[2].split()
    assert header[:2] == ["NAME", "ID"] and "FAULT/s" in header and "RES(M)" in header, header
    row = lines[3].split()
    rate = row[header.index("FAULT/s")]
    assert re.fullmatch(r"\d+(\.\d)?[kMG]", rate), f"a rate too wide is abbreviated, not cut: {rate}"
    assert row[header.index("P99us")] == "9877k", row
    assert lines[0].startswith("hvemu top - 12:00:00  host 96 MiB: 93.75 used, 2.25 free")


def test_batch_mode_has_every_column() -> None:
    lines = top.screen(_host(), [_stats(1, False)], None, 0.0, "12:00:00", None)
    assert all(c.header in lines[2] for c in top.DOMAIN_COLUMNS), lines[2]
    assert all(c.header in lines[5] for c in top.RING_COLUMNS), lines[5]


@pytest.mark.parametrize(("text", "nbytes", "shown"), [
    ("512m", 512 << 20, "512m"), ("1g", 1 << 30, "1g"), ("4096k", 4 << 20, "4096k"), ("64", 64 << 20, "64 MiB"),
    ("1.5G", 3 << 29, "1.5G"), ("2MiB", 2 << 20, "2MiB"), ("8192b", 8192, "8192b"), ("-1", -(1 << 20), "-1 MiB")])
def test_sizes_read_as_xl_reads_them(text: str, nbytes: int, shown: str) -> None:
    size = sizes.parse_size(text)
    assert size.bytes == nbytes and str(size) == shown


@pytest.mark.parametrize(("text", "why"), [("12q", "is not a size"), ("nan", "not a finite"),
                                           ("1e999", "not a finite"), ("", "is not a size"), ("m", "is not a size")])
def test_sizes_refused(text: str, why: str) -> None:
    with pytest.raises(sizes.SizeError, match=why):
        sizes.parse_size(text)
