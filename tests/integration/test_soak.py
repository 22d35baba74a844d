"""A short soak (``scripts/soak.sh``): several domains, many vCPUs, a tiny target, foreign
mappers, drops, a pager killed and restarted; zero integrity failures and zero lost guest
events.  ``scripts/soak.sh --minutes N`` is the long version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.system import ROOT, shm_segments


@pytest.mark.timeout(180)
def test_short_soak(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "soak.json")
    logs = os.path.join(str(tmp_path), "logs")
    before = set(shm_segments())
    run = subprocess.run([sys.executable, "-m", "hvemu.toolstack.soak", "--seconds", "12", "--domains", "3",
                          "--vcpus", "8",
                          "--target", "48", "--kill-pagers-every", "4", "--json", out, "--log-dir", logs],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(out) as f:
        summary = json.load(f)
    assert summary["ok"], summary
    assert summary["pager_kills"] >= 1
    for d in summary["domains"]:
        assert d["integrity_failures"] == 0 and d["lost_guest"] == 0, d
        assert d["faults"] > 1000 and d["dropped"] > 0 and d["max_occupancy"] > 8, d
    mappers = summary["mappers"]
    assert sum(m["pages"] for m in mappers) > 0 and sum(m["retries"] for m in mappers) > 0, mappers
    assert summary["leftovers"] == {"dev_shm": [], "run_dir": []}, summary["leftovers"]
    assert summary["hypervisor"]["fds"]["max"] > 0, summary["hypervisor"]
    assert "soak OK" in run.stdout and "lost guest events 0, integrity failures 0" in run.stdout
    assert set(shm_segments()) <= before, "the soak left segments in /dev/shm"
