"""A paging daemon that does no work: the system's own exit overhead (not a floor: see :mod:`.relay`).

It attaches to a domain's paging ring with the SDK, like the real pager,
pages out ``--evict`` gfns once (nominate and evict, so that touching them
exits), says ``ready``, then answers every request at once: one response per
request echoing its flags, all responses of a drain pushed with one notify,
exactly as :mod:`pager.xenpaging` does, but without reading a pagefile or
loading a page.  The gfns therefore stay paged, and a vCPU touching one exits
every time, which is what ``system_exit_overhead`` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import uvloop

from hvemu.abi import MemEvent, MemEventFlag, RingKind
from pager.sdk import DomainGone, MemEventClient

_ECHO = int(MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL | MemEventFlag.FOREIGN)


async def _serve(client: MemEventClient) -> None:
    async for batch in client.requests():
        for req in batch:
            client.respond(MemEvent(type=req.type, flags=req.flags & _ECHO, vcpu_id=req.vcpu_id,
                                    gfn=req.gfn, p2mt=req.p2mt))
        await client.push()


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    async with MemEventClient(args.domid, RingKind.paging, run_dir=args.run_dir) as client:
        gfns = list(range(args.evict))
        if gfns:
            nominated = [g for g, r in zip(gfns, await client.nominate(gfns), strict=True) if r is None]
            evicted = await client.evict(nominated)
            if len(nominated) != len(gfns) or any(r is not None for r in evicted):
                raise RuntimeError(f"could not page out gfns 0..{args.evict - 1}")
        print(json.dumps({"ready": True, "paged": len(gfns)}), flush=True)
        try:
            await _serve(client)
        except DomainGone:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.bench.nulld", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--evict", type=int, default=1, help="gfns 0..N-1 to page out before serving")
    args = p.parse_args(argv)
    try:
        uvloop.run(_main(args))
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
