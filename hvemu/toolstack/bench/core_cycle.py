"""The contract's own work per fault, with no I/O: the sans-I/O core and the rings, driven in one process.

``python -m hvemu.toolstack.bench.core_cycle --iterations N`` runs ``N`` faults
through :class:`hvemu.core.hypervisor.Hypervisor` as the hypervisor process
does, minus every fd: a vCPU touches a paged-out gfn (``guest_access``:
``p2m_mem_paging_populate``, ``put_request``), the daemon's back ring takes
the request and answers it with the page staged (``get_request``,
``put_response``, the push), the hypervisor loads the page
(``p2m_mem_paging_load``: allocate, copy 4 KiB, retype) and resumes the ring
(``mem_event_resume``: the response, the unpause, the effects).  Then the
steady state's other half: the gfn is paged out again (``nominate``, the
page copied out, ``evict``), in batches of ``--batch``.

Why it is measured: the fault path cannot cost less than this work plus the
hops the relay floor (:mod:`hvemu.toolstack.bench.relay`) makes, so
``core_vs_relay_p50`` (this per fault over the relay's p50) says how much of
the 1.5x target the contract's own Python work uses before any byte moves
between processes.  It is the system's own code: never a floor.

Prints one JSON object: CPU (``time.process_time``) per fault of each part.
"""

from __future__ import annotations

import argparse
import json
import time

from hvemu import abi
from hvemu.abi import MemEvent, MemEventCodec, RingKind
from hvemu.core.hypervisor import Hypervisor
from hvemu.ring import BackRing, SharedRing

_PAGE = bytes(range(256)) * (abi.PAGE_SIZE // 256)


def run(iterations: int, batch: int) -> dict[str, float]:
    gfns = max(batch, 64) * 2
    hv = Hypervisor(gfns, policy="seed")
    dom = hv.create_domain(1, gfns)
    page = bytearray(abi.PAGE_SIZE)
    dom.mem_event_enable(RingKind.paging, page)
    back: BackRing[MemEvent] = BackRing(SharedRing(page, MemEventCodec,
                                                   page_size=abi.ring_bytes(dom.rings_size(RingKind.paging))))
    memory = bytearray(gfns * abi.PAGE_SIZE)
    staged = memoryview(bytearray(_PAGE))
    out = bytearray(abi.PAGE_SIZE)

    def fill(gfn: int) -> None:
        memory[gfn * abi.PAGE_SIZE:(gfn + 1) * abi.PAGE_SIZE] = staged

    def page_out(batch_gfns: list[int]) -> None:
        dom.paging_nominate(batch_gfns)
        for g in batch_gfns:
            out[:] = memory[g * abi.PAGE_SIZE:(g + 1) * abi.PAGE_SIZE]
        dom.paging_evict(batch_gfns)
        hv.take_effects()

    pool = list(range(gfns))
    page_out(pool)
    fault_s = evict_s = 0.0
    done = 0
    while done < iterations:
        todo = pool[:min(batch, iterations - done)]
        t0 = time.process_time()
        for g in todo:
            dom.guest_access(0, g, abi.ACCESS_R, None, 0)
            hv.take_effects()
            req = back.get_request()
            back.put_response(MemEvent(type=req.type, flags=req.flags, vcpu_id=req.vcpu_id, gfn=req.gfn,
                                       p2mt=req.p2mt))
            back.push_responses_and_check_notify()
            dom.paging_load([g], fill)
            dom.mem_event_resume(RingKind.paging)
            hv.take_effects()
        t1 = time.process_time()
        page_out(todo)
        evict_s += time.process_time() - t1
        fault_s += t1 - t0
        done += len(todo)
        pool = pool[len(todo):] + todo
    if dom.counters.paged_in < iterations or dom.crashed:
        raise SystemExit(f"core_cycle: {dom.counters.paged_in} of {iterations} faults served")
    return {"n": iterations, "batch": batch, "fault_us": round(fault_s / iterations * 1e6, 2),
            "evict_us": round(evict_s / iterations * 1e6, 2),
            "total_us": round((fault_s + evict_s) / iterations * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.core_cycle", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--batch", type=int, default=16, help="pages per eviction batch")
    args = p.parse_args(argv)
    run(min(args.iterations, 1000), args.batch)  # warm
    print(json.dumps(run(args.iterations, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
