"""The benchmark's smallest configuration runs end to end and reports every figure.

Timings are not asserted (benchmarks report, tests do not judge speed); the
JSON must have every key issues 6 and 13 name, no lost guest event, no
integrity failure, the bare relay must really have relayed (every fault's
page checked), and the run must leave no process, run directory or segment
behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from hvemu.procs import die_with_parent
from hvemu.toolstack.bench import relay, suites
from hvemu.toolstack.bench.common import BenchError, Placement
from tests.integration.system import ROOT

REQUIRED = [
    "fault_roundtrip.p50_us", "fault_roundtrip.p99_us", "fault_roundtrip.n",
    "fault_roundtrip.cpu_per_fault_us.total", "fault_roundtrip.cpu_per_fault_us.hypervisor",
    "fault_roundtrip.cpu_per_fault_us.daemon", "fault_roundtrip.cpu_per_fault_us.guest",
    *(f"{floor}.{k}" for floor in ("relay_floor", "relay_floor_blocking")
      for k in ("p50_us", "p99_us", "n", "checked_faults", "cpu_per_roundtrip_us.total",
                "cpu_per_roundtrip_us.hypervisor", "cpu_per_roundtrip_us.daemon", "cpu_per_roundtrip_us.guest")),
    "system_exit_overhead.p50_us", "system_exit_overhead.p99_us", "system_exit_overhead.cpu_per_exit_us.total",
    "core_work.fault_us", "core_work.evict_us", "core_work.total_us", "core_vs_relay_p50",
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
    proc = subprocess.run([sys.executable, "-m", "hvemu.toolstack.bench", "--smoke", "--json", out], cwd=ROOT,
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
    for floor in ("relay_floor", "relay_floor_blocking"):
        assert result[floor]["failed_checks"] == 0
        assert [r["when"] for r in result[floor]["runs"]] == ["before", "after"], result[floor]["runs"]
        assert result[floor]["checked_faults"] == result[floor]["n"] == sum(r["n"] for r in result[floor]["runs"])
    assert "transport_floor" not in result and "fault_vs_floor_p50" not in result
    assert not os.listdir(scratch), "run directories or pagefiles left behind"
    assert not _processes_mentioning(scratch), "benchmark processes left running"


def _children_running(needle: str) -> list[int]:
    """Children of this process whose command line holds ``needle``."""
    me = os.getpid()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and needle in cmd:
            found.append(int(pid))
    return found


def _relay_fds() -> set[str]:
    """What this process's fds point at, for the relay's kinds (eventfds, its memfds)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "eventfd" in target or "memfd:relay-" in target:
            out.add(f"{fd}:{target}")
    return out


def test_relay_guest_check_catches_a_page_not_copied() -> None:
    """The relay's guest fails a fault whose page was not copied in, or that was not resumed for it."""
    ch = relay.make_channels("blocking")
    guest = relay.Guest(ch)  # maps (and closes) the memory and slot fds
    try:
        relay.SLOT.pack_into(guest.slot, 0, 0, 5, 0, relay.RESUMED)
        guest.check(5)  # resumed, but no page
        assert guest.failed == 1 and "gfn 5" in guest.first_error
        off = 5 * relay.PAGE
        for at in (off, off + relay.PAGE - relay.STAMP.size):
            relay.STAMP.pack_into(guest.memory, at, relay.stamp(5))
        guest.check(5)  # copied and resumed: passes, and clears the stamp for the next fault
        assert guest.failed == 1
        assert relay.STAMP.unpack_from(guest.memory, off)[0] == 0
        relay.SLOT.pack_into(guest.slot, 0, 0, 5, 0, relay.BAD_RESPONSE)
        for at in (off, off + relay.PAGE - relay.STAMP.size):
            relay.STAMP.pack_into(guest.memory, at, relay.stamp(5))
        guest.check(5)  # the hypervisor saw a bad response
        assert guest.failed == 2
    finally:
        guest.memory.close()
        guest.slot.close()
        for fd in (ch.ring, ch.to_hv, ch.to_daemon, ch.from_daemon, ch.to_guest):
            os.close(fd)


async def test_relay_that_loses_a_process_fails_at_once_and_leaves_nothing() -> None:
    """A relay whose daemon dies fails without waiting for its timeout; no process or fd is left."""
    fds = _relay_fds()
    cfg = dataclasses.replace(suites.SMOKE, relay_iterations=10**7)  # its warm-up alone would take minutes
    run = asyncio.ensure_future(suites.relay_floor(cfg, Placement(), suites.Totals()))
    deadline = time.monotonic() + 30
    while not (daemons := _children_running("hvemu.toolstack.bench.relay daemon")):
        assert not run.done(), run.exception()
        assert time.monotonic() < deadline, "the relay's daemon did not start"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the guest is relaying its warm-up
    os.kill(daemons[0], signal.SIGKILL)
    with pytest.raises(BenchError, match="relay-uvloop-daemon exited"):
        await asyncio.wait_for(run, 20)
    assert not _children_running("hvemu.toolstack.bench.relay"), "relay processes left running"
    assert _relay_fds() <= fds, "relay fds left open"
