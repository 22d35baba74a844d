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
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from hvemu.procs import child_setup, stop_process

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
