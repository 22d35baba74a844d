"""``scripts/run.sh`` (hvemu.toolstack.run): a whole overcommitted host, its summary, and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import msgspec

from hvemu.core.domain import MAX_GFNS, MAX_VCPUS
from hvemu.procs import status_field
from hvemu.toolstack import run_options, run_summary
from pager.defaults import EVICT_BATCH
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
    res = subprocess.run([sys.executable, "-m", "hvemu.toolstack.run", *SMALL, "--duration", "2", "--json", out,
                          "--progress", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "integrity OK" in res.stdout
    lines = res.stdout.splitlines()
    assert all(len(line) <= run_summary.SUMMARY_WIDTH for line in lines), lines
    assert "WARNING" not in res.stderr and "still out" not in res.stderr, res.stderr
    assert re.search(r"run.sh: \d+/2 s .* faults/s .* resident", res.stderr), "a progress line: " + res.stderr
    with open(out) as f:
        summary = json.load(f)
    assert summary["ok"] is True and summary["complete"] is True and len(summary["domains"]) == 2
    for dom in summary["domains"]:
        for key in ("domid", "vcpus", "memory_mib", "target_mib", "resident_start_mib", "resident_end_mib",
                    "faults_per_s", "pages_in_per_s", "pages_out_per_s", "fault_p50_us", "fault_p99_us",
                    "blocked", "refused", "events_lost", "integrity_failures"):
            assert key in dom, key
        assert dom["integrity_failures"] == 0 and dom["events_lost"] == 0
        assert dom["pages_out"] > 0 and dom["faults"] > 0, "memory was overcommitted: paging must happen"
        assert dom["memory_mib"] == 8 and dom["target_mib"] == 5
        assert f"{dom['domid']:>3}" == lines[2 + summary["domains"].index(dom)][:3]
    # 12 MiB of host for 2 x 8 MiB: the second domain starts 4 MiB short, and the summary says why.
    second = summary["domains"][1]
    assert second["paged_at_start"] == 1024 and second["resident_start_mib"] == 4
    assert f"dom {second['domid']}: created with 4.0 of 8 MiB resident" in res.stdout
    # Every setting is in the file, and --from runs them again.
    settings = summary["settings"]
    assert settings == {"domains": 2, "vcpus": 2, "memory_mib": 8, "host_memory_mib": 12, "target_mib": 5,
                        "duration_s": 2, "pattern": "hotcold", "write_ratio": 0.3, "admission": "seed",
                        "batch": EVICT_BATCH, "seed": 1, "cpus": None, "abi": "seed"}
    args = run_options._parser().parse_args(shlex.split(summary["command"])[1:])
    assert not run_options.option_problems(args) and msgspec.to_builtins(run_options.settings_of(args)) == settings
    assert run_options._from_file(out) == shlex.split(summary["command"])[1:]


def _allowed_cpus(pid: int) -> str | None:
    return status_field(pid, "Cpus_allowed_list")


def test_sigint_stops_everything(tmp_path: object) -> None:
    cpu = str(min(os.sched_getaffinity(0)))
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.run", *SMALL, "--duration", "30", "--cpus", cpu],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_children_of(proc.pid)) < 5:  # hypervisor, 2 pagers, 2 guests
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        # A child just forked is pinned by its pre-exec hook a moment later: look again until it is.
        while True:
            children = _children_of(proc.pid)
            pinned = [_allowed_cpus(pid) for pid in children]
            if pinned == [cpu] * len(children) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert pinned == [cpu] * len(children), f"--cpus pins every process: {pinned}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "everything stopped" in err and "Traceback" not in err
        # Ctrl-C prints the summary of the run so far.
        assert "interrupted: the figures are those of the run so far" in out and "integrity not checked" in out, out
        assert len([ln for ln in out.splitlines() if re.match(r"\s+[12] ", ln)]) == 2, out
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        _stop_and_clean(proc)


def _stop_and_clean(proc: subprocess.Popen[str]) -> None:
    """Even when the test failed: stop run.sh cleanly (its children and run dir go with it), else kill it
    and remove the run directory it announced."""
    err = ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    announced = re.search(r"run directory (\S+)", err or "")
    if announced is not None:
        shutil.rmtree(announced.group(1), ignore_errors=True)


def test_values_the_hypervisor_or_host_would_refuse_are_refused_up_front() -> None:
    for args, start in [(["--memory", "100000"], f"--memory 100000 MiB is above the {MAX_GFNS >> 18} GiB"),
                        (["--memory", "17g"], "--memory 17g is above"),
                        (["--domains", "1000"], "--domains 1000 needs about"),
                        (["--host-memory", "64t"], "--host-memory 64t is above the")]:
        res = _launch("--duration", "1", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith(f"run.sh: {start}") and len(res.stderr.splitlines()) == 1, (args, res.stderr)
        assert "run directory" not in res.stderr, "nothing may start"


def test_a_closed_stdout_and_the_watch_hint(tmp_path: object) -> None:
    """``run.sh | head -1`` after head exited: no traceback, status 141, the --json file still written;
    the ``watch with:`` hint runs as printed, from anywhere."""
    out = os.path.join(str(tmp_path), "summary.json")
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.run", "--domains", "1", "--vcpus", "1", "--memory",
                             "4", "--host-memory", "3", "--target", "2", "--duration", "0.5", "--json", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err
    with open(out) as f:
        assert json.load(f)["ok"] is True
    hint = re.search(r"watch with: (.*) --run-dir (\S+) top\)", err)
    assert hint is not None, err
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH
    res = subprocess.run(f"{hint.group(1)} --help", shell=True, cwd="/", env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "toolstack" in res.stdout.lower(), res.stdout + res.stderr


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvemu.toolstack.run", *args], cwd=ROOT, capture_output=True,
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
        (["--vcpus", str(MAX_VCPUS + 1)], [f"--vcpus {MAX_VCPUS + 1} is above {MAX_VCPUS}"]),
        (["--duration", "nan"], ["--duration nan is not a finite number"]),
        (["--duration", "inf"], ["--duration inf is not a finite number"]),
        (["--memory", "nan", "--target", "nan", "--write-ratio", "nan", "--host-memory=-inf"],
         ["--memory nan is not a finite number", "--host-memory -inf is not a finite number",
          "--target nan is not a finite number", "--write-ratio nan is not a finite number"]),
        (["--memory", "inf", "--target", "1e999"],
         ["--memory inf is not a finite number", "--target 1e999 is not a finite number"]),
        (["--memory", "12q"], ["--memory 12q is not a size"]),
        (["--memory", "512k", "--target", "1m"], ["--target 1m is above --memory 512k"]),
        (["--memory", "0.001", "--target", "0"], ["--memory 0.001 MiB is less than one page"]),
        (["--write-ratio", "1.5"], ["--write-ratio 1.5 is outside 0..1"]),
        (["--json", os.path.join(str(tmp_path), "missing", "s.json")], ["--json "]),
        (["--cpus", "abc"], ["--cpus 'abc' is not a CPU list"]),
        (["--cpus", "0-"], ["--cpus '0-' is not a CPU list"]),
        (["--cpus", f"{min(allowed)},{absent}"],
         [f"--cpus {min(allowed)},{absent}: CPU"]),
    ]:
        res = _launch("--duration", "1", *args)  # the last --duration given wins
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (args, res.stderr)
        assert len(lines) == len(expected), (args, res.stderr)
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(f"run.sh: {start}"), (args, line)
        assert "run directory" not in res.stderr and "taskset:" not in res.stderr, "nothing may start"
        assert res.stdout == ""


def _run_dir_of(proc: subprocess.Popen[str]) -> str:
    """The run directory run.sh announces on its first line of stderr."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    announced = re.search(r"run directory (\S+)", line)
    assert announced is not None, line
    return announced.group(1)


def _wait_children(proc: subprocess.Popen[str], n: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(_children_of(proc.pid)) < n:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return _children_of(proc.pid)


def test_sighup_is_a_clean_stop(tmp_path: object) -> None:
    """Closing the terminal: everything stopped, the run directory and its pagefiles removed."""
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.run", *SMALL, "--duration", "30"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _run_dir_of(proc)
        children = _wait_children(proc, 5)
        assert any(n.endswith(".pagefile") for n in os.listdir(run_dir))
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGHUP, err
        assert "interrupted (SIGHUP), everything stopped" in err and "Traceback" not in err, err
        assert not os.path.exists(run_dir), "the run directory (and its pagefiles) must go"
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        _stop_and_clean(proc)


def test_a_killed_hypervisor_is_named_as_the_cause(tmp_path: object) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.run", *SMALL, "--duration", "30"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _run_dir_of(proc)
        hypervisor = _wait_children(proc, 5)[0]
        os.kill(hypervisor, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        last = err.strip().splitlines()[-1]
        assert last == ("run.sh: the hypervisor was killed by SIGKILL during the run "
                        "(its guests and pagers lost it)"), err
        assert not os.path.exists(run_dir)
    finally:
        _stop_and_clean(proc)


def test_from_a_file_that_is_not_a_summary_is_one_line(tmp_path: object) -> None:
    bad = os.path.join(str(tmp_path), "bad.json")
    with open(bad, "w") as f:
        f.write('{"x": 1}')
    for path, why in ((bad, "not a run.sh --json file (no settings)"),
                      (os.path.join(str(tmp_path), "none.json"), "No such file or directory")):
        res = _launch("--from", path)
        assert res.returncode == 2 and res.stderr == f"run.sh: --from {path}: {why}\n", res.stderr


def test_a_hypervisor_killed_while_the_run_starts_is_named_too(tmp_path: object) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.run", *SMALL, "--duration", "30"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _run_dir_of(proc)
        hypervisor = _wait_children(proc, 1)[0]
        os.kill(hypervisor, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert err.strip().splitlines()[-1].startswith("run.sh: the hypervisor was killed by SIGKILL"), err
        assert "Traceback" not in err and not os.path.exists(run_dir)
    finally:
        _stop_and_clean(proc)
