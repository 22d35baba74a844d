"""Floors measured beside the system: a bare ring between two processes, and the bare copy to a pagefile.

``python -m hvemu.toolstack.bench.floors ring --duration S [--back-cpus LIST]``
    This process is the front end (as the hypervisor is), a child it starts
    is the back end (as a daemon is); they share one ring page and one event
    channel, built from :mod:`hvemu.ring`, :mod:`hvemu.evtchn` and
    :mod:`hvemu.hypervisor.shm` exactly as the hypervisor and the SDK build theirs.  The
    front keeps the ring full (every free slot filled, one push, one notify
    when ``ring.h`` asks for it), the back answers every request of a drain
    with one push and one notify.  No work, no control socket, no asyncio
    task per request: the most entries per second a ring can carry here, so
    the ceiling of page-in throughput.
``python -m hvemu.toolstack.bench.floors copy --pages N --batch B --dir D``
    Copies ``N`` stamped pages from a shared-memory mapping to a fresh
    :class:`~pager.pagefile.Pagefile`, ``B`` at a time, with the very copy
    loop the pager's eviction runs (:func:`pager.pagefile.copy_out`), minus
    the two domctls per batch: the floor of eviction.

Each prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time

import uvloop

from hvemu import abi
from hvemu.abi import MemEvent, MemEventFlag, MemEventType
from hvemu.evtchn import ChannelClosed, EventChannel
from hvemu.hypervisor.shm import Segment
from hvemu.procs import child_setup
from hvemu.ring import BackRing, FrontRing, SharedRing
from pager.defaults import EVICT_BATCH

PORT = 1


# --------------------------------------------------------------------------
# Ring floor
# --------------------------------------------------------------------------


async def _ring_back(ring_fd: int, evtchn_fd: int) -> None:
    page = mmap.mmap(ring_fd, abi.PAGE_SIZE, mmap.MAP_SHARED)
    os.close(ring_fd)
    sring: SharedRing[MemEvent] = SharedRing(page, abi.MemEventCodec)
    back: BackRing[MemEvent] = BackRing(sring)
    evtchn = EventChannel(evtchn_fd, PORT)
    try:
        while True:
            n = back.unconsumed_requests()
            if n:
                for _ in range(n):
                    back.put_response(back.get_request())
                if back.push_responses_and_check_notify():
                    evtchn.notify()
                continue
            if back.final_check_for_requests():
                continue
            try:
                await evtchn.wait()
            except ChannelClosed:
                return
    finally:
        evtchn.close()
        sring.release()
        page.close()


async def _ring_front(duration: float, back_cpus: str | None) -> dict[str, object]:
    seg = Segment(abi.PAGE_SIZE, tag="bench-ring")
    sring: SharedRing[MemEvent] = SharedRing(seg.map, abi.MemEventCodec)
    sring.init()
    front: FrontRing[MemEvent] = FrontRing(sring)
    local, remote = EventChannel.pair(PORT)
    remote_fd = remote.detach()
    cpus = {int(c) for c in back_cpus.split(",")} if back_cpus else None

    child = subprocess.Popen(
        [sys.executable, "-m", "hvemu.toolstack.bench.floors", "ring-back", "--ring-fd", str(seg.fd),
         "--evtchn-fd", str(remote_fd)],
        pass_fds=(seg.fd, remote_fd), preexec_fn=child_setup(cpus), start_new_session=True)
    os.close(remote_fd)
    req = MemEvent(type=MemEventType.PAGING, flags=MemEventFlag.VCPU_PAUSED, gfn=1)
    done = 0
    kicks = 0
    try:
        # Warm up (the child is still starting): one round trip.
        front.put_request(req)
        if front.push_requests_and_check_notify():
            local.notify()
        while not front.unconsumed_responses():
            await local.wait()
        front.get_response()
        t0 = time.perf_counter()
        end = t0 + duration
        while True:
            for _ in range(front.free_requests()):
                front.put_request(req)
            if front.push_requests_and_check_notify():
                local.notify()
                kicks += 1
            while True:
                n = front.unconsumed_responses()
                if n:
                    for _ in range(n):
                        front.get_response()
                    done += n
                    break
                if front.final_check_for_responses():
                    continue
                await local.wait()
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
    finally:
        local.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        sring.release()
        seg.close()
    return {"entries": done, "elapsed_s": elapsed, "entries_per_s": done / elapsed, "kicks": kicks,
            "ring_size": front.size}


# --------------------------------------------------------------------------
# Copy-to-pagefile floor
# --------------------------------------------------------------------------


def _copy(pages: int, batch: int, directory: str, repeat: int) -> dict[str, object]:
    """The best of ``repeat`` copies, each into a fresh pagefile (noise only ever slows a run down)."""
    from guest.stamp import make_page
    from pager.pagefile import Pagefile, copy_out

    seg = Segment(pages * abi.PAGE_SIZE, tag="bench-copy")
    path = os.path.join(directory, f"floor-{os.getpid()}.pagefile")
    best = float("inf")
    try:
        mem = seg.map
        for g in range(pages):
            mem[g * abi.PAGE_SIZE:(g + 1) * abi.PAGE_SIZE] = make_page(g, 1)
        for _ in range(max(1, repeat)):
            pagefile = Pagefile(path, pages, fresh=True)
            try:
                os.sync()  # no writeback of an earlier copy during this one (each page-out does the same)
                t0 = time.perf_counter()
                for start in range(0, pages, batch):
                    copy_out(pagefile, mem, range(start, min(start + batch, pages)))
                best = min(best, time.perf_counter() - t0)
            finally:
                pagefile.close()
    finally:
        if os.path.exists(path):
            os.unlink(path)
        seg.close()
    return {"pages": pages, "elapsed_s": best, "pages_per_s": pages / best, "repeat": repeat}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.floors", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    ring = sub.add_parser("ring")
    ring.add_argument("--duration", type=float, default=1.0)
    ring.add_argument("--back-cpus", default=None, help="CPUs of the back end (comma list)")
    back = sub.add_parser("ring-back")
    back.add_argument("--ring-fd", type=int, required=True)
    back.add_argument("--evtchn-fd", type=int, required=True)
    copy = sub.add_parser("copy")
    copy.add_argument("--pages", type=int, default=4096)
    copy.add_argument("--batch", type=int, default=EVICT_BATCH)
    copy.add_argument("--dir", required=True)
    copy.add_argument("--repeat", type=int, default=3, help="report the best of this many copies")
    args = p.parse_args(argv)
    if args.what == "ring":
        result = uvloop.run(_ring_front(args.duration, args.back_cpus))
    elif args.what == "ring-back":
        uvloop.run(_ring_back(args.ring_fd, args.evtchn_fd))
        return 0
    else:
        result = _copy(args.pages, args.batch, args.dir, args.repeat)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
