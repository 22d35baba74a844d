"""How the toolstack starts the processes of a host, once: their command lines, and one child wrapper.

Every front end that runs processes (``scripts/run.sh``, the soak, the
benchmarks, ``hvemu``, the tests) builds the hypervisor's, a pager's and a
guest's command line with :func:`hypervisor_argv`, :func:`pager_argv` and
:func:`guest_argv`, so an option renamed or added is renamed everywhere.
Those that own their children (run.sh, the soak, the benchmarks) run them as
:class:`Child`: an asyncio process in a session of its own, pinned if asked,
its stdout read by lines, its stderr kept in a file (a log the caller names,
or a temporary one), stopped with SIGTERM and then SIGKILL.  ``hvemu``
starts daemons that outlive it (pidfiles, logs in the run directory) and
the tests' synchronous fixtures use ``subprocess``; both take their command
lines from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Self

from hvemu import protocol
from hvemu.client import ControlClient
from hvemu.procs import ReadyPipe, child_setup, stop_process
from hvemu.stats import DomainStats

#: The modules the processes run (``hvemu`` also finds its daemons by them in ``/proc/PID/cmdline``).
HYPERVISOR_MODULE = "hvemu.hypervisor.daemon"
PAGER_MODULE = "pager.xenpaging"
GUEST_MODULE = "guest"


def hypervisor_argv(run_dir: str, memory_mib: float, admission: str, *, ring_size: int | None = None,
                    verbose: int = 0) -> list[str]:
    """``python`` arguments that run the hypervisor (add ``ReadyPipe.argv`` to wait for it to listen)."""
    argv = ["-m", HYPERVISOR_MODULE, "--run-dir", run_dir, "--memory", repr(float(memory_mib)),
            "--admission", admission]
    if ring_size is not None:
        argv += ["--ring-size", str(ring_size)]
    return argv + ["-v"] * verbose


def pager_argv(run_dir: str, domid: int, pagefile: str, *extra: str) -> list[str]:
    """``python`` arguments that run the built-in pager (``pager.xenpaging``) on ``domid``."""
    return ["-m", PAGER_MODULE, "--run-dir", run_dir, "--domid", str(domid), "--pagefile", pagefile, *extra]


def guest_argv(run_dir: str, domid: int, *extra: str) -> list[str]:
    """``python`` arguments that run a guest (``guest``) for ``domid``."""
    return ["-m", GUEST_MODULE, "--run-dir", run_dir, "--domid", str(domid), *extra]


class ChildError(RuntimeError):
    """A child did not do what was waited for (no line in time, exited first...); the message says which."""


class Child:
    """A child Python process: stdout read by lines, stdin written by lines, stderr kept aside."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, err: IO[bytes] | None) -> None:
        self.name = name
        self.proc = proc
        self._err = err

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], *, cpus: set[int] | None = None, stdin: bool = False,
                    pass_fds: Sequence[int] = (), executable: str | None = None,
                    log_path: str | None = None, inherit_stderr: bool = False) -> Child:
        """Run ``python argv`` (or ``executable argv``); stderr to ``log_path`` (appended), a temporary file,
        or (``inherit_stderr``) ours: run.sh's children speak on its terminal."""
        cmd = [executable or sys.executable, *argv]
        err: IO[bytes] | None = None
        if not inherit_stderr:
            err = open(log_path, "ab") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 - close()
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=err if err is not None else None, start_new_session=True,
                preexec_fn=child_setup(cpus), pass_fds=tuple(pass_fds), limit=1 << 22)
        except BaseException:
            if err is not None:
                err.close()
            raise
        return cls(name, proc, err)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr_tail(self, limit: int = 3000) -> str:
        """The last ``limit`` characters the child wrote on stderr (all of it with ``limit=0``)."""
        if self._err is None:
            return ""
        try:
            self._err.flush()
            with open(f"/proc/self/fd/{self._err.fileno()}", "rb") as f:
                text = f.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        return text[-limit:] if limit else text

    async def line(self, timeout: float) -> str:
        """The next line of stdout, stripped ('' at EOF); :class:`ChildError` if none comes in ``timeout``."""
        assert self.proc.stdout is not None
        try:
            data = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise ChildError(f"{self.name}: no output within {timeout:.0f} s; stderr:\n{self.stderr_tail()}") \
                from None
        return data.decode().strip()

    async def json_line(self, timeout: float) -> dict[str, Any]:
        """The next stdout line that is a JSON object (others, e.g. from a library, are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = await self.line(max(0.1, deadline - time.monotonic()))
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data
            if not line and self.proc.stdout is not None and self.proc.stdout.at_eof():
                status = await self.stop(timeout=5, sig=0)
                raise ChildError(f"{self.name} exited (status {status}) without a report; stderr:\n"
                                 f"{self.stderr_tail()}")

    async def output(self) -> str:
        """Everything left on stdout, up to EOF."""
        assert self.proc.stdout is not None
        return (await self.proc.stdout.read()).decode()

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (0: none, just wait) and reap; SIGKILL after ``timeout``.  The exit status."""
        await stop_process(self.proc, sig=sig, timeout=timeout)
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        return self.proc.returncode or 0

    def close(self) -> None:
        """Close the stderr file (after :meth:`stop`)."""
        if self._err is not None:
            self._err.close()

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid} returncode={self.returncode}>"


def log_file(log_dir: str, name: str) -> str:
    """Where a child named ``name`` logs in ``log_dir``."""
    return os.path.join(log_dir, f"{name}.log")


class Host:
    """A hypervisor in a private run directory, a tool connection to it, and the children started around it.

    ``async with Host(...)`` (the benchmarks, the soak), or :meth:`open` and
    :meth:`close` when the owner must act between the end of its work and
    the teardown (``run.sh`` summarises an interrupted run first).  Closing
    stops every child (the last started first), then the hypervisor, removes
    the run directory and checks that no ``/dev/shm`` name of the hypervisor
    is left; :meth:`close` returns what went wrong, ``async with`` raises it
    as a :class:`ChildError`.  ``cpus(role)`` places each role (``hypervisor``,
    ``guest``, ``daemon``); children log to ``log_dir`` (``<name>.log``), to
    a temporary file, or (``inherit_stderr``) to our stderr.
    """

    def __init__(self, *, memory_mib: float, admission: str = "seed", ring_size: int | None = None,
                 cpus: Callable[[str], set[int] | None] = lambda role: None, client: str = "host",
                 run_dir_prefix: str = "hvemu-", log_dir: str | None = None, inherit_stderr: bool = False,
                 child_type: type[Child] = Child, ready_timeout: float = 15.0) -> None:
        self.memory_mib = memory_mib
        self.admission = admission
        self.ring_size = ring_size
        self.cpus = cpus
        self.client = client
        self.run_dir_prefix = run_dir_prefix
        self.log_dir = log_dir
        self.inherit_stderr = inherit_stderr
        self.child_type = child_type
        self.ready_timeout = ready_timeout
        self.run_dir = ""
        self.hv: Child | None = None
        self.tool: ControlClient | None = None
        self.children: list[Child] = []

    @property
    def socket(self) -> str:
        return protocol.socket_path(self.run_dir)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        problems = await self.close()
        if problems and exc[0] is None:
            raise ChildError("; ".join(problems))

    def started(self, role: str, child: Child) -> None:
        """Called with each child started (a subclass records where it runs, say)."""

    async def _spawn(self, name: str, role: str, argv: Sequence[str], *, stdin: bool = False,
                     pass_fds: Sequence[int] = ()) -> Child:
        child = await self.child_type.start(
            name, argv, cpus=self.cpus(role), stdin=stdin, pass_fds=pass_fds,
            log_path=log_file(self.log_dir, name) if self.log_dir else None, inherit_stderr=self.inherit_stderr)
        self.started(role, child)
        return child

    async def open(self) -> Self:
        """Make the run directory, start the hypervisor, wait until it listens, connect as a tool."""
        self.run_dir = tempfile.mkdtemp(prefix=self.run_dir_prefix)
        os.chmod(self.run_dir, 0o700)
        try:
            with ReadyPipe() as ready:
                argv = [*hypervisor_argv(self.run_dir, self.memory_mib, self.admission, ring_size=self.ring_size),
                        *ready.argv]
                self.hv = await self._spawn("hypervisor", "hypervisor", argv, pass_fds=ready.pass_fds)
                ready.spawned()
                if not await ready.started(self.ready_timeout):
                    status = await self.hv.stop(timeout=5)
                    raise ChildError(f"the hypervisor did not listen within {self.ready_timeout:.0f} s "
                                     f"(status {status}): {self.hv.stderr_tail()}")
            self.tool = await ControlClient.connect(self.socket)
            await self.tool.call(protocol.ToolHello(client=self.client))
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> list[str]:
        """Stop everything and clean up (idempotent); what went wrong, one line each."""
        problems: list[str] = []
        for child in reversed(self.children):
            await child.stop()
            child.close()
        self.children.clear()
        if self.tool is not None:
            with contextlib.suppress(OSError):
                await self.tool.close()
            self.tool = None
        if self.hv is not None:
            status = await self.hv.stop()
            leaked = [n for n in os.listdir("/dev/shm") if n.startswith(f"hvemu-{self.hv.pid}-")]
            if status not in (0, -signal.SIGTERM):
                problems.append(f"hypervisor exited with status {status}: {self.hv.stderr_tail()}")
            if leaked:
                problems.append(f"shared-memory segments left in /dev/shm: {leaked}")
            self.hv.close()
            self.hv = None
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return problems

    async def start(self, name: str, role: str, argv: Sequence[str], *, stdin: bool = False) -> Child:
        """A child of ``role`` (``guest``/``daemon``), stopped when the host is."""
        child = await self._spawn(name, role, argv, stdin=stdin)
        self.children.append(child)
        return child

    async def stop_child(self, child: Child, *, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        status = await child.stop(timeout=timeout, sig=sig)
        if child in self.children:
            self.children.remove(child)
        child.close()
        return status

    # ------------------------------------------------------------ tool calls
    async def call(self, msg: protocol.Msg) -> protocol.Msg:
        assert self.tool is not None
        reply, fds = await self.tool.call(msg)
        for fd in fds:
            os.close(fd)
        return reply

    async def create(self, gfns: int, vcpus: int = 1, target: int | None = None, name: str = "",
                     abi: str = "seed") -> int:
        reply = await self.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns, name=name or self.client,
                                                      abi=abi))
        assert isinstance(reply, protocol.DomainCreated)
        if target is not None:
            await self.call(protocol.SetTarget(domid=reply.domid, pages=target))
        return reply.domid

    async def stats(self, domid: int) -> DomainStats:
        reply = await self.call(protocol.Stats(domid=domid))
        assert isinstance(reply, protocol.StatsReply)
        return reply.stats

    async def set_target(self, domid: int, pages: int) -> None:
        await self.call(protocol.SetTarget(domid=domid, pages=pages))

    async def wait_for(self, domid: int, pred: Callable[[DomainStats], bool], what: str, timeout: float = 60.0,
                       interval: float = 0.01, watch: Child | None = None) -> DomainStats:
        """Poll the domain's stats until ``pred(stats)``; the stats that satisfied it."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.stats(domid)
            if pred(st):
                return st
            if watch is not None and watch.returncode is not None:
                raise ChildError(f"{watch.name} exited ({watch.returncode}) while waiting for {what}: "
                                 f"{watch.stderr_tail()}")
            if time.monotonic() > deadline:
                raise ChildError(f"{what}: not reached within {timeout:.0f} s (stats: "
                                 f"resident={st.resident} paged={st.paged})")
            await asyncio.sleep(interval)

    def pagefile(self, domid: int) -> str:
        return os.path.join(self.run_dir, f"dom{domid}.pagefile")

    async def pager(self, domid: int, *extra: str, name: str = "pager", pagefile: str | None = None,
                    timeout: float = 20.0, interval: float = 0.01) -> Child:
        """The built-in pager on ``domid`` (its pagefile in the run directory unless given); returns once it
        owns the ring."""
        child = await self.start(name, "daemon",
                                 pager_argv(self.run_dir, domid, pagefile or self.pagefile(domid), *extra))
        await self.wait_for(domid, lambda st: st.ring_owned("paging", child.pid), f"{name} attach",
                            timeout=timeout, interval=interval, watch=child)
        return child
