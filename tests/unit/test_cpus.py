"""CPU lists (``--cpus`` of run.sh and the benchmarks), in taskset's form."""

from __future__ import annotations

import os

import pytest

from hvemu.toolstack.bench.common import format_cpus, parse_cpus


def test_parse_cpus_reads_taskset_lists() -> None:
    first = min(os.sched_getaffinity(0))
    assert parse_cpus(str(first)) == {first}
    assert parse_cpus(f" {first} ,{first}-{first}") == {first}
    assert parse_cpus(format_cpus(os.sched_getaffinity(0))) == os.sched_getaffinity(0)


@pytest.mark.parametrize("text, message", [
    ("", "not a CPU"), ("0,,", "not a CPU"), ("abc", "not a CPU"), ("1-", "not a CPU"), ("-1", "not a CPU"),
    ("3-1", "not a range"), ("0-99999999999", "not available"), ("100000", "not available"),
])
def test_parse_cpus_refuses_what_taskset_would_not_take(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cpus(text)
