"""PNG plots of a ring trace: ring occupancy, and fault latency, per domain.

Needs matplotlib, the optional extra ``hvemu[plot]`` (:func:`need_matplotlib`
says how to get it).  Every figure has one panel per domain.  Occupancy is
binned over time (mean and maximum per bin, the ring's size drawn as a line)
so that a long trace is a readable curve, not a solid block of steps; fault
latency is drawn as a CDF per domain and as p50/p99 per time bin, with the
paging target's changes marked.  A plot never overwrites an existing file
unless asked to.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hvemu.toolstack.tracetools import Records, fault_latencies
from hvemu.trace import NO_RING, RING_NAMES, TraceEvent

#: Time bins across a trace (fewer when the trace is short).
BINS = 200
#: The files written, by name suffix.
PLOTS = ("ring-occupancy.png", "fault-latency.png", "fault-latency-cdf.png")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def need_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg back end, or :class:`PlotUnavailable` saying how to get it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable("plotting needs matplotlib, the optional extra hvemu[plot]: "
                              "pip install 'hvemu[plot]' (scripts/test.sh and scripts/run.sh install it in .venv)"
                              ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_paths(out_dir: str, prefix: str) -> list[str]:
    return [os.path.join(out_dir, prefix + name) for name in PLOTS]


def plot_trace(records: Records, out_dir: str, prefix: str = "", *, force: bool = False) -> list[str]:
    """Write the :data:`PLOTS` into ``out_dir`` (names prefixed by ``prefix``); their paths.

    ``FileExistsError`` names a file that exists already, unless ``force``.
    """
    if not len(records):
        raise ValueError("the trace has no records")
    paths = plot_paths(out_dir, prefix)
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists (--force to overwrite it, or --out another directory)")
    plt = need_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    t0 = int(records["ts_ns"][0])
    t = (records["ts_ns"] - np.uint64(t0)).astype(np.float64) / 1e9
    span = max(float(t[-1]), 1e-6)
    domains = np.unique(records["domid"]).tolist()
    bins = np.linspace(0.0, span, max(2, min(BINS, len(records) // 20 + 2)))
    targets = {d: (t[m], records["arg"][m]) for d in domains
               if (m := (records["domid"] == d) & (records["event"] == TraceEvent.TARGET)).any()}
    _occupancy(plt, records, t, bins, domains, paths[0])
    begin, dom_of, _, lat = fault_latencies(records)
    lat_t = (begin - np.uint64(t0)).astype(np.float64) / 1e9
    _latency_over_time(plt, lat_t, dom_of, lat, bins, domains, targets, paths[1])
    _latency_cdf(plt, dom_of, lat, domains, paths[2])
    return paths


def _panels(plt: Any, n: int) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 + 1.8 * n), sharex=True, squeeze=False)
    return fig, [row[0] for row in axes]


def _occupancy(plt: Any, records: Records, t: Any, bins: Any, domains: list[int], path: str) -> None:
    ring_events = np.isin(records["event"], [TraceEvent.PUT, TraceEvent.RESPONSE, TraceEvent.LOST,
                                             TraceEvent.REFUSED, TraceEvent.REJECTED])
    fig, axes = _panels(plt, len(domains))
    for ax, domid in zip(axes, domains, strict=True):
        mine = records["domid"] == domid
        for ring in np.unique(records["ring"][mine & ring_events]).tolist():
            sel = mine & ring_events & (records["ring"] == ring)
            idx = np.clip(np.digitize(t[sel], bins) - 1, 0, len(bins) - 2)
            occ = records["arg"][sel].astype(np.float64)
            count = np.bincount(idx, minlength=len(bins) - 1)
            mean = np.bincount(idx, weights=occ, minlength=len(bins) - 1) / np.maximum(count, 1)
            peak = np.zeros(len(bins) - 1)
            np.maximum.at(peak, idx, occ)
            centres = (bins[:-1] + bins[1:]) / 2
            used = count > 0
            name = RING_NAMES.get(ring, "?")
            line = ax.plot(centres[used], mean[used], label=f"{name}: mean")[0]
            ax.fill_between(centres, 0, np.where(used, peak, np.nan), step="mid", alpha=0.25,
                            color=line.get_color(), label=f"{name}: max per bin")
            sizes = records["arg"][mine & (records["event"] == TraceEvent.RING) & (records["ring"] == ring)]
            if len(sizes):
                ax.axhline(int(sizes[-1]), color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"{name} ring size ({int(sizes[-1])})")
        ax.set_ylabel(f"dom{domid}\nrequests")
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    _finish(plt, fig, axes, "unanswered requests on each ring (binned over time)", path)


def _latency_over_time(plt: Any, lat_t: Any, dom_of: Any, lat: Any, bins: Any, domains: list[int],
                       targets: dict[int, tuple[Any, Any]], path: str) -> None:
    fig, axes = _panels(plt, len(domains))
    centres = (bins[:-1] + bins[1:]) / 2
    for ax, domid in zip(axes, domains, strict=True):
        mine = dom_of == domid
        idx = np.clip(np.digitize(lat_t[mine], bins) - 1, 0, len(bins) - 2)
        samples = lat[mine]
        for q, style in ((50, "-"), (99, ":")):
            per_bin = np.full(len(centres), np.nan)
            for b in np.unique(idx).tolist():
                per_bin[b] = np.percentile(samples[idx == b], q)
            ax.plot(centres, per_bin, style, label=f"p{q}")
        for when, pages in zip(*targets.get(domid, ((), ())), strict=True):
            ax.axvline(float(when), color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"target {int(pages)} pages", (float(when), 1), xycoords=("data", "axes fraction"),
                        fontsize="x-small", rotation=90, va="top", ha="right")
        if len(samples):
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize="small")
        ax.set_ylabel(f"dom{domid}\nus")
    _finish(plt, fig, axes, "fault latency (request put to vCPU runnable), per time bin; dashed: target changes",
            path)


def _latency_cdf(plt: Any, dom_of: Any, lat: Any, domains: list[int], path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for domid in domains:
        samples = np.sort(lat[dom_of == domid])
        if len(samples):
            ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples), label=f"dom{domid} ({len(samples)})")
    ax.set_xscale("log")
    ax.set_xlabel("fault latency (us)")
    ax.set_ylabel("fraction of faults")
    ax.set_title("fault latency CDF per domain")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finish(plt: Any, fig: Any, axes: list[Any], title: str, path: str) -> None:
    """Title a figure of time panels, label its time axis, write it as a PNG and close it."""
    axes[0].set_title(title)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["NO_RING", "PLOTS", "PlotUnavailable", "need_matplotlib", "plot_trace"]
