"""``hvemu`` as an xl user types it (sizes, hex gfns, names, list, info, vcpu-list, help), and clean stops."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import hvemu
from tests.integration.system import Proc, shm_segments
from tests.integration.test_cli import hv_json
from tests.integration.test_cli import hvemu as run


def test_help_version_and_usage(tmp_path: object) -> None:
    run_dir = os.path.join(str(tmp_path), "none")
    bare = run(run_dir)
    assert bare.returncode == 0 and "COMMAND" in bare.stdout and "vcpu-list" in bare.stdout, bare.stdout
    assert run(run_dir, "--version").stdout.strip() == f"hvemu {hvemu.__version__}"
    start = " ".join(run(run_dir, "start", "--help").stdout.split())
    assert "(default: 256 MiB)" in start and "512m, 1g" in start and "--ring-size SLOTS" in start, start
    assert "(default: seed)" in start and "None" not in start, start
    listener = run(run_dir, "listener-attach", "--help").stdout
    assert "--gfns" in listener and "--access" in listener, listener
    bad = run(run_dir, "start", "--ring-size", "3", check=False)
    assert bad.returncode == 2 and "3 is not a power of two from 1 to 64" in bad.stderr, bad.stderr
    size = run(run_dir, "create", "--memory", "12q", check=False)
    assert size.returncode == 2 and "12q is not a size" in size.stderr, size.stderr


def test_xl_habits(tmp_path: object) -> None:
    run_dir = os.path.join(str(tmp_path), "run")
    pid = int(hv_json(run_dir, "start", "--memory", "64m", "--ring-size", "8")["pid"])  # type: ignore[index]
    try:
        host: Any = hv_json(run_dir, "info")
        assert host["total_memory_mib"] == 64 and host["ring_size"] == 8 and host["nr_domains"] == 0, host
        assert run(run_dir, "list").stdout.split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Resident",
                                                       "Target"], "a header when empty"
        created = hv_json(run_dir, "create", "--memory", "4096k", "--vcpus", "2", "--name", "web")
        assert created == {"domid": 1, "vcpus": 2, "gfns": 1024, "abi": "seed"}, created
        assert hv_json(run_dir, "mem-set", "web", "512k") == {"domid": 1, "target_pages": 128}
        too_big = run(run_dir, "mem-set", "web", "1g", check=False)
        assert too_big.returncode == 1 and "target 1g is above domain web's memory (4 MiB)" in too_big.stderr
        assert set(hv_json(run_dir, "map", "web", "0x10", "17")["pages"]) == {"16", "17"}  # type: ignore[index]
        assert hv_json(run_dir, "info", "web")["domid"] == 1  # type: ignore[index]
        vcpus: Any = hv_json(run_dir, "vcpu-list", "web")
        assert [v["vcpu"] for v in vcpus] == [0, 1], vcpus
        assert run(run_dir, "vcpu-list").stdout.split()[:6] == ["Name", "ID", "VCPU", "State", "Pauses",
                                                              "Congested"]
        name_clash = run(run_dir, "create", "--name", "7", check=False)
        assert name_clash.returncode == 1 and "would read as a domain id" in name_clash.stderr
        run(run_dir, "destroy", "web")
        assert hv_json(run_dir, "list") == []
    finally:
        res = run(run_dir, "stop", check=False)
        if res.returncode != 0:
            os.kill(pid, 9)
        assert not shm_segments(pid)


def _guest(run_dir: str, domid: int) -> Proc:
    return Proc("-m", "guest", "--run-dir", run_dir, "--domid", str(domid), "--duration", "60")


def _wait_paged(run_dir: str, domain: str) -> None:
    deadline = time.monotonic() + 20
    while hv_json(run_dir, "info", domain)["pages"]["paged"] < 100:  # type: ignore[index]
        assert time.monotonic() < deadline, "the pager did not page out"
        time.sleep(0.1)


def test_destroy_and_stop_are_clean_ends(tmp_path: object) -> None:
    """The guest says its domain was destroyed and exits 0; the pager exits 0 quietly; its pagefile goes."""
    run_dir = os.path.join(str(tmp_path), "run")
    pid = int(hv_json(run_dir, "start", "--memory", "32")["pid"])  # type: ignore[index]
    guests: list[Proc] = []
    try:
        for name in ("one", "two"):
            run(run_dir, "create", "--memory", "8", "--target", "2", "--name", name)
            run(run_dir, "pager-attach", name)
        pagefiles = [os.path.join(run_dir, f"dom{d}.pagefile") for d in (1, 2)]
        assert all(os.path.exists(p) for p in pagefiles)
        _wait_paged(run_dir, "one")
        guests = [_guest(run_dir, 1), _guest(run_dir, 2)]
        deadline = time.monotonic() + 60
        while not all(hv_json(run_dir, "info", d, "--raw")["guest_connected"] for d in ("1", "2")):  # type: ignore[index]
            assert time.monotonic() < deadline, "the guests did not connect"
            time.sleep(0.1)
        run(run_dir, "destroy", "one")
        assert guests[0].wait(20) == 0, guests[0].stderr()
        assert "domain 1: the domain was destroyed" in guests[0].stderr()
        # destroy waited for the domain's pager: it removed its pagefile and exited.
        assert not os.path.exists(pagefiles[0]) and not os.path.exists(os.path.join(run_dir, "pager-1.pid"))
        stopped = hv_json(run_dir, "stop")
        assert "still_running" not in stopped, stopped  # type: ignore[operator]
        assert guests[1].wait(20) == 0, guests[1].stderr()
        assert "domain 2: the domain was destroyed" in guests[1].stderr()
        for log in ("pager-1.log", "pager-2.log"):
            with open(os.path.join(run_dir, log)) as f:
                text = f.read()
            assert "lost the hypervisor" not in text and "hvemu-pager:" not in text, (log, text)
        assert sorted(os.listdir(run_dir)) == ["hypervisor.log", "pager-1.log", "pager-2.log"]
    finally:
        for g in guests:
            g.stop()
        if run(run_dir, "stop", check=False).returncode != 0 and os.path.exists(f"/proc/{pid}"):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"hvemu.hypervisor.daemon" in f.read():
                    os.kill(pid, 9)


def test_trace_plot_without_matplotlib_says_how_to_get_it(tmp_path: object) -> None:
    """``hvemu[plot]`` not installed: one line naming the extra (matplotlib hidden by a package that fails)."""
    from hvemu import trace

    hidden = os.path.join(str(tmp_path), "hide")
    os.makedirs(os.path.join(hidden, "matplotlib"))
    with open(os.path.join(hidden, "matplotlib", "__init__.py"), "w") as f:
        f.write("raise ImportError('No module named matplotlib')\n")
    path = os.path.join(str(tmp_path), "t.trace")
    with open(path, "wb") as f:
        f.write(trace.HEADER.pack(trace.MAGIC, trace.VERSION, trace.RECORD.size))
        f.write(trace.RECORD.pack(1, 1, 0, int(trace.TraceEvent.PUT), 0, 3, 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([hidden, *sys.path])}
    res = run(os.path.join(str(tmp_path), "none"), "--json", "trace", "plot", path, check=False, env=env)
    assert res.returncode == 1, res.stderr
    err = json.loads(res.stderr)
    assert "pip install 'hvemu[plot]'" in err["error"] and err["errno"] == "ENOPKG", err
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".png")]


def test_top_quits_on_q_and_says_when_the_hypervisor_goes(tmp_path: object) -> None:
    import pty
    import subprocess

    from tests.integration.system import ROOT

    run_dir = os.path.join(str(tmp_path), "run")
    pid = int(hv_json(run_dir, "start", "--memory", "16")["pid"])  # type: ignore[index]
    try:
        run(run_dir, "create", "--memory", "4", "--name", "web")
        leader, follower = pty.openpty()
        os.set_blocking(leader, False)
        env = {**os.environ, "COLUMNS": "80", "LINES": "24"}
        proc = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.cli", "--run-dir", run_dir, "top", "-d", "0.2"],
                                cwd=ROOT, stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env)
        os.close(follower)
        screen = b""
        deadline = time.monotonic() + 30
        while b"web" not in screen:  # the first refresh is on the terminal
            assert proc.poll() is None and time.monotonic() < deadline, screen
            time.sleep(0.1)
            try:
                screen += os.read(leader, 65536)
            except BlockingIOError:
                pass
        os.write(leader, b"q")
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
        os.close(leader)
        text = screen.decode(errors="replace")
        assert all(len(line) <= 80 for line in text.replace("\x1b[H\x1b[2J", "").splitlines()), text
        batch = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.cli", "--run-dir", run_dir,
                                  "top", "-b", "-d", "0.2"],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        run(run_dir, "stop")
        _, err = batch.communicate(timeout=30)
        assert batch.returncode == 1 and err == "hvemu top: the hypervisor went away (stopped or killed)\n", err
    finally:
        if run(run_dir, "stop", check=False).returncode != 0 and os.path.exists(f"/proc/{pid}"):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"hvemu.hypervisor.daemon" in f.read():
                    os.kill(pid, 9)


def test_sighup_stops_the_hypervisor_its_guest_and_pager_cleanly(tmp_path: object) -> None:
    """The terminal closing (SIGHUP) is a clean stop, as SIGTERM is, for every process."""
    import signal
    import subprocess

    from hvemu import protocol
    from tests.integration.system import ROOT

    run_dir = os.path.join(str(tmp_path), "run")
    hv = subprocess.Popen([sys.executable, "-m", "hvemu.hypervisor.daemon", "--run-dir", run_dir, "--memory", "16"],
                          cwd=ROOT,
                          stderr=subprocess.PIPE, text=True)
    guest: Proc | None = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(protocol.socket_path(run_dir)):
            assert hv.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        run(run_dir, "create", "--memory", "4", "--target", "2")
        run(run_dir, "pager-attach", "1")
        guest = Proc("-m", "guest", "--run-dir", run_dir, "--domid", "1", "--duration", "0.5", "--linger")
        assert guest.json_line(60)["ok"]  # its report: it lingers until stopped
        guest.signal(signal.SIGHUP)
        assert guest.wait(20) == 0, guest.stderr()
        run(run_dir, "create", "--memory", "4")
        hv.send_signal(signal.SIGHUP)
        _, err = hv.communicate(timeout=30)
        assert hv.returncode == 0, err
        assert not os.path.exists(protocol.socket_path(run_dir))
        assert not shm_segments(hv.pid)
    finally:
        if guest is not None:
            guest.stop()
        if hv.poll() is None:
            hv.kill()
            hv.wait()


def _vcpus(run_dir: str, domain: str) -> list[dict[str, Any]]:
    rows: Any = hv_json(run_dir, "vcpu-list", domain)
    return list(rows)


def test_pause_stops_a_running_guest_and_unpause_lets_it_go_on(tmp_path: object) -> None:
    """xl pause: every vCPU of the real guest ends up waiting in an exit, list says 'p'; unpause: it runs on."""
    run_dir = os.path.join(str(tmp_path), "run")
    pid = int(hv_json(run_dir, "start", "--memory", "64m")["pid"])  # type: ignore[index]
    guest: Proc | None = None
    try:
        hv_json(run_dir, "create", "--memory", "4m", "--vcpus", "2", "--name", "web")
        guest = Proc("-m", "guest", "--run-dir", run_dir, "--domid", "1", "--duration", "3", "--vcpus", "2")
        deadline = time.monotonic() + 30
        while not all(v["connected"] for v in _vcpus(run_dir, "web")):
            assert time.monotonic() < deadline, "the guest's vCPUs did not connect"
            time.sleep(0.05)
        assert hv_json(run_dir, "pause", "web") == {"paused": 1}
        while not all(v["in_exit"] for v in _vcpus(run_dir, "web")):
            assert time.monotonic() < deadline, "the paused guest's vCPUs kept running"
            time.sleep(0.05)
        row = next(ln.split() for ln in run(run_dir, "list").stdout.splitlines() if ln.startswith("web "))
        assert row[4] == "--p---" and float(row[5]) >= 0, row  # xl's state letter, and Time(s): the guest's CPU
        listed: Any = hv_json(run_dir, "list")
        assert isinstance(listed[0]["time_s"], float), listed
        assert guest.alive(), "a paused guest does not finish"
        assert hv_json(run_dir, "unpause", "web") == {"unpaused": 1}
        out, err = guest.communicate(60)
        assert guest.p.returncode == 0 and json.loads(out.splitlines()[-1])["ok"], err[-2000:]
    finally:
        if guest is not None:
            guest.stop()
        res = run(run_dir, "stop", check=False)
        if res.returncode != 0:
            os.kill(pid, 9)
        assert not shm_segments(pid)
