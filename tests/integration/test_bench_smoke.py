"""The benchmark's smallest configuration runs end to end and reports every figure.

Timings are not asserted (benchmarks report, tests do not judge speed); the
JSON must have every key issue 6 names, no lost guest event, no integrity
failure, and the run must leave no process, run directory or segment behind.
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
    "transport_floor.p50_us", "transport_floor.p99_us", "fault_vs_floor_p50",
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
        elif not key.startswith("placement.") and key not in ("lost_guest_events", "integrity_failures"):
            assert isinstance(value, int | float) and value > 0, f"{key} = {value!r}"
    assert result["lost_guest_events"] == 0
    assert result["integrity_failures"] == 0
    assert "errors" not in result, result["errors"]
    assert result["scale"]["gfns"] == 262144
    assert result["pagein"]["16"]["batched_pages_per_s"] > 0
    assert not os.listdir(scratch), "run directories or pagefiles left behind"
    assert not _processes_mentioning(scratch), "benchmark processes left running"
