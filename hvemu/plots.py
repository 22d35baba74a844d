"""PNG plots of a ring trace: fault latency and ring occupancy over time."""

from __future__ import annotations

import os
from typing import Any

from hvemu.trace import NO_RING, RING_NAMES, TraceEvent, TraceRecord, fault_latencies


def plot_trace(records: list[TraceRecord], out_dir: str) -> list[str]:
    """Write ``fault_latency.png`` and ``ring_occupancy.png`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    if not records:
        raise ValueError("the trace has no records")
    t0 = records[0][0]
    paths = []

    fig, ax = plt.subplots(figsize=(10, 4))
    lat = fault_latencies(records)
    for domid in sorted({d for _, d, _ in lat}):
        xs = [(ts - t0) / 1e9 for ts, d, _ in lat if d == domid]
        ys = [us for _, d, us in lat if d == domid]
        ax.scatter(xs, ys, s=4, label=f"dom{domid}")
    ax.set_yscale("log")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "fault_latency.png"), "fault latency",
                       "fault latency (us): request put to vCPU runnable", legend=bool(lat)))

    fig, ax = plt.subplots(figsize=(10, 4))
    series: dict[tuple[int, int], tuple[list[float], list[int]]] = {}
    ring_events = {TraceEvent.PUT, TraceEvent.RESPONSE, TraceEvent.LOST, TraceEvent.REFUSED}
    for ts, domid, ring, event, _vcpu, _gfn, arg in records:
        if ring == NO_RING or event not in ring_events:
            continue
        times, occupancy = series.setdefault((domid, ring), ([], []))
        times.append((ts - t0) / 1e9)
        occupancy.append(arg)
    for (domid, ring), (times, occupancy) in sorted(series.items()):
        ax.step(times, occupancy, where="post", label=f"dom{domid} {RING_NAMES.get(ring, '?')}")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "ring_occupancy.png"), "ring occupancy",
                       "unanswered requests on the ring", legend=bool(series)))
    return paths


def _save(plt: Any, fig: Any, ax: Any, path: str, title: str, ylabel: str, *, legend: bool) -> str:
    """Label a time plot, write it as a PNG and close it; its path."""
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
