"""``python -m hvemu.toolstack.bench`` (``scripts/bench.sh``): run the benchmarks, print a table, write JSON.

Placement: ``--cpus LIST`` pins every process (hypervisor, guests, daemons,
the floors' processes and this one) to LIST, as ``scripts/run.sh --cpus``
does; ``--hypervisor-cpus``/``--guest-cpus``/``--daemon-cpus`` override one
role.  The default is the first CPU this process may use, for everything:
co-located processes avoid the 40-50 us cross-CPU wake-up per hop of a small
VM, and an unpinned run can be bimodal.  ``--cpus all`` leaves placement to
the scheduler.  The placement used (and what the kernel reported for one
process of each role) is in the JSON.

Exit status: 0 when every benchmark ran with no lost guest event and no
integrity failure (targets missed are reported, not fatal), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any

import uvloop

from hvemu.client import ControlError
from hvemu.toolstack.bench import report, suites
from hvemu.toolstack.bench.common import Placement, format_cpus, parse_cpus
from hvemu.toolstack.host import ChildError


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version()}


def _placement(args: argparse.Namespace) -> Placement:
    allowed = os.sched_getaffinity(0)
    if args.cpus is None:
        common: set[int] | None = {min(allowed)}
    elif args.cpus == "all":
        common = None
    else:
        common = parse_cpus(args.cpus)
    p = Placement(hypervisor=common, guest=common, daemon=common)
    for role in ("hypervisor", "guest", "daemon"):
        override = getattr(args, f"{role}_cpus")
        if override is not None:
            setattr(p, role, None if override == "all" else parse_cpus(override))
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.sh", description="hvemu benchmarks, each beside its floor.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller and shorter (under a minute on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="the smallest configuration (the test suite's)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--cpus", default=None,
                   help="CPUs for every process (taskset list, e.g. 0 or 0,1); 'all' = unpinned; "
                        "default: the first allowed CPU")
    p.add_argument("--hypervisor-cpus", default=None, help="override --cpus for the hypervisor")
    p.add_argument("--guest-cpus", default=None, help="override --cpus for guests")
    p.add_argument("--daemon-cpus", default=None, help="override --cpus for daemons (pager, null daemon)")
    p.add_argument("--only", default=None,
                   help=f"comma list of benchmarks to run (default all: {','.join(suites.BENCHMARKS)})")
    return p


async def run(args: argparse.Namespace, placement: Placement) -> dict[str, Any]:
    cfg = suites.SMOKE if args.smoke else suites.QUICK if args.quick else suites.FULL
    only = set(args.only.split(",")) if args.only else set(suites.BENCHMARKS)
    unknown = only - set(suites.BENCHMARKS)
    if unknown:
        raise SystemExit(f"bench.sh: unknown benchmark(s) {sorted(unknown)}; choose from {suites.BENCHMARKS}")
    # SIGINT and SIGTERM cancel the run, whatever the shell left them as (a
    # background job starts with SIGINT ignored): every Host then stops its
    # processes and removes its run directory on the way out.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    totals = suites.Totals()
    result: dict[str, Any] = {"config": cfg.name, "machine": machine()}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    # scale first, on a quiet host; each floor right before the figure it bounds, and the physical
    # floor (the bare relay) both before and after the system's fault figures, in the same placement.
    order = ["scale", "relay_floor", "relay_floor_blocking", "system_exit_overhead", "core_work", "fault_roundtrip",
             "relay_floor", "relay_floor_blocking", "native_uffd", "ring_floor", "pagein", "evict", "fairness"]
    bracket_runs: dict[str, list[dict[str, Any]]] = {}
    for name in order:
        if name not in only:
            continue
        started = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            section = await getattr(suites, name)(cfg, placement, totals)
        except (ChildError, ControlError, OSError, KeyError, AssertionError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {name} failed: {exc}", file=sys.stderr, flush=True)
            if os.environ.get("HVEMU_BENCH_TRACEBACK"):
                traceback.print_exc()
            continue
        if name == "evict":
            result.update(section)
        elif name in suites.BRACKETING:
            bracket_runs.setdefault(name, []).append(section)
        else:
            result[name] = section
        print(f"bench: {name} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    for name, runs in bracket_runs.items():
        result[name] = suites.pool_relay(runs)
    result.update(report.ratios(result))
    result["lost_guest_events"] = totals.lost_guest_events
    result["integrity_failures"] = totals.integrity_failures
    result["placement"] = placement.describe()
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if errors:
        result["errors"] = errors
    result["targets"] = report.evaluate(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        placement = _placement(args)
    except ValueError as exc:
        print(f"bench.sh: {exc}", file=sys.stderr)
        return 2
    mine = placement.union()
    if mine is not None:
        os.sched_setaffinity(0, mine)  # the orchestrator (a tool: stats, foreign maps) stays on them too
        placement.observed["bench"] = format_cpus(os.sched_getaffinity(0))
    try:
        result = uvloop.run(run(args, placement))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench.sh: interrupted; every process stopped", file=sys.stderr)
        return 130
    print(report.table(result))
    print(f"\nplacement: {suites.placement_label(placement)}; config {result['config']}; "
          f"{result['elapsed_s']} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    bad = result.get("errors") or result["lost_guest_events"] or result["integrity_failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
