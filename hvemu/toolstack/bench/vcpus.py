"""A bench-only guest: the guest's own memory access and exit path, driven by the benchmark.

It uses :class:`guest.memory.GuestMemory` and the same exit path as
``python -m guest`` (each vCPU's slot of the ioreq page and its event
channel, :mod:`guest.exits`), but runs the access pattern a benchmark needs
instead of a workload:

``floor``
    vCPU 0 exits on one gfn again and again (the daemon is
    :mod:`hvemu.toolstack.bench.nulld`, which took every right from it and answers each
    violation without giving one back, so every access exits).  One sample is one exit's round
    trip plus the failed direct access after it: exactly what a real fault
    costs minus the paging work.  After the warm-up it says ``warm`` and waits
    for ``go``, so that the benchmark reads every process's CPU time around
    the timed exits only.  Waits for ``exit`` (or EOF) before leaving.
``pages``
    Writes a stamped page to every gfn (all resident), says so, waits for
    ``go`` on stdin, then reads every gfn back with ``--vcpus`` vCPUs
    concurrently (each its own slice), verifying each stamp; reports the wall
    time.  The pages are evicted in between by the benchmark's pager, so every
    read is a page-in.  Waits for ``exit`` (or EOF) before leaving, so the
    benchmark can read the domain's counters first.

Prints one JSON object per phase on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import time
from typing import Any

import uvloop

from guest.exits import ExitPort, connect_vcpu
from guest.memory import GuestMemory, open_guest
from guest.stamp import StampError, make_page, verify_page
from hvemu import abi, protocol
from hvemu.client import ControlClient
from hvemu.toolstack.bench.common import latency_summary


class BenchGuest:
    def __init__(self, main: ControlClient, mem: GuestMemory, conns: list[ControlClient],
                 ports: list[ExitPort]) -> None:
        self.main = main
        self.mem = mem
        self.conns = conns
        self.ports = ports
        self.faults = 0
        self.integrity_failures = 0
        self.errors: list[str] = []
        self.latencies: list[int] = []

    @classmethod
    async def open(cls, path: str, domid: int, vcpus: int) -> BenchGuest:
        main, mem, reply = await open_guest(path, domid)
        guest = cls(main, mem, [], [])
        assert mem.ioreq is not None
        try:
            for i in range(vcpus):
                conn, port = await connect_vcpu(path, domid, i, mem.ioreq)
                guest.conns.append(conn)
                guest.ports.append(port)
        except BaseException:
            await guest.close()
            raise
        return guest

    async def close(self) -> None:
        for p in self.ports:
            p.close()
        for c in self.conns:
            await c.close()
        await self.main.close()
        self.mem.close()

    async def write(self, vcpu: int, gfn: int, version: int) -> None:
        page = make_page(gfn, version)
        while not self.mem.try_write(vcpu, gfn, page):
            await self.ports[vcpu].access(gfn, abi.ACCESS_W)

    async def read(self, vcpu: int, gfn: int, version: int) -> None:
        start = 0
        while (data := self.mem.try_read(vcpu, gfn)) is None:
            if not start:
                start = time.perf_counter_ns()
            await self.ports[vcpu].access(gfn, abi.ACCESS_R)
        if start:
            self.faults += 1
            self.latencies.append(time.perf_counter_ns() - start)
        try:
            verify_page(data, gfn, version)
        except StampError as exc:
            self.integrity_failures += 1
            if len(self.errors) < 10:
                self.errors.append(str(exc))


async def _floor(guest: BenchGuest, gfn: int, iterations: int, warmup: int,
                 stdin: asyncio.StreamReader) -> dict[str, Any]:
    port = guest.ports[0]
    mem = guest.mem
    clock = time.perf_counter_ns

    async def exits(n: int) -> list[int]:
        samples: list[int] = []
        for _ in range(n):
            t0 = clock()
            await port.access(gfn, abi.ACCESS_R)
            if mem.try_read(0, gfn) is not None:
                raise RuntimeError(f"gfn {gfn} became readable: the floor's daemon must not restore its rights")
            samples.append(clock() - t0)
        return samples

    await exits(warmup)
    _emit({"phase": "warm"})
    if (await stdin.readline()).decode().strip() != "go":
        raise RuntimeError("the benchmark did not say go")
    return {"phase": "floor", **latency_summary(await exits(iterations))}


async def _pages(guest: BenchGuest, vcpus: int, stdin: asyncio.StreamReader) -> None:
    gfns = guest.mem.gfns
    for g in range(gfns):
        await guest.write(0, g, 1)
    _emit({"phase": "filled", "pages": gfns})
    line = (await stdin.readline()).decode().strip()
    if line != "go":
        return
    slices = [range(i * gfns // vcpus, (i + 1) * gfns // vcpus) for i in range(vcpus)]

    async def run(vcpu: int) -> None:
        for g in slices[vcpu]:
            await guest.read(vcpu, g, 1)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(vcpus)))
    elapsed = time.perf_counter() - t0
    _emit({"phase": "read", "pages": gfns, "elapsed_s": elapsed, "faults": guest.faults,
           "integrity_failures": guest.integrity_failures, "errors": guest.errors,
           "latency": latency_summary(guest.latencies)})
    await stdin.readline()  # "exit" or EOF


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _stdin() -> asyncio.StreamReader:
    """stdin as a stream; when it is not a pipe (a terminal, /dev/null) a stream already at EOF.

    (uvloop aborts the process when asked to read a pipe that is a character device.)
    """
    reader = asyncio.StreamReader()
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    else:
        reader.feed_eof()
    return reader


async def _main(args: argparse.Namespace) -> None:
    guest = await BenchGuest.open(protocol.socket_path(args.run_dir), args.domid, args.vcpus)
    try:
        if args.mode == "floor":
            stdin = await _stdin()
            _emit(await _floor(guest, args.gfn, args.iterations, args.warmup, stdin))
            await stdin.readline()  # "exit" or EOF: the domain lives until the benchmark has read its counters
        else:
            await _pages(guest, args.vcpus, await _stdin())
    finally:
        await guest.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.vcpus", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["floor", "pages"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--gfn", type=int, default=0, help="floor: the gfn (no rights) to exit on")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    args = p.parse_args(argv)
    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
