"""``hvemu top``: a live view of every domain and ring, in the manner of ``xentop``.

On a terminal the screen is redrawn in place, fitted to its size: at 80x24
every number is whole, columns that do not fit are dropped by priority
(least useful first) rather than cut, and rows beyond the screen's height
are left out with a line saying how many.  ``q`` quits.  Counters are shown
as rates per second between refreshes.  Into a pipe (or with ``-b``) each
refresh is plain columns, like ``xentop -b``: every column, ``$COLUMNS``
wide if that is set.  With ``--json`` each refresh is one JSON object on one
line (:func:`as_json_line`).  When the hypervisor goes away, top ends with
one line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hvemu import abi, protocol, readiness
from hvemu.client import ControlClient, ControlError
from hvemu.stats import DomainStats
from hvemu.toolstack.sizes import mib_text


class HypervisorGone(ConnectionError):
    """The hypervisor closed top's connection (stopped or killed)."""


class OutputClosed(Exception):
    """stdout's reader went away (``hvemu top | head``): the caller exits quietly."""


PAGE_MIB = abi.pages_to_mib(1)


def _rate(now: object, before: object | None, key: str, dt: float) -> float:
    """Per second between two snapshots of one domain or ring (0 on the first)."""
    if before is None or dt <= 0:
        return 0.0
    return max(0.0, (int(getattr(now, key)) - int(getattr(before, key))) / dt)


def domain_rows(infos: list[DomainStats], before: dict[int, DomainStats] | None = None,
                dt: float = 0.0) -> list[dict[str, Any]]:
    """One row per domain: the figures of the ``domains`` table (and of ``--json``'s ``domains``)."""
    rows = []
    for st in infos:
        lat = st.fault_latency_us
        prev = (before or {}).get(st.domid)
        rows.append({"dom": st.domid, "name": st.name,
                     "vcpus_running": st.max_vcpus - st.vcpus_paused, "vcpus_paused": st.vcpus_paused,
                     "vcpus_blocked": st.vcpus_blocked, "memory": st.gfns,
                     "resident": st.resident, "paged": st.paged, "in_flight": st.paging_in, "target": st.target,
                     "faults": st.faults, "fault_p50_us": round(float(lat.get("p50", 0)), 1),
                     "fault_p99_us": round(float(lat.get("p99", 0)), 1),
                     "put": st.events_put, "lost": st.events_lost,
                     "faults_per_s": round(_rate(st, prev, "faults", dt), 1),
                     "pages_in_per_s": round(_rate(st, prev, "paged_in", dt), 1),
                     "pages_out_per_s": round(_rate(st, prev, "evicted", dt), 1)})
    return rows


def ring_rows(infos: list[DomainStats], before: dict[int, DomainStats] | None = None,
              dt: float = 0.0) -> list[dict[str, Any]]:
    """One row per enabled ring: the figures of the ``rings`` table (and of ``--json``'s ``rings``)."""
    rows = []
    for st in infos:
        for kind in abi.RingKind:
            r = st.ring(kind)
            if not r.enabled:
                continue
            prev_dom = (before or {}).get(st.domid)
            prev = prev_dom.ring(kind) if prev_dom else None
            rows.append({"dom": st.domid, "ring": str(kind), "occupancy": r.occupancy, "size": r.size,
                         "max": r.max_occupancy, "put": r.put, "lost": r.lost, "refused": r.refused,
                         "blocked_now": r.blocked_now, "blocked_ever": r.blocked_ever,
                         "responses": r.responses, "rejected": r.responses_rejected,
                         "put_per_s": round(_rate(r, prev, "put", dt), 1)})
    return rows


def _num(value: float, width: int) -> str:
    """A number in at most ``width`` characters, whole: ``12345`` or ``12k``/``1.2M`` when it does not fit."""
    text = f"{value:.0f}"
    if len(text) <= width:
        return text
    for unit, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        for digits in (1, 0):
            text = f"{value / scale:.{digits}f}{unit}"
            if len(text) <= width:
                return text
    return "#" * width


def _mib(pages: float, width: int) -> str:
    text = mib_text(pages * abi.PAGE_SIZE) if pages * PAGE_MIB >= 1 or not pages else f"{pages * PAGE_MIB:.2f}"
    if len(text) > width:
        text = _num(pages * PAGE_MIB, width)
    return text


@dataclass(frozen=True)
class Column:
    """A column of a table: its header, width, priority (0: always kept; higher: dropped first) and figure."""

    header: str
    width: int
    priority: int
    cell: Callable[[dict[str, Any]], str]
    left: bool = False


def _w(key: str, width: int, fmt: Callable[[Any, int], str] = _num) -> Callable[[dict[str, Any]], str]:
    return lambda row: fmt(row[key], width)


DOMAIN_COLUMNS = (
    Column("NAME", 10, 0, lambda r: r["name"] or "-", left=True),
    Column("ID", 4, 0, _w("dom", 4)),
    Column("VCPU r/p/b", 10, 3, lambda r: f"{r['vcpus_running']}/{r['vcpus_paused']}/{r['vcpus_blocked']}"),
    Column("MEM(M)", 7, 2, _w("memory", 7, _mib)),
    Column("RES(M)", 7, 0, _w("resident", 7, _mib)),
    Column("TGT(M)", 7, 1, _w("target", 7, _mib)),
    Column("PAGED(M)", 8, 4, _w("paged", 8, _mib)),
    Column("FAULT/s", 7, 0, _w("faults_per_s", 7)),
    Column("IN/s", 6, 1, _w("pages_in_per_s", 6)),
    Column("OUT/s", 6, 1, _w("pages_out_per_s", 6)),
    Column("P50us", 6, 3, _w("fault_p50_us", 6)),
    Column("P99us", 6, 2, _w("fault_p99_us", 6)),
    Column("LOST", 5, 1, _w("lost", 5)),
    Column("INFLT", 5, 5, _w("in_flight", 5)),
    Column("FAULTS", 8, 6, _w("faults", 8)),
)

RING_COLUMNS = (
    Column("ID", 4, 0, _w("dom", 4)),
    Column("RING", 7, 0, lambda r: r["ring"], left=True),
    Column("OCC/SIZE", 8, 0, lambda r: f"{r['occupancy']}/{r['size']}"),
    Column("MAX", 4, 2, _w("max", 4)),
    Column("PUT/s", 7, 0, _w("put_per_s", 7)),
    Column("LOST", 6, 1, _w("lost", 6)),
    Column("REFUSED", 7, 1, _w("refused", 7)),
    Column("BLOCKED", 7, 1, lambda r: f"{r['blocked_now']}/{_num(r['blocked_ever'], 5)}"),
    Column("REJECTED", 8, 2, _w("rejected", 8)),
    Column("PUT", 9, 4, _w("put", 9)),
    Column("RESPONSES", 9, 5, _w("responses", 9)),
)


def fit(columns: tuple[Column, ...], width: int | None) -> list[Column]:
    """The columns that fit ``width`` (None: all), dropping the highest priority numbers first."""
    kept = list(columns)
    while width is not None and sum(c.width + 1 for c in kept) - 1 > width and len(kept) > 1:
        worst = max(range(len(kept)), key=lambda i: (kept[i].priority, i))
        if kept[worst].priority == 0:
            break
        del kept[worst]
    return kept


def table(columns: list[Column], rows: list[dict[str, Any]]) -> list[str]:
    """The header line and a line per row; a cell never cut (names excepted, shortened with ``~``)."""
    def cell(c: Column, text: str) -> str:
        if len(text) > c.width:
            text = text[:c.width - 1] + "~"
        return f"{text:<{c.width}}" if c.left else f"{text:>{c.width}}"

    lines = [" ".join(cell(c, c.header) for c in columns).rstrip()]
    lines += [" ".join(cell(c, c.cell(r)) for c in columns).rstrip() for r in rows]
    return lines


def host_line(host: protocol.HostInfoReply, stamp: str) -> str:
    used, total = host.used_frames * abi.PAGE_SIZE, host.total_frames * abi.PAGE_SIZE
    trace = "on" if host.tracing else "off"
    return (f"hvemu top - {stamp}  host {mib_text(total)} MiB: {mib_text(used)} used, {mib_text(total - used)} free; "
            f"{host.domains} domain(s); {host.policy} policy; trace {trace}")


def screen(host: protocol.HostInfoReply, infos: list[DomainStats], before: dict[int, DomainStats] | None,
           dt: float, stamp: str, size: tuple[int, int] | None) -> list[str]:
    """One refresh as lines, fitted to ``size`` (columns, lines) or, with None, every column and row."""
    width = size[0] if size else None
    doms = table(fit(DOMAIN_COLUMNS, width), domain_rows(infos, before, dt))
    rings = table(fit(RING_COLUMNS, width), ring_rows(infos, before, dt))
    lines = [host_line(host, stamp)]
    if width is not None:
        lines[0] = lines[0][:width]
    lines += ["", *doms, "", *rings]
    if size is not None and len(lines) > size[1] - 1:  # the last line stays free for the cursor
        hidden = len(lines) - (size[1] - 2)
        lines = lines[:size[1] - 2] + [f"... {hidden} more line(s): a larger terminal shows them"[:size[0]]]
    return lines


def as_json_line(infos: list[DomainStats], now: float, before: dict[int, DomainStats] | None = None,
                 dt: float = 0.0, host: protocol.HostInfoReply | None = None) -> str:
    """One refresh as ``--json`` prints it: one object on one line, the tables' figures as numbers.

    ``{"time": "HH:MM:SS", "timestamp": <Unix time>, "host": {...}, "domains": [...], "rings": [...]}``;
    a domain row has ``dom name vcpus_running vcpus_paused vcpus_blocked memory resident paged
    in_flight target faults fault_p50_us fault_p99_us put lost faults_per_s pages_in_per_s
    pages_out_per_s`` (pages, counts and rates), a ring row ``dom ring occupancy size max put lost
    refused blocked_now blocked_ever responses rejected put_per_s``.
    """
    host_obj = None if host is None else {"total_pages": host.total_frames, "used_pages": host.used_frames,
                                          "domains": host.domains, "admission": host.policy, "tracing": host.tracing}
    return json.dumps({"time": time.strftime("%H:%M:%S", time.localtime(now)), "timestamp": round(now, 3),
                       "host": host_obj, "domains": domain_rows(infos, before, dt),
                       "rings": ring_rows(infos, before, dt)})


async def snapshot(conn: ControlClient) -> tuple[protocol.HostInfoReply, list[DomainStats]]:
    """The host and every domain's counters, now; :class:`HypervisorGone` if it went away."""
    try:
        host, _ = await conn.call(protocol.HostInfo())
        assert isinstance(host, protocol.HostInfoReply)
        reply, _ = await conn.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply)
        infos: list[DomainStats] = []
        for d in reply.domains:
            try:
                st, _ = await conn.call(protocol.Stats(domid=d.domid))
            except ControlError:  # the domain went away between the two calls
                continue
            assert isinstance(st, protocol.StatsReply)
            infos.append(st.stats)
    except (ConnectionError, EOFError, OSError) as exc:
        raise HypervisorGone("the hypervisor went away (stopped or killed)") from exc
    return host, infos


@contextlib.contextmanager
def _stdout() -> Iterator[None]:
    """Around a write to stdout: its reader going away is :class:`OutputClosed` (not the control socket's EPIPE)."""
    try:
        yield
    except BrokenPipeError as exc:
        raise OutputClosed("stdout was closed") from exc


def batch_width() -> int | None:
    """``$COLUMNS`` if set (a positive number), else None: every column."""
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


@contextlib.contextmanager
def _keys(quit_: asyncio.Event) -> Iterator[None]:
    """While inside: the terminal reads keys one at a time, and ``q`` sets ``quit_``; the terminal restored after."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)

    def key() -> None:
        if os.read(fd, 32).lower().startswith(b"q"):
            quit_.set()

    tty.setcbreak(fd)
    readiness.add_reader(fd, key, lambda _exc: quit_.set())  # a terminal that fails to read ends top
    try:
        yield
    finally:
        readiness.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(run_dir: str | None, *, interval: float = 1.0, iterations: int = 0,
                  as_json: bool = False, batch: bool = False) -> None:
    """Refresh every ``interval`` s, ``iterations`` times (0: until ``q`` or Ctrl-C)."""
    conn = await ControlClient.connect(protocol.socket_path(run_dir))
    terminal = sys.stdout.isatty() and not batch and not as_json
    quit_ = asyncio.Event()
    try:
        await conn.call(protocol.ToolHello(client="hvemu-top"))
        before: dict[int, DomainStats] | None = None
        last = time.monotonic()
        n = 0
        with _keys(quit_) if terminal else contextlib.nullcontext():
            while not iterations or n < iterations:
                if n:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(quit_.wait(), interval)
                if quit_.is_set():
                    break
                host, infos = await snapshot(conn)
                now = time.monotonic()
                dt = now - last
                stamp = time.strftime("%H:%M:%S")
                with _stdout():
                    if as_json:
                        print(as_json_line(infos, time.time(), before, dt, host), flush=True)
                    elif terminal:
                        size = shutil.get_terminal_size()
                        lines = screen(host, infos, before, dt, stamp, (size.columns, size.lines))
                        sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
                        sys.stdout.flush()
                    else:
                        width = batch_width()
                        print("\n".join(screen(host, infos, before, dt, stamp,
                                               (width, 1 << 30) if width else None)) + "\n", flush=True)
                before = {st.domid: st for st in infos}
                last = now
                n += 1
    finally:
        await conn.close()
