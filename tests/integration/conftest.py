"""Fixtures for real-process tests: a hypervisor per test, and a leak check after it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.system import Hypervisor, shm_segments
from tests.integration.xen_tools import xen_bin, xen_libs  # noqa: F401 - fixtures of the Xen tools' tests


@pytest.fixture
def hypervisor(tmp_path: object) -> Iterator[Hypervisor]:
    run_dir = os.path.join(str(tmp_path), "run")
    hv = Hypervisor(run_dir)
    try:
        yield hv
    finally:
        status = hv.stop()
        assert status == 0, f"hypervisor exited with status {status}"
        assert not os.path.exists(hv.socket), "control socket left behind"
        assert not shm_segments(hv.proc.pid), "shared-memory segments left in /dev/shm"
