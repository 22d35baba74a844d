"""The benchmarks, one coroutine each; every one returns its JSON section.

Each starts its own hypervisor (:class:`~hvemu.toolstack.bench.common.Host`), so that
one benchmark's leftovers (pagefiles, fragmented heaps, a busy pager) never
bend the next one's figures, and adds the guest events it saw lost and the
pages that failed verification to the run's totals (both must be 0).

Why one module of ~600 lines: one function per benchmark of the issue's list, each short; they
share the configurations and helpers at the top, and the report reads them as one suite.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.toolstack.bench import relay, uffd
from hvemu.toolstack.bench.common import (
    BenchError,
    Host,
    Placement,
    Proc,
    ProcTimes,
    close_window,
    cpu_detail,
    cpu_per_op_us,
    format_cpus,
    latency_summary,
    lost_guest,
    open_window,
    rss_bytes,
)
from hvemu.toolstack.host import Child, guest_argv
from pager.defaults import EVICT_BATCH, EVICT_POLICY


@dataclass(frozen=True)
class Config:
    """Sizes and durations of one run (``--smoke`` < ``--quick`` < full)."""

    name: str
    fault_gfns: int = 2048
    fault_target: int = 256
    fault_duration: float = 10.0
    floor_iterations: int = 5000
    #: Faults per relay run (each relay floor runs twice: before and after the system's fault figures).
    relay_iterations: int = 20000
    uffd_iterations: int = 20000
    pagein_pages: int = 4096
    pagein_vcpus: tuple[int, ...] = (1, 4, 16)
    ring_duration: float = 2.0
    evict_pages: int = 16384
    evict_rounds: int = 5
    fairness_vcpus: int = 32
    fairness_gfns: int = 4096
    fairness_target: int = 512
    fairness_duration: float = 10.0
    fairness_foreign_batch: int = 8
    scale_gfns: int = 262144


FULL = Config("full")
QUICK = Config("quick", fault_duration=3.0, floor_iterations=2000, relay_iterations=10000,
               uffd_iterations=5000, pagein_pages=1024,
               ring_duration=1.0, evict_pages=16384, fairness_gfns=2048, fairness_target=256,
               fairness_duration=3.0)
SMOKE = Config("smoke", fault_gfns=512, fault_target=64, fault_duration=0.5, floor_iterations=200,
               relay_iterations=300,
               uffd_iterations=500, pagein_pages=128, ring_duration=0.2, evict_pages=512, evict_rounds=1,
               fairness_gfns=512, fairness_target=64, fairness_duration=1.0)
CONFIGS = {c.name: c for c in (FULL, QUICK, SMOKE)}


@dataclass
class Totals:
    """What must be zero in every benchmark, summed over the run."""

    lost_guest_events: int = 0
    integrity_failures: int = 0


def _bench_guest_args(host: Host, mode: str, domid: int, *extra: str) -> list[str]:
    return ["-m", "hvemu.toolstack.bench.vcpus", mode, "--run-dir", host.run_dir, "--domid", str(domid), *extra]


async def _finish_guest(host: Host, guest: Child, pager: Child | None) -> None:
    """Stop a lingering guest (its domain goes with it), then let the daemon leave on its own."""
    status = await host.stop_child(guest)
    if status not in (0, -signal.SIGTERM):
        raise BenchError(f"{guest.name} exited with status {status}: {guest.stderr_tail()}")
    if pager is not None:
        status = await host.stop_child(pager, sig=0, timeout=20)
        if status != 0:
            raise BenchError(f"{pager.name} exited with status {status}: {pager.stderr_tail()}")


# --------------------------------------------------------------------------
# Fault round trip, the physical floor, and the system's own exit overhead
# --------------------------------------------------------------------------


async def _line_unless_one_dies(guest: Child, procs: list[Child], timeout: float) -> dict[str, Any]:
    """The guest's next JSON line; a :class:`BenchError` at once if any relay process exits first.

    A relay whose hypervisor or daemon died would otherwise leave the guest
    blocked until the timeout, on a fault that nobody will answer.
    """
    line = asyncio.ensure_future(guest.json_line(timeout))
    deaths = {asyncio.ensure_future(p.proc.wait()): p for p in procs}
    try:
        await asyncio.wait([line, *deaths], return_when=asyncio.FIRST_COMPLETED)
        if line.done():
            return line.result()
        dead = next(p for fut, p in deaths.items() if fut.done())
        raise BenchError(f"{dead.name} exited (status {dead.proc.returncode}) during the relay; stderr:\n"
                         f"{dead.stderr_tail()}")
    finally:
        for fut in (line, *deaths):
            fut.cancel()
        await asyncio.gather(line, *deaths, return_exceptions=True)


async def _relay_run(cfg: Config, placement: Placement, mode: str) -> dict[str, Any]:
    """One run of :mod:`hvemu.toolstack.bench.relay`: the guest's samples (ns) and each process's CPU per fault."""
    ch = relay.make_channels(mode)
    procs: list[Child] = []
    warmup = max(50, cfg.relay_iterations // 20)
    try:
        try:
            for role in ("hypervisor", "daemon", "guest"):
                procs.append(await Proc.start(
                    f"relay-{mode}-{role}",
                    relay.argv(role, ch, mode, iterations=cfg.relay_iterations, warmup=warmup),
                    cpus=placement.of(role), stdin=role == "guest", pass_fds=ch.fds()))
        finally:
            ch.close()  # the three processes hold their own copies
        guest = procs[-1]
        pids = {role: p.pid for role, p in zip(("hypervisor", "daemon", "guest"), procs, strict=True)}
        # warm: every process is idle, blocked on its eventfd or stdin
        await _line_unless_one_dies(guest, procs, 60)
        before = open_window(pids)
        await guest.send("go")
        rep = await _line_unless_one_dies(guest, procs, 60 + cfg.relay_iterations / 1000)
        after = close_window(pids)  # the guest waits for EOF, the others for a kick: all idle again
    finally:
        for p in reversed(procs):
            await p.stop(timeout=5)
            p.close()
    samples: list[int] = rep["samples_ns"]
    if len(samples) != cfg.relay_iterations or rep["failed_checks"]:
        raise BenchError(f"relay ({mode}): {len(samples)} of {cfg.relay_iterations} faults relayed, "
                         f"{rep['failed_checks']} failed checks (first: {rep['first_error']})")
    used = {r: ProcTimes(*(a - b for a, b in zip(after[r], before[r], strict=True))) for r in pids}
    return {"samples_ns": samples, "used": used, "cpu_per_roundtrip_us": cpu_per_op_us(before, after, len(samples))}


def pool_relay(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One relay section from its runs (before and after the system): percentiles of every sample pooled.

    Pooling gives both sides of the system's measurement the same weight,
    so a slow spell during either counts as it would against the system.
    CPU per round trip is all the runs' ticks over all their faults.
    """
    samples = [s for run in runs for s in run["samples_ns"]]
    used: dict[str, ProcTimes] = {}
    for run in runs:
        for role, t in run["used"].items():
            used[role] = ProcTimes(*(a + b for a, b in zip(used.get(role, ProcTimes(0, 0, 0)), t, strict=True)))
    zero = dict.fromkeys(used, ProcTimes(0, 0, 0))
    out = latency_summary(samples)
    out["cpu_per_roundtrip_us"] = cpu_per_op_us(zero, used, len(samples))
    out.update(cpu_detail(zero, used, len(samples)))
    out["checked_faults"] = len(samples)
    out["failed_checks"] = 0  # a run with any is an error (BenchError), never pooled
    out["pages"] = relay.PAGES
    out["runs"] = [{"when": when, **{k: v for k, v in latency_summary(run["samples_ns"]).items()
                                     if k in ("n", "p50_us", "p99_us")},
                    "cpu_per_roundtrip_us": run["cpu_per_roundtrip_us"]}
                   for when, run in zip(("before", "after", *(f"run{i}" for i in range(2, len(runs)))), runs,
                                        strict=False)]
    return out


async def relay_floor(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """The bare relay with uvloop (:mod:`hvemu.toolstack.bench.relay`): one run; :func:`pool_relay` joins them."""
    return await _relay_run(cfg, placement, "uvloop")


async def relay_floor_blocking(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """The bare relay with blocking eventfd reads, no event loop: one run."""
    return await _relay_run(cfg, placement, "blocking")


#: Benchmarks run before and after the system's fault figures, their runs joined by :func:`pool_relay`.
BRACKETING = ("relay_floor", "relay_floor_blocking")


async def system_exit_overhead(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """Guest exit -> hypervisor -> null daemon -> hypervisor -> guest, no paging work: hvemu's own plumbing.

    Not a floor: it is the system's exit path, so the system can never be
    measured below it whatever it wastes (the floor is :func:`relay_floor`).
    """
    async with Host(placement, memory_mib=64) as host:
        assert host.hv is not None
        domid = await host.create(64, vcpus=1)
        nulld = await host.start("nulld", "daemon", ["-m", "hvemu.toolstack.bench.nulld", "--run-dir", host.run_dir,
                                                     "--domid", str(domid), "--evict", "1"])
        await nulld.json_line(30)
        guest = await host.start("bench-guest", "guest", _bench_guest_args(
            host, "floor", domid, "--gfn", "0", "--iterations", str(cfg.floor_iterations),
            "--warmup", str(max(50, cfg.floor_iterations // 10))), stdin=True)
        pids = {"hypervisor": host.hv.pid, "daemon": nulld.pid, "guest": guest.pid}
        await guest.json_line(120)  # warm
        before = open_window(pids)
        await guest.send("go")
        rep = await guest.json_line(120)
        after = close_window(pids)
        st = await host.stats(domid)
        totals.lost_guest_events += lost_guest(st)
        await guest.send("exit")
        await _finish_guest(host, guest, nulld)
    out = {k: rep[k] for k in ("p50_us", "p99_us", "n", "max_us", "mean_us")}
    out["cpu_per_exit_us"] = cpu_per_op_us(before, after, int(rep["n"]))
    out.update(cpu_detail(before, after, int(rep["n"])))
    return out


async def core_work(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """The contract's own work per fault, no I/O (:mod:`hvemu.toolstack.bench.core_cycle`), on the hypervisor's CPUs.

    Not a floor either: the system's own code.  It bounds the fault from
    below together with the relay's hops, which is why it is reported.
    """
    proc = await Proc.start("core-cycle", ["-m", "hvemu.toolstack.bench.core_cycle", "--iterations",
                                           str(cfg.relay_iterations), "--batch", str(EVICT_BATCH)],
                            cpus=placement.of("hypervisor"))
    try:
        rep = await proc.json_line(120)
    finally:
        await proc.stop(timeout=5, sig=0)
        proc.close()
    return rep


async def _first_faults(host: Host, domid: int, guest: Child,
                        pids: dict[str, int]) -> tuple[int, dict[str, ProcTimes]]:
    """Wait for the guest's first faults; the hypervisor's fault count and every process's CPU then.

    So the guest's interpreter start-up and the pager's initial eviction stay
    out of the CPU per fault.
    """
    base = (await host.stats(domid)).faults
    deadline = time.monotonic() + 60
    while True:
        st = await host.stats(domid)
        if st.faults > base:
            return st.faults, open_window(pids)
        if guest.proc.returncode is not None or time.monotonic() > deadline:
            raise BenchError(f"{guest.name} did not fault within 60 s: {guest.stderr_tail()}")
        await asyncio.sleep(0.005)


async def fault_roundtrip(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """One vCPU, uniform random access, real pager: the guest's own fault latency histogram.

    CPU per fault of each process (hypervisor, pager as ``daemon``, guest)
    runs from the first faults to the guest's report, over the faults the
    hypervisor counted in between: the guest's hits, the pager's evictions
    and polls included, as they are part of what a fault costs here.
    """
    async with Host(placement, memory_mib=256) as host:
        assert host.hv is not None
        domid = await host.create(cfg.fault_gfns, vcpus=1, target=cfg.fault_target)
        pager = await host.pager(domid)
        await host.wait_for(domid, lambda st: st.resident <= cfg.fault_target, "initial eviction",
                            watch=pager)
        guest = await host.start("guest", "guest", guest_argv(
            host.run_dir, domid, "--vcpus", "1", "--duration", str(cfg.fault_duration), "--pattern", "uniform",
            "--write-ratio", "0.3", "--seed", "1", "--no-verify-all", "--linger"))
        pids = {"hypervisor": host.hv.pid, "daemon": pager.pid, "guest": guest.pid}
        faults0, before = await _first_faults(host, domid, guest, pids)
        rep = await guest.json_line(cfg.fault_duration + 120)
        after = close_window(pids)
        st = await host.stats(domid)
        totals.lost_guest_events += lost_guest(st)
        totals.integrity_failures += int(rep["integrity_failures"])
        await _finish_guest(host, guest, pager)
    lat = rep["latency_us"]
    out = {"p50_us": lat["p50"], "p99_us": lat["p99"], "n": lat["n"], "max_us": lat["max"],
           "mean_us": lat["mean"], "accesses": rep["accesses"], "pages": cfg.fault_gfns,
           "target": cfg.fault_target, "integrity_failures": rep["integrity_failures"],
           "evict_fails": st.evict_fails, "evicted": st.evicted,
           "cpu_per_fault_us": cpu_per_op_us(before, after, st.faults - faults0),
           "cpu_faults": st.faults - faults0,
           **cpu_detail(before, after, st.faults - faults0)}
    hv_lat = st.fault_latency_us
    if hv_lat.get("n"):
        out["hypervisor_p50_us"] = hv_lat.get("p50")
    return out


async def native_uffd(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hvemu-uffd-") as scratch:
        out = await uffd.run(placement, scratch, cfg.uffd_iterations, max(100, cfg.uffd_iterations // 10))
    totals.integrity_failures += int(out.get("integrity_failures", 0) or 0)
    return out


# --------------------------------------------------------------------------
# Page-in throughput, eviction
# --------------------------------------------------------------------------


async def _filled_guest(host: Host, domid: int, vcpus: int) -> Child:
    guest = await host.start(f"bench-guest-v{vcpus}", "guest",
                             _bench_guest_args(host, "pages", domid, "--vcpus", str(vcpus)), stdin=True)
    await guest.json_line(120)  # every page written (and resident)
    return guest


async def _read_back(host: Host, domid: int, guest: Child, totals: Totals, timeout: float) -> dict[str, Any]:
    await guest.send("go")
    rep = await guest.json_line(timeout)
    st = await host.stats(domid)
    totals.lost_guest_events += lost_guest(st)
    totals.integrity_failures += int(rep["integrity_failures"])
    if rep["integrity_failures"]:
        raise BenchError(f"{guest.name}: integrity failures: {rep['errors']}")
    await guest.send("exit")
    return rep


async def _pagein_one(host: Host, pages: int, vcpus: int, unbatched: bool, totals: Totals) -> dict[str, Any]:
    domid = await host.create(pages, vcpus=vcpus)
    guest = await _filled_guest(host, domid, vcpus)
    pager = await host.pager(domid, *(["--unbatched"] if unbatched else []))
    await host.set_target(domid, 0)
    await host.wait_for(domid, lambda st: st.paged >= pages, "evicting every page", watch=pager)
    await host.set_target(domid, pages)  # nothing more to evict: the pager only pages in now
    rep = await _read_back(host, domid, guest, totals, timeout=300)
    await _finish_guest(host, guest, pager)
    if rep["faults"] < pages:
        raise BenchError(f"page-in with {vcpus} vCPUs: only {rep['faults']} of {pages} reads faulted")
    return {"pages_per_s": round(pages / rep["elapsed_s"], 1), "fault_p50_us": rep["latency"]["p50_us"]}


async def pagein(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """V vCPUs read back every (evicted) page, batched pager vs. one push and notify per response."""
    out: dict[str, Any] = {}
    async with Host(placement, memory_mib=max(64.0, abi.pages_to_mib(cfg.pagein_pages * 4))) as host:
        for v in cfg.pagein_vcpus:
            batched = await _pagein_one(host, cfg.pagein_pages, v, False, totals)
            unbatched = await _pagein_one(host, cfg.pagein_pages, v, True, totals)
            out[str(v)] = {"batched_pages_per_s": batched["pages_per_s"],
                           "unbatched_pages_per_s": unbatched["pages_per_s"],
                           "batched_fault_p50_us": batched["fault_p50_us"],
                           "unbatched_fault_p50_us": unbatched["fault_p50_us"]}
    out["pages"] = cfg.pagein_pages
    return out


async def ring_floor(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    argv = ["-m", "hvemu.toolstack.bench.floors", "ring", "--duration", str(cfg.ring_duration)]
    if placement.daemon is not None:
        argv += ["--back-cpus", ",".join(map(str, sorted(placement.daemon)))]
    proc = await Proc.start("ring-floor", argv, cpus=placement.hypervisor)
    try:
        rep = await proc.json_line(cfg.ring_duration + 60)
        status = await proc.stop(sig=0)
    finally:
        await proc.stop()
        proc.close()
    if status != 0:
        raise BenchError(f"ring floor exited with status {status}")
    return {"entries_per_s": round(rep["entries_per_s"], 1), "entries": rep["entries"],
            "ring_size": rep["ring_size"]}


async def _evict_once(host: Host, domid: int, pages: int, pager: Child) -> tuple[float, float]:
    """One page-out of a full domain to nothing: pages per second under way, and from the target change.

    The second rate counts from the target change to the poll that saw the
    end, so it includes the pager noticing the target (up to its 50 ms poll)
    and the last poll's lag.
    """
    base = (await host.stats(domid)).evicted
    # About 20 polls over the expected run, 2-20 ms apart: a Stats call costs
    # the hypervisor ~0.1 ms, so polling takes ~1-2% of its time.  The rate
    # runs from the first poll that sees eviction under way to the poll that
    # sees it finished, counting the pages evicted in between: the whole
    # page-out but its first batches, as the floor times its whole copy.  The
    # last poll comes up to an interval after the end, which only ever counts
    # against the system.
    interval = min(0.02, max(0.002, pages / 150000 / 20))
    t_set = time.monotonic()
    await host.set_target(domid, 0)
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + 300
    while True:
        st = await host.stats(domid)
        # The hypervisor's own time of the reading (same clock as time.monotonic):
        # this process, sharing a CPU with the pager, may read the reply late.
        now = st.monotonic_ns / 1e9
        evicted = st.evicted - base
        if st.paged >= pages:
            break
        if evicted > 0 and first is None:
            first = (now, evicted)
        if pager.proc.returncode is not None or time.monotonic() > deadline:
            raise BenchError(f"eviction stalled at {st.paged} of {pages}: {pager.stderr_tail()}")
        await asyncio.sleep(interval)
    from_target = evicted / max(now - t_set, 1e-9)
    if first is not None and evicted > first[1]:
        return (evicted - first[1]) / max(now - first[0], 1e-9), from_target
    return from_target, from_target  # done before a poll saw it under way


async def _evict_round(host: Host, domid: int, pages: int, policy: str | None) -> tuple[float, float]:
    """One page-out of the full domain by a fresh pager, whose clean stop then pages everything back in.

    ``policy`` None runs the pager with its defaults, as a user would.
    """
    pager = await host.pager(domid, *(["--policy", policy] if policy else []))
    os.sync()  # no writeback of earlier rounds' pagefiles during this one (the floor does the same)
    rates = await _evict_once(host, domid, pages, pager)
    await host.set_target(domid, pages)
    status = await host.stop_child(pager)  # SIGTERM: a clean stop pages everything back in
    if status != 0:
        raise BenchError(f"{pager.name} exited with status {status}: {pager.stderr_tail()}")
    st = await host.stats(domid)
    if st.resident != pages:
        raise BenchError(f"{pager.name} left {pages - st.resident} pages out on its clean stop")
    # Everything is in: the next pager starts on a fresh pagefile, as each copy of the floor does
    # (rewriting pages already in a file's page cache is cheaper than writing new ones).
    os.unlink(host.pagefile(domid))
    return rates


async def evict(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """Pager eviction (nominate, copy, evict in batches of the pager's default size) of every page of a full domain.

    The pager with its defaults (``pager.defaults``: clock victims,
    xenpaging's policy, one hole punched per batch) is the figure; the random
    policy's (one hole punched per page) is reported beside it.  Rounds
    alternate a copy of the floor and a page-out by each policy, so that both
    sides of a round sample the same stretch of a noisy machine.  The ratio
    (``over_floor``) is the median over the rounds of page-out / floor; the
    rates reported are each side's best (noise only ever slows a run down).
    The guest then reads every page back and checks its stamp.
    """
    pages = cfg.evict_pages
    floors: list[float] = []
    rates: list[float] = []
    from_target: list[float] = []
    random_rates: list[float] = []
    async with Host(placement, memory_mib=max(64.0, abi.pages_to_mib(pages * 2))) as host:
        domid = await host.create(pages, vcpus=1)
        guest = await _filled_guest(host, domid, 1)
        for _ in range(cfg.evict_rounds):
            floors.append(await _copy_floor(host, placement, pages, 1))
            rate, since_target = await _evict_round(host, domid, pages, None)
            rates.append(rate)
            from_target.append(since_target)
            random_rates.append((await _evict_round(host, domid, pages, "random"))[0])
        # Every page went out and came back evict_rounds * 2 times: each must still hold its stamp.
        pager = await host.pager(domid)
        await _read_back(host, domid, guest, totals, timeout=600)
        await _finish_guest(host, guest, pager)
    ratios = sorted(r / f for r, f in zip(rates, floors, strict=True))
    return {"evict": {"pages_per_s": round(max(rates), 1), "pages": pages, "batch": EVICT_BATCH,
                      "policy": EVICT_POLICY, "rounds": [round(r, 1) for r in rates],
                      "over_floor": round(statistics.median(ratios), 3),
                      "round_ratios": [round(r / f, 3) for r, f in zip(rates, floors, strict=True)],
                      "pages_per_s_from_target": round(max(from_target), 1),
                      "random_pages_per_s": round(max(random_rates), 1)},
            "evict_floor": {"pages_per_s": round(max(floors), 1), "pages": pages,
                            "rounds": [round(f, 1) for f in floors]}}


async def _copy_floor(host: Host, placement: Placement, pages: int, repeat: int) -> float:
    proc = await Proc.start("copy-floor", ["-m", "hvemu.toolstack.bench.floors", "copy", "--pages", str(pages),
                                           "--batch", str(EVICT_BATCH), "--repeat", str(repeat),
                                           "--dir", host.run_dir],
                            cpus=placement.daemon)
    try:
        rep = await proc.json_line(120)
    finally:
        await proc.stop(sig=0)
        proc.close()
    return float(rep["pages_per_s"])


# --------------------------------------------------------------------------
# Fairness under congestion
# --------------------------------------------------------------------------


async def _foreign_mapper(host: Host, domid: int, gfns: int, batch: int, stop: asyncio.Event) -> int:
    """Map random gfns from outside (as a backup tool would) until stopped: extra ring pressure.

    Paged ones answer ENOENT and populate without pausing anyone; they are
    retried until mapped, so at most ``batch`` foreign requests are out at once.
    """
    rng = random.Random(7)
    mapped = 0
    while not stop.is_set():
        want = rng.sample(range(gfns), batch)
        while want and not stop.is_set():
            reply = await host.call(protocol.MapForeign(domid=domid, gfns=want))
            assert isinstance(reply, protocol.ForeignPages)
            mapped += sum(1 for r in reply.results if r is None)
            want = [g for g, r in zip(want, reply.results, strict=True) if r == Errno.ENOENT]
            if want:
                await asyncio.sleep(0.001)
    return mapped


async def fairness(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """32 vCPUs on one 64-slot ring, plus a foreign mapper, so that the seed's reservation bites."""
    async with Host(placement, memory_mib=256) as host:
        domid = await host.create(cfg.fairness_gfns, vcpus=cfg.fairness_vcpus, target=cfg.fairness_target)
        pager = await host.pager(domid)
        await host.wait_for(domid, lambda st: st.resident <= cfg.fairness_target, "initial eviction",
                            watch=pager)
        guest = await host.start("guest", "guest", guest_argv(
            host.run_dir, domid, "--duration", str(cfg.fairness_duration), "--pattern", "uniform",
            "--write-ratio", "0.3", "--seed", "3", "--no-verify-all", "--linger"))
        stop = asyncio.Event()
        mapper = asyncio.create_task(_foreign_mapper(host, domid, cfg.fairness_gfns,
                                                     cfg.fairness_foreign_batch, stop))
        try:
            rep = await guest.json_line(cfg.fairness_duration + 120)
        finally:
            stop.set()
            mapped = await mapper
        st = await host.stats(domid)
        totals.lost_guest_events += lost_guest(st)
        totals.integrity_failures += int(rep["integrity_failures"])
        await _finish_guest(host, guest, pager)
    per_vcpu = [int(v["faults"]) for v in rep["vcpus"]]
    stalls = [float(v["latency"].get("max", 0.0)) for v in rep["vcpus"]]
    paging = st.paging
    return {
        "min_over_max": round(min(per_vcpu) / max(per_vcpu), 3) if max(per_vcpu) else 0.0,
        "max_stall_ms": round(max(stalls) / 1000.0, 2),
        "vcpus": cfg.fairness_vcpus, "ring_size": paging.size,
        "faults_min": min(per_vcpu), "faults_max": max(per_vcpu), "faults_total": sum(per_vcpu),
        "congestion_pauses": paging.blocked_ever, "max_occupancy": paging.max_occupancy,
        "foreign_pages_mapped": mapped, "lost_foreign": paging.lost_foreign,
        "evict_fails": st.evict_fails,
    }


# --------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------


async def scale(cfg: Config, placement: Placement, totals: Totals) -> dict[str, Any]:
    """Create a 1 GiB domain and attach the real pager: wall time, and hypervisor memory per gfn."""
    gfns = cfg.scale_gfns
    async with Host(placement, memory_mib=abi.pages_to_mib(gfns * 1.25)) as host:
        assert host.hv is not None
        await host.call(protocol.DomainList())  # the hypervisor's lazy set-up is not the domain's cost
        rss0 = rss_bytes(host.hv.pid)
        t0 = time.perf_counter()
        domid = await host.create(gfns, vcpus=1)
        t1 = time.perf_counter()
        pager = await host.start("pager", "daemon", [
            "-m", "pager.xenpaging", "--run-dir", host.run_dir, "--domid", str(domid),
            "--pagefile", os.path.join(host.run_dir, "scale.pagefile")])
        await host.wait_for(domid, lambda st: st.ring_owned("paging", pager.pid), "pager attach",
                            timeout=30, interval=0.002, watch=pager)
        t2 = time.perf_counter()
        rss1 = rss_bytes(host.hv.pid)
        await host.stop_child(pager)
    return {"gfns": gfns, "startup_s": round(t2 - t0, 3), "create_s": round(t1 - t0, 3),
            "attach_s": round(t2 - t1, 3), "hv_bytes_per_gfn": round((rss1 - rss0) / gfns, 2),
            "hv_rss_delta_bytes": rss1 - rss0}


BENCHMARKS = ("relay_floor", "relay_floor_blocking", "system_exit_overhead", "core_work", "fault_roundtrip",
              "native_uffd",
              "pagein", "ring_floor", "evict", "fairness", "scale")


def placement_label(p: Placement) -> str:
    parts = []
    for role in ("hypervisor", "guest", "daemon"):
        cpus = p.of(role)
        parts.append(f"{role}={format_cpus(cpus) if cpus is not None else 'any'}")
    return " ".join(parts)
