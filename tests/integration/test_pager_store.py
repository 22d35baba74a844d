"""A custom pager with an in-memory store, on :class:`pager.base.Pager` (issue 14, defect 1).

The natural in-memory store frees its copy of a page once the page is back
in the guest.  The Pager's eviction task used to be able to page a gfn out
again after its load but before ``on_populate`` reported it, so a store that
freed the copy there deleted the *new* copy and the next page-in gave the
guest zeros.  The victim policy here makes that race as likely as it can be
(it evicts the pages just asked for), and the real guest verifies every page
it ever wrote.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Sequence

import pytest

from hvemu import abi
from hvemu.abi import RingKind
from pager.base import Pager
from pager.gfns import GfnsOfType
from pager.sdk import MemEventClient, RequestBatch
from tests.integration.hostile import wait_proc
from tests.integration.system import Hypervisor

ZERO = bytes(abi.PAGE_SIZE)


class MemoryStore:
    """Pages in a dict; a gfn never stored reads as zeros (a page never written)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.most = 0

    def write(self, gfn: int, data: bytes | memoryview) -> None:
        self.pages[gfn] = bytes(data)
        self.most = max(self.most, len(self.pages))

    def read(self, gfn: int) -> bytes:
        return self.pages.get(gfn, ZERO)

    def discard(self, gfns: Sequence[int]) -> None:
        for g in gfns:
            self.pages.pop(g, None)


class EagerPager(Pager):
    """Evicts the pages the guest just asked for; frees a page's copy when it is reported back in."""

    store: MemoryStore

    def __init__(self, client: MemEventClient, store: MemoryStore, *, free_in_hook: bool) -> None:
        super().__init__(client, store, batch=16, seed=1)
        self.store = store
        self.free_in_hook = free_in_hook
        self.asked: deque[int] = deque(maxlen=64)

    async def handle_batch(self, batch: RequestBatch) -> None:  # type: ignore[override]
        self.asked.extend(r.gfn for r in batch)
        await super().handle_batch(batch)

    def choose_victims(self, candidates: GfnsOfType, count: int) -> list[int]:
        recent = [g for g in dict.fromkeys(reversed(self.asked)) if g in candidates][:count]
        return recent + candidates.sample(count - len(recent), self.rng, avoid=set(recent))

    def on_populate(self, gfns: list[int]) -> None:
        if self.free_in_hook:  # what the guide used to invite: "pages just brought back in"
            self.store.discard(gfns)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("free_in_hook", [True, False], ids=["frees-in-on_populate", "store-discard"])
async def test_an_in_memory_store_that_frees_on_page_in_loses_nothing(hypervisor: Hypervisor,
                                                                      free_in_hook: bool) -> None:
    domid = await hypervisor.create_domain(2, 2048, target=1024)  # 8 MiB, 4 MiB resident
    store = MemoryStore()
    async with MemEventClient(domid, RingKind.paging, run_dir=hypervisor.run_dir) as client:
        pager = EagerPager(client, store, free_in_hook=free_in_hook)
        guest = hypervisor.guest(domid, "--duration", "3", "--pattern", "uniform", "--write-ratio", "0.5",
                                 "--seed", "7")
        try:
            await pager.run(asyncio.Event())  # returns when the guest exits and its domain goes
            status = await wait_proc(guest, 60)
            out, err = guest.communicate(10)
        finally:
            guest.stop()
    assert pager.gone is not None, "run() returned without the domain going away"
    report = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and report["integrity_failures"] == 0, err[-2000:]
    assert pager.pages_in > 100 and pager.pages_out > 100, pager.summary()
    # Freed on page-in: the store holds about what is out, not every page ever evicted.
    assert store.most <= 1024 + 64, store.most
