"""``scripts/run.sh``: a whole emulated host, started, measured and stopped.

Starts a hypervisor with a host budget smaller than the guests' memory (so
paging really happens), creates the domains, attaches a pager to each, runs a
guest per domain, and when the guests have run their workload (and verified
every page they wrote), reads the hypervisor's counters, stops the guests
(their domains are destroyed, and each pager exits with its domain), stops
the hypervisor and prints a summary per domain that fits 100 columns.

Every process is a child of this one and is stopped on any exit path:
Ctrl-C, SIGTERM and SIGHUP (the terminal closed) included; the run directory
(and the pagefiles in it) is removed.  Ctrl-C prints the summary of what ran
so far.  Every setting goes into ``--json``'s file, and ``--from FILE`` runs
that file's settings again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from typing import Any

import msgspec
import uvloop

import hvemu
from hvemu import abi, protocol
from hvemu.bench.common import format_cpus, parse_cpus
from hvemu.core.domain import MAX_GFNS, MAX_VCPUS
from hvemu.core.mem_event import POLICIES
from hvemu.procs import child_setup, stop_process
from hvemu.sizes import MiB, Size, SizeError, gib_or_mib, mib_text, parse_size
from hvemu.transport import Connection, ControlError
from pager.defaults import EVICT_BATCH

#: The guests' access patterns (``guest --pattern``).
PATTERNS = ("sequential", "uniform", "hotcold", "phases")
#: Runs longer than this print a progress line every ``--progress`` seconds.
PROGRESS_AFTER_S = 10.0
PROGRESS_EVERY_S = 5.0
#: What one domain's two Python processes (guest and pager) take at least, besides guest memory:
#: ``--domains`` beyond what the host has room for is refused before anything starts.
PROCESS_PAIR_BYTES = 80 * MiB
#: The signals that stop a run cleanly: Ctrl-C, ``kill``, and the terminal going away.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a run depends on: written into ``--json``'s file, read back by ``--from``."""

    domains: int
    vcpus: int
    memory_mib: float
    host_memory_mib: float
    target_mib: float
    duration_s: float
    pattern: str
    write_ratio: float
    policy: str
    batch: int
    seed: int
    #: CPUs every process was pinned to (``taskset -c`` form), None: not pinned.
    cpus: str | None = None
    #: The domains' ring ABI (``abi.RING_ABIS``).
    abi: str = "seed"

    def argv(self) -> list[str]:
        """The ``run.sh`` options that give these settings."""
        argv = ["--domains", str(self.domains), "--vcpus", str(self.vcpus), "--memory", _num(self.memory_mib),
                "--host-memory", _num(self.host_memory_mib), "--target", _num(self.target_mib),
                "--duration", _num(self.duration_s), "--pattern", self.pattern, "--write-ratio",
                _num(self.write_ratio), "--policy", self.policy, "--batch", str(self.batch), "--seed", str(self.seed)]
        argv += ["--abi", self.abi] if self.abi != "seed" else []
        return argv + (["--cpus", self.cpus] if self.cpus else [])


class DomainResult(msgspec.Struct, kw_only=True):
    """One domain's line of the summary (sizes in MiB, rates per second of the guest's run)."""

    domid: int
    vcpus: int
    memory_mib: float
    target_mib: float
    #: Resident when created (below ``memory_mib`` when the host budget was spent: the rest starts paged out).
    resident_start_mib: float
    resident_end_mib: float
    #: Pages that started paged out, before any pager ran: their page-ins have no page-out.
    paged_at_start: int
    elapsed_s: float
    faults: int
    faults_per_s: float
    pages_in: int
    pages_out: int
    pages_in_per_s: float
    pages_out_per_s: float
    fault_p50_us: float
    fault_p99_us: float
    fault_max_us: float
    #: vCPUs paused for ring congestion (the seed's rule), foreign events refused (claim), events lost.
    blocked: int
    refused: int
    events_lost: int
    events_put: int
    accesses: int = 0
    integrity_failures: int = 0
    #: None when the run was interrupted before the process ended.
    pager_exit: int | None = None
    guest_exit: int | None = None


class Summary(msgspec.Struct, kw_only=True):
    ok: bool
    #: False when interrupted: the figures are those of the run so far.
    complete: bool
    settings: Settings
    #: ``scripts/run.sh`` with the options that repeat this run.
    command: str
    domains: list[DomainResult]
    host_memory_mib: float
    policy: str
    duration_s: float


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
            raise RuntimeError(f"the hypervisor {_exit_cause(hv.proc.returncode)} while starting")
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
        paging = (await _stats(tool, domid)).get("paging", {})
        if isinstance(paging, dict) and paging.get("enabled"):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"pager of domain {domid} did not attach within {timeout} s")


async def _stats(tool: Connection, domid: int) -> dict[str, Any]:
    reply, _ = await tool.call(protocol.Stats(domid=domid))
    assert isinstance(reply, protocol.StatsReply)
    return dict(reply.stats)


class Interrupted(Exception):
    """A stop signal arrived: everything was stopped; ``summary`` is the run so far (None: nothing ran yet)."""

    def __init__(self, signame: str, summary: Summary | None) -> None:
        super().__init__(signame)
        self.summary = summary


def _exit_cause(status: int | None) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    if status is not None and status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


class Run:
    """One run's processes and what is known so far (so that an interrupted run can still be summarised)."""

    def __init__(self, settings: Settings, cpus: set[int] | None, progress_every: float = 0.0) -> None:
        self.s = settings
        self.cpus = cpus
        self.progress_every = progress_every
        self.run_dir = ""
        self.children: list[Child] = []
        self.hv: Child | None = None
        self.tool: Connection | None = None
        self.domids: list[int] = []
        self.created: dict[int, dict[str, Any]] = {}
        self.guests: dict[int, Child] = {}
        self.pagers: dict[int, Child] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.started_at = 0.0
        self.elapsed: dict[int, float] = {}

    async def scenario(self) -> Summary:
        """Start everything, let the guests run, and summarise."""
        s = self.s
        self.run_dir = tempfile.mkdtemp(prefix="hvemu-run-")
        os.chmod(self.run_dir, 0o700)
        _say(f"run.sh: run directory {self.run_dir} (watch with: {hvemu_command()} --run-dir "
             f"{shlex.quote(self.run_dir)} top)")
        self.hv = await start_hypervisor(self.run_dir, s.host_memory_mib, s.policy, cpus=self.cpus)
        self.children.append(self.hv)
        self.tool = tool = await Connection.connect(protocol.socket_path(self.run_dir))
        await tool.call(protocol.ToolHello(client="run.sh"))
        gfns = int(s.memory_mib * MiB) // abi.PAGE_SIZE
        target = int(s.target_mib * MiB) // abi.PAGE_SIZE
        for i in range(s.domains):
            reply, _ = await tool.call(protocol.DomainCreate(max_vcpus=s.vcpus, gfns=gfns, name=f"guest{i}",
                                                             abi=s.abi))
            assert isinstance(reply, protocol.DomainCreated)
            self.domids.append(reply.domid)
            await tool.call(protocol.SetTarget(domid=reply.domid, pages=target))
        for domid in self.domids:
            self.created[domid] = await _stats(tool, domid)
        for domid in self.domids:
            pager = await Child.start(f"pager{domid}", "-m", "pager.xenpaging", "--domid", str(domid),
                                      "--run-dir", self.run_dir, "--pagefile",
                                      os.path.join(self.run_dir, f"dom{domid}.pagefile"),
                                      "--batch", str(s.batch), "--progress", "off", cpus=self.cpus)
            self.children.append(pager)
            self.pagers[domid] = pager
            await _wait_ring(tool, domid, pager)
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        for domid in self.domids:
            guest = await Child.start(f"guest{domid}", "-m", "guest", "--domid", str(domid), "--run-dir",
                                      self.run_dir, "--duration", str(s.duration_s), "--pattern", s.pattern,
                                      "--write-ratio", str(s.write_ratio), "--seed", str(s.seed + domid),
                                      "--linger", cpus=self.cpus)
            self.children.append(guest)
            self.guests[domid] = guest
        _say(f"run.sh: {s.domains} guest(s) running for {_num(s.duration_s)} s ({s.pattern}, seed {s.seed}); "
             "Ctrl-C stops them and prints the summary so far")
        await self._wait_reports()
        stats = {domid: await _stats(tool, domid) for domid in self.domids}
        # Shut the guests down (their domains are destroyed); each pager then
        # sees its domain gone and exits on its own, printing its summary.
        guest_status = {domid: await g.stop() for domid, g in self.guests.items()}
        pager_status = {domid: await p.stop(timeout=30, sig=0) for domid, p in self.pagers.items()}
        rows = [self._row(domid, stats[domid], guest_status[domid], pager_status[domid]) for domid in self.domids]
        ok = all(d.integrity_failures == 0 and d.pager_exit == 0 and d.guest_exit == 0 and d.events_lost == 0
                 for d in rows)
        return self._summary(rows, ok=ok, complete=True)

    async def _wait_reports(self) -> None:
        """Each guest's report line; a progress line every few seconds; the hypervisor's death named as such."""
        assert self.hv is not None
        loop = asyncio.get_running_loop()
        hv_exit = asyncio.ensure_future(self.hv.proc.wait())
        progress = asyncio.ensure_future(self._progress())
        try:
            for domid, guest in self.guests.items():
                line_task = asyncio.ensure_future(guest.readline(timeout=self.s.duration_s + 120))
                await asyncio.wait({line_task, hv_exit}, return_when=asyncio.FIRST_COMPLETED)
                if not line_task.done():
                    line_task.cancel()
                    raise RuntimeError(self._hypervisor_died())
                line = line_task.result()
                if not line:
                    status = await guest.stop()
                    if self.hv.proc.returncode is not None:  # the guest only lost it
                        raise RuntimeError(self._hypervisor_died())
                    raise RuntimeError(f"guest of domain {domid} {_exit_cause(status)}")
                self.reports[domid] = json.loads(line)
                self.elapsed[domid] = loop.time() - self.started_at
        finally:
            progress.cancel()
            hv_exit.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress

    def _hypervisor_died(self) -> str:
        assert self.hv is not None
        when = "during the run" if self.started_at else "while the run was starting"
        return f"the hypervisor {_exit_cause(self.hv.proc.returncode)} {when} (its guests and pagers lost it)"

    async def _progress(self) -> None:
        """One line on stderr every ``progress_every`` seconds while the guests run (0: none)."""
        if not self.progress_every or self.tool is None:
            return
        loop = asyncio.get_running_loop()
        last = {domid: await _stats(self.tool, domid) for domid in self.domids}
        last_t = loop.time()
        while True:
            await asyncio.sleep(self.progress_every)
            now = {domid: await _stats(self.tool, domid) for domid in self.domids}
            t = loop.time()
            _say(progress_line(t - self.started_at, self.s.duration_s, last, now, t - last_t))
            last, last_t = now, t

    async def partial(self) -> Summary | None:
        """The summary of the run so far (after a stop signal), from the hypervisor's counters."""
        if not self.started_at or self.tool is None or self.hv is None or self.hv.proc.returncode is not None:
            return None  # the guests never ran (nothing to summarise), or the hypervisor is gone
        elapsed = asyncio.get_running_loop().time() - self.started_at
        rows = []
        for domid in self.domids:
            self.elapsed.setdefault(domid, elapsed)
            rows.append(self._row(domid, await _stats(self.tool, domid), None, None))
        return self._summary(rows, ok=False, complete=False)

    def _row(self, domid: int, st: dict[str, Any], guest_exit: int | None, pager_exit: int | None) -> DomainResult:
        """A domain's result: the hypervisor's counters, and the guest's own report when it made one."""
        created = self.created[domid]
        rep = self.reports.get(domid)
        # The guest measures a fault from its own side (exit to runnable); the hypervisor's histogram is
        # what there is when the guest has not reported.
        lat = (rep or {}).get("latency_us") or st.get("fault_latency_us") or {}
        elapsed = max(self.elapsed.get(domid, 0.0), 1e-9)
        rings = [r for k in abi.RingKind if isinstance(r := st.get(str(k)), dict)]
        faults = int(rep["faults"]) if rep else int(st.get("faults", 0))
        pages_in, pages_out = int(st.get("paged_in", 0)), int(st.get("evicted", 0))
        page_mib = abi.PAGE_SIZE / MiB
        return DomainResult(
            domid=domid, vcpus=self.s.vcpus, memory_mib=int(st["gfns"]) * page_mib,
            target_mib=int(st.get("target", 0)) * page_mib,
            resident_start_mib=int(created["resident"]) * page_mib, resident_end_mib=int(st["resident"]) * page_mib,
            paged_at_start=int(created.get("paged", 0)), elapsed_s=round(elapsed, 3), faults=faults,
            faults_per_s=round(faults / elapsed, 1), pages_in=pages_in, pages_out=pages_out,
            pages_in_per_s=round(pages_in / elapsed, 1), pages_out_per_s=round(pages_out / elapsed, 1),
            fault_p50_us=float(lat.get("p50", 0.0)), fault_p99_us=float(lat.get("p99", 0.0)),
            fault_max_us=float(lat.get("max", 0.0)),
            blocked=sum(int(r.get("blocked_ever", 0)) for r in rings),
            refused=sum(int(r.get("refused", 0)) for r in rings),
            events_lost=int(st.get("events_lost", 0)), events_put=int(st.get("events_put", 0)),
            accesses=int(rep["accesses"]) if rep else 0,
            integrity_failures=int(rep["integrity_failures"]) if rep else 0,
            pager_exit=pager_exit, guest_exit=guest_exit)

    def _summary(self, rows: list[DomainResult], *, ok: bool, complete: bool) -> Summary:
        s = self.s
        return Summary(ok=ok, complete=complete, settings=s, command=shlex.join(["scripts/run.sh", *s.argv()]),
                       domains=rows, host_memory_mib=s.host_memory_mib, policy=s.policy, duration_s=s.duration_s)

    async def close(self) -> None:
        """Stop every process (last started first) and remove the run directory; on every path."""
        if self.tool is not None:
            with contextlib.suppress(OSError):
                await self.tool.close()
        for child in reversed(self.children):
            await child.stop(timeout=20)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def progress_line(t: float, duration: float, before: dict[int, dict[str, Any]], now: dict[int, dict[str, Any]],
                  dt: float) -> str:
    """``run.sh: 15/60 s  1234 faults/s  310 in/s  305 out/s  resident 80.0 MiB  lost 0`` over every domain."""
    def rate(key: str) -> float:
        return sum(int(now[d].get(key, 0)) - int(before.get(d, {}).get(key, 0)) for d in now) / max(dt, 1e-9)

    resident = sum(int(st.get("resident", 0)) for st in now.values()) * abi.PAGE_SIZE
    lost = sum(int(st.get("events_lost", 0)) for st in now.values())
    return (f"run.sh: {t:.0f}/{_num(duration)} s  {rate('faults'):.0f} faults/s  {rate('paged_in'):.0f} pages in/s  "
            f"{rate('evicted'):.0f} out/s  resident {mib_text(resident)} MiB  lost {lost}")


async def run_with_signals(run: Run) -> Summary:
    """:meth:`Run.scenario`, stopped cleanly by a stop signal (even when a shell left SIGINT ignored).

    On a signal the run so far is summarised (if the hypervisor still
    answers) before anything is stopped; a second signal skips that.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    caught: list[int] = []

    def stop(sig: int) -> None:
        caught.append(sig)
        if len(caught) == 1:  # a second signal must not cancel the stopping itself
            task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        try:
            return await run.scenario()
        except (OSError, ControlError, TimeoutError) as exc:
            # A lost connection is the hypervisor's death, whichever step noticed it first: say so.
            if run.hv is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.hv.proc.wait()), 1)
                if run.hv.proc.returncode is not None:
                    raise RuntimeError(run._hypervisor_died()) from exc
            raise
        except asyncio.CancelledError:
            if not caught:
                raise
            task.uncancel()
            summary = None
            with contextlib.suppress(asyncio.CancelledError, OSError, ControlError, TimeoutError):
                summary = await asyncio.wait_for(run.partial(), 10)
            raise Interrupted(signal.Signals(caught[0]).name, summary) from None
        finally:
            await run.close()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


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


#: The summary table, one entry per column: (group over it, header, width, the figure).  One table for
#: the header lines and the rows; at most :data:`SUMMARY_WIDTH` columns wide.
_COLUMNS: list[tuple[str, str, int, Any]] = [
    ("", "dom", 3, lambda d: str(d.domid)),
    ("", "vcpus", 5, lambda d: str(d.vcpus)),
    ("memory, MiB", "size", 6, lambda d: mib_text(d.memory_mib * MiB)),
    ("memory, MiB", "target", 6, lambda d: mib_text(d.target_mib * MiB)),
    ("resident, MiB", "start", 6, lambda d: f"{d.resident_start_mib:.1f}"),
    ("resident, MiB", "end", 6, lambda d: f"{d.resident_end_mib:.1f}"),
    ("per second", "faults", 7, lambda d: f"{d.faults_per_s:.0f}"),
    ("per second", "in", 6, lambda d: f"{d.pages_in_per_s:.0f}"),
    ("per second", "out", 6, lambda d: f"{d.pages_out_per_s:.0f}"),
    ("fault, us", "p50", 7, lambda d: f"{d.fault_p50_us:.0f}"),
    ("fault, us", "p99", 7, lambda d: f"{d.fault_p99_us:.0f}"),
    ("ring events", "blocked", 7, lambda d: str(d.blocked)),
    ("ring events", "refused", 7, lambda d: str(d.refused)),
    ("ring events", "lost", 5, lambda d: str(d.events_lost)),
]
SUMMARY_WIDTH = 100


def summary_lines(summary: Summary) -> list[str]:
    """The summary as printed: a two-line header, a row per domain, what explains the figures, the verdict."""
    groups: list[str] = []
    spans: list[tuple[str, int]] = []
    for group, _, width, _ in _COLUMNS:
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1] + width + 1)
        else:
            spans.append((group, width))
    for group, width in spans:
        groups.append(f"{group:^{width}}" if not group else f"{' ' + group + ' ':-^{width}}")
    lines = [" ".join(groups).rstrip(), " ".join(f"{h:>{w}}" for _, h, w, _ in _COLUMNS)]
    lines += [" ".join(f"{fmt(d):>{w}}" for _, _, w, fmt in _COLUMNS) for d in summary.domains]
    s = summary.settings
    for d in summary.domains:
        if d.paged_at_start:
            lines.append(f"dom {d.domid}: created with {d.resident_start_mib:.1f} of {mib_text(d.memory_mib * MiB)} "
                         f"MiB resident (host budget spent): {d.paged_at_start} pages started out, so in > out")
    if not summary.complete:
        lines.append("interrupted: the figures are those of the run so far (pages not verified by the guests)")
    verdict = "OK" if summary.ok else ("not checked" if not summary.complete else "FAILED")
    lines.append(f"integrity {verdict}  (host {mib_text(s.host_memory_mib * MiB)} MiB, {s.policy} policy, "
                 f"{s.pattern} pattern, {_num(s.duration_s)} s, seed {s.seed}; rates per s of guest run)")
    return lines


def _print_summary(summary: Summary) -> None:
    print("\n".join(summary_lines(summary)))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none (None: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.sh", formatter_class=_HelpFormatter,
                                description="Run an overcommitted host: hypervisor, guests, pagers.",
                                epilog=f"sizes take a unit (512m, 1g, 4096k) and a bare number is MiB (1 MiB = "
                                       f"{MiB // abi.PAGE_SIZE} pages of {abi.PAGE_SIZE // 1024} KiB); times are "
                                       "seconds; exit status: 0 ok, 1 failed, 2 an option refused, 128+N stopped "
                                       "by signal N (130 Ctrl-C, 129 terminal closed, 143 SIGTERM), 141 stdout "
                                       "closed early")
    p.add_argument("--domains", type=int, default=2, metavar="N",
                   help="number of domains, each with a guest and a pager")
    p.add_argument("--vcpus", type=int, default=4, metavar="N", help=f"vCPUs per domain, 1 to {MAX_VCPUS}")
    p.add_argument("--memory", default="64", metavar="SIZE", help="memory per domain, MiB")
    p.add_argument("--host-memory", default="96", metavar="SIZE",
                   help="host memory budget, MiB; below the domains' total, so paging happens")
    p.add_argument("--target", default="40", metavar="SIZE",
                   help="paging target per domain, MiB (what its pager keeps resident), 0 to --memory")
    p.add_argument("--duration", type=float, default=10, metavar="SECONDS",
                   help="how long each guest runs its workload, seconds")
    p.add_argument("--pattern", choices=PATTERNS, default="hotcold", help="the guests' access pattern")
    p.add_argument("--write-ratio", type=float, default=0.3, metavar="R",
                   help="fraction of the guests' accesses that write, 0 to 1")
    p.add_argument("--policy", choices=POLICIES, default=POLICIES[0],
                   help="mem_event admission policy of the hypervisor")
    p.add_argument("--abi", choices=abi.RING_ABIS, default=abi.DEFAULT_RING_ABI,
                   help="the domains' ring ABI: the seed's mem_event, Xen 4.2.0's, or Xen 4.17's vm_event")
    p.add_argument("--batch", type=int, default=EVICT_BATCH, metavar="PAGES", help="pages per pager eviction batch")
    p.add_argument("--seed", type=int, default=1, help="workload seed (domain N's guest uses seed + N)")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin every process to these CPUs (taskset -c list: 0, 0,2 or 0-3; CPUs this shell may "
                        "use; default: not pinned)")
    p.add_argument("--progress", type=float, default=None, metavar="SECONDS",
                   help=f"a progress line on stderr every SECONDS while the guests run (default: every "
                        f"{_num(PROGRESS_EVERY_S)} s on runs longer than {_num(PROGRESS_AFTER_S)} s; 0: none)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the summary, with every setting, as JSON to this file (default: none)")
    p.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                   help="run again with the settings of a --json file (options given as well override them)")
    return p


def _num(value: float) -> str:
    """A number as the user would have typed it (``80``, not ``80.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


#: A ``taskset -c`` list as :func:`~hvemu.bench.common.parse_cpus` reads it: ``0``, ``0,2``, ``0-3,6``.
_CPU_LIST = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*(\d+(\s*-\s*\d+)?)?)*\s*")


def _mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def option_problems(args: argparse.Namespace) -> list[str]:
    """One line per option value refused, naming the option and the value as typed (empty: all good).

    Checked before anything is started, including what only the hypervisor
    or the host would refuse later (a domain bigger than the hypervisor
    allows, more domains than the host has memory for their processes).
    The sizes are parsed here (``args.memory`` etc. become :class:`Size`),
    and ``--cpus`` too (``args.cpus`` becomes the set of CPUs), so that an
    invalid value is one message of ours, not taskset's or a child's.
    """
    problems = [f"--{name} {getattr(args, name)} is below 1" for name in ("domains", "vcpus", "batch")
                if getattr(args, name) < 1]
    if args.vcpus > MAX_VCPUS:
        problems.append(f"--vcpus {args.vcpus} is above {MAX_VCPUS} (the hypervisor's limit)")
    sizes: dict[str, Size | None] = {}
    for name in ("memory", "host_memory", "target"):
        try:
            sizes[name] = parse_size(getattr(args, name))
        except SizeError as exc:
            sizes[name] = None
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} {exc}")
    for name in ("duration", "write_ratio"):
        if not _finite(getattr(args, name)):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is not a finite number")
    memory, host, target = sizes["memory"], sizes["host_memory"], sizes["target"]
    for name, size in (("memory", memory), ("host-memory", host)):
        if size is not None and size.bytes <= 0:
            problems.append(f"--{name} {size} is not above 0")
    if memory is not None and memory.bytes > 0:
        if memory.pages < 1:
            problems.append(f"--memory {memory} is less than one page ({abi.PAGE_SIZE // 1024} KiB)")
        elif memory.pages > MAX_GFNS:
            problems.append(f"--memory {memory} is above the {gib_or_mib(MAX_GFNS * abi.PAGE_SIZE)} the "
                            "hypervisor gives a domain")
    if target is not None and target.bytes < 0:
        problems.append(f"--target {target} is below 0")
    elif target is not None and memory is not None and memory.bytes > 0 and target.bytes > memory.bytes:
        problems.append(f"--target {target} is above --memory {memory}")
    if _finite(args.duration) and args.duration <= 0:
        problems.append(f"--duration {_num(args.duration)} s is not above 0")
    if _finite(args.write_ratio) and not 0 <= args.write_ratio <= 1:
        problems.append(f"--write-ratio {_num(args.write_ratio)} is outside 0..1")
    if args.progress is not None and not (_finite(args.progress) and args.progress >= 0):
        problems.append(f"--progress {args.progress} is not a number of seconds (0: none)")
    available = _mem_available()
    if available is not None and host is not None and host.bytes > available:
        problems.append(f"--host-memory {host} is above the {gib_or_mib(available)} this host has available")
    elif available is not None and host is not None and args.domains >= 1:
        needed = args.domains * PROCESS_PAIR_BYTES + max(host.bytes, 0)
        if needed > available:
            problems.append(f"--domains {args.domains} needs about {gib_or_mib(needed)} for its "
                            f"{2 * args.domains} guest and pager processes and the host budget; this host has "
                            f"{gib_or_mib(available)} available")
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
    if not problems:
        args.memory, args.host_memory, args.target = memory, host, target
    return problems


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of checked options (:func:`option_problems` found nothing)."""
    return Settings(domains=args.domains, vcpus=args.vcpus, memory_mib=args.memory.mib,
                    host_memory_mib=args.host_memory.mib, target_mib=args.target.mib, duration_s=args.duration,
                    pattern=args.pattern, write_ratio=args.write_ratio, policy=args.policy, batch=args.batch,
                    seed=args.seed, cpus=format_cpus(args.cpus) if args.cpus is not None else None, abi=args.abi)


def _from_file(path: str) -> list[str]:
    """The options that repeat the run a ``--json`` file describes."""
    try:
        with open(path, "rb") as f:
            data = msgspec.json.decode(f.read())
        return msgspec.convert(data["settings"], Settings).argv()
    except OSError as exc:
        raise ValueError(f"--from {path}: {exc.strerror}") from exc
    except KeyError as exc:
        raise ValueError(f"--from {path}: not a run.sh --json file (no settings)") from exc
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"--from {path}: not a run.sh --json file ({exc})") from exc


def _write_json(path: str, summary: Summary) -> bool:
    try:
        with open(path, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n")
    except OSError as exc:
        _say(f"run.sh: could not write --json {path}: {exc.strerror or exc}")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.from_file is not None:
        try:
            argv = _from_file(args.from_file) + argv
        except ValueError as exc:
            _say(f"run.sh: {exc}")
            return 2
        args = _parser().parse_args(argv)
    problems = option_problems(args)
    for problem in problems:
        _say(f"run.sh: {problem}")
    if problems:
        return 2
    settings = settings_of(args)
    progress = args.progress if args.progress is not None else (
        PROGRESS_EVERY_S if settings.duration_s > PROGRESS_AFTER_S else 0.0)
    run = Run(settings, args.cpus, progress)
    status = 0
    try:
        summary = uvloop.run(run_with_signals(run))
    except Interrupted as exc:
        status = 128 + signal.Signals[str(exc)].value
        if exc.summary is None:
            _say(f"run.sh: interrupted ({exc}) before the guests ran, everything stopped")
            return status
        summary = exc.summary
        _say(f"run.sh: interrupted ({exc}), everything stopped; the summary of the run so far follows")
    except KeyboardInterrupt:
        _say("run.sh: interrupted (SIGINT), everything stopped")
        return 130
    except (RuntimeError, OSError, TimeoutError, ControlError) as exc:
        _say(f"run.sh: {exc}")
        return 1
    try:
        _print_summary(summary)
        sys.stdout.flush()
        printed = True
    except BrokenPipeError:  # run.sh | head: the --json file is still written
        printed = False
    if args.json and not _write_json(args.json, summary):
        return 1
    if not printed:
        return _stdout_closed()
    return status or (0 if summary.ok else 1)


if __name__ == "__main__":
    sys.exit(main())
