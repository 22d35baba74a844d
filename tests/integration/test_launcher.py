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


def _allowed_cpus(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:"))


def test_sigint_stops_everything(tmp_path: object) -> None:
    cpu = str(min(os.sched_getaffinity(0)))
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.launcher", *SMALL, "--duration", "30", "--cpus", cpu],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_children_of(proc.pid)) < 5:  # hypervisor, 2 pagers, 2 guests
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        children = _children_of(proc.pid)
        assert [_allowed_cpus(pid) for pid in children] == [cpu] * len(children), "--cpus pins every process"
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


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvemu.launcher", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_each_refused_option_is_its_own_line_and_nothing_starts(tmp_path: object) -> None:
    allowed = os.sched_getaffinity(0)
    absent = max(allowed) + 1
    for args, expected in [
        (["--target", "80", "--memory", "64"], ["--target 80 MiB is above --memory 64 MiB"]),
        (["--target", "-1"], ["--target -1 MiB is below 0"]),
        (["--memory", "0", "--host-memory", "-2.5"],
         ["--memory 0 MiB is not above 0", "--host-memory -2.5 MiB is not above 0"]),
        (["--vcpus", "0", "--duration", "0"], ["--vcpus 0 is below 1", "--duration 0 s is not above 0"]),
        (["--write-ratio", "1.5"], ["--write-ratio 1.5 is outside 0..1"]),
        (["--json", os.path.join(str(tmp_path), "missing", "s.json")], ["--json "]),
        (["--cpus", "abc"], ["--cpus 'abc' is not a CPU list"]),
        (["--cpus", "0-"], ["--cpus '0-' is not a CPU list"]),
        (["--cpus", f"{min(allowed)},{absent}"],
         [f"--cpus {min(allowed)},{absent}: CPUs [{absent}] are not available"]),
    ]:
        res = _launch("--duration", "1", *args)  # the last --duration given wins
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (args, res.stderr)
        assert len(lines) == len(expected), (args, res.stderr)
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(f"run.sh: {start}"), (args, line)
        assert "run directory" not in res.stderr and "taskset:" not in res.stderr, "nothing may start"
        assert res.stdout == ""
