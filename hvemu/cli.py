"""``hvemu``: the toolstack command, in the manner of ``xl``.

Subcommands talk to a running hypervisor over its control socket.  ``map``
is a foreign mapper: it maps guest pages from the tool side, and a paged-out
page answers ``ENOENT`` (the hypervisor has asked the pager for it), so the
mapper retries, exactly as Xen's foreign-mapping callers do.
Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import zlib
from typing import Any

import uvloop

from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.transport import Connection, ControlError


async def _tool(run_dir: str | None) -> Connection:
    conn = await Connection.connect(protocol.socket_path(run_dir))
    await conn.call(protocol.ToolHello(client="hvemu-cli"))
    return conn


async def map_foreign(conn: Connection, domid: int, gfns: list[int], *, timeout: float = 10.0,
                      delay: float = 0.001) -> tuple[dict[int, bytes], int]:
    """Map ``gfns`` of ``domid``, retrying the ENOENT ones until paged in; returns pages and retries."""
    pages: dict[int, bytes] = {}
    pending = list(gfns)
    retries = 0
    deadline = time.monotonic() + timeout
    while pending:
        reply, _ = await conn.call(protocol.MapForeign(domid=domid, gfns=pending))
        assert isinstance(reply, protocol.ForeignPages)
        again = []
        for g, r, page in zip(pending, reply.results, reply.pages, strict=True):
            if r is None and page is not None:
                pages[g] = page
            elif r == Errno.ENOENT:
                again.append(g)
            else:
                raise ControlError(r or Errno.EINVAL, f"gfn {g}: {r}")
        pending = again
        if pending:
            retries += 1
            if time.monotonic() > deadline:
                raise ControlError(Errno.EAGAIN, f"{len(pending)} gfns still paged out after {timeout}s")
            await asyncio.sleep(delay)
    return pages, retries


async def _run(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        if args.cmd == "create":
            gfns = int(args.memory * (1 << 20)) // abi.PAGE_SIZE
            reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=args.vcpus, gfns=gfns, name=args.name))
            assert isinstance(reply, protocol.DomainCreated)
            return {"domid": reply.domid}
        if args.cmd == "destroy":
            await conn.call(protocol.DomainDestroy(domid=args.domid))
            return {"destroyed": args.domid}
        if args.cmd == "list":
            reply, _ = await conn.call(protocol.DomainList())
            assert isinstance(reply, protocol.DomainListReply)
            return [{"domid": d.domid, "name": d.name, "vcpus": d.max_vcpus, "gfns": d.gfns,
                     "resident": d.resident, "crashed": d.crashed} for d in reply.domains]
        if args.cmd == "info":
            reply, _ = await conn.call(protocol.Stats(domid=args.domid))
            assert isinstance(reply, protocol.StatsReply)
            return reply.stats
        if args.cmd == "set-target":
            await conn.call(protocol.SetTarget(domid=args.domid, pages=args.pages))
            return {"domid": args.domid, "target": args.pages}
        if args.cmd == "map":
            pages, retries = await map_foreign(conn, args.domid, args.gfns, timeout=args.timeout)
            return {"domid": args.domid, "retries": retries,
                    "pages": {str(g): {"crc32": f"{zlib.crc32(p):08x}",
                                       "head": p[:24].hex()} for g, p in sorted(pages.items())}}
        raise ValueError(f"unknown command {args.cmd}")
    finally:
        await conn.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvemu", description="Toolstack for the hvemu hypervisor.")
    p.add_argument("--run-dir", default=None, help="hypervisor run directory")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a domain")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--memory", type=float, default=16, help="MiB")
    c.add_argument("--name", default="")
    d = sub.add_parser("destroy", help="destroy a domain")
    d.add_argument("domid", type=int)
    sub.add_parser("list", help="list domains")
    i = sub.add_parser("info", help="counters of one domain")
    i.add_argument("domid", type=int)
    t = sub.add_parser("set-target", help="set a domain's paging target (resident pages)")
    t.add_argument("domid", type=int)
    t.add_argument("pages", type=int)
    m = sub.add_parser("map", help="foreign-map guest pages (retrying paged-out ones) and checksum them")
    m.add_argument("domid", type=int)
    m.add_argument("gfns", type=int, nargs="+")
    m.add_argument("--timeout", type=float, default=10.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = uvloop.run(_run(args))
    except ControlError as exc:
        print(f"hvemu {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, FileNotFoundError) as exc:
        print(f"hvemu {args.cmd}: cannot reach the hypervisor at {protocol.socket_path(args.run_dir)}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"hvemu {args.cmd}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
