"""Each name the processes pass each other is spelled once (hvemu/names.py) and means something everywhere."""

from __future__ import annotations

import itertools

from guest.workload import WorkloadConfig, accesses
from hvemu import abi, names
from hvemu.core.admission import ADMISSIONS
from hvemu.core.hypervisor import Hypervisor
from pager.policy import make_policy


def test_every_admission_name_has_its_rules() -> None:
    assert tuple(ADMISSIONS) == names.ADMISSION_POLICIES
    for name in names.ADMISSION_POLICIES:
        assert Hypervisor(8, policy=name).create_domain(1, 8).rings[abi.RingKind.paging].admission.name == name


def test_every_victim_policy_name_makes_a_policy() -> None:
    for name in names.VICTIM_POLICIES:
        assert make_policy(name, seed=1) is not None


def test_every_pattern_makes_accesses() -> None:
    for pattern in names.PATTERNS:
        got = list(itertools.islice(accesses(WorkloadConfig(pattern=pattern), list(range(16)), 0), 50))
        assert len(got) == 50 and all(0 <= g < 16 for g, _ in got)


def test_mib_and_pages() -> None:
    assert abi.mib_to_pages(1) == abi.MiB // abi.PAGE_SIZE == 256
    assert abi.mib_to_pages(0.0039) == 0, "rounded down"
    assert abi.pages_to_mib(256) == 1.0
