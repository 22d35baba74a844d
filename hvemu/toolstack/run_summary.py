"""``scripts/run.sh``'s output: the summary table (100 columns), its verdict, and the progress line."""

from __future__ import annotations

from typing import Any

import msgspec

from hvemu import abi
from hvemu.stats import DomainStats
from hvemu.toolstack.run_options import Settings, _num
from hvemu.toolstack.sizes import MiB, mib_text


class DomainResult(msgspec.Struct, kw_only=True):
    """One domain's line of the summary (sizes in MiB, rates per second of the guest's run)."""

    domid: int
    vcpus: int
    memory_mib: float
    target_mib: float
    #: Resident when created (below ``memory_mib`` when the host budget was spent: the rest starts paged out).
    resident_start_mib: float
    resident_end_mib: float
    #: Pages that started paged out, before any pager ran: their page-ins have no page-out.
    paged_at_start: int
    elapsed_s: float
    faults: int
    faults_per_s: float
    pages_in: int
    pages_out: int
    pages_in_per_s: float
    pages_out_per_s: float
    fault_p50_us: float
    fault_p99_us: float
    fault_max_us: float
    #: vCPUs paused for ring congestion (the seed's rule), foreign events refused (claim), events lost.
    blocked: int
    refused: int
    events_lost: int
    events_put: int
    accesses: int = 0
    integrity_failures: int = 0
    #: None when the run was interrupted before the process ended.
    pager_exit: int | None = None
    guest_exit: int | None = None


class Summary(msgspec.Struct, kw_only=True):
    ok: bool
    #: False when interrupted: the figures are those of the run so far.
    complete: bool
    settings: Settings
    #: ``scripts/run.sh`` with the options that repeat this run.
    command: str
    domains: list[DomainResult]
    host_memory_mib: float
    admission: str
    duration_s: float


def progress_line(t: float, duration: float, before: dict[int, DomainStats], now: dict[int, DomainStats],
                  dt: float) -> str:
    """``run.sh: 15/60 s  1234 faults/s  310 in/s  305 out/s  resident 80.0 MiB  lost 0`` over every domain."""
    def rate(key: str) -> float:
        return sum(getattr(now[d], key) - (getattr(before[d], key) if d in before else 0) for d in now) / max(dt, 1e-9)

    resident = sum(st.resident for st in now.values()) * abi.PAGE_SIZE
    lost = sum(st.events_lost for st in now.values())
    return (f"run.sh: {t:.0f}/{_num(duration)} s  {rate('faults'):.0f} faults/s  {rate('paged_in'):.0f} pages in/s  "
            f"{rate('evicted'):.0f} out/s  resident {mib_text(resident)} MiB  lost {lost}")


#: The summary table, one entry per column: (group over it, header, width, the figure).  One table for
#: the header lines and the rows; at most :data:`SUMMARY_WIDTH` columns wide.
_COLUMNS: list[tuple[str, str, int, Any]] = [
    ("", "dom", 3, lambda d: str(d.domid)),
    ("", "vcpus", 5, lambda d: str(d.vcpus)),
    ("memory, MiB", "size", 6, lambda d: mib_text(d.memory_mib * MiB)),
    ("memory, MiB", "target", 6, lambda d: mib_text(d.target_mib * MiB)),
    ("resident, MiB", "start", 6, lambda d: f"{d.resident_start_mib:.1f}"),
    ("resident, MiB", "end", 6, lambda d: f"{d.resident_end_mib:.1f}"),
    ("per second", "faults", 7, lambda d: f"{d.faults_per_s:.0f}"),
    ("per second", "in", 6, lambda d: f"{d.pages_in_per_s:.0f}"),
    ("per second", "out", 6, lambda d: f"{d.pages_out_per_s:.0f}"),
    ("fault, us", "p50", 7, lambda d: f"{d.fault_p50_us:.0f}"),
    ("fault, us", "p99", 7, lambda d: f"{d.fault_p99_us:.0f}"),
    ("ring events", "blocked", 7, lambda d: str(d.blocked)),
    ("ring events", "refused", 7, lambda d: str(d.refused)),
    ("ring events", "lost", 5, lambda d: str(d.events_lost)),
]


SUMMARY_WIDTH = 100


def summary_lines(summary: Summary) -> list[str]:
    """The summary as printed: a two-line header, a row per domain, what explains the figures, the verdict."""
    groups: list[str] = []
    spans: list[tuple[str, int]] = []
    for group, _, width, _ in _COLUMNS:
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1] + width + 1)
        else:
            spans.append((group, width))
    for group, width in spans:
        groups.append(f"{group:^{width}}" if not group else f"{' ' + group + ' ':-^{width}}")
    lines = [" ".join(groups).rstrip(), " ".join(f"{h:>{w}}" for _, h, w, _ in _COLUMNS)]
    lines += [" ".join(f"{fmt(d):>{w}}" for _, _, w, fmt in _COLUMNS) for d in summary.domains]
    s = summary.settings
    for d in summary.domains:
        if d.paged_at_start:
            lines.append(f"dom {d.domid}: created with {d.resident_start_mib:.1f} of {mib_text(d.memory_mib * MiB)} "
                         f"MiB resident (host budget spent): {d.paged_at_start} pages started out, so in > out")
    if not summary.complete:
        lines.append("interrupted: the figures are those of the run so far (pages not verified by the guests)")
    verdict = "OK" if summary.ok else ("not checked" if not summary.complete else "FAILED")
    lines.append(f"integrity {verdict}  (host {mib_text(s.host_memory_mib * MiB)} MiB, {s.admission} admission, "
                 f"{s.pattern} pattern, {_num(s.duration_s)} s, seed {s.seed}; rates per s of guest run)")
    return lines


def _print_summary(summary: Summary) -> None:
    print("\n".join(summary_lines(summary)))
