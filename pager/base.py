"""The pager base class: everything a paging daemon does, except its policy.

A custom pager subclasses :class:`Pager` and overrides the hooks
(:meth:`Pager.choose_victims`, :meth:`Pager.on_populate`,
:meth:`Pager.on_drop`); ``pager/examples/minimal_pager.py`` is one in forty
lines and :mod:`pager.xenpaging` (the built-in pager) is this class with a
victim policy from :mod:`pager.policy`.  It uses the public SDK
(:mod:`pager.sdk`) only.

How it works, like ``xenpaging``: a serving task drains the ring and answers
each drain at once (each page read from the pagefile straight into the
paging ring's load area, staged with its response, all responses published
with one index update and one kick, on which the hypervisor loads the pages
and resumes the ring; a ring without a load area gets one load domctl per
drain that also resumes it); an eviction task keeps the resident size at the target (read from
the hypervisor, so a changed target is followed at run time), evicting in
batches (nominate, copy to the pagefile, evict: a page touched in between
fails its evict and stays).  On a clean stop it pages everything back in
before the ring is disabled.  Killed, it leaves ring and pagefile behind; a
new pager on the same pagefile picks up every unanswered request.

Why one module of ~580 lines: the pager's request loop, its eviction task and its stop are one
object whose invariants (a gfn busy while its page is copied, the hooks' order) span all three.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from hvemu import abi, protocol
from hvemu.abi import MemEvent, MemEventFlag, P2MType
from pager.defaults import EVICT_BATCH
from pager.gfns import GfnsOfType, gfns_in
from pager.pagefile import PageStore, copy_out
from pager.progress import Progressbar
from pager.sdk import DomainGone, Domctl, MemEventClient, SdkError, response_for

log = logging.getLogger("pager")

# Plain ints on the page-in path: an IntFlag operation costs a microsecond, an int one 10 ns.
_DROP_PAGE = int(MemEventFlag.DROP_PAGE)
_EVICT_FAIL = int(MemEventFlag.EVICT_FAIL)
_NO_LOAD = int(MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL | MemEventFlag.DUMMY)
#: The most pages one load domctl may carry: half a control frame of page data.
LOAD_BATCH_MAX = protocol.MAX_FRAME // 2 // abi.PAGE_SIZE
_RAM_RW = int(P2MType.ram_rw)
_RAM_PAGING_OUT = int(P2MType.ram_paging_out)


def _first(group: BaseExceptionGroup[Any]) -> Any:
    """The first leaf of an exception group (what one of the pager's tasks raised)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class Pager:
    """A paging daemon on an attached :class:`~pager.sdk.MemEventClient`; override the hooks.

    The hooks are the whole policy of a pager; everything else (draining the
    ring, loading a drain's pages in one domctl, one push per drain, making
    room on ``ENOMEM``, following the target, evicting in batches, the
    stranded-gfn sweep, paging everything in on a clean stop) is done here:

    :meth:`choose_victims`
        which resident gfns to evict next (default: uniformly at random);
    :meth:`on_populate`
        pages just brought back in (e.g. to avoid evicting them again soon);
    :meth:`on_drop`
        the guest gave back a gfn that was paged out (its saved copy is garbage).

    ``pagefile`` is any :class:`PageStore` (a :class:`~pager.pagefile.Pagefile`
    is one).  A page is written to it after nominate and before evict, read
    back for every page-in, and discarded once the page is in again (or the
    gfn was given back, or its evict failed): nothing is ever lost as long as
    it keeps what it is given until then.

    Order, per gfn, guaranteed: a gfn being paged in (its load sent) or out
    (nominated) is never offered to :meth:`choose_victims`, and a page-in is
    reported (the store's ``discard``, then :meth:`on_populate`) before the
    gfn can be nominated again.  Eviction runs in its own task, concurrently
    with serving; without this a gfn could go out again between its load and
    the report of that load, and a store that freed its copy on the report
    would free the new copy.
    """

    def __init__(self, client: MemEventClient, pagefile: PageStore, *,
                 batch: int = EVICT_BATCH, poll_interval: float = 0.05, unbatched: bool = False,
                 seed: int | None = None, progress: bool = False) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.client = client
        #: Serve each request on its own (one load, one response, one push and
        #: notify, hence one resume, per request): the naive daemon that the
        #: page-in benchmark compares batching against.
        self.unbatched = unbatched
        #: Show the initial page-out and the final page-in as progress (a bar
        #: on a terminal, plain lines otherwise; see :mod:`pager.progress`).
        self.progress = progress
        #: Eviction's own connection (set by :meth:`run`): page-ins never queue behind it.
        self.evictor: Domctl = client.domctl
        self.pagefile = pagefile
        self.batch = batch
        #: Pages per load domctl when loading without a request (stranded gfns,
        #: the final page-in): a load carries its pages, and a control message
        #: is at most ``protocol.MAX_FRAME`` bytes.
        self.load_batch = min(batch, LOAD_BATCH_MAX)
        self.rng = random.Random(seed)
        self.poll_interval = poll_interval
        self.pages_out = 0
        self.pages_in = 0
        self.evict_failed = 0
        self.drops = 0
        self.requests = 0
        self.stranded_loaded = 0
        self._paged_in_event = asyncio.Event()
        #: The target and the resident count as the eviction loop last read
        #: them, plus the pages loaded since: a page-in wakes that loop only
        #: when it takes the domain above its target.
        self._target = 1 << 62
        self._resident = 0
        self._paging_in_seen: set[int] = set()
        #: Gfns on their way in (load sent, not yet reported) or out (nominated,
        #: evict not yet returned): no victim policy may pick them meanwhile.
        self._busy: set[int] = set()
        #: Requests whose page could not be read, by gfn: unanswered until :meth:`retry_unfilled` reads it.
        self._unfilled: dict[int, list[MemEvent]] = {}
        #: Why :meth:`run` ended without ``stop``: the domain went away (None: it did not).
        self.gone: DomainGone | None = None

    # ------------------------------------------------------------- hooks
    def choose_victims(self, candidates: GfnsOfType, count: int) -> list[int]:
        """Which of ``candidates`` (every ``ram_rw`` gfn, ascending) to evict next: at most ``count``.

        ``candidates`` is a read-only sequence (``len``, ``in``, indexing,
        iteration) that lists the gfns only when indexed or iterated; its
        ``walk(gfn)`` (a clock hand's turn) and ``sample(n, rng)`` do not.
        Return fewer (or none) to evict less.  A gfn that is no longer
        pageable by the time it is nominated is simply skipped.
        """
        return gfns_in(candidates).sample(count, self.rng)

    def on_populate(self, gfns: list[int]) -> None:
        """``gfns`` were just paged back in (loaded: their pages are in the guest's memory).

        Called after the store's ``discard`` of the same gfns and before any
        of them can be nominated again (so a policy may note them, and a
        store may be freed here too).
        """

    def on_drop(self, gfn: int) -> None:
        """The guest gave ``gfn`` back while it was paged out (the store's copy is already discarded)."""

    def _paged_in(self, gfns: list[int]) -> None:
        """Report a page-in: the store lets go of the copies, then the hook hears of it."""
        if gfns:
            self.pagefile.discard(gfns)
            self.on_populate(gfns)

    # ------------------------------------------------------------- serving
    async def serve(self) -> None:
        """Answer requests forever, one drain at a time."""
        async for batch in self.client.requests():
            await self.handle_batch(batch)

    async def handle_batch(self, batch: list[MemEvent]) -> None:
        """Answer one drain (every request of it), loading its pages first."""
        if self.client.can_stage_pages:
            if self.unbatched and batch:  # (an empty batch: only staged pages that found no memory came back)
                for req in batch:
                    if not await self._handle_staged([req]):
                        self.client.kick()  # one notify per response, even when ring.h would skip it
            else:
                await self._handle_staged(batch)
            return
        if self.unbatched:
            for req in batch:
                if not await self._handle([req], merged=False):
                    self.client.kick()  # one notify per response, even when ring.h would skip it
            return
        await self._handle(batch)

    async def _handle_staged(self, batch: list[MemEvent]) -> bool:
        """Answer one drain with no domctl: each page staged with its response, one push and kick.

        Each page is read from the pagefile straight into the ring's load
        area (:meth:`~pager.sdk.MemEventClient.respond_with_page`); the
        hypervisor, on the kick, loads every staged page as it consumes its
        response, so the vCPU runs with its page in.  A page whose read
        failed gets no response (a response would expose whatever the frame
        holds): its requests wait in :attr:`_unfilled` for
        :meth:`retry_unfilled`.  A page that found no host memory comes back
        marked and is loaded with a ``PagingLoad`` after making room (its
        vCPU waits on the gfn).  Returns whether the hypervisor was notified.
        """
        client = self.client
        self.requests += len(batch)
        failed = client.take_load_failures()
        if failed:
            self.pages_in -= len(failed)
            await self._load_unrequested(failed)
        staged: list[int] = []
        for req in batch:
            flags = req.flags
            gfn = req.gfn
            if flags & _NO_LOAD or gfn in staged:
                if flags & _DROP_PAGE:
                    self.drops += 1
                    self.pagefile.discard([gfn])
                    self.on_drop(gfn)
                elif flags & _EVICT_FAIL:
                    self.evict_failed += 1
                client.respond(response_for(req))
                continue
            try:
                client.respond_with_page(response_for(req), gfn, self.pagefile)
            except OSError as exc:
                log.warning("dom%d: reading gfn %#x failed (%s): its request waits", client.domid, gfn, exc)
                self._unfilled.setdefault(gfn, []).append(req)
                continue
            staged.append(gfn)
        notified = await client.push()
        if staged:
            self.pages_in += len(staged)
            self._paged_in(staged)
            self._resident += len(staged)
            if self._resident > self._target:
                self._paged_in_event.set()
        return notified

    async def retry_unfilled(self) -> int:
        """Read again the pages whose read failed and answer their requests; how many were answered."""
        if not self._unfilled:
            return 0
        waiting, self._unfilled = self._unfilled, {}
        batch = [req for reqs in waiting.values() for req in reqs]
        self.requests -= len(batch)  # counted when they first came
        if not await self._handle_staged(batch):
            self.client.kick()
        return len(batch) - sum(len(r) for r in self._unfilled.values())

    async def _load_unrequested(self, gfns: list[int]) -> list[int]:
        """Load gfns no request is left for (``PagingLoad``), keeping them from victim choice meanwhile."""
        chunk = [g for g in gfns if g not in self._busy]
        self._busy.update(chunk)
        try:
            loaded = await self._load(chunk)
            self.pages_in += len(loaded)
            self._paged_in(loaded)
        finally:
            self._busy.difference_update(chunk)
        return loaded

    def _not_loadable(self) -> set[int]:
        """Gfns no load may cross: staged with a response not yet consumed (the copy could go stale
        once loaded, written and paged out again), or waiting for a read that failed."""
        out = set(self._unfilled)
        if self.client.can_stage_pages:
            out |= self.client.staged()
        return out

    async def _handle(self, batch: list[MemEvent], *, merged: bool = True) -> bool:
        """Answer one drain: every response with one push, every page with one load domctl.

        The responses are published first and the load resumes the ring in
        the same domctl (``resume=True``): one round trip and no event-channel
        kick per drain.  The hypervisor looks at responses only when it
        resumes, which it does after loading, so no vCPU runs before its page
        is in (a pager killed in between leaves published, unconsumed
        responses, which a re-attach rolls back).  ``merged=False`` is the
        classic order (load, push, notify), kept for the unbatched mode.
        Returns whether the hypervisor was resumed or notified.
        """
        self.requests += len(batch)
        to_load: dict[int, None] = {}
        for req in batch:
            if req.flags & _NO_LOAD:
                continue
            to_load[req.gfn] = None
        busy = [g for g in to_load if g not in self._busy]  # (a gfn may be in a stranded load already)
        self._busy.update(busy)
        try:
            merge = merged and bool(to_load)
            loaded: list[int] = [] if merge else await self._load(list(to_load))
            for req in batch:
                if req.flags & _DROP_PAGE:
                    self.drops += 1
                    self.pagefile.discard([req.gfn])
                    self.on_drop(req.gfn)
                elif req.flags & _EVICT_FAIL:
                    self.evict_failed += 1
                self.client.respond(response_for(req))
            if merge:
                await self.client.push(notify=False)
                loaded = await self._load(list(to_load), resume=True)
                notified = True
            else:
                notified = await self.client.push()
            if loaded:
                self.pages_in += len(loaded)
                self._paged_in(loaded)
                self._resident += len(loaded)
                if self._resident > self._target:
                    self._paged_in_event.set()
        finally:
            self._busy.difference_update(busy)
        return notified

    async def _load(self, gfns: list[int], *, resume: bool = False) -> list[int]:
        """Read the pagefile and load; on ENOMEM make room by evicting, then retry.

        ``resume``: the paging ring is resumed by the time this returns, by
        the load that finds memory for every gfn, or else by a kick at the end.
        """
        loaded: list[int] = []
        pending = gfns
        resumed = not resume
        for _attempt in range(8):
            if not pending:
                break
            results = await self.client.domctl.load(pending, [self.pagefile.read(g) for g in pending],
                                                    resume=not resumed)
            retry = []
            for g, r in zip(pending, results, strict=True):
                if r is None:
                    loaded.append(g)
                elif r == abi.Errno.ENOMEM:
                    retry.append(g)
                # EINVAL etc: the gfn is no longer paged (a duplicate request); the response suffices.
            if not retry:
                resumed = True  # the hypervisor resumed after this load (see PagingLoad.resume)
            pending = retry
            if pending:
                await self.evict_batch(len(pending))
        if pending:
            log.warning("dom%d: host memory exhausted, %d page-ins deferred to the guest's retry",
                        self.client.domid, len(pending))
        if not resumed:
            self.client.kick()
        return loaded

    # ------------------------------------------------------------- eviction
    def resident(self) -> int:
        """Pages holding a frame the pager could evict (``ram_rw`` + nominated)."""
        types = self.client.p2m_types()
        return types.count(_RAM_RW) + types.count(_RAM_PAGING_OUT)

    async def evict_batch(self, count: int) -> int:
        """Nominate, copy and evict up to ``count`` pages; returns how many left.

        Gfns on their way in or out (see the class) are not victims, even if
        the policy picks them: they are ``ram_rw`` for the hypervisor yet, but
        not for the store.  The copies of pages whose evict failed (touched
        since nominate: their frame stays) are discarded.
        """
        candidates = self.client.gfns_view(P2MType.ram_rw)
        busy = self._busy
        victims = [g for g in dict.fromkeys(self.choose_victims(candidates, min(count, self.batch)))
                   if g not in busy]
        if not victims:
            return 0
        busy.update(victims)
        try:
            nominated = [g for g, r in zip(victims, await self.evictor.nominate(victims), strict=True)
                         if r is None]
            if not nominated:
                return 0
            mem = self.client.memory
            assert mem is not None
            copy_out(self.pagefile, mem, nominated)
            results = await self.evictor.evict(nominated)
            kept = [g for g, r in zip(nominated, results, strict=True) if r is not None]
            if kept:
                self.pagefile.discard(kept)
        finally:
            busy.difference_update(victims)
        evicted = len(nominated) - len(kept)
        self.pages_out += evicted
        self._resident -= evicted  # the eviction loop's estimate, whoever evicted (e.g. room for a load)
        return evicted

    async def load_stranded(self) -> int:
        """Load gfns left ``ram_paging_in`` with no request in sight.

        Under the seed's rule a foreign mapper's populate is lost when the
        ring is full, and a foreign retry of a ``ram_paging_in`` gfn sends no
        new request: without this sweep such a gfn would wait for a guest
        vCPU to touch it.  A gfn seen ``ram_paging_in`` on two consecutive
        sweeps is loaded directly (a request that does turn up later is then
        answered as usual; its response finds ``ram_rw`` and only unpauses).
        """
        now = set(self.client.gfns_of_type(P2MType.ram_paging_in))
        stranded = sorted(now & self._paging_in_seen - self._busy - self._not_loadable())
        self._paging_in_seen = now - set(stranded)
        if not stranded:
            return 0
        total = 0
        for i in range(0, len(stranded), self.load_batch):
            chunk = stranded[i:i + self.load_batch]
            chunk = [g for g in chunk if g not in self._busy]  # a request may have come for it meanwhile
            self._busy.update(chunk)
            try:
                loaded = await self._load(chunk)
                self.stranded_loaded += len(loaded)
                self.pages_in += len(loaded)
                self._paged_in(loaded)
            finally:
                self._busy.difference_update(chunk)
            total += len(loaded)
        return total

    async def evict_loop(self) -> None:
        """Follow the target: evict while above it, otherwise wait for a page-in or a little while.

        The target (a domctl) and the stranded sweep (a scan of the p2m) are
        refreshed once per ``poll_interval``, not on every page-in, and a
        page-in wakes this loop only when it takes the domain above the
        target: the fault path pays neither a domctl round trip nor a task
        switch and a p2m scan per fault.  Between batches the resident count
        is carried forward (minus what was evicted, plus what was paged in)
        rather than counted again: a count of a big guest's p2m costs more
        than a batch.  It is counted afresh after every wait and before
        deciding to wait, so an estimate never keeps the domain off target.
        """
        loop = asyncio.get_running_loop()
        target = 0
        next_poll = 0.0
        initial: Progressbar | None = None
        initial_done = not self.progress
        recount = True
        while True:
            now = loop.time()
            if now >= next_poll:
                await self.retry_unfilled()
                await self.load_stranded()
                target = self._target = await self.evictor.get_target()
                next_poll = now + self.poll_interval
                recount = True  # bounds the drift of the estimate during a long page-out
            counted = recount
            if recount:
                self._resident = self.resident()
                recount = False
            excess = self._resident - target
            if not initial_done:
                # The first page-out down to the target, shown as progress.
                if initial is None and excess > 0:
                    initial = Progressbar(f"dom{self.client.domid}: paging out to the target", excess).__enter__()
                    start_out = self.pages_out
                if initial is not None:
                    initial.update(self.pages_out - start_out)
                if excess <= 0 and counted:
                    if initial is not None:
                        initial.__exit__(None, None, None)
                    initial_done = True
            # Evict whole batches (down to a little below the target) rather
            # than one page per page-in: a batch costs two domctls, whatever its size.
            if excess > 0 and await self.evict_batch(max(excess, min(self.batch, target // 8 + 1))) > 0:
                await asyncio.sleep(0)
                continue  # evict_batch took its pages off the estimate
            if not counted:
                recount = True  # on target by the estimate (or nothing to evict): count before waiting
                continue
            self._paged_in_event.clear()
            try:
                async with asyncio.timeout(max(0.0, next_poll - loop.time())):
                    await self._paged_in_event.wait()
            except TimeoutError:
                pass
            recount = True

    # ------------------------------------------------------------- stopping
    async def page_in_all(self, timeout: float = 60.0) -> None:
        """Bring every page back before the ring goes away.

        Paged gfns (and ones whose populate is in flight) are loaded directly
        from the pagefile, which makes them ``ram_rw`` at once; nominated ones
        still hold their frame: they are copied out and evicted, so that the
        next round loads them (a foreign map would only map them, as on Xen).
        Requests that arrive meanwhile are answered by the serve loop as usual.
        """
        deadline = time.monotonic() + timeout
        client = self.client
        bar: Progressbar | None = None
        total = 0
        while True:
            await self.retry_unfilled()
            waiting = self._not_loadable()
            out = [g for g in client.gfns_of_type(P2MType.ram_paged) + client.gfns_of_type(P2MType.ram_paging_in)
                   if g not in waiting]
            nominated = client.gfns_of_type(P2MType.ram_paging_out)
            if self.progress:
                if bar is None:
                    total = len(out) + len(nominated)
                    bar = Progressbar(f"dom{client.domid}: paging everything in", total).__enter__()
                bar.update(total - len(out) - len(nominated))
            if not out and not nominated and not waiting:
                if bar is not None:
                    bar.__exit__(None, None, None)
                return
            if time.monotonic() > deadline:
                raise SdkError(f"dom{client.domid}: {len(out) + len(nominated)} pages still out after {timeout}s")
            for i in range(0, len(out), self.load_batch):
                chunk = [g for g in out[i:i + self.load_batch] if g not in self._busy]
                self._busy.update(chunk)
                try:
                    results = await client.domctl.load(chunk, [self.pagefile.read(g) for g in chunk])
                    if abi.Errno.ENOMEM in results:
                        raise SdkError(f"dom{client.domid}: host memory exhausted while paging everything in",
                                       abi.Errno.ENOMEM)
                    loaded = [g for g, r in zip(chunk, results, strict=True) if r is None]
                    self.pages_in += len(loaded)
                    self._paged_in(loaded)
                finally:
                    self._busy.difference_update(chunk)
            if nominated:
                mem = client.memory
                assert mem is not None
                for i in range(0, len(nominated), self.batch):
                    chunk = nominated[i:i + self.batch]
                    copy_out(self.pagefile, mem, chunk)  # the frames are final: nominated pages cannot be written
                    results = await client.domctl.evict(chunk)
                    kept = [g for g, r in zip(chunk, results, strict=True) if r is not None]
                    if kept:
                        self.pagefile.discard(kept)  # touched (or mapped) since: the frame stays, not the copy
            await asyncio.sleep(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve and evict until ``stop`` is set, then page everything in; or until the domain goes.

        The domain going away (its guest exited, it was destroyed or it
        crashed: :class:`~pager.sdk.DomainGone`) is the normal end of a
        pager, as for ``xenpaging``: ``run`` then returns, with the reason in
        :attr:`gone`, rather than raising.  Anything else is raised as it is
        (not wrapped in an ``ExceptionGroup``).
        """
        self.gone = None
        self.evictor = await self.client.open_domctl()
        try:
            async with asyncio.TaskGroup() as tg:
                serve = tg.create_task(self.serve(), name="serve")
                evict = tg.create_task(self.evict_loop(), name="evict")
                await stop.wait()
                evict.cancel()
                log.info("dom%d: stopping, paging everything back in", self.client.domid)
                await self.page_in_all()
                serve.cancel()
            await self.drain_unanswered()
        except BaseExceptionGroup as group:
            gone, rest = group.split(DomainGone)
            if rest is not None:
                raise _first(rest)  # noqa: B904 - the group stays the exception's __context__
            assert gone is not None
            self.gone = _first(gone)
            log.info("dom%d: %s", self.client.domid, self.gone)
        finally:
            if self.evictor is not self.client.domctl:  # the ring's own connection is the client's to close
                await self.evictor.close()
            self.evictor = self.client.domctl

    async def drain_unanswered(self) -> None:
        """Answer every request left on the ring before it is disabled.

        The serve task may have been cancelled between taking a batch and
        answering it; a request left unanswered at disable would keep its
        vCPU paused for good.  Publish what was answered, take back what was
        taken but not answered, and serve until the ring is empty.
        """
        await self.client.push()
        if self.client.rewind_unanswered():
            log.info("dom%d: answering requests a cancelled serve had taken", self.client.domid)
        while batch := self.client.take_requests():
            await self.handle_batch(batch)
        await self.client.push()

    def summary(self) -> dict[str, int]:
        """Counters of this run (printed by the pagers as one JSON line)."""
        return {"pages_out": self.pages_out, "pages_in": self.pages_in, "requests": self.requests,
                "evict_failed": self.evict_failed, "drops": self.drops,
                "stranded_loaded": self.stranded_loaded}
