"""The physical floor of a fault: the same hops as hvemu's fault path, done bare.

Three processes, a guest, a hypervisor and a daemon, relay one fault at a time
guest -> hypervisor -> daemon -> hypervisor -> guest over four eventfds (one
per direction and hop), doing only the work no design can avoid:

- the guest writes its exit (vCPU, gfn, access) into a slot in shared memory
  and kicks the hypervisor;
- the hypervisor reads the slot, puts a real 40-byte ``mem_event_st`` request
  (PAGING, VCPU_PAUSED) on a real 4 KiB ring page (layout from
  :mod:`hvemu.abi`) and kicks the daemon;
- the daemon consumes the request, copies the gfn's 4 KiB page from its
  pagefile buffer into shared guest memory, puts the response and kicks back;
- the hypervisor consumes the response, checks it names the paused vCPU and
  its gfn, marks the slot resumed and kicks the guest, which checks that the
  page holds the gfn's stamp (first and last 8 bytes) and clears it, so that
  each check needs a fresh copy.

Nothing of hvemu's ring, event-channel, transport, core or daemon code is on
this path (only :mod:`hvemu.abi`'s constants, so that no offset is written
twice): whatever hvemu does beyond this is its own plumbing.  The ring is
Xen's without notification suppression (one fault in flight, so
``RING_PUSH_*_AND_CHECK_NOTIFY`` would notify every time anyway); the eventfd
write that follows each index store is a syscall, the full barrier ``ring.h``
asks for.

Two modes, the same for all three processes:

``uvloop``
    The hypervisor and the daemon serve from persistent ``add_reader``
    callbacks, as a process multiplexing many domains must; the guest's vCPU
    is a coroutine that awaits a future its persistent reader resolves, as a
    guest whose vCPUs block independently must.
``blocking``
    Every process blocks in ``read(2)`` on its eventfd: no event loop at all,
    the cheapest a Python process can wait.

The guest runs ``--warmup`` faults, prints ``{"phase": "warm"}``, waits for
``go`` on stdin (the benchmark reads every process's CPU time then), runs
``--iterations`` timed faults, prints its report (latencies in ns and the
failed checks) and waits for EOF.  The hypervisor and the daemon serve until
killed.  :func:`make_channels` builds the shared memory and eventfds and
:func:`argv` each role's command line; the benchmark
(:func:`hvemu.toolstack.bench.suites.relay_floor`) starts, pins, measures and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvloop

from hvemu import abi

MODES = ("uvloop", "blocking")
ROLES = ("guest", "hypervisor", "daemon")
#: Guest pages the faults cycle over (each fault copies a different page from the last).
PAGES = 256
PAGE = abi.PAGE_SIZE

# The entry and header layout, taken from the contract module (no offset here).
_FORMAT = {2: "H", 4: "I", 8: "Q"}
ENTRY = struct.Struct("<" + "".join(_FORMAT[size] for _, size in sorted(abi.MEM_EVENT_FIELDS.values())))
assert ENTRY.size == abi.MEM_EVENT_SIZE
RING_SLOTS = abi.ring_size(abi.MEM_EVENT_SIZE)
RING_BASE = abi.RING_ENTRIES_OFFSET
REQ_PROD = abi.REQ_PROD_WORD
RSP_PROD = abi.RSP_PROD_WORD
IDX_MASK = abi.RING_IDX_MASK
PAGING = int(abi.MemEventType.PAGING)
VCPU_PAUSED = int(abi.MemEventFlag.VCPU_PAUSED)
P2MT_PAGED = int(abi.P2MType.ram_paged)
P2MT_RW = int(abi.P2MType.ram_rw)
ACCESS_R = abi.BIT_ACCESS_R

#: The exit slot (one vCPU): vcpu, gfn, access, state.  State: 1 = exited, 2 = resumed, 3 = bad response.
SLOT = struct.Struct("<IQII")
EXITED, RESUMED, BAD_RESPONSE = 1, 2, 3
#: A page's stamp: first and last 8 bytes, never zero for any gfn.
STAMP = struct.Struct("<Q")
MAGIC = 0x5245_4C41_5900_0000  # "RELAY"


def stamp(gfn: int) -> int:
    return MAGIC | gfn


def slot_of(index: int) -> int:
    """Byte offset of ring index ``index`` (free-running u32) on the ring page."""
    return RING_BASE + (index % RING_SLOTS) * ENTRY.size


# --------------------------------------------------------------------------
# Set-up (the benchmark's side)
# --------------------------------------------------------------------------


@dataclass
class Channels:
    """The fds a relay shares: three memfds and four eventfds (read by the named process)."""

    ring: int
    memory: int
    slot: int
    to_hv: int       # guest -> hypervisor: an exit
    to_daemon: int   # hypervisor -> daemon: a request is on the ring
    from_daemon: int  # daemon -> hypervisor: a response is on the ring
    to_guest: int    # hypervisor -> guest: resumed

    def fds(self) -> tuple[int, ...]:
        return (self.ring, self.memory, self.slot, self.to_hv, self.to_daemon, self.from_daemon, self.to_guest)

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


def make_channels(mode: str) -> Channels:
    """Nameless memfds (nothing can be left in ``/dev/shm``) and eventfds, non-blocking for ``uvloop``.

    The fds are inheritable only through ``pass_fds``; the caller closes its
    copies once the three processes have started.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    efd_flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if mode == "uvloop" else 0)
    made: list[int] = []
    try:
        for name, size in (("relay-ring", PAGE), ("relay-memory", PAGES * PAGE), ("relay-slot", PAGE)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            made.append(fd)
            os.ftruncate(fd, size)
        for _ in range(4):
            made.append(os.eventfd(0, efd_flags))
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    return Channels(*made)


def argv(role: str, ch: Channels, mode: str, *, iterations: int = 0, warmup: int = 0) -> list[str]:
    """The interpreter arguments that run ``role`` on ``ch`` (start it with ``pass_fds=ch.fds()``)."""
    out = ["-m", "hvemu.toolstack.bench.relay", role, "--mode", mode, "--fds", ",".join(map(str, ch.fds()))]
    if role == "guest":
        out += ["--iterations", str(iterations), "--warmup", str(warmup)]
    return out


# --------------------------------------------------------------------------
# The three processes
# --------------------------------------------------------------------------


def _map(fd: int, size: int) -> mmap.mmap:
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    os.close(fd)
    return m


def _wake(fd: int, handler: Callable[[], None]) -> Callable[[], None]:
    """A reader callback: consume the eventfd's count (coalesced kicks), then run ``handler``."""
    read = os.eventfd_read

    def readable() -> None:
        try:
            read(fd)
        except BlockingIOError:  # a spurious wake-up
            return
        handler()

    return readable


class Hypervisor:
    """Puts a request for each exit, resumes the vCPU on each response."""

    def __init__(self, ch: Channels) -> None:
        self.page = _map(ch.ring, PAGE)
        self.idx = memoryview(self.page)[:16].cast("I")
        self.slot = _map(ch.slot, PAGE)
        self.ch = ch
        self.rsp_cons = 0
        self.pending = -1  # the gfn vCPU 0 waits for

    def on_exit(self) -> None:
        vcpu, gfn, access, _ = SLOT.unpack_from(self.slot, 0)
        prod = self.idx[REQ_PROD]
        ENTRY.pack_into(self.page, slot_of(prod), PAGING, VCPU_PAUSED, vcpu, gfn, 0, 0, P2MT_PAGED,
                        access, 0)
        self.pending = gfn
        self.idx[REQ_PROD] = (prod + 1) & IDX_MASK
        os.eventfd_write(self.ch.to_daemon, 1)

    def on_response(self) -> None:
        prod = self.idx[RSP_PROD]
        while self.rsp_cons != prod:
            typ, flags, vcpu, gfn, _, _, p2mt, _, _ = ENTRY.unpack_from(self.page, slot_of(self.rsp_cons))
            self.rsp_cons = (self.rsp_cons + 1) & IDX_MASK
            ok = typ == PAGING and flags & VCPU_PAUSED and vcpu == 0 and gfn == self.pending and p2mt == P2MT_RW
            SLOT.pack_into(self.slot, 0, vcpu, gfn, 0, RESUMED if ok else BAD_RESPONSE)
            os.eventfd_write(self.ch.to_guest, 1)

    def serve(self, mode: str) -> None:
        if mode == "blocking":
            # One fault in flight: an exit, then its response, then the next exit.
            read = os.eventfd_read
            while True:
                read(self.ch.to_hv)
                self.on_exit()
                read(self.ch.from_daemon)
                self.on_response()

        async def forever() -> None:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.ch.to_hv, _wake(self.ch.to_hv, self.on_exit))
            loop.add_reader(self.ch.from_daemon, _wake(self.ch.from_daemon, self.on_response))
            await loop.create_future()

        uvloop.run(forever())


class Daemon:
    """Answers each request with the gfn's page copied from its pagefile buffer into guest memory."""

    def __init__(self, ch: Channels) -> None:
        self.page = _map(ch.ring, PAGE)
        self.idx = memoryview(self.page)[:16].cast("I")
        self.memory = _map(ch.memory, PAGES * PAGE)
        self.mem = memoryview(self.memory)
        pagefile = bytearray(PAGES * PAGE)
        for gfn in range(PAGES):
            STAMP.pack_into(pagefile, gfn * PAGE, stamp(gfn))
            STAMP.pack_into(pagefile, (gfn + 1) * PAGE - STAMP.size, stamp(gfn))
        self.pagefile = memoryview(pagefile)
        self.ch = ch
        self.req_cons = 0
        self.rsp_prod = 0

    def on_request(self) -> None:
        prod = self.idx[REQ_PROD]
        page = self.page
        while self.req_cons != prod:
            typ, flags, vcpu, gfn, _, _, p2mt, _, _ = ENTRY.unpack_from(page, slot_of(self.req_cons))
            self.req_cons = (self.req_cons + 1) & IDX_MASK
            if typ == PAGING and p2mt == P2MT_PAGED and gfn < PAGES:
                off = gfn * PAGE
                self.mem[off:off + PAGE] = self.pagefile[off:off + PAGE]
                p2mt = P2MT_RW
            ENTRY.pack_into(page, slot_of(self.rsp_prod), typ, flags & VCPU_PAUSED, vcpu, gfn, 0, 0, p2mt, 0, 0)
            self.rsp_prod = (self.rsp_prod + 1) & IDX_MASK
        self.idx[RSP_PROD] = self.rsp_prod
        os.eventfd_write(self.ch.from_daemon, 1)

    def serve(self, mode: str) -> None:
        if mode == "blocking":
            read = os.eventfd_read
            while True:
                read(self.ch.to_daemon)
                self.on_request()

        async def forever() -> None:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.ch.to_daemon, _wake(self.ch.to_daemon, self.on_request))
            await loop.create_future()

        uvloop.run(forever())


class Guest:
    """vCPU 0 faults on gfn 0, 1, 2, ... (mod :data:`PAGES`), timing each exit to its checked page."""

    def __init__(self, ch: Channels) -> None:
        self.memory = _map(ch.memory, PAGES * PAGE)
        self.slot = _map(ch.slot, PAGE)
        self.ch = ch
        self.gfn = 0
        self.failed = 0
        self.first_error = ""

    def exit(self) -> int:
        """Write the exit into the slot and kick the hypervisor; the gfn."""
        gfn = self.gfn
        self.gfn = (gfn + 1) % PAGES
        SLOT.pack_into(self.slot, 0, 0, gfn, ACCESS_R, EXITED)
        os.eventfd_write(self.ch.to_hv, 1)
        return gfn

    def check(self, gfn: int) -> None:
        """The hypervisor resumed us for ``gfn`` and the page holds its stamp; then clear the stamp."""
        mem = self.memory
        off = gfn * PAGE
        end = off + PAGE - STAMP.size
        _, resumed_gfn, _, state = SLOT.unpack_from(self.slot, 0)
        want = stamp(gfn)
        if state != RESUMED or resumed_gfn != gfn or STAMP.unpack_from(mem, off)[0] != want \
                or STAMP.unpack_from(mem, end)[0] != want:
            self.failed += 1
            if not self.first_error:
                self.first_error = f"gfn {gfn}: slot state {state} for gfn {resumed_gfn}, stamps " \
                                   f"{STAMP.unpack_from(mem, off)[0]:#x}/{STAMP.unpack_from(mem, end)[0]:#x}"
        STAMP.pack_into(mem, off, 0)
        STAMP.pack_into(mem, end, 0)

    def run_blocking(self, n: int) -> list[int]:
        clock = time.perf_counter_ns
        read = os.eventfd_read
        samples = []
        for _ in range(n):
            t0 = clock()
            gfn = self.exit()
            read(self.ch.to_guest)
            self.check(gfn)
            samples.append(clock() - t0)
        return samples

    async def run_uvloop(self, n: int) -> list[int]:
        loop = asyncio.get_running_loop()
        clock = time.perf_counter_ns
        waiting: list[asyncio.Future[None]] = []

        def resumed() -> None:
            if waiting:
                waiting.pop().set_result(None)

        fd = self.ch.to_guest
        loop.add_reader(fd, _wake(fd, resumed))
        samples = []
        try:
            for _ in range(n):
                t0 = clock()
                fut = loop.create_future()
                waiting.append(fut)
                gfn = self.exit()
                await fut
                self.check(gfn)
                samples.append(clock() - t0)
        finally:
            loop.remove_reader(fd)
        return samples

    def run(self, mode: str, n: int) -> list[int]:
        return self.run_blocking(n) if mode == "blocking" else uvloop.run(self.run_uvloop(n))


def _emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def main(cli: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.relay", description=__doc__.split("\n")[0])
    p.add_argument("role", choices=ROLES)
    p.add_argument("--mode", choices=MODES, default="uvloop")
    p.add_argument("--fds", required=True, help="the seven fds of Channels, comma-separated, in order")
    p.add_argument("--iterations", type=int, default=1000, help="guest: timed faults")
    p.add_argument("--warmup", type=int, default=100, help="guest: faults before the timed ones")
    args = p.parse_args(cli)
    ch = Channels(*(int(x) for x in args.fds.split(",")))
    if args.role == "hypervisor":
        Hypervisor(ch).serve(args.mode)
    elif args.role == "daemon":
        Daemon(ch).serve(args.mode)
    else:
        guest = Guest(ch)
        guest.run(args.mode, args.warmup)
        _emit({"phase": "warm"})
        if sys.stdin.readline().strip() != "go":
            return 0
        samples = guest.run(args.mode, args.iterations)
        _emit({"phase": "relay", "mode": args.mode, "samples_ns": samples, "faults": len(samples),
               "failed_checks": guest.failed, "first_error": guest.first_error})
        sys.stdin.readline()  # EOF: the benchmark has read our CPU time
    return 0


if __name__ == "__main__":
    sys.exit(main())
