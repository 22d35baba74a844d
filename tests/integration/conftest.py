"""Fixtures for real-process tests: a hypervisor per test, and a leak check after it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.system import Hypervisor, running_hypervisor
from tests.integration.xen_tools import xen_bin, xen_libs  # noqa: F401 - fixtures of the Xen tools' tests


@pytest.fixture
def hypervisor(tmp_path: object) -> Iterator[Hypervisor]:
    yield from running_hypervisor(os.path.join(str(tmp_path), "run"))
