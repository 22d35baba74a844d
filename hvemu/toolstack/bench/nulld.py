"""A mem_event daemon that does no work: the system's own exit overhead (not a floor: see :mod:`.relay`).

It attaches to a domain's *access* ring with the SDK, takes every right away
from ``--evict`` gfns (``p2m_access_n``, so that touching one exits with a
violation), says ``ready``, then answers every request at once: one response
per request echoing its flags, all responses of a drain pushed with one
notify, as :mod:`pager.xenpaging` does, but with no paging work.  The rights
stay removed, so a vCPU touching one of those gfns exits every time, which
is what ``system_exit_overhead`` measures.

Not the paging ring: on Xen a vCPU whose paged gfn is answered but never
loaded re-executes its access without a new request (the gfn is already
``ram_paging_in``), so a paging daemon that loads nothing would hang it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import uvloop

from hvemu.abi import MemEvent, MemEventFlag, P2MAccess, RingKind
from pager.sdk import DomainGone, MemEventClient

_ECHO = int(MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL | MemEventFlag.FOREIGN)


async def _serve(client: MemEventClient) -> None:
    async for batch in client.requests():
        for req in batch:
            client.respond(MemEvent(type=req.type, flags=req.flags & _ECHO, vcpu_id=req.vcpu_id,
                                    gfn=req.gfn, p2mt=req.p2mt, reason=req.reason))
        await client.push()


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    async with MemEventClient(args.domid, RingKind.access, run_dir=args.run_dir) as client:
        gfns = list(range(args.evict))
        if gfns and any(r is not None for r in await client.domctl.access_set(gfns, P2MAccess.n)):
            raise RuntimeError(f"could not restrict gfns 0..{args.evict - 1}")
        print(json.dumps({"ready": True, "paged": len(gfns)}), flush=True)
        try:
            await _serve(client)
        except DomainGone:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.nulld", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--evict", type=int, default=1, help="gfns 0..N-1 to take every right from before serving")
    args = p.parse_args(argv)
    try:
        uvloop.run(_main(args))
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
