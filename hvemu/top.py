"""``hvemu top``: a live view of every domain and ring, refreshed in place.

Built on ``rich`` (``Live`` + ``Table``).  On a terminal the screen is
redrawn in place; when stdout is not a terminal each refresh is printed as a
plain table, so the view can also be logged: ``$COLUMNS`` wide if set, else
as wide as the tables are (never wrapped or cut to 80 columns).  With
``--json``, each refresh is one JSON object on one line instead
(:func:`as_json_line`), whatever stdout is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from hvemu import abi, protocol
from hvemu.transport import Connection


def domain_rows(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per domain: the figures of the ``domains`` table (and of ``--json``'s ``domains``)."""
    rows = []
    for st in infos:
        lat = st.get("fault_latency_us", {}) or {}
        vcpus = int(st.get("max_vcpus", 0))
        paused = int(st.get("vcpus_paused", 0))
        rows.append({"dom": st["domid"], "name": str(st.get("name", "")),
                     "vcpus_running": vcpus - paused, "vcpus_paused": paused,
                     "vcpus_blocked": int(st.get("vcpus_blocked", 0)),
                     "resident": st.get("resident", 0), "paged": st.get("paged", 0),
                     "in_flight": st.get("paging_in", 0), "target": st.get("target", 0),
                     "faults": st.get("faults", 0), "fault_p50_us": round(float(lat.get("p50", 0)), 1),
                     "fault_p99_us": round(float(lat.get("p99", 0)), 1),
                     "put": st.get("events_put", 0), "lost": st.get("events_lost", 0)})
    return rows


def ring_rows(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per enabled ring: the figures of the ``rings`` table (and of ``--json``'s ``rings``)."""
    rows = []
    for st in infos:
        for kind in abi.RingKind:
            r = st.get(str(kind))
            if not isinstance(r, dict) or not r.get("enabled"):
                continue
            rows.append({"dom": st["domid"], "ring": str(kind), "occupancy": r.get("occupancy", 0),
                         "size": r.get("size", 0), "max": r.get("max_occupancy", 0), "put": r.get("put", 0),
                         "lost": r.get("lost", 0), "refused": r.get("refused", 0),
                         "blocked_now": r.get("blocked_now", 0), "blocked_ever": r.get("blocked_ever", 0),
                         "responses": r.get("responses", 0), "rejected": r.get("responses_rejected", 0)})
    return rows


def _domain_table(infos: list[dict[str, Any]]) -> Table:
    t = Table(title="domains", expand=False)
    for col in ("dom", "name", "vcpus run/paused/blocked", "resident", "paged", "in flight", "target",
                "faults", "fault p50 us", "fault p99 us", "put", "lost"):
        t.add_column(col, justify="right")
    for d in domain_rows(infos):
        t.add_row(str(d["dom"]), d["name"], f"{d['vcpus_running']}/{d['vcpus_paused']}/{d['vcpus_blocked']}",
                  str(d["resident"]), str(d["paged"]), str(d["in_flight"]), str(d["target"]), str(d["faults"]),
                  f"{d['fault_p50_us']:.0f}", f"{d['fault_p99_us']:.0f}", str(d["put"]), str(d["lost"]))
    return t


def _ring_table(infos: list[dict[str, Any]]) -> Table:
    t = Table(title="rings", expand=False)
    for col in ("dom", "ring", "occupancy", "max", "put", "lost", "refused", "blocked now/ever",
                "responses", "rejected"):
        t.add_column(col, justify="right")
    for r in ring_rows(infos):
        t.add_row(str(r["dom"]), r["ring"], f"{r['occupancy']}/{r['size']}", str(r["max"]), str(r["put"]),
                  str(r["lost"]), str(r["refused"]), f"{r['blocked_now']}/{r['blocked_ever']}",
                  str(r["responses"]), str(r["rejected"]))
    return t


def as_json_line(infos: list[dict[str, Any]], now: float) -> str:
    """One refresh as ``--json`` prints it: one object on one line, the tables' figures as numbers.

    ``{"time": "HH:MM:SS", "timestamp": <Unix time>, "domains": [...], "rings": [...]}``; a domain row
    has ``dom name vcpus_running vcpus_paused vcpus_blocked resident paged in_flight target faults
    fault_p50_us fault_p99_us put lost`` (pages and counts), a ring row ``dom ring occupancy size max
    put lost refused blocked_now blocked_ever responses rejected``.
    """
    return json.dumps({"time": time.strftime("%H:%M:%S", time.localtime(now)), "timestamp": round(now, 3),
                       "domains": domain_rows(infos), "rings": ring_rows(infos)})


async def snapshot(conn: Connection) -> list[dict[str, Any]]:
    """Every domain's counters, now."""
    reply, _ = await conn.call(protocol.DomainList())
    assert isinstance(reply, protocol.DomainListReply)
    infos = []
    for d in reply.domains:
        try:
            st, _ = await conn.call(protocol.Stats(domid=d.domid))
        except Exception:  # the domain went away between the two calls
            continue
        assert isinstance(st, protocol.StatsReply)
        infos.append(dict(st.stats))
    return infos


def render(infos: list[dict[str, Any]], stamp: str) -> Group:
    return Group(f"hvemu top — {stamp} — {len(infos)} domain(s)", _domain_table(infos), _ring_table(infos))


#: The console width when stdout is not a terminal and ``$COLUMNS`` is unset:
#: more than any table needs, and tables not expanded take only what they need.
PIPE_WIDTH = 10_000


class OutputClosed(Exception):
    """stdout's reader went away (``hvemu top | head``): the caller exits quietly."""


@contextlib.contextmanager
def _stdout() -> Iterator[None]:
    """Around a write to stdout: its reader going away is :class:`OutputClosed` (not the control socket's EPIPE)."""
    try:
        yield
    except BrokenPipeError as exc:
        raise OutputClosed("stdout was closed") from exc


class _Console(Console):
    """rich's console, but a reader that went away is the caller's to handle (rich would exit with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def make_console() -> Console:
    """A terminal's own width; otherwise ``$COLUMNS`` if set, else :data:`PIPE_WIDTH`.

    (rich alone would use 80 columns, or the width of whichever of stdin and
    stderr is a terminal, and wrap or cut the tables to it.)
    """
    console = _Console()
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return _Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH)


async def run_top(run_dir: str | None, *, interval: float = 1.0, iterations: int = 0,
                  as_json: bool = False) -> None:
    """Refresh every ``interval`` s, ``iterations`` times (0: until interrupted); ``as_json``: JSON lines."""
    conn = await Connection.connect(protocol.socket_path(run_dir))
    try:
        await conn.call(protocol.ToolHello(client="hvemu-top"))

        async def refreshes() -> AsyncIterator[list[dict[str, Any]]]:
            n = 0
            while not iterations or n < iterations:
                if n:
                    await asyncio.sleep(interval)
                yield await snapshot(conn)
                n += 1

        if as_json:
            async for infos in refreshes():
                with _stdout():
                    print(as_json_line(infos, time.time()), flush=True)
            return
        console = make_console()
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, screen=False) as live:
                async for infos in refreshes():
                    with _stdout():
                        live.update(render(infos, time.strftime("%H:%M:%S")), refresh=True)
        else:
            async for infos in refreshes():
                with _stdout():
                    console.print(render(infos, time.strftime("%H:%M:%S")))
    finally:
        await conn.close()
