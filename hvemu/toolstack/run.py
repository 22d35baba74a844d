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

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
from typing import Any

import msgspec
import uvloop

import hvemu
from hvemu import abi
from hvemu.client import ControlClient, ControlError
from hvemu.stats import DomainStats
from hvemu.toolstack.host import Child, Host, guest_argv
from hvemu.toolstack.run_options import (
    PROGRESS_AFTER_S,
    PROGRESS_EVERY_S,
    Settings,
    _from_file,
    _num,
    _parser,
    option_problems,
    settings_of,
)
from hvemu.toolstack.run_summary import DomainResult, Summary, _print_summary, progress_line

#: The signals that stop a run cleanly: Ctrl-C, ``kill``, and the terminal going away.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
        #: The hypervisor, its tool connection and every child, stopped on every exit path (:meth:`close`).
        self.host = Host(memory_mib=settings.host_memory_mib, admission=settings.admission, cpus=lambda role: cpus,
                         client="run.sh", run_dir_prefix="hvemu-run-", inherit_stderr=True, ready_timeout=10)
        self.domids: list[int] = []
        self.created: dict[int, DomainStats] = {}
        self.guests: dict[int, Child] = {}
        self.pagers: dict[int, Child] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.started_at = 0.0
        self.elapsed: dict[int, float] = {}

    async def scenario(self) -> Summary:
        """Start everything, let the guests run, and summarise."""
        s = self.s
        await self.host.open()
        tool = self.tool
        assert tool is not None
        _say(f"run.sh: run directory {self.run_dir} (watch with: {hvemu_command()} --run-dir "
             f"{shlex.quote(self.run_dir)} top)")
        gfns = abi.mib_to_pages(s.memory_mib)
        target = abi.mib_to_pages(s.target_mib)
        for i in range(s.domains):
            self.domids.append(await self.host.create(gfns, vcpus=s.vcpus, target=target, name=f"guest{i}",
                                                      abi=s.abi))
        for domid in self.domids:
            self.created[domid] = await self.host.stats(domid)
        for domid in self.domids:
            self.pagers[domid] = await self.host.pager(domid, "--batch", str(s.batch), "--progress", "off",
                                                       name=f"pager{domid}", timeout=10, interval=0.05)
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        for domid in self.domids:
            guest = await self.host.start(f"guest{domid}", "guest", guest_argv(
                self.run_dir, domid, "--duration", str(s.duration_s), "--pattern", s.pattern, "--write-ratio",
                str(s.write_ratio), "--seed", str(s.seed + domid), "--linger"))
            self.guests[domid] = guest
        _say(f"run.sh: {s.domains} guest(s) running for {_num(s.duration_s)} s ({s.pattern}, seed {s.seed}); "
             "Ctrl-C stops them and prints the summary so far")
        await self._wait_reports()
        stats = {domid: await self.host.stats(domid) for domid in self.domids}
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
                line_task = asyncio.ensure_future(guest.line(timeout=self.s.duration_s + 120))
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
        last = {domid: await self.host.stats(domid) for domid in self.domids}
        last_t = loop.time()
        while True:
            await asyncio.sleep(self.progress_every)
            now = {domid: await self.host.stats(domid) for domid in self.domids}
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
            rows.append(self._row(domid, await self.host.stats(domid), None, None))
        return self._summary(rows, ok=False, complete=False)

    def _row(self, domid: int, st: DomainStats, guest_exit: int | None, pager_exit: int | None) -> DomainResult:
        """A domain's result: the hypervisor's counters, and the guest's own report when it made one."""
        created = self.created[domid]
        rep = self.reports.get(domid)
        # The guest measures a fault from its own side (exit to runnable); the hypervisor's histogram is
        # what there is when the guest has not reported.
        lat = (rep or {}).get("latency_us") or st.fault_latency_us
        elapsed = max(self.elapsed.get(domid, 0.0), 1e-9)
        rings = [st.ring(k) for k in abi.RingKind]
        faults = int(rep["faults"]) if rep else st.faults
        pages_in, pages_out = st.paged_in, st.evicted
        page_mib = abi.pages_to_mib(1)
        return DomainResult(
            domid=domid, vcpus=self.s.vcpus, memory_mib=st.gfns * page_mib, target_mib=st.target * page_mib,
            resident_start_mib=created.resident * page_mib, resident_end_mib=st.resident * page_mib,
            paged_at_start=created.paged, elapsed_s=round(elapsed, 3), faults=faults,
            faults_per_s=round(faults / elapsed, 1), pages_in=pages_in, pages_out=pages_out,
            pages_in_per_s=round(pages_in / elapsed, 1), pages_out_per_s=round(pages_out / elapsed, 1),
            fault_p50_us=float(lat.get("p50", 0.0)), fault_p99_us=float(lat.get("p99", 0.0)),
            fault_max_us=float(lat.get("max", 0.0)),
            blocked=sum(r.blocked_ever for r in rings), refused=sum(r.refused for r in rings),
            events_lost=st.events_lost, events_put=st.events_put,
            accesses=int(rep["accesses"]) if rep else 0,
            integrity_failures=int(rep["integrity_failures"]) if rep else 0,
            pager_exit=pager_exit, guest_exit=guest_exit)

    def _summary(self, rows: list[DomainResult], *, ok: bool, complete: bool) -> Summary:
        s = self.s
        return Summary(ok=ok, complete=complete, settings=s, command=shlex.join(["scripts/run.sh", *s.argv()]),
                       domains=rows, host_memory_mib=s.host_memory_mib, admission=s.admission, duration_s=s.duration_s)

    @property
    def run_dir(self) -> str:
        return self.host.run_dir

    @property
    def hv(self) -> Child | None:
        return self.host.hv

    @property
    def tool(self) -> ControlClient | None:
        return self.host.tool

    async def close(self) -> None:
        """Stop every process (last started first) and remove the run directory; on every path."""
        for problem in await self.host.close():
            _say(f"run.sh: {problem}")


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
    ``hvemu.toolstack.cli``, told where the package is.
    """
    python = python or sys.executable
    script = os.path.join(os.path.dirname(python), "hvemu")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return shlex.quote(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hvemu.__file__)))
    return f"PYTHONPATH={shlex.quote(root)} {shlex.quote(python)} -m hvemu.toolstack.cli"


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
