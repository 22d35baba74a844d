"""The guest process: runs one domain's vCPUs against its shared memory.

Usage: ``python -m guest --domid N [--duration S] [--pattern hotcold] ...``.
It prints a JSON report (per vCPU: accesses, faults, fault latency p50/p99/max,
integrity failures) and exits 1 if any page failed verification, 2 on a usage
error, 3 if the hypervisor went away or the domain crashed under it (the last
line says which).  A domain destroyed by the toolstack (``hvemu destroy``,
``hvemu stop``) is a normal end: the guest says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

import msgspec
import uvloop

from guest.exits import connect_vcpu
from guest.memory import open_guest
from guest.vcpu import Vcpu, VcpuReport
from guest.workload import WorkloadConfig, accesses
from hvemu import logs, protocol, readiness
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError, SyncControlClient, root_cause
from hvemu.histogram import Histogram
from hvemu.names import PATTERNS


class GuestReport(msgspec.Struct):
    domid: int
    ok: bool
    vcpus: list[VcpuReport]
    faults: int = 0
    accesses: int = 0
    integrity_failures: int = 0
    ballooned: int = 0
    latency_us: dict[str, float] = {}
    error: str = ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvemu-guest", description="Run a domain's vCPUs.")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--run-dir", default=None,
                   help="hypervisor run directory (default: the one hvemu uses: $HVEMU_RUN_DIR, "
                        "else $XDG_RUNTIME_DIR/hvemu-UID, else /tmp/hvemu-UID)")
    p.add_argument("--vcpus", type=int, default=0, help="vCPUs to run (default: the domain's max_vcpus)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds to run")
    p.add_argument("--max-accesses", type=int, default=0, help="stop each vCPU after this many accesses")
    p.add_argument("--pattern", choices=PATTERNS, default="hotcold")
    p.add_argument("--write-ratio", type=float, default=0.3)
    p.add_argument("--hot-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--balloon", type=int, default=0, help="give back this many pages halfway through")
    p.add_argument("--trap-every", type=int, default=0, help="write CR3 every N accesses (0: never)")
    p.add_argument("--int3-every", type=int, default=0, help="hit a breakpoint (INT3) every N accesses (0: never)")
    p.add_argument("--exec-every", type=int, default=0,
                   help="fetch instructions from the page just accessed every N accesses (0: never)")
    p.add_argument("--report", default="-", help="where to write the JSON report ('-' = stdout)")
    p.add_argument("--no-verify-all", dest="verify_all", action="store_false",
                   help="skip the final pass that reads back every page written")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--linger", action="store_true",
                   help="after the report, keep the domain alive until SIGTERM/SIGINT")
    return p


class Outcome:
    """What ``main`` needs however the run ends (a signal while lingering too): the report, once written."""

    def __init__(self) -> None:
        self.report: GuestReport | None = None


class HypervisorGone(ConnectionError):
    """The hypervisor closed the guest's connection (it stopped, or destroyed the domain)."""


async def _lifeline(conn: ControlClient, domid: int) -> None:
    """Raise :class:`HypervisorGone` when the domain's connection ends.

    The guest's first connection is never used after its hello, so it
    becoming readable can only mean EOF: the hypervisor is gone or has
    destroyed the domain, and vCPUs that never fault would not notice.
    """
    await readiness.wait_readable(conn.fileno())
    raise HypervisorGone(f"the hypervisor closed domain {domid}'s connection")


async def run_guest(args: argparse.Namespace, outcome: Outcome) -> GuestReport:
    path = protocol.socket_path(args.run_dir)
    main_conn, memory, welcome = await open_guest(path, args.domid)
    args.welcomed = True  # the domain was ours: an ESRCH from now on means it ended under us
    nvcpus = args.vcpus or welcome.max_vcpus
    if not 0 < nvcpus <= welcome.max_vcpus:
        raise ValueError(f"--vcpus must be within 1..{welcome.max_vcpus}")
    if not 0 <= args.balloon < welcome.gfns // 2:
        raise ValueError(f"--balloon must be below half the domain's {welcome.gfns} pages")
    cfg = WorkloadConfig(pattern=args.pattern, write_ratio=args.write_ratio,
                         hot_fraction=args.hot_fraction, seed=args.seed)
    balloon = list(range(welcome.gfns - args.balloon, welcome.gfns))
    usable = list(range(welcome.gfns - args.balloon))
    versions = [0] * welcome.gfns
    conns: list[ControlClient] = []
    vcpus: list[Vcpu] = []
    assert memory.ioreq is not None
    try:
        for i in range(nvcpus):
            conn, port = await connect_vcpu(path, args.domid, i, memory.ioreq)
            conns.append(conn)
            vcpus.append(Vcpu(i, memory, versions, conn, port))
        deadline = time.monotonic() + args.duration
        ballooned = 0
        async with asyncio.TaskGroup() as tg:
            lifeline = tg.create_task(_lifeline(main_conn, args.domid), name="lifeline")
            tasks = [tg.create_task(v.run(accesses(cfg, usable, v.vcpu_id), deadline,
                                          max_accesses=args.max_accesses, trap_every=args.trap_every,
                                          int3_every=args.int3_every, exec_every=args.exec_every))
                     for v in vcpus]
            if balloon:
                await asyncio.sleep(args.duration / 2)
                async with vcpus[0].port.lock:  # vCPU 0 makes the hypercall: it exits for nothing else meanwhile
                    rep = await conns[0].call(protocol.GuestBalloonOut(vcpu=0, gfns=balloon))
                assert isinstance(rep[0], protocol.BatchResult)
                ballooned = sum(1 for r in rep[0].results if r is None)
            await asyncio.gather(*tasks)
            if args.verify_all and vcpus:
                # Read back every page ever written: each must hold its last write.
                checker = vcpus[0]
                for gfn in usable:
                    if versions[gfn]:
                        await checker.read(gfn)
            reports = [t.result() for t in tasks]
            report = outcome.report = _summarise(args.domid, vcpus, reports, ballooned)
            _write_report(args.report, report)
            if args.linger:
                await asyncio.Event().wait()  # until cancelled by SIGTERM/SIGINT
            lifeline.cancel()  # the work is done: the task group ends with it
    finally:
        for v in vcpus:
            v.port.close()
        for c in conns:
            await c.close()
        await main_conn.close()
        memory.close()
    return report


def _summarise(domid: int, vcpus: list[Vcpu], reports: list[VcpuReport], ballooned: int) -> GuestReport:
    hist = Histogram()
    for v in vcpus:
        hist.merge(v.hist)
    failures = sum(r.integrity_failures for r in reports)
    return GuestReport(
        domid=domid, ok=failures == 0, vcpus=reports,
        faults=sum(r.faults for r in reports), accesses=sum(r.accesses for r in reports),
        integrity_failures=failures, ballooned=ballooned, latency_us=hist.summary(scale=1000.0),
    )


def _write_report(dest: str, report: GuestReport) -> None:
    text = json.dumps(msgspec.to_builtins(report), indent=None)
    if dest == "-":
        print(text, flush=True)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


#: Exit status when the domain was destroyed by the toolstack: a normal end.
EXIT_DESTROYED = 0
#: Exit status when the domain crashed or the hypervisor went away.
EXIT_LOST = 3


def _why_gone(args: argparse.Namespace, root: BaseException) -> tuple[str, int]:
    """Why the guest's connection ended, and the exit status that says it.

    The hypervisor is asked, if it still answers: a stopping hypervisor
    destroys its domains and keeps answering a moment for that reason.
    """
    lost = (f"lost the hypervisor ({root})", EXIT_LOST)
    try:
        conn = SyncControlClient.connect(protocol.socket_path(args.run_dir), timeout=10)
    except OSError:
        return lost
    try:
        conn.call(protocol.ToolHello(client="guest:probe"))
        reply, _ = conn.call(protocol.Stats(domid=args.domid))
        if isinstance(reply, protocol.StatsReply) and reply.stats.crashed:
            return "the domain crashed (see the hypervisor's log)", EXIT_LOST
        return f"the hypervisor closed the domain's connection ({root})", EXIT_LOST
    except ControlError as exc:
        if exc.errno == Errno.ESRCH:
            return "the domain was destroyed", EXIT_DESTROYED
        return lost
    except OSError:
        return lost
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("guest", args.verbose)

    outcome = Outcome()

    async def _main() -> GuestReport:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        return await run_guest(args, outcome)

    try:
        report = uvloop.run(_main())
    except asyncio.CancelledError:
        if outcome.report is not None and args.linger:
            return 0 if outcome.report.ok else 1
        print("hvemu-guest: stopped by signal", file=sys.stderr)
        return 3
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one clear line
        root = root_cause(exc)
        if isinstance(root, ValueError):
            print(f"hvemu-guest: {root}", file=sys.stderr)
            return 2
        # ESRCH on a vCPU's exit once the domain was ours: it was destroyed (or crashed) under the guest.
        ended = isinstance(root, ControlError) and root.errno == Errno.ESRCH and getattr(args, "welcomed", False)
        if isinstance(root, ControlError) and not ended:
            print(f"hvemu-guest: domain {args.domid}: {root}", file=sys.stderr)
            return 3
        if ended or isinstance(root, HypervisorGone | ConnectionError | OSError | EOFError):
            # The connection ended (the lifeline saw it, or a vCPU's exit did):
            # ask the hypervisor, if it still answers, what became of the domain.
            why, status = _why_gone(args, root)
            print(f"hvemu-guest: domain {args.domid}: {why}", file=sys.stderr)
            return status
        raise
    if not report.ok:
        for v in report.vcpus:
            for err in v.errors:
                print(f"hvemu-guest: integrity: vcpu {v.vcpu}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
