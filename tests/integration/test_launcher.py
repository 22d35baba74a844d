"""``scripts/run.sh`` (hvemu.launcher): a whole overcommitted host, its summary, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.integration.system import ROOT

SMALL = ["--domains", "2", "--vcpus", "2", "--memory", "8", "--host-memory", "12", "--target", "5"]


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def test_overcommitted_run_prints_a_summary_and_json(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "summary.json")
    res = subprocess.run([sys.executable, "-m", "hvemu.launcher", *SMALL, "--duration", "2", "--json", out],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "integrity OK" in res.stdout
    with open(out) as f:
        summary = json.load(f)
    assert summary["ok"] is True and len(summary["domains"]) == 2
    for dom in summary["domains"]:
        for key in ("domid", "vcpus", "faults", "fault_p50_us", "fault_p99_us", "pages_out", "pages_in",
                    "events_lost", "integrity_failures"):
            assert key in dom, key
        assert dom["integrity_failures"] == 0 and dom["events_lost"] == 0
        assert dom["pages_out"] > 0 and dom["faults"] > 0, "memory was overcommitted: paging must happen"


def test_sigint_stops_everything(tmp_path: object) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.launcher", *SMALL, "--duration", "30"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_children_of(proc.pid)) < 5:  # hypervisor, 2 pagers, 2 guests
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        children = _children_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "everything stopped" in err and "Traceback" not in err
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_values_the_hypervisor_refuses_are_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "hvemu.launcher", "--vcpus", "1000", "--duration", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "max_vcpus" in res.stderr and "Traceback" not in res.stderr, res.stderr
