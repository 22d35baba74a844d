"""Defaults of the built-in pager, in one place for every front end that starts one.

``hvemu pager-attach``, ``scripts/run.sh`` and the benchmarks pass these on,
so that what they run is the pager a user gets.  (``scripts/soak.sh`` keeps
its own small batch on purpose: it wants heavy paging on tiny targets.)
"""

#: Pages per eviction batch (nominate, copy, evict).  A batch costs two domctl
#: round trips whatever its size -- some 65 us each on a small VM with the
#: hypervisor and the pager on one CPU -- against ~4 us to copy one page: at
#: 64 pages the round trips add ~2 us to every page, at 256 about 0.5 us.  A
#: larger batch only keeps its pages nominated a little longer (about 1.5
#: ms at 256): a guest touching one of them meanwhile makes that
#: page's evict fail (``EVICT_FAIL``): the page stays, but the vCPU that
#: touched it waits for the pager to answer that request, a fault's round trip.
EVICT_BATCH = 256

#: The victim policy (:mod:`pager.policy`): xenpaging's own, a clock hand
#: sweeping over gfn order.  Its batches are runs of gfns: one hole punched
#: per run in guest memory and sequential pagefile writes.
EVICT_POLICY = "clock"
