"""The ``hvemu`` toolstack command, run as a user would: real processes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.system import ROOT, Proc, shm_segments


def hvemu(run_dir: str, *args: str, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvemu.cli", "--run-dir", run_dir, *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=90, env=env)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def hv_json(run_dir: str, *args: str) -> object:
    return json.loads(hvemu(run_dir, *args, "--json").stdout)


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
    assert created == {"domid": 1, "vcpus": 2, "gfns": 1024}
    listing = hv_json(run_dir, "list")
    assert isinstance(listing, list) and listing[0]["name"] == "web" and listing[0]["memory_mib"] == 4
    info = hv_json(run_dir, "info", "1")
    assert isinstance(info, dict)
    assert info["vcpus"] == {"total": 2, "paused": 0, "blocked": 0, "running": 2}
    assert info["pages"]["total"] == 1024 and info["pages"]["resident"] == 1024
    assert hv_json(run_dir, "mem-set", "1", "1") == {"domid": 1, "target_pages": 256}
    assert hv_json(run_dir, "info", "1")["pages"]["target"] == 256  # type: ignore[index]
    mapped = hv_json(run_dir, "map", "1", "0", "5")
    assert isinstance(mapped, dict) and set(mapped["pages"]) == {"0", "5"}
    text = hvemu(run_dir, "list").stdout
    assert "domid" in text and "web" in text, "the text output is a table"
    hvemu(run_dir, "destroy", "1")
    assert hv_json(run_dir, "list") == []


def test_errors_are_one_line(started: str, tmp_path: object) -> None:
    for args, needle in [(("info", "7"), "ESRCH"), (("destroy", "7"), "ESRCH"),
                         (("trace", "stop"), "ENOENT"), (("pager-detach", "3"), "not running"),
                         (("trace", "summary", "/nonexistent"), "no trace file")]:
        res = hvemu(started, *args, check=False)
        assert res.returncode == 1, (args, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    bad = hvemu(started, "pager-attach", "99", check=False)
    assert bad.returncode == 1 and "ESRCH" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
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
    assert plain.returncode == 1 and plain.stderr.startswith("hvemu info: ") and "ESRCH" in plain.stderr


def _check_piped_top(run_dir: str) -> None:
    """``top`` into a pipe: as wide as its tables without $COLUMNS (nothing cut or wrapped), else $COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    natural = hvemu(run_dir, "top", "--iterations", "1", env=env).stdout
    assert "…" not in natural, natural
    lines = natural.splitlines()
    header = next(line for line in lines if " dom " in line and "lost" in line)  # one row of column names
    for column in ("vcpus run/paused/blocked", "in flight", "fault p50 us", "fault p99 us", "put"):
        assert column in header, (column, natural)
    assert any(" dom " in line and "blocked now/ever" in line and "rejected" in line for line in lines), natural
    assert max(len(line) for line in lines) > 80, "the domain table alone is wider than 80 columns"
    narrow = hvemu(run_dir, "top", "--iterations", "1", env={**env, "COLUMNS": "100"}).stdout
    assert "domains" in narrow and max(len(line) for line in narrow.splitlines()) <= 100, narrow


def test_pager_trace_top_and_plots(started: str, tmp_path: object) -> None:
    run_dir = started
    trace_file = os.path.join(str(tmp_path), "ring.trace")
    hvemu(run_dir, "create", "--vcpus", "2", "--memory", "8", "--target", "1")
    hvemu(run_dir, "trace", "start", trace_file)
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
        assert "domains" in top and "rings" in top and "paging" in top
        _check_piped_top(run_dir)
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
    out_dir = os.path.join(str(tmp_path), "plots")
    plots = hv_json(run_dir, "trace", "plot", trace_file, "--out", out_dir)["plots"]  # type: ignore[index]
    for path in plots:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
