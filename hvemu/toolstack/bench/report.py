"""The ratios between a run's figures, the issue's targets checked against them, and the table a person reads.

Every ratio is computed here, by the benchmark, from figures it measured in
the same run (never from anything the system reports about itself).
Targets are *reported*, never asserted: a run that misses one still exits 0;
only lost guest events, integrity failures or a benchmark that could not run
make it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _get(result: dict[str, Any], path: str) -> Any:
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return round(float(a) / float(b), 3)


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The system against its floors: the fault against the bare relay, userfaultfd and its own exit path.

    ``relay_floor`` is the physical floor (:mod:`hvemu.toolstack.bench.relay`, no
    hvemu code on its path); ``system_exit_overhead`` is hvemu's own exit
    path with nothing to do, reported beside it so that the share of the
    fault its plumbing takes is visible, and never used as a floor.
    """
    fault = "fault_roundtrip"
    out: dict[str, Any] = {
        "fault_vs_relay_p50": _ratio(_get(result, f"{fault}.p50_us"), _get(result, "relay_floor.p50_us")),
        "fault_vs_relay_p99": _ratio(_get(result, f"{fault}.p99_us"), _get(result, "relay_floor.p99_us")),
        "cpu_per_fault_vs_relay": _ratio(_get(result, f"{fault}.cpu_per_fault_us.total"),
                                         _get(result, "relay_floor.cpu_per_roundtrip_us.total")),
        "cpu_per_fault_vs_relay_by_process": {
            role: _ratio(_get(result, f"{fault}.cpu_per_fault_us.{role}"),
                         _get(result, f"relay_floor.cpu_per_roundtrip_us.{role}"))
            for role in ("hypervisor", "daemon", "guest")},
        "fault_vs_relay_blocking_p50": _ratio(_get(result, f"{fault}.p50_us"),
                                              _get(result, "relay_floor_blocking.p50_us")),
        "fault_vs_uffd_p50": _ratio(_get(result, f"{fault}.p50_us"), _get(result, "native_uffd.p50_us")),
        "fault_vs_exit_overhead_p50": _ratio(_get(result, f"{fault}.p50_us"),
                                             _get(result, "system_exit_overhead.p50_us")),
        "exit_overhead_vs_relay_p50": _ratio(_get(result, "system_exit_overhead.p50_us"),
                                             _get(result, "relay_floor.p50_us")),
        # The contract's own work alone (no I/O) against the whole bare relay: above 0.5, a fault
        # cannot come within 1.5 relays, since it also makes the relay's hops.
        "core_vs_relay_p50": _ratio(_get(result, "core_work.total_us"), _get(result, "relay_floor.p50_us")),
        "pagein16_vs_ring_floor": _ratio(_get(result, "pagein.16.batched_pages_per_s"),
                                         _get(result, "ring_floor.entries_per_s")),
    }
    return out


#: (name, how the value is computed, comparison, bound, what it means)
TARGETS: list[tuple[str, Callable[[dict[str, Any]], float | None], str, float, str]] = [
    ("fault_vs_relay_p50", lambda r: _get(r, "fault_vs_relay_p50"), "<=", 1.5,
     "a fault costs at most 1.5 bare relays (the physical floor)"),
    ("fault_vs_relay_p99", lambda r: _get(r, "fault_vs_relay_p99"), "<=", 3.0,
     "eviction batches and polls off the fault path"),
    ("cpu_per_fault_vs_relay", lambda r: _get(r, "cpu_per_fault_vs_relay"), "<=", 2.0,
     "CPU per fault, all processes, against the relay's per round trip"),
    ("fault_vs_uffd_p50", lambda r: _get(r, "fault_vs_uffd_p50"), "<=", 4.0,
     "stretch: within 4x of Linux userfaultfd"),
    ("pagein16_vs_ring_floor", lambda r: _get(r, "pagein16_vs_ring_floor"), ">=", 0.2,
     "page-in at 16 vCPUs against the bare ring"),
    ("pagein16_batched_over_unbatched",
     lambda r: _ratio(_get(r, "pagein.16.batched_pages_per_s"), _get(r, "pagein.16.unbatched_pages_per_s")),
     ">=", 2.0, "batching pays at 16 vCPUs"),
    ("pagein_batched_16_over_1",
     lambda r: _ratio(_get(r, "pagein.16.batched_pages_per_s"), _get(r, "pagein.1.batched_pages_per_s")),
     ">=", 2.0, "concurrency pays"),
    ("evict_over_floor", lambda r: _get(r, "evict.over_floor"),
     ">=", 0.5, "eviction runs at half the bare copy rate or better (median of paired rounds)"),
    ("fairness_min_over_max", lambda r: _get(r, "fairness.min_over_max"), ">=", 0.8,
     "no vCPU starves under congestion"),
    ("scale_startup_s", lambda r: _get(r, "scale.startup_s"), "<", 1.0, "a 1 GiB domain and its pager in < 1 s"),
    ("scale_hv_bytes_per_gfn", lambda r: _get(r, "scale.hv_bytes_per_gfn"), "<=", 16.0,
     "hypervisor memory per guest page"),
    ("lost_guest_events", lambda r: _get(r, "lost_guest_events"), "<=", 0, "must be 0"),
    ("integrity_failures", lambda r: _get(r, "integrity_failures"), "<=", 0, "must be 0"),
]


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn, op, bound, why in TARGETS:
        value = fn(result)
        met: bool | None
        if value is None:
            met = None
        elif op == "<=":
            met = value <= bound
        elif op == ">=":
            met = value >= bound
        else:
            met = value < bound
        out[name] = {"value": value, "target": f"{op} {bound:g}", "met": met, "why": why}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(result: dict[str, Any]) -> str:
    """Figures beside their floors, then the targets."""
    rows: list[tuple[str, str, str, str]] = [("figure", "value", "floor / ceiling", "ratio")]

    def row(label: str, value: Any, floor: Any = None, ratio: Any = None) -> None:
        rows.append((label, _fmt(value), _fmt(floor) if floor is not None else "", _fmt(ratio) if ratio else ""))

    fr, rf = result.get("fault_roundtrip", {}), result.get("relay_floor", {})
    rb, xo = result.get("relay_floor_blocking", {}), result.get("system_exit_overhead", {})
    uf = result.get("native_uffd", {})
    row("fault p50 us (1 vCPU, real pager) / relay", fr.get("p50_us"), rf.get("p50_us"),
        result.get("fault_vs_relay_p50"))
    row("fault p99 us / relay", fr.get("p99_us"), rf.get("p99_us"), result.get("fault_vs_relay_p99"))
    row("fault p50 us / blocking relay", fr.get("p50_us"), rb.get("p50_us"), result.get("fault_vs_relay_blocking_p50"))
    for role in ("total", "hypervisor", "daemon", "guest"):
        row(f"CPU us per fault / per relay round trip: {role}", _get(fr, f"cpu_per_fault_us.{role}"),
            _get(rf, f"cpu_per_roundtrip_us.{role}"),
            _ratio(_get(fr, f"cpu_per_fault_us.{role}"), _get(rf, f"cpu_per_roundtrip_us.{role}")))
    row("faults measured", fr.get("n"), rf.get("n"))
    row("system exit overhead p50 us (not a floor)", xo.get("p50_us"), rf.get("p50_us"),
        result.get("exit_overhead_vs_relay_p50"))
    row("system exit overhead CPU us per exit", _get(xo, "cpu_per_exit_us.total"),
        _get(rf, "cpu_per_roundtrip_us.total"),
        _ratio(_get(xo, "cpu_per_exit_us.total"), _get(rf, "cpu_per_roundtrip_us.total")))
    row("core work us per fault, no I/O (not a floor)", _get(result, "core_work.total_us"), rf.get("p50_us"),
        result.get("core_vs_relay_p50"))
    row("fault p50 us / native userfaultfd p50 (C)", fr.get("p50_us"), uf.get("p50_us"),
        result.get("fault_vs_uffd_p50"))
    ring = _get(result, "ring_floor.entries_per_s")
    for v in ("1", "4", "16"):
        pi = _get(result, f"pagein.{v}") or {}
        row(f"page-in {v:>2} vCPUs batched pages/s", pi.get("batched_pages_per_s"), ring,
            _ratio(pi.get("batched_pages_per_s"), ring))
        row(f"page-in {v:>2} vCPUs unbatched pages/s", pi.get("unbatched_pages_per_s"), ring,
            _ratio(pi.get("unbatched_pages_per_s"), ring))
    ev, evf = _get(result, "evict.pages_per_s"), _get(result, "evict_floor.pages_per_s")
    policy, batch = _get(result, "evict.policy"), _get(result, "evict.batch")
    row(f"evict pages/s ({policy} policy, batches of {batch})" if policy else "evict pages/s", ev, evf,
        _ratio(ev, evf))
    row("evict / floor, median of paired rounds", _get(result, "evict.over_floor"))
    evt = _get(result, "evict.pages_per_s_from_target")
    row("evict pages/s counted from the target change", evt, evf, _ratio(evt, evf))
    evr = _get(result, "evict.random_pages_per_s")
    row("evict pages/s, random policy", evr, evf, _ratio(evr, evf))
    fa = result.get("fairness", {})
    row("fairness min/max faults per vCPU", fa.get("min_over_max"))
    row("fairness longest stall ms", fa.get("max_stall_ms"))
    row("fairness congestion pauses", fa.get("congestion_pauses"))
    sc = result.get("scale", {})
    row("1 GiB domain + pager startup s", sc.get("startup_s"))
    row("hypervisor bytes per gfn", sc.get("hv_bytes_per_gfn"))
    row("lost guest events", result.get("lost_guest_events"))
    row("integrity failures", result.get("integrity_failures"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("targets (reported, not asserted):")
    for name, t in result.get("targets", {}).items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  {name:<34} {_fmt(t['value']):>10} {t['target']:>8}  {mark:<6}  {t['why']}")
    return "\n".join(lines)
