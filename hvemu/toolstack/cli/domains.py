"""``hvemu create|destroy|pause|unpause|list|info|vcpu-list|mem-set|map|top``: domains, as ``xl`` has them."""

from __future__ import annotations

import argparse
import asyncio
import zlib
from typing import Any

import msgspec

import hvemu
from hvemu import abi, protocol
from hvemu.client import ControlError
from hvemu.stats import DomainStats
from hvemu.toolstack.cli.base import (
    DOMAIN,
    SIZE_UNITS,
    CliError,
    _finite,
    _gfn,
    _run_dir,
    _size,
    _tool,
    _wait_daemons_gone,
    _warn,
    arg,
    command,
    domain_info,
    domain_list,
    map_foreign,
    resolve_domain,
)
from hvemu.toolstack.sizes import MiB, Size, mib_text


@command("create", "create a domain",
         arg("--vcpus", type=int, default=1, metavar="N", help="vCPUs"),
         arg("--memory", type=_size, default=_size("16"), metavar="SIZE", help=f"memory, {SIZE_UNITS}"),
         arg("--target", type=_size, default=None, metavar="SIZE",
             help=f"paging target, {SIZE_UNITS} (default: all of --memory)"),
         arg("--name", default="", help="a name to use instead of the id (default: none)"),
         arg("--abi", choices=abi.RING_ABIS, default=abi.DEFAULT_RING_ABI,
             help="ring entry layout: the seed's mem_event, Xen 4.2.0's, or Xen 4.17's vm_event (for Xen's tools)"))
async def cmd_create(args: argparse.Namespace) -> Any:
    memory: Size = args.memory
    gfns = memory.pages
    if gfns < 1:
        raise CliError(f"--memory {memory} is less than one page ({abi.PAGE_SIZE // 1024} KiB)", "EINVAL")
    if args.target is not None and args.target.bytes > memory.bytes:
        raise CliError(f"--target {args.target} is above --memory {memory}", "EINVAL")
    if args.name.strip().isdigit():
        raise CliError(f"--name {args.name} is a number: it would read as a domain id", "EINVAL")
    conn = await _tool(args.run_dir)
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=args.vcpus, gfns=gfns, name=args.name,
                                                         abi=args.abi))
        assert isinstance(reply, protocol.DomainCreated)
        if args.target is not None:
            await conn.call(protocol.SetTarget(domid=reply.domid, pages=args.target.pages))
        resident = (await domain_info(conn, reply.domid)).resident
    finally:
        await conn.close()
    if resident < gfns:  # the host budget is spent: the domain is created, but a guest would fault at once
        _warn(args, f"domain {reply.domid} starts with {mib_text(resident * abi.PAGE_SIZE)} of its {memory} "
                    f"resident (the host memory budget is spent); attach a pager (hvemu pager-attach "
                    f"{reply.domid}) before a guest runs, or its first fault crashes the domain")
    return {"domid": reply.domid, "vcpus": args.vcpus, "gfns": gfns, "abi": args.abi}


@command("destroy", "destroy a domain (its guest and daemons exit; its pagefile is removed)", DOMAIN)
async def cmd_destroy(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        await conn.call(protocol.DomainDestroy(domid=domid))
    finally:
        await conn.close()
    result: dict[str, Any] = {"destroyed": domid}
    running = await asyncio.to_thread(_wait_daemons_gone, _run_dir(args), [f"pager-{domid}", f"listener-{domid}"])
    if running:
        result["still_running"] = running
    return result


async def _pause_op(args: argparse.Namespace, op: type[protocol.DomainPause | protocol.DomainUnpause]) -> int:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        await conn.call(op(domid=domid))
    finally:
        await conn.close()
    return domid


@command("pause", "pause a domain: every vCPU stops at its next step (xl pause)", DOMAIN)
async def cmd_pause(args: argparse.Namespace) -> Any:
    return {"paused": await _pause_op(args, protocol.DomainPause)}


@command("unpause", "let a paused domain run again (xl unpause)", DOMAIN)
async def cmd_unpause(args: argparse.Namespace) -> Any:
    return {"unpaused": await _pause_op(args, protocol.DomainUnpause)}


def _state(st: DomainStats) -> str:
    """xl's six state letters ``rbpscd``: running, blocked (no vCPU runs: waiting, or no guest), paused, crashed."""
    if st.crashed:
        return "----c-"
    if st.paused:
        return "--p---"
    running = st.guest_connected and any(v.runnable for v in st.vcpus)
    return "r-----" if running else "-b----"


def _list_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<20} {'ID':>5} {'Mem':>7} {'VCPUs':>5}  {'State':<6} {'Time(s)':>8} {'Resident':>9} "
             f"{'Target':>8}"]
    lines += [f"{(r['name'] or '(unnamed)')[:20]:<20} {r['domid']:>5} {mib_text(r['memory_mib'] * MiB):>7} "
              f"{r['vcpus']:>5}  {r['state']:<6} {r['time_s'] if r['time_s'] is not None else '-':>8} "
              f"{mib_text(r['resident_mib'] * MiB):>9} {mib_text(r['target_mib'] * MiB):>8}" for r in rows]
    return "\n".join(lines)


@command("list", "list domains, with xl's columns (memory in MiB) and state letters", text=_list_text)
async def cmd_list(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    page = abi.pages_to_mib(1)
    rows = []
    try:
        for d in await domain_list(conn):
            try:
                st = await domain_info(conn, d.domid)
            except ControlError:  # destroyed since the list
                continue
            rows.append({"domid": d.domid, "name": d.name, "vcpus": d.max_vcpus, "memory_mib": d.gfns * page,
                         "resident_mib": round(d.resident * page, 2), "target_mib": st.target * page,
                         "state": _state(st), "time_s": st.cpu_time_s, "crashed": d.crashed})
    finally:
        await conn.close()
    return rows


def summarise_info(st: DomainStats) -> dict[str, Any]:
    """The figures a person wants from ``info``, out of the raw counters."""
    rings = {str(kind): {k: getattr(r, k) for k in ("occupancy", "size", "max_occupancy", "put", "lost", "refused",
                                                   "blocked_now", "blocked_ever", "responses", "responses_rejected")}
             for kind in abi.RingKind if (r := st.ring(kind)).enabled}
    return {
        "domid": st.domid, "name": st.name, "crashed": st.crashed, "ring_abi": st.abi,
        "vcpus": {"total": st.max_vcpus, "paused": st.vcpus_paused, "blocked": st.vcpus_blocked,
                  "running": st.max_vcpus - st.vcpus_paused},
        "pages": {"total": st.gfns, "resident": st.resident, "paged": st.paged, "paging_out": st.paging_out,
                  "in_flight": st.paging_in, "target": st.target},
        "events": {"put": st.events_put, "lost": st.events_lost, "refused": sum(r["refused"] for r in rings.values())},
        "rings": rings,
        "fault_latency_us": st.fault_latency_us,
    }


@command("info", "the host (xl info), or one domain: vCPUs, pages, rings, counters, fault latency",
         arg("domain", metavar="DOMAIN", nargs="?", default=None, help="domain id or name (default: the host)"),
         arg("--raw", action="store_true", help="every counter the hypervisor keeps for the domain"))
async def cmd_info(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        if args.domain is None:
            reply, _ = await conn.call(protocol.HostInfo())
            assert isinstance(reply, protocol.HostInfoReply)
            page = abi.pages_to_mib(1)
            return {"total_memory_mib": reply.total_frames * page, "used_memory_mib": reply.used_frames * page,
                    "free_memory_mib": (reply.total_frames - reply.used_frames) * page, "nr_domains": reply.domains,
                    "admission": reply.policy, "ring_size": reply.ring_size, "tracing": reply.tracing or None,
                    "run_dir": _run_dir(args), "hvemu_version": hvemu.__version__}
        st = await domain_info(conn, await resolve_domain(conn, args.domain))
    finally:
        await conn.close()
    return msgspec.to_builtins(st) if args.raw else summarise_info(st)


def _vcpu_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<20} {'ID':>5} {'VCPU':>5}  {'State':<5} {'Pauses':>6}  Congested"]
    lines += [f"{(r['name'] or '(unnamed)')[:20]:<20} {r['domid']:>5} {r['vcpu']:>5}  {r['state']:<5} "
              f"{r['pauses']:>6}  {'yes' if r['congested'] else 'no'}" for r in rows]
    return "\n".join(lines)


@command("vcpu-list", "every vCPU (of one domain): running, or blocked waiting for the pager",
         arg("domain", metavar="DOMAIN", nargs="?", default=None, help="domain id or name (default: all)"),
         text=_vcpu_text)
async def cmd_vcpu_list(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    rows = []
    try:
        domids = [await resolve_domain(conn, args.domain)] if args.domain is not None else \
            [d.domid for d in await domain_list(conn)]
        for domid in domids:
            try:
                st = await domain_info(conn, domid)
            except ControlError:
                continue
            for v in st.vcpus:
                rows.append({"name": st.name, "domid": domid, "vcpu": v.vcpu,
                             "state": "r--" if v.runnable and v.connected else ("-b-" if not v.runnable else "---"),
                             "pauses": v.pauses, "congested": v.congested, "connected": v.connected,
                             "in_exit": v.in_exit})
    finally:
        await conn.close()
    return rows


@command("mem-set", "set a domain's paging target (xl mem-set: also memory/target and, for xenpaging, "
                    "memory/target-tot_pages in xenstore, in KiB)",
         DOMAIN, arg("memory", type=_size, metavar="SIZE", help=f"the target, {SIZE_UNITS}"))
async def cmd_mem_set(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        gfns = (await domain_info(conn, domid)).gfns
        if args.memory.bytes > gfns * abi.PAGE_SIZE:  # in the user's units (the hypervisor would say pages)
            raise CliError(f"target {args.memory} is above domain {args.domain}'s memory "
                           f"({mib_text(gfns * abi.PAGE_SIZE)} MiB)", "EINVAL")
        pages = args.memory.pages
        await conn.call(protocol.SetTarget(domid=domid, pages=pages))
    finally:
        await conn.close()
    return {"domid": domid, "target_pages": pages}


@command("map", "foreign-map guest pages (retrying paged-out ones) and checksum them",
         DOMAIN, arg("gfns", type=_gfn, nargs="+", metavar="GFN", help="gfns: 16 or 0x10"),
         arg("--timeout", type=_finite, default=10.0, metavar="SECONDS", help="give up after, seconds"))
async def cmd_map(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        gfns = (await domain_info(conn, domid)).gfns
        outside = [g for g in args.gfns if not 0 <= g < gfns]
        if outside:
            which = f"gfn {outside[0]} is" if len(outside) == 1 else f"gfns {', '.join(map(str, outside))} are"
            raise CliError(f"{which} outside domain {args.domain}'s {gfns} gfns (0..{gfns - 1})", "EINVAL")
        pages, retries = await map_foreign(conn, domid, args.gfns, timeout=args.timeout)
    finally:
        await conn.close()
    return {"domid": domid, "retries": retries,
            "pages": {str(g): {"crc32": f"{zlib.crc32(p):08x}", "head": p[:24].hex()}
                      for g, p in sorted(pages.items())}}


@command("top", "live view of every domain and ring (xentop); q quits",
         arg("--interval", "-d", type=_finite, default=1.0, metavar="SECONDS", help="refresh every, seconds"),
         arg("--iterations", "-i", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)"),
         arg("--batch", "-b", action="store_true",
             help="plain columns, one block per refresh, as xentop -b (the default when stdout is not a terminal)"),
         epilog="with --json: one JSON object per refresh, on one line (the tables' figures)")
async def cmd_top(args: argparse.Namespace) -> Any:
    from hvemu.toolstack.top import run_top

    await (await _tool(args.run_dir)).close()  # no hypervisor: the same one-line error as every command
    await run_top(args.run_dir, interval=args.interval, iterations=args.iterations, as_json=args.json,
                  batch=args.batch)
    return None
