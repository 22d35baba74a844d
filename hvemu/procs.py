"""Child processes that never outlive their parent, and stopping them.

Shared by everything that starts hvemu processes (``run.sh``, the soak, the
benchmarks, the raw attach, the tests): one way to tie a child's life to its
parent and one way to stop it (signal, wait, SIGKILL after a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable

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
