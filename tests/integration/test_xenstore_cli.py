"""hvemu create --abi, mem-set into xenstore, hvemu xenstore and hvemu xen-tool, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.integration.system import ROOT
from tests.integration.test_cli import hv_json, hvemu, started  # noqa: F401 - the fixture


def test_xenstore_follows_domains_and_targets(started: str) -> None:  # noqa: F811
    run_dir = started
    created = hv_json(run_dir, "create", "--memory", "4", "--abi", "vm_event", "--name", "xs")
    assert created["abi"] == "vm_event"  # type: ignore[index]
    domid = created["domid"]  # type: ignore[index]
    assert hvemu(run_dir, "xenstore", "read", f"/local/domain/{domid}/name").stdout.strip() == "xs"
    assert hvemu(run_dir, "xenstore", "read", f"/local/domain/{domid}/memory/target").stdout.strip() == "4096"
    watch = subprocess.Popen([sys.executable, "-m", "hvemu.toolstack.cli", "--run-dir", run_dir, "xenstore", "watch",
                              f"/local/domain/{domid}/memory", "-n", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let it register: the first event is the watch firing at once
        hvemu(run_dir, "mem-set", "xs", "2m")  # as xl mem-set: memory/target, and xenpaging's key
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert out.split() == [f"/local/domain/{domid}/memory", f"/local/domain/{domid}/memory/target",
                           f"/local/domain/{domid}/memory/target-tot_pages"], out
    rows = hv_json(run_dir, "xenstore", "ls", f"/local/domain/{domid}/memory")
    assert {r["key"].rsplit("/", 1)[1]: r["value"] for r in rows} == {  # type: ignore[attr-defined, index]
        "static-max": "4096", "target": "2048", "target-tot_pages": "2048"}
    hvemu(run_dir, "xenstore", "write", "/local/domain/0/device-model/1/command", "flush-cache")
    hvemu(run_dir, "xenstore", "rm", "/local/domain/0/device-model")
    missing = hvemu(run_dir, "xenstore", "read", "/local/domain/0/device-model/1/command", check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "ENOENT" in missing.stderr
    hvemu(run_dir, "destroy", "xs")
    gone = hvemu(run_dir, "xenstore", "ls", f"/local/domain/{domid}", check=False)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr


def test_bad_input_is_one_line(tmp_path: object) -> None:
    run_dir = os.path.join(str(tmp_path), "none")
    for args in (["xenstore", "read", "/x"], ["xen-tool", "xenpaging", "-d", "1", "-f", "/tmp/p"]):
        res = hvemu(run_dir, *args, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, (args, res.stderr)
    res = hvemu(run_dir, "create", "--abi", "xen9", check=False)  # a usage error: usage, then the error
    assert res.returncode == 2 and "invalid choice: 'xen9'" in res.stderr.splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_xen_tool_refuses_what_it_cannot_run(started: str) -> None:  # noqa: F811
    res = hvemu(started, "xen-tool", "xl", "list", check=False)
    assert res.returncode == 1 and "unknown tool 'xl'" in res.stderr and res.stderr.count("\n") == 1
    res = hvemu(started, "xen-tool", "--path", "/nonexistent/xenpaging", "xenpaging", check=False)
    assert res.returncode == 1 and "not an executable file" in res.stderr
