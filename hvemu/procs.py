"""Child processes that never outlive their parent, and stopping them.

Shared by everything that starts hvemu processes (``run.sh``, the soak, the
benchmarks, the raw attach, the tests): one way to tie a child's life to its
parent, one way to know a daemon has started (:class:`ReadyPipe`) and one
way to stop it (signal, wait, SIGKILL after a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
from collections.abc import Callable
from types import TracebackType

from hvemu import readiness

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: have the kernel SIGTERM this child if its parent dies first.

    A launcher (or a test run) killed with ``kill -9`` cannot stop its
    children; without this they would run on, holding memory and sockets.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_setup(cpus: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: die with the parent and, if ``cpus``, run only on them (``taskset -c`` without taskset)."""
    def setup() -> None:
        die_with_parent()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


#: Clock ticks per second of ``/proc/PID/stat``'s CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """``utime``/``stime`` of ``pid`` in clock ticks (``/proc/PID/stat`` fields 14, 15; ``OSError`` if gone).

    The command name may hold spaces and parentheses, so fields are counted
    from the last ``)``.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def status_field(pid: int, name: str) -> str | None:
    """A field of ``/proc/PID/status`` (``VmRSS``, ``Cpus_allowed_list``...) as printed; None if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    return None


def status_bytes(pid: int, name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` in bytes (``LookupError`` if absent)."""
    value = status_field(pid, name)
    if value is None:
        raise LookupError(f"no {name} in /proc/{pid}/status")
    return int(value.split()[0]) * 1024


async def stop_process(proc: asyncio.subprocess.Process, *, sig: int = signal.SIGTERM,
                       timeout: float = 30.0) -> int | None:
    """Send ``sig`` (0: none, just wait), wait up to ``timeout``, then SIGKILL; the exit status."""
    if proc.returncode is None:
        if sig:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode


class ReadyPipe:
    """The started-handshake of a daemon that takes ``--ready-fd`` (the hypervisor): one byte once it listens.

    Looking for the control socket's file instead races with the stale file
    of a hypervisor that was killed (it exists before the new one has
    unlinked it and bound its own) and costs a connection per look.  The
    pipe says it once: the byte when the daemon serves, EOF if it died
    first.  Usage::

        with ReadyPipe() as ready:
            child = start([..., *ready.argv], pass_fds=ready.pass_fds)
            ready.spawned()
            if not await ready.started(timeout): ...   # or ready.started_blocking(timeout)
    """

    #: What the daemon writes (:func:`hvemu.hypervisor.daemon.main`).
    READY = b"R"

    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # both close-on-exec: a child gets the write end only by pass_fds

    @property
    def argv(self) -> list[str]:
        return ["--ready-fd", str(self._write)]

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._write,) if self._write >= 0 else ()

    def spawned(self) -> None:
        """The child has its copy of the write end: drop ours, so that its death reads as EOF."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1

    def _answer(self) -> bool:
        return os.read(self._read, 1) == self.READY

    async def started(self, timeout: float) -> bool:
        """True once the daemon said it serves; False if it exited first or ``timeout`` passed."""
        try:
            async with asyncio.timeout(timeout):
                await readiness.wait_readable(self._read)
        except TimeoutError:
            return False
        return self._answer()

    def started_blocking(self, timeout: float) -> bool:
        """:meth:`started` for a caller without an event loop (the CLI)."""
        if not select.select([self._read], [], [], timeout)[0]:
            return False
        return self._answer()

    def close(self) -> None:
        self.spawned()
        if self._read >= 0:
            readiness.notify_closing(self._read)
            os.close(self._read)
            self._read = -1

    def __enter__(self) -> ReadyPipe:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
