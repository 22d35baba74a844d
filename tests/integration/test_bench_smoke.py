"""The benchmark's smallest configuration runs end to end and reports every figure.

Timings are not asserted (benchmarks report, tests do not judge speed); the
JSON must have every key issues 6 and 13 name, no lost guest event, no
integrity failure, the bare relay must really have relayed (every fault's
page checked), and the run must leave no process, run directory or segment
behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from hvemu.procs import die_with_parent
from tests.integration.system import ROOT

REQUIRED = [
    "fault_roundtrip.p50_us", "fault_roundtrip.p99_us", "fault_roundtrip.n",
    "fault_roundtrip.cpu_per_fault_us.total", "fault_roundtrip.cpu_per_fault_us.hypervisor",
    "fault_roundtrip.cpu_per_fault_us.daemon", "fault_roundtrip.cpu_per_fault_us.guest",
    *(f"{relay}.{k}" for relay in ("relay_floor", "relay_floor_blocking")
      for k in ("p50_us", "p99_us", "n", "checked_faults", "cpu_per_roundtrip_us.total",
                "cpu_per_roundtrip_us.hypervisor", "cpu_per_roundtrip_us.daemon", "cpu_per_roundtrip_us.guest")),
    "system_exit_overhead.p50_us", "system_exit_overhead.p99_us", "system_exit_overhead.cpu_per_exit_us.total",
    "fault_vs_relay_p50", "fault_vs_relay_p99", "cpu_per_fault_vs_relay", "fault_vs_exit_overhead_p50",
    "native_uffd.p50_us",
    *(f"pagein.{v}.{k}" for v in (1, 4, 16) for k in ("batched_pages_per_s", "unbatched_pages_per_s")),
    "ring_floor.entries_per_s", "evict.pages_per_s", "evict_floor.pages_per_s",
    "fairness.min_over_max", "fairness.max_stall_ms",
    "scale.gfns", "scale.startup_s", "scale.hv_bytes_per_gfn",
    "lost_guest_events", "integrity_failures",
    "placement.hypervisor", "placement.guest", "placement.daemon",
]


def _lookup(result: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_bench_smoke_reports_every_key(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "bench.json")
    scratch = os.path.join(str(tmp_path), "scratch")  # run directories, pagefiles, the C handler
    os.mkdir(scratch)
    proc = subprocess.run([sys.executable, "-m", "hvemu.bench", "--smoke", "--json", out], cwd=ROOT,
                          env={**os.environ, "TMPDIR": scratch}, capture_output=True, text=True,
                          timeout=120, preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        result = json.load(f)
    missing = [k for k in REQUIRED if not _lookup(result, k)[0]]
    assert not missing, f"keys missing from the benchmark's JSON: {missing}"
    for key in REQUIRED:
        value = _lookup(result, key)[1]
        if key == "native_uffd.p50_us":
            assert value is None or value > 0, result["native_uffd"]
            if value is None:
                assert result["native_uffd"].get("reason"), "a null userfaultfd figure must say why"
        elif "cpu_per" in key:
            # CPU times come in 10 ms ticks: the smoke run's windows are a few ticks long, so may read 0.
            assert value is None or (isinstance(value, int | float) and value >= 0), f"{key} = {value!r}"
        elif not key.startswith("placement.") and key not in ("lost_guest_events", "integrity_failures"):
            assert isinstance(value, int | float) and value > 0, f"{key} = {value!r}"
    assert result["lost_guest_events"] == 0
    assert result["integrity_failures"] == 0
    assert "errors" not in result, result["errors"]
    assert result["scale"]["gfns"] == 262144
    assert result["pagein"]["16"]["batched_pages_per_s"] > 0
    for relay in ("relay_floor", "relay_floor_blocking"):
        assert result[relay]["failed_checks"] == 0
        assert [r["when"] for r in result[relay]["runs"]] == ["before", "after"], result[relay]["runs"]
        assert result[relay]["checked_faults"] == result[relay]["n"] == sum(r["n"] for r in result[relay]["runs"])
    assert "transport_floor" not in result and "fault_vs_floor_p50" not in result
    assert not os.listdir(scratch), "run directories or pagefiles left behind"
    assert not _processes_mentioning(scratch), "benchmark processes left running"
