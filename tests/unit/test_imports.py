"""Guests and daemons are other processes: they load the control socket's client, never its server.

Each is imported in a fresh interpreter (what ``python -m guest`` or a pager
loads), and its ``sys.modules`` must hold none of the hypervisor side.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: What only the hypervisor (the control server and what serves it) loads.
SERVER_SIDE = ("hvemu.hypervisor.server", "hvemu.buffer_budget", "hvemu.hypervisor.daemon",
               "hvemu.hypervisor.backend", "hvemu.core")


@pytest.mark.parametrize("module", ["guest.__main__", "pager.xenpaging", "pager.sdk", "pager.attach",
                                    "pager.examples.access_listener", "hvemu.client"])
def test_guests_and_daemons_do_not_load_the_server(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    assert "hvemu.client" in loaded
    assert [m for m in loaded if m.startswith(SERVER_SIDE)] == []
