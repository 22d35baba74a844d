"""The ``hvemu`` toolstack command, run as a user would: real processes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hvemu.toolstack.plots import PLOTS
from tests.integration.system import ROOT, Proc, shm_segments


def hvemu(run_dir: str, *args: str, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvemu.toolstack.cli", "--run-dir", run_dir, *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=90, env=env)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def hv_json(run_dir: str, *args: str) -> object:
    return json.loads(hvemu(run_dir, *args, "--json").stdout)


def into_closed_pipe(run_dir: str, *args: str) -> tuple[int, str]:
    """Run ``hvemu`` with stdout a pipe whose reader is already gone (``| head`` after head exited)."""
    proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.cli", "--run-dir", run_dir, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has written anything: its every write is EPIPE
    err = proc.stderr.read()
    return proc.wait(timeout=90), err


@pytest.fixture
def started(tmp_path: object) -> Iterator[str]:
    run_dir = os.path.join(str(tmp_path), "run")
    pid = int(hv_json(run_dir, "start", "--memory", "32")["pid"])  # type: ignore[index]
    try:
        yield run_dir
    finally:
        for name in os.listdir(run_dir):
            if name.startswith("pager-") and name.endswith(".pid"):
                hvemu(run_dir, "pager-detach", name[len("pager-"):-len(".pid")], check=False)
        res = hvemu(run_dir, "stop", check=False)
        if res.returncode != 0:
            os.kill(pid, 9)
        assert not shm_segments(pid)
        assert not os.path.exists(os.path.join(run_dir, "control.sock"))


def test_domain_lifecycle_and_reads(started: str) -> None:
    run_dir = started
    created = hv_json(run_dir, "create", "--vcpus", "2", "--memory", "4", "--name", "web")
    assert created == {"domid": 1, "vcpus": 2, "gfns": 1024, "abi": "seed"}
    listing = hv_json(run_dir, "list")
    assert isinstance(listing, list) and listing[0]["name"] == "web" and listing[0]["memory_mib"] == 4
    info = hv_json(run_dir, "info", "1")
    assert isinstance(info, dict)
    assert info["vcpus"] == {"total": 2, "paused": 0, "blocked": 0, "running": 2}
    assert info["pages"]["total"] == 1024 and info["pages"]["resident"] == 1024
    assert hv_json(run_dir, "mem-set", "1", "1") == {"domid": 1, "target_pages": 256}
    assert hv_json(run_dir, "mem-set", "1", "4") == {"domid": 1, "target_pages": 1024}, "all of it is allowed"
    for where in ((), ("--json",)):
        res = hvemu(run_dir, *where, "mem-set", "1", "64", check=False)  # MiB in, MiB out: not pages
        assert res.returncode == 1 and "target 64 MiB is above domain 1's memory (4 MiB)" in res.stderr, res.stderr
        assert "8192" not in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    hvemu(run_dir, "mem-set", "1", "1")
    assert hv_json(run_dir, "info", "1")["pages"]["target"] == 256  # type: ignore[index]
    mapped = hv_json(run_dir, "map", "1", "0", "5")
    assert isinstance(mapped, dict) and set(mapped["pages"]) == {"0", "5"}
    res = hvemu(run_dir, "--json", "map", "1", "0", "99999", check=False)
    err = json.loads(res.stderr)
    assert res.returncode == 1 and err["errno"] == "EINVAL", res.stderr
    assert err["error"] == "gfn 99999 is outside domain 1's 1024 gfns (0..1023)", err
    res = hvemu(run_dir, "map", "1", "-1", "1024", check=False)
    assert res.returncode == 1 and "gfns -1, 1024 are outside domain 1's 1024 gfns" in res.stderr, res.stderr
    text = hvemu(run_dir, "list").stdout
    assert text.split()[:8] == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Resident", "Target"], text
    assert text.splitlines()[1].split()[:5] == ["web", "1", "4", "2", "-b----"], "no guest runs: blocked"
    _check_top_json(run_dir)
    _check_closed_pipes(run_dir)
    hvemu(run_dir, "destroy", "1")
    assert hv_json(run_dir, "list") == []


def test_errors_are_one_line(started: str, tmp_path: object) -> None:
    for args, needle in [(("info", "7"), "hvemu info: no domain 7"), (("destroy", "7"), "hvemu destroy: no domain 7"),
                         (("mem-set", "nosuch", "1"), "hvemu mem-set: no domain nosuch"),
                         (("trace", "stop"), "ENOENT"), (("pager-detach", "3"), "not running"),
                         (("trace", "summary", "/nonexistent"), "no trace file")]:
        res = hvemu(started, *args, check=False)
        assert res.returncode == 1, (args, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    bad = hvemu(started, "pager-attach", "99", check=False)
    assert bad.returncode == 1 and "no domain 99" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not os.path.exists(os.path.join(started, "pager-99.pid")), "a failed attach left its pidfile"
    too_big = hvemu(started, "create", "--memory", "8", "--target", "16", check=False)
    assert too_big.returncode == 1 and "--target" in too_big.stderr
    assert hv_json(started, "list") == [], "a refused create must not leave a domain behind"
    nobody = hvemu(os.path.join(str(tmp_path), "none"), "list", check=False)
    assert nobody.returncode == 1 and "no hypervisor" in nobody.stderr and "Traceback" not in nobody.stderr
    usage = hvemu(started, "create", "--vcpus", "many", check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    again = hvemu(started, "start", check=False)
    assert again.returncode == 1 and "already running" in again.stderr


def test_json_errors_are_one_json_object_on_stderr(started: str, tmp_path: object) -> None:
    nowhere = os.path.join(str(tmp_path), "none")
    for run_dir, args, errno, command, status in [
            (started, ("info", "7"), "ESRCH", "info", 1),
            (started, ("trace", "stop"), "ENOENT", "trace stop", 1),
            (started, ("pager-detach", "3"), "ESRCH", "pager-detach", 1),
            (started, ("pager-attach", "99"), "ESRCH", "pager-attach", 1),
            (started, ("trace", "summary", "/nonexistent"), "ENOENT", "trace summary", 1),
            (started, ("create", "--memory", "8", "--target", "16"), "EINVAL", "create", 1),
            (started, ("start",), "EBUSY", "start", 1),
            (nowhere, ("list",), "ENOENT", "list", 1),
            (nowhere, ("top",), "ENOENT", "top", 1),
            (started, ("create", "--vcpus", "many"), "EINVAL", "create", 2),
            (started, ("info", "1", "--bogus"), "EINVAL", "info", 2)]:
        for where in ("before", "after"):  # --json before or after the command
            argv = ("--json", *args) if where == "before" else (*args, "--json")
            res = hvemu(run_dir, *argv, check=False)
            assert res.returncode == status, (argv, res.stderr)
            assert res.stdout == "", (argv, res.stdout)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1, (argv, res.stderr)
            err = json.loads(lines[0])
            assert set(err) == {"error", "errno", "command"}, err
            assert err["errno"] == errno and err["command"] == command and err["error"], (argv, err)
    plain = hvemu(started, "info", "7", check=False)
    assert plain.returncode == 1 and plain.stderr == "hvemu info: no domain 7\n", plain.stderr


def _check_top_json(run_dir: str, ring: str | None = None) -> None:
    """``--json`` on top (before or after it): one JSON object per refresh, one line each, the tables' figures."""
    for argv in (("--json", "top", "--iterations", "2", "--interval", "0.05"),
                 ("top", "--iterations", "1", "--json")):
        out = hvemu(run_dir, *argv).stdout
        lines = out.splitlines()
        assert len(lines) == int(argv[argv.index("--iterations") + 1]), out
        for line in lines:
            snap = json.loads(line)
            assert set(snap) == {"time", "timestamp", "host", "domains", "rings"}, snap
            assert snap["host"]["total_pages"] == 32 * 256 and snap["host"]["domains"] >= 1, snap
            dom = snap["domains"][0]
            assert dom["dom"] == 1 and set(dom) == {
                "dom", "name", "vcpus_running", "vcpus_paused", "vcpus_blocked", "memory", "resident", "paged",
                "in_flight", "target", "faults", "fault_p50_us", "fault_p99_us", "put", "lost", "faults_per_s",
                "pages_in_per_s", "pages_out_per_s"}, dom
            assert dom["vcpus_running"] + dom["vcpus_paused"] >= 1 and isinstance(dom["resident"], int)
            if ring is not None:
                r = next(r for r in snap["rings"] if r["dom"] == 1 and r["ring"] == ring)
                assert r["size"] > 0 and set(r) == {"dom", "ring", "occupancy", "size", "max", "put", "lost",
                                                    "refused", "blocked_now", "blocked_ever", "responses",
                                                    "rejected", "put_per_s"}, r


def _check_closed_pipes(run_dir: str) -> None:
    """``hvemu info 1 | head`` once head has exited: no traceback, nothing on stderr, status 141 (SIGPIPE's)."""
    for args in (("info", "1"), ("--json", "info", "1", "--raw"), ("list",),
                 ("top", "--iterations", "3", "--interval", "0.05"), ("--json", "top", "--iterations", "3")):
        status, err = into_closed_pipe(run_dir, *args)
        assert (status, err) == (141, ""), (args, status, err)


def _check_piped_top(run_dir: str) -> None:
    """``top`` into a pipe: plain columns like ``xentop -b``, every column without $COLUMNS, else fitted to it."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    natural = hvemu(run_dir, "top", "--iterations", "1", env=env).stdout
    lines = natural.splitlines()
    assert lines[0].startswith("hvemu top - ") and "host 32 MiB" in lines[0], natural
    header = next(line for line in lines if line.startswith("NAME"))
    for column in ("ID", "VCPU r/p/b", "RES(M)", "TGT(M)", "FAULT/s", "IN/s", "OUT/s", "P50us", "P99us", "LOST",
                   "FAULTS"):
        assert column in header, (column, natural)
    assert any(line.split()[:3] == ["ID", "RING", "OCC/SIZE"] for line in lines), natural
    narrow = hvemu(run_dir, "top", "--iterations", "1", "-b", env={**env, "COLUMNS": "80"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 80, narrow
    assert "FAULT/s" in narrow and "FAULTS" not in narrow, "the least useful columns go first"


def test_pager_trace_top_and_plots(started: str, tmp_path: object) -> None:
    run_dir = started
    trace_file = os.path.join(str(tmp_path), "ring.trace")
    hvemu(run_dir, "create", "--vcpus", "2", "--memory", "8", "--target", "1")
    hvemu(run_dir, "trace", "start", trace_file)
    second = hvemu(run_dir, "trace", "start", trace_file + "2", check=False)
    assert second.returncode == 1 and "already being recorded to" in second.stderr, second.stderr
    hvemu(run_dir, "pager-attach", "1", "--pagefile", os.path.join(str(tmp_path), "pf"))
    deadline = time.monotonic() + 15
    while hv_json(run_dir, "info", "1")["pages"]["paged"] < 1000:  # type: ignore[index]
        assert time.monotonic() < deadline, "the pager did not page out to its target"
        time.sleep(0.1)
    guest = Proc("-m", "guest", "--run-dir", run_dir, "--domid", "1", "--duration", "1.5", "--linger")
    try:
        report = guest.json_line(60)
        assert report["ok"] and report["faults"] > 0
        top = hvemu(run_dir, "top", "--iterations", "1").stdout
        assert "NAME" in top and "RING" in top and "paging" in top
        _check_piped_top(run_dir)
        _check_top_json(run_dir, ring="paging")
        info = hv_json(run_dir, "info", "1")
        assert info["fault_latency_us"]["n"] > 0  # type: ignore[index]
        assert hv_json(run_dir, "pager-detach", "1")["detached"] == "pager"  # type: ignore[index]
        assert hv_json(run_dir, "info", "1")["pages"]["paged"] == 0, "detach pages everything in"  # type: ignore[index]
    finally:
        guest.stop()
    stopped = hv_json(run_dir, "trace", "stop")
    assert stopped["records"] > 0  # type: ignore[index]
    summary = hv_json(run_dir, "trace", "summary", trace_file)
    dom = summary["domains"]["1"]  # type: ignore[index]
    assert dom["events"]["paging.put"] > 0 and dom["fault_latency_us"]["n"] > 0
    assert dom["events"]["paging.evict"] > 0 and dom["events"]["paging.load"] > 0, "batches are recorded"
    out_dir = os.path.join(str(tmp_path), "plots")
    plots = hv_json(run_dir, "trace", "plot", trace_file, "--out", out_dir)["plots"]  # type: ignore[index]
    assert sorted(os.path.basename(p) for p in plots) == sorted(f"ring.trace.{n}" for n in PLOTS)
    for path in plots:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = hvemu(run_dir, "trace", "plot", trace_file, "--out", out_dir, check=False)
    assert again.returncode == 1 and "exists (--force" in again.stderr, "no silent overwrite"
    hvemu(run_dir, "trace", "plot", trace_file, "--out", out_dir, "--force")
    printed = hvemu(run_dir, "trace", "print", trace_file).stdout.splitlines()
    assert len(printed) == stopped["records"]  # type: ignore[index]
    assert any(line.split()[3:5] == ["paging", "put"] for line in printed), printed[:5]
    chrome = os.path.join(str(tmp_path), "ring.json")
    exported = hv_json(run_dir, "trace", "export", trace_file, "--chrome", chrome)
    with open(chrome) as f:
        doc = json.load(f)
    assert exported["events"] == len(doc["traceEvents"]) > 0  # type: ignore[index]
    kinds = {(e["ph"], e.get("cat")) for e in doc["traceEvents"]}
    assert {("X", "fault"), ("X", "paging"), ("M", None)} <= kinds, kinds
    assert any(e["ph"] == "C" and e["name"] == "paging ring size" and e["args"]["slots"] == 64
               for e in doc["traceEvents"])
    refused = hvemu(run_dir, "trace", "export", trace_file, "--chrome", chrome, check=False)
    assert refused.returncode == 1 and "exists" in refused.stderr


def test_create_warns_when_the_domain_starts_short_of_memory(started: str) -> None:
    """The budget (32 MiB) is spent by the first domain: the next starts with no page and must get a pager."""
    full = hvemu(started, "create", "--memory", "32")
    assert full.stderr == "", "a domain with all its memory resident needs no warning"
    short = hvemu(started, "create", "--memory", "8")
    lines = short.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvemu create: warning: "), short.stderr
    assert "0 of its 8 MiB resident" in lines[0] and "hvemu pager-attach 2" in lines[0], lines[0]
    assert "domid: 2" in short.stdout
    res = hvemu(started, "--json", "create", "--memory", "4")
    assert json.loads(res.stdout)["domid"] == 3
    warning = json.loads(res.stderr)  # one JSON object, as --json errors are
    assert set(warning) == {"warning", "command"} and warning["command"] == "create", warning
    assert "0 of its 4 MiB resident" in warning["warning"]
    listing = hv_json(started, "list")
    assert isinstance(listing, list) and [d["resident_mib"] for d in listing] == [32, 0, 0], listing


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_a_pidfile_naming_another_process_is_stale(started: str) -> None:
    """A pid reused by an unrelated process (or a pager of another domain) is never signalled."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for name in ("pager-7", "listener-7"):
            path = os.path.join(started, f"{name}.pid")
            with open(path, "w") as f:
                f.write(f"{sleeper.pid}\n")
            res = hvemu(started, name.replace("-7", "-detach"), "7", check=False)
            assert res.returncode == 1 and "not running" in res.stderr, res.stderr
            assert sleeper.poll() is None, f"{name}-detach signalled a process that is not its daemon"
            assert not os.path.exists(path), "a stale pidfile stays"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_leaves_only_logs_and_pagefiles(tmp_path: object) -> None:
    run_dir = os.path.join(str(tmp_path), "run")
    hv_pid = int(hv_json(run_dir, "start", "--memory", "32")["pid"])  # type: ignore[index]
    try:
        hvemu(run_dir, "create", "--memory", "8", "--target", "1")
        pager_pid = int(hv_json(run_dir, "pager-attach", "1")["pid"])  # type: ignore[index]
        assert "pager.xenpaging" in _cmdline(pager_pid)
        failed = hvemu(run_dir, "pager-attach", "99", check=False)
        assert failed.returncode == 1 and "no domain 99" in failed.stderr, "refused before any pager starts"
        with open(os.path.join(run_dir, "pager-1.pid")) as f, open(os.path.join(run_dir, "pager-5.pid"), "w") as g:
            g.write(f.read())  # a live pager, but not domain 5's
        res = hvemu(run_dir, "pager-detach", "5", check=False)
        assert res.returncode == 1 and "not running" in res.stderr, res.stderr
        assert "pager.xenpaging" in _cmdline(pager_pid), "pager-detach 5 stopped domain 1's pager"
        assert not os.path.exists(os.path.join(run_dir, "pager-5.pid"))
        stopped = hv_json(run_dir, "stop")
        assert stopped == {"stopped": "hypervisor", "pid": hv_pid}, stopped
        assert "pager.xenpaging" not in _cmdline(pager_pid), "the pager exits with its hypervisor"
        left = sorted(os.listdir(run_dir))
        assert left == ["hypervisor.log", "pager-1.log"], "a destroyed domain's pagefile goes: " + str(left)
        with open(os.path.join(run_dir, "pager-1.log")) as f:
            assert "lost the hypervisor" not in f.read(), "hvemu stop is a normal end for a pager"
        again = hvemu(run_dir, "stop", check=False)
        assert again.returncode == 1 and "not running" in again.stderr
    finally:
        if "hvemu.hypervisor.daemon" in _cmdline(hv_pid):
            os.kill(hv_pid, 9)


def test_pager_attach_reports_a_pager_that_refuses_an_orphaned_ring(started: str, tmp_path: object) -> None:
    """An orphaned ring counts as enabled: attached means the new pager owns it, else its refusal is reported."""
    run_dir = started
    hvemu(run_dir, "create", "--vcpus", "1", "--memory", "8", "--target", "1")
    pager_pid = int(hv_json(run_dir, "pager-attach", "1", "--pagefile",  # type: ignore[index]
                            os.path.join(str(tmp_path), "right"))["pid"])
    deadline = time.monotonic() + 15
    while hv_json(run_dir, "info", "1")["pages"]["paged"] < 1000:  # type: ignore[index]
        assert time.monotonic() < deadline, "the pager did not page out to its target"
        time.sleep(0.1)
    os.kill(pager_pid, signal.SIGKILL)
    while "pager.xenpaging" in _cmdline(pager_pid):
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    refused = hvemu(run_dir, "pager-attach", "1", "--pagefile", os.path.join(str(tmp_path), "wrong"), check=False)
    assert refused.returncode == 1 and "pages are out" in refused.stderr, refused.stderr
    assert "attached" not in refused.stdout, refused.stdout
    hvemu(run_dir, "pager-attach", "1", "--pagefile", os.path.join(str(tmp_path), "right"))
    hvemu(run_dir, "pager-detach", "1")
    assert hv_json(run_dir, "info", "1")["pages"]["paged"] == 0  # type: ignore[index]
