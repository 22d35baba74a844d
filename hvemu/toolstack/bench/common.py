"""What every benchmark shares: CPU placement, child processes, a hypervisor, percentiles.

Children are started with this interpreter, in their own session, with
``die_with_parent`` (a killed benchmark leaves nothing running) and pinned
with ``sched_setaffinity`` before ``exec`` (the same CPU lists ``taskset -c``
and ``scripts/run.sh --cpus`` take).  Their stderr goes to a private
temporary file that is shown only when something fails.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hvemu import procs
from hvemu.procs import status_bytes, status_field
from hvemu.stats import DomainStats
from hvemu.toolstack import host
from hvemu.toolstack.bench import profile
from hvemu.toolstack.host import Child, ChildError

#: Process roles a placement names.
ROLES = ("hypervisor", "guest", "daemon")


class BenchError(ChildError):
    """A benchmark could not run (a child failed, a deadline passed); the message says which."""


def parse_cpus(text: str) -> set[int]:
    """A ``taskset -c`` list (``0``, ``0,2``, ``0-3``) of CPUs this process may use, as a set.

    ``ValueError`` names what is wrong: an empty item, a range whose end is
    below its start, a CPU that is not available (checked before a range is
    expanded, so ``0-99999999999`` costs nothing).
    """
    allowed = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        try:
            lo, hi = (int(x) for x in item.split("-", 1)) if "-" in item else (int(item), int(item))
        except ValueError:
            raise ValueError(f"{item!r} is not a CPU or a range of CPUs (in {text!r})") from None
        if not 0 <= lo <= hi:
            raise ValueError(f"{item!r} is not a range of CPUs (in {text!r})")
        if hi > max(allowed):
            raise ValueError(f"CPU {hi} is not available (allowed: {format_cpus(allowed)})")
        cpus.update(range(lo, hi + 1))
    if not cpus <= allowed:
        raise ValueError(f"CPUs {sorted(cpus - allowed)} are not available (allowed: {format_cpus(allowed)})")
    return cpus


def format_cpus(cpus: set[int] | frozenset[int]) -> str:
    """The compact ``taskset -c`` form of a CPU set (``0-3,6``)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


@dataclass
class Placement:
    """Which CPUs each role runs on (None: wherever the scheduler likes)."""

    hypervisor: set[int] | None = None
    guest: set[int] | None = None
    daemon: set[int] | None = None
    #: What was actually seen in /proc for one process of each role.
    observed: dict[str, str] = field(default_factory=dict)
    #: The CPUs the benchmark was allowed to use when it started.
    available: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    def of(self, role: str) -> set[int] | None:
        cpus: set[int] | None = getattr(self, role)
        return cpus

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {r: (format_cpus(c) if (c := self.of(r)) is not None else "any") for r in ROLES}
        out["pinned"] = any(self.of(r) is not None for r in ROLES)
        out["available_cpus"] = format_cpus(self.available)
        out["observed"] = dict(self.observed)
        return out

    def union(self) -> set[int] | None:
        sets = [c for r in ROLES if (c := self.of(r)) is not None]
        if len(sets) != len(ROLES):
            return None
        return set().union(*sets)


def observed_affinity(pid: int) -> str:
    """``Cpus_allowed_list`` of a live process (what the kernel enforces)."""
    try:
        return status_field(pid, "Cpus_allowed_list") or "?"
    except OSError:
        return "?"


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (anonymous, file and shared memory it touched), in bytes."""
    try:
        return status_bytes(pid, "VmRSS")
    except LookupError as exc:
        raise BenchError(str(exc)) from exc


CLK_TCK = procs.CLK_TCK


class ProcTimes(NamedTuple):
    """What a process has used so far: CPU ticks in user and kernel mode, and times it slept."""

    user: int
    system: int
    #: ``voluntary_ctxt_switches``: each is a wait (for an fd, a futex) that blocked, so one wake-up.
    sleeps: int

    @property
    def cpu(self) -> int:
        return self.user + self.system


def proc_times(pid: int) -> ProcTimes:
    """``utime``/``stime`` of ``pid`` from ``/proc/PID/stat`` (fields 14, 15) and its voluntary switches.

    The kernel scales the two to the task's exact run time, so their sum is
    exact to a tick (10 ms here): windows must hold enough work to make a
    tick small beside it.  The command name may hold spaces and parentheses,
    so fields are counted from the last ``)``.
    """
    try:
        user, system = procs.cpu_ticks(pid)
        sleeps = status_field(pid, "voluntary_ctxt_switches")
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    return ProcTimes(user, system, int(sleeps or 0))


def cpu_snapshot(pids: dict[str, int]) -> dict[str, ProcTimes]:
    """:func:`proc_times` of each named process, read back to back."""
    return {role: proc_times(pid) for role, pid in pids.items()}


def open_window(pids: dict[str, int]) -> dict[str, ProcTimes]:
    """Start measuring the named processes: their times now, and their profilers on if profiling."""
    profile.window(pids.values(), on=True)
    return cpu_snapshot(pids)


def close_window(pids: dict[str, int]) -> dict[str, ProcTimes]:
    """Stop measuring: the processes' times now, and their profilers off if profiling."""
    after = cpu_snapshot(pids)
    profile.window(pids.values(), on=False)
    return after


def _per_op_us(ticks: int, ops: int) -> float:
    return round(ticks * 1e6 / CLK_TCK / max(ops, 1), 1)


def cpu_per_op_us(before: dict[str, ProcTimes], after: dict[str, ProcTimes], ops: int) -> dict[str, float]:
    """CPU microseconds per operation of each process between two snapshots, and their ``total``."""
    out = {role: _per_op_us(after[role].cpu - before[role].cpu, ops) for role in before}
    out["total"] = _per_op_us(sum(after[r].cpu - before[r].cpu for r in before), ops)
    return out


def cpu_detail(before: dict[str, ProcTimes], after: dict[str, ProcTimes], ops: int) -> dict[str, dict[str, float]]:
    """Per operation and process: the kernel's share of the CPU (``sys_us``) and the sleeps (wake-ups)."""
    return {"sys_us": {r: _per_op_us(after[r].system - before[r].system, ops) for r in before},
            "sleeps": {r: round((after[r].sleeps - before[r].sleeps) / max(ops, 1), 2) for r in before}}


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(len(sorted_values) * pct / 100.0))
    return float(sorted_values[rank - 1])


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    """p50/p99/max/mean in microseconds of samples in nanoseconds."""
    s = sorted(samples_ns)
    return {
        "n": len(s),
        "p50_us": round(percentile(s, 50) / 1000, 2),
        "p99_us": round(percentile(s, 99) / 1000, 2),
        "max_us": round((s[-1] if s else 0) / 1000, 2),
        "mean_us": round((sum(s) / len(s) if s else 0) / 1000, 2),
    }


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------


class Proc(Child):
    """A benchmark's child: a :class:`~hvemu.toolstack.host.Child`, run under the profiler when profiling."""

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], *, cpus: set[int] | None = None, stdin: bool = False,
                    pass_fds: Sequence[int] = (), executable: str | None = None,
                    log_path: str | None = None, inherit_stderr: bool = False) -> Proc:
        argv = list(argv) if executable else profile.wrap_argv(name, list(argv))
        child = await super().start(name, argv, cpus=cpus, stdin=stdin, pass_fds=pass_fds, executable=executable,
                                    log_path=log_path, inherit_stderr=inherit_stderr)
        assert isinstance(child, Proc)
        return child


class Host(host.Host):
    """The benchmark's :class:`hvemu.toolstack.host.Host`: children placed by role, as the run asked.

    Records the CPUs the kernel actually allowed one process of each role
    (``placement.observed``), and runs every Python child under the profiler
    when profiling (:class:`Proc`).
    """

    def __init__(self, placement: Placement, *, memory_mib: float = 1024.0, policy: str = "seed",
                 ring_size: int | None = None) -> None:
        super().__init__(memory_mib=memory_mib, admission=policy, ring_size=ring_size, cpus=placement.of,
                         client="bench", run_dir_prefix="hvemu-bench-", child_type=Proc)
        self.placement = placement

    def started(self, role: str, child: Child) -> None:
        self.placement.observed.setdefault(role, observed_affinity(child.pid))


def lost_guest(st: DomainStats) -> int:
    """Guest events lost on the paging ring (the seed's ``EAGAIN`` for a guest producer)."""
    return st.paging.lost_guest
