"""A minimal custom pager: random victims, on the SDK and the Pager base class.

    python -m pager.examples.minimal_pager --domid 1 --pagefile /tmp/dom1.pages

It keeps the domain at its paging target (``hvemu mem-set``), pages in on
demand, and on SIGTERM/SIGINT pages everything back in and disables the ring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop

from hvemu.abi import RingKind
from pager.base import Pager
from pager.gfns import GfnsOfType
from pager.pagefile import Pagefile, PagefileMismatch
from pager.sdk import MemEventClient


class RandomPager(Pager):
    """The whole policy: which resident pages to evict."""

    def choose_victims(self, candidates: GfnsOfType, count: int) -> list[int]:
        # Draws from the p2m snapshot: no list of every resident gfn per batch.
        return candidates.sample(count, self.rng)

    def on_drop(self, gfn: int) -> None:
        print(f"dom{self.client.domid}: gfn {gfn:#x} ballooned out while paged", flush=True)


async def main(domid: int, path: str, run_dir: str | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with MemEventClient(domid, RingKind.paging, run_dir=run_dir) as client:
        assert client.info is not None
        # The pagefile records the domain it belongs to: kept when it is this
        # domain's, started afresh when nothing is out, refused (PagefileMismatch)
        # when pages are out and it does not hold them.
        out = await client.stored_pages_out()  # pages out whose bytes a pager stored
        try:
            pagefile = Pagefile.open_for(path, client.gfns, handle=client.info.domain_handle,
                                         reattached=client.info.reattached, paged_out=out)
        except PagefileMismatch:
            client.disable_on_exit = False  # leave the ring (and its requests) to the pager with the pages
            raise
        pager = RandomPager(client, pagefile)
        try:
            # Serve + evict until stop, then page everything in; or until the
            # domain goes away (its guest exited): then pager.gone says why.
            await pager.run(stop)
            if pager.gone is not None or not await client.stored_pages_out():
                pagefile.clear()  # all in, or the domain is gone: the file must not pass for a store
        finally:
            pagefile.close()
    print(json.dumps({"domid": domid, **pager.summary()}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--pagefile", required=True)
    p.add_argument("--run-dir")
    a = p.parse_args()
    try:
        uvloop.run(main(a.domid, a.pagefile, a.run_dir))
    except PagefileMismatch as exc:
        raise SystemExit(f"minimal_pager: dom{a.domid}: {exc}") from None
