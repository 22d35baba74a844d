"""``hvemu top``: a live view of every domain and ring, refreshed in place.

Built on ``rich`` (``Live`` + ``Table``).  On a terminal the screen is
redrawn in place; when stdout is not a terminal each refresh is printed as a
plain table, so the view can also be logged: ``$COLUMNS`` wide if set, else
as wide as the tables are (never wrapped or cut to 80 columns).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from hvemu import abi, protocol
from hvemu.transport import Connection


def _domain_table(infos: list[dict[str, Any]]) -> Table:
    t = Table(title="domains", expand=False)
    for col in ("dom", "name", "vcpus run/paused/blocked", "resident", "paged", "in flight", "target",
                "faults", "fault p50 us", "fault p99 us", "put", "lost"):
        t.add_column(col, justify="right")
    for st in infos:
        lat = st.get("fault_latency_us", {}) or {}
        vcpus = int(st.get("max_vcpus", 0))
        paused = int(st.get("vcpus_paused", 0))
        t.add_row(str(st["domid"]), str(st.get("name", "")),
                  f"{vcpus - paused}/{paused}/{st.get('vcpus_blocked', 0)}",
                  str(st.get("resident", 0)), str(st.get("paged", 0)), str(st.get("paging_in", 0)),
                  str(st.get("target", 0)), str(st.get("faults", 0)),
                  f"{lat.get('p50', 0):.0f}", f"{lat.get('p99', 0):.0f}",
                  str(st.get("events_put", 0)), str(st.get("events_lost", 0)))
    return t


def _ring_table(infos: list[dict[str, Any]]) -> Table:
    t = Table(title="rings", expand=False)
    for col in ("dom", "ring", "occupancy", "max", "put", "lost", "refused", "blocked now/ever",
                "responses", "rejected"):
        t.add_column(col, justify="right")
    for st in infos:
        for kind in abi.RingKind:
            r = st.get(str(kind))
            if not isinstance(r, dict) or not r.get("enabled"):
                continue
            t.add_row(str(st["domid"]), str(kind), f"{r.get('occupancy', 0)}/{r.get('size', 0)}",
                      str(r.get("max_occupancy", 0)), str(r.get("put", 0)), str(r.get("lost", 0)),
                      str(r.get("refused", 0)), f"{r.get('blocked_now', 0)}/{r.get('blocked_ever', 0)}",
                      str(r.get("responses", 0)), str(r.get("responses_rejected", 0)))
    return t


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


def make_console() -> Console:
    """A terminal's own width; otherwise ``$COLUMNS`` if set, else :data:`PIPE_WIDTH`.

    (rich alone would use 80 columns, or the width of whichever of stdin and
    stderr is a terminal, and wrap or cut the tables to it.)
    """
    console = Console()
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH)


async def run_top(run_dir: str | None, *, interval: float = 1.0, iterations: int = 0) -> None:
    conn = await Connection.connect(protocol.socket_path(run_dir))
    console = make_console()
    try:
        await conn.call(protocol.ToolHello(client="hvemu-top"))
        n = 0
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, screen=False) as live:
                while not iterations or n < iterations:
                    live.update(render(await snapshot(conn), time.strftime("%H:%M:%S")), refresh=True)
                    n += 1
                    await asyncio.sleep(interval)
        else:
            while not iterations or n < iterations:
                console.print(render(await snapshot(conn), time.strftime("%H:%M:%S")))
                n += 1
                if not iterations or n < iterations:
                    await asyncio.sleep(interval)
    finally:
        await conn.close()
