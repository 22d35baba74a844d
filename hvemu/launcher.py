"""``scripts/run.sh``: a whole emulated host, started, measured and stopped.

Starts a hypervisor with a host budget smaller than the guests' memory (so
paging really happens), creates the domains, attaches a pager to each, runs a
guest per domain, and when the guests have run their workload (and verified
every page they wrote), stops the pagers cleanly (which pages everything back
in), reads the hypervisor's counters, stops the guests and the hypervisor, and
prints a summary per domain.  Every process is a child of this one and is
stopped on any exit path, Ctrl-C included; the run directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from typing import Any

import uvloop

import hvemu
from hvemu import abi, protocol
from hvemu.bench.common import parse_cpus
from hvemu.core.domain import MAX_VCPUS
from hvemu.procs import child_setup, stop_process
from hvemu.transport import Connection, ControlError
from pager.defaults import EVICT_BATCH

MiB = 1 << 20


class Child:
    """A child process whose stdout we read line by line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @classmethod
    async def start(cls, name: str, *argv: str, cpus: set[int] | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(sys.executable, *argv, stdout=asyncio.subprocess.PIPE,
                                                    start_new_session=True, preexec_fn=child_setup(cpus))
        return cls(name, proc)

    async def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        return line.decode().strip()

    async def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (0: none, just wait) and wait; kill after ``timeout``."""
        return await stop_process(self.proc, sig=sig, timeout=timeout) or 0

    async def output(self) -> str:
        assert self.proc.stdout is not None
        return (await self.proc.stdout.read()).decode()


async def start_hypervisor(run_dir: str, memory_mib: float, policy: str, *, cpus: set[int] | None = None,
                           verbose: int = 0) -> Child:
    """Start ``hvemu.daemon`` and return once its control socket answers."""
    args = ["-m", "hvemu.daemon", "--run-dir", run_dir, "--memory", str(memory_mib), "--policy", policy]
    args += ["-v"] * verbose
    hv = await Child.start("hypervisor", *args, cpus=cpus)
    path = protocol.socket_path(run_dir)
    for _ in range(200):
        if hv.proc.returncode is not None:
            raise RuntimeError(f"hypervisor exited with status {hv.proc.returncode}")
        if os.path.exists(path):
            try:
                conn = await Connection.connect(path)
            except OSError:
                pass
            else:
                await conn.close()
                return hv
        await asyncio.sleep(0.05)
    await hv.stop()
    raise RuntimeError("hypervisor did not start listening within 10 s")


async def _wait_ring(tool: Connection, domid: int, pager: Child, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pager.proc.returncode is not None:
            raise RuntimeError(f"pager of domain {domid} exited with status {pager.proc.returncode}")
        reply, _ = await tool.call(protocol.Stats(domid=domid))
        assert isinstance(reply, protocol.StatsReply)
        paging = reply.stats.get("paging", {})
        if isinstance(paging, dict) and paging.get("enabled"):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"pager of domain {domid} did not attach within {timeout} s")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: everything was stopped."""


async def scenario_with_signals(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`scenario`, stopped cleanly by SIGINT/SIGTERM (even when a shell left SIGINT ignored)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    caught: list[int] = []

    def stop(sig: int) -> None:
        caught.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await scenario(args)
    except asyncio.CancelledError:
        if caught:
            raise Interrupted(signal.Signals(caught[0]).name) from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = tempfile.mkdtemp(prefix="hvemu-run-")
    os.chmod(run_dir, 0o700)
    _say(f"run.sh: run directory {run_dir} (watch with: {hvemu_command()} --run-dir {shlex.quote(run_dir)} top)")
    children: list[Child] = []
    try:
        hv = await start_hypervisor(run_dir, args.host_memory, args.policy, cpus=args.cpus)
        children.append(hv)
        tool = await Connection.connect(protocol.socket_path(run_dir))
        await tool.call(protocol.ToolHello(client="run.sh"))
        gfns = int(args.memory * MiB) // abi.PAGE_SIZE
        target = int(args.target * MiB) // abi.PAGE_SIZE
        domids: list[int] = []
        pagers: dict[int, Child] = {}
        guests: dict[int, Child] = {}
        for i in range(args.domains):
            reply, _ = await tool.call(protocol.DomainCreate(max_vcpus=args.vcpus, gfns=gfns, name=f"guest{i}"))
            assert isinstance(reply, protocol.DomainCreated)
            domids.append(reply.domid)
            await tool.call(protocol.SetTarget(domid=reply.domid, pages=target))
        for domid in domids:
            pager = await Child.start(f"pager{domid}", "-m", "pager.xenpaging", "--domid", str(domid),
                                      "--run-dir", run_dir, "--pagefile",
                                      os.path.join(run_dir, f"dom{domid}.pagefile"),
                                      "--batch", str(args.batch), "--progress", "off", cpus=args.cpus)
            children.append(pager)
            pagers[domid] = pager
            await _wait_ring(tool, domid, pager)
        for domid in domids:
            guest = await Child.start(f"guest{domid}", "-m", "guest", "--domid", str(domid), "--run-dir",
                                      run_dir, "--duration", str(args.duration), "--pattern", args.pattern,
                                      "--write-ratio", str(args.write_ratio), "--seed", str(args.seed + domid),
                                      "--linger", cpus=args.cpus)
            children.append(guest)
            guests[domid] = guest
        reports: dict[int, dict[str, Any]] = {}
        for domid, guest in guests.items():
            line = await guest.readline(timeout=args.duration + 120)
            if not line:
                raise RuntimeError(f"guest of domain {domid} exited with status {await guest.stop()}")
            reports[domid] = json.loads(line)
        hv_stats: dict[int, dict[str, Any]] = {}
        for domid in domids:
            reply, _ = await tool.call(protocol.Stats(domid=domid))
            assert isinstance(reply, protocol.StatsReply)
            hv_stats[domid] = dict(reply.stats)
        # Shut the guests down (their domains are destroyed); each pager then
        # sees its domain gone and exits on its own, printing its summary.
        # (Paging everything back in is impossible on an overcommitted host.)
        guest_status = {domid: await g.stop() for domid, g in guests.items()}
        pager_summaries: dict[int, dict[str, Any]] = {}
        for domid, pager in pagers.items():
            status = await pager.stop(timeout=30, sig=0)
            out = (await pager.output()).strip().splitlines()
            pager_summaries[domid] = json.loads(out[-1]) if out else {}
            pager_summaries[domid]["exit_status"] = status
        await tool.close()
        domains = []
        for domid in domids:
            rep, pg, st = reports[domid], pager_summaries[domid], hv_stats[domid]
            lat = rep.get("latency_us", {})
            domains.append({
                "domid": domid, "vcpus": args.vcpus, "faults": rep["faults"],
                "fault_p50_us": lat.get("p50", 0.0), "fault_p99_us": lat.get("p99", 0.0),
                "fault_max_us": lat.get("max", 0.0), "accesses": rep["accesses"],
                "pages_out": pg.get("pages_out", 0), "pages_in": pg.get("pages_in", 0),
                "events_lost": int(st["events_lost"]), "events_put": int(st["events_put"]),
                "integrity_failures": rep["integrity_failures"],
                "pager_exit": pg.get("exit_status", -1), "guest_exit": guest_status[domid],
            })
        ok = all(d["integrity_failures"] == 0 and d["pager_exit"] == 0 and d["guest_exit"] == 0
                 and d["events_lost"] == 0 for d in domains)
        return {"ok": ok, "host_memory_mib": args.host_memory, "policy": args.policy,
                "duration_s": args.duration, "domains": domains}
    finally:
        for child in reversed(children):
            await child.stop(timeout=20)
        shutil.rmtree(run_dir, ignore_errors=True)


def hvemu_command(python: str | None = None) -> str:
    """``hvemu`` as a shell can run it from anywhere, outside the venv too.

    The ``hvemu`` script beside this interpreter (``.venv/bin/hvemu``, which
    ``scripts/run.sh`` uses) by its full path; else this interpreter running
    ``hvemu.cli``, told where the package is.
    """
    python = python or sys.executable
    script = os.path.join(os.path.dirname(python), "hvemu")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return shlex.quote(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hvemu.__file__)))
    return f"PYTHONPATH={shlex.quote(root)} {shlex.quote(python)} -m hvemu.cli"


def _say(line: str) -> None:
    """One line on stderr; a reader that went away is no reason to stop (or to print a traceback)."""
    with contextlib.suppress(BrokenPipeError):
        print(line, file=sys.stderr, flush=True)


#: The exit status when stdout's reader went away (``run.sh | head -1``): a shell's status for SIGPIPE.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def _stdout_closed() -> int:
    """Send what is still buffered for stdout to /dev/null (the final flush cannot fail) and say so by status."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE_CLOSED


def _print_table(summary: dict[str, Any]) -> None:
    cols = ["domid", "vcpus", "faults", "fault_p50_us", "fault_p99_us", "pages_out", "pages_in",
            "events_lost", "integrity_failures"]
    print(" ".join(f"{c:>18}" for c in cols))
    for d in summary["domains"]:
        print(" ".join(f"{d[c]:>18}" for c in cols))
    print(f"integrity {'OK' if summary['ok'] else 'FAILED'}  (host {summary['host_memory_mib']} MiB, "
          f"{summary['policy']} policy, {summary['duration_s']} s)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none (None: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.sh", formatter_class=_HelpFormatter,
                                description="Run an overcommitted host: hypervisor, guests, pagers.",
                                epilog=f"sizes are MiB (1 MiB = {MiB // abi.PAGE_SIZE} pages of "
                                       f"{abi.PAGE_SIZE // 1024} KiB), times seconds; "
                                       "exit status: 0 ok, 1 failed, 2 an option refused, 130 interrupted, "
                                       "141 stdout closed early")
    p.add_argument("--domains", type=int, default=2, metavar="N",
                   help="number of domains, each with a guest and a pager")
    p.add_argument("--vcpus", type=int, default=4, metavar="N", help=f"vCPUs per domain, 1 to {MAX_VCPUS}")
    p.add_argument("--memory", type=float, default=64, metavar="MIB", help="memory per domain, MiB")
    p.add_argument("--host-memory", type=float, default=96, metavar="MIB",
                   help="host memory budget, MiB; below the domains' total, so paging happens")
    p.add_argument("--target", type=float, default=40, metavar="MIB",
                   help="paging target per domain, MiB (what its pager keeps resident), 0 to --memory")
    p.add_argument("--duration", type=float, default=10, metavar="SECONDS",
                   help="how long each guest runs its workload, seconds")
    p.add_argument("--pattern", choices=["sequential", "uniform", "hotcold", "phases"], default="hotcold",
                   help="the guests' access pattern")
    p.add_argument("--write-ratio", type=float, default=0.3, metavar="R",
                   help="fraction of the guests' accesses that write, 0 to 1")
    p.add_argument("--policy", choices=["seed", "claim"], default="seed",
                   help="mem_event admission policy of the hypervisor")
    p.add_argument("--batch", type=int, default=EVICT_BATCH, metavar="PAGES", help="pages per pager eviction batch")
    p.add_argument("--seed", type=int, default=1, help="workload seed (domain N's guest uses seed + N)")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin every process to these CPUs (taskset -c list: 0, 0,2 or 0-3; CPUs this shell may "
                        "use; default: not pinned)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the summary as JSON to this file (default: none)")
    return p


def _num(value: float) -> str:
    """A number as the user would have typed it (``80``, not ``80.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


#: A ``taskset -c`` list as :func:`~hvemu.bench.common.parse_cpus` reads it: ``0``, ``0,2``, ``0-3,6``.
_CPU_LIST = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*(\d+(\s*-\s*\d+)?)?)*\s*")


def option_problems(args: argparse.Namespace) -> list[str]:
    """One line per option value refused, naming the option and the value (empty: all good).

    Checked before anything is started.  ``--cpus`` is parsed here (and
    normalised to the parsed set in ``args.cpus``) so that an invalid list is
    one message of ours, not taskset's or a child's.
    """
    problems = [f"--{name} {getattr(args, name)} is below 1" for name in ("domains", "vcpus", "batch")
                if getattr(args, name) < 1]
    if args.vcpus > MAX_VCPUS:
        problems.append(f"--vcpus {args.vcpus} is above {MAX_VCPUS} (the hypervisor's limit)")
    # nan and inf pass every comparison below (or make no size at all): refused first, once each.
    finite = {name: math.isfinite(getattr(args, name))
              for name in ("memory", "host_memory", "target", "duration", "write_ratio")}
    problems += [f"--{name.replace('_', '-')} {getattr(args, name)} is not a finite number"
                 for name, ok in finite.items() if not ok]
    for name in ("memory", "host_memory"):
        if finite[name] and getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {_num(getattr(args, name))} MiB is not above 0")
    if finite["memory"] and 0 < args.memory and int(args.memory * MiB) < abi.PAGE_SIZE:
        problems.append(f"--memory {_num(args.memory)} MiB is less than one page ({abi.PAGE_SIZE // 1024} KiB)")
    if finite["target"] and args.target < 0:
        problems.append(f"--target {_num(args.target)} MiB is below 0")
    elif finite["target"] and finite["memory"] and args.memory > 0 and args.target > args.memory:
        problems.append(f"--target {_num(args.target)} MiB is above --memory {_num(args.memory)} MiB")
    if finite["duration"] and args.duration <= 0:
        problems.append(f"--duration {_num(args.duration)} s is not above 0")
    if finite["write_ratio"] and not 0 <= args.write_ratio <= 1:
        problems.append(f"--write-ratio {_num(args.write_ratio)} is outside 0..1")
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            problems.append(f"--json {args.json}: no directory {parent} to write it in")
    if args.cpus is not None:
        text = args.cpus
        if not _CPU_LIST.fullmatch(text):
            problems.append(f"--cpus {text!r} is not a CPU list (taskset -c form: 0, 0,2 or 0-3)")
        else:
            try:
                args.cpus = parse_cpus(text)
            except ValueError as exc:  # no CPU at all, or CPUs this process may not use
                problems.append(f"--cpus {text}: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problems = option_problems(args)
    for problem in problems:
        _say(f"run.sh: {problem}")
    if problems:
        return 2
    try:
        summary = uvloop.run(scenario_with_signals(args))
    except (KeyboardInterrupt, Interrupted) as exc:
        _say(f"run.sh: interrupted ({exc or 'SIGINT'}), everything stopped")
        return 130
    except (RuntimeError, OSError, TimeoutError, ControlError) as exc:
        _say(f"run.sh: {exc}")
        return 1
    try:
        _print_table(summary)
        sys.stdout.flush()
        printed = True
    except BrokenPipeError:  # run.sh | head: the --json file is still written
        printed = False
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        except OSError as exc:
            _say(f"run.sh: could not write --json {args.json}: {exc.strerror or exc}")
            return 1
    if not printed:
        return _stdout_closed()
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
