#!/usr/bin/env python3
"""Build and scan a 1 GiB guest's p2m (262,144 gfns) and print what it costs, as JSON.

A benchmark, not a test: it prints numbers and asserts nothing.  It measures

* ``build_s``: creating a domain of that size (the p2m initialised, frames charged);
* ``scan_py_s``: a Python loop reading every gfn's type, access right and frame bit
  (what a careless caller would do);
* ``scan_bulk_s``: :meth:`hvemu.core.p2m.P2M.recount`, the C-speed scan;
* ``page_out_s``: nominating and evicting every other gfn, in batches of 512;
* ``bytes_per_gfn``: memory allocated (tracemalloc) for the domain, per gfn,
  and its ``table``/``private`` split by layout.

Usage: ``python scripts/bench_p2m.py [--gfns N]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hvemu import abi  # noqa: E402
from hvemu.core.hypervisor import Hypervisor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gfns", type=int, default=262_144)
    args = ap.parse_args()
    gfns = args.gfns

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    hv = Hypervisor(total_frames=gfns)
    dom = hv.create_domain(4, gfns)
    build_s = time.perf_counter() - t0
    allocated = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    p2m = dom.p2m
    t0 = time.perf_counter()
    rw = 0
    for g in range(gfns):
        if (p2m.get_type(g) == abi.P2MType.ram_rw and p2m.get_access(g) == abi.P2MAccess.rwx
                and p2m.has_frame(g)):
            rw += 1
    scan_py_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts, resident = p2m.recount()
    scan_bulk_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    victims = list(range(0, gfns, 2))
    for i in range(0, len(victims), 512):
        batch = victims[i:i + 512]
        dom.paging_nominate(batch)
        dom.paging_evict(batch)
    hv.take_effects()
    page_out_s = time.perf_counter() - t0

    print(json.dumps({
        "gfns": gfns,
        "build_s": round(build_s, 6),
        "scan_py_s": round(scan_py_s, 6),
        "scan_py_ns_per_gfn": round(scan_py_s / gfns * 1e9, 1),
        "scan_bulk_s": round(scan_bulk_s, 6),
        "page_out_half_s": round(page_out_s, 6),
        "bytes_per_gfn": round(allocated / gfns, 3),
        "table_bytes_per_gfn": abi.p2m_table_size(gfns) / gfns,
        "private_bytes_per_gfn": p2m.private_bytes_per_gfn(),
        "ram_rw_seen": rw,
        "resident_after_build": resident,
        "paged_after_page_out": dom.stats()["paged"],
        "counts_ok": counts == {int(abi.P2MType.ram_rw): gfns},
    }, indent=2))


if __name__ == "__main__":
    main()
