"""Waiting for a file descriptor: the one place that registers readers and writers with the event loop.

Every process here waits on raw fds: sockets that carry frames and fds (uvloop
0.23 has no ``sock_sendmsg``/``sock_recvmsg``), event channels, pidfds, a
terminal.  This module is the only code that calls ``loop.add_reader`` /
``add_writer``, so that two parts of a process cannot fight over one fd (a
second ``add_reader`` silently replaces the first one's callback) and every
registration is dropped before its fd is closed (a closed fd's number is soon
reused, and a stale registration would poll someone else's file).  The shape
is trio's:

* :func:`wait_readable` / :func:`wait_writable` suspend the calling task until
  the fd is ready.  One task per fd and direction: a second one raises
  :class:`BusyResourceError`.  Cancellation-safe: a cancelled wait leaves no
  waiter behind.  Readiness may be spurious (the caller retries its syscall
  and waits again on ``EAGAIN``).
* :func:`notify_closing` wakes whoever waits on the fd with an error
  (:class:`ClosedResourceError`, or the exception given) and drops the fd's
  registrations.  Call it *before* closing an fd that was ever waited on.
* :func:`add_reader` / :func:`remove_reader`: a persistent callback, for the
  hypervisor's fault path where a kick must cost no task and no future
  (issue 13).  An exception escaping the callback is logged with its
  traceback and handed to the ``on_error`` given with it, which decides what
  it breaks (see :mod:`hvemu.hypervisor.daemon`); the reader stays registered unless
  ``on_error`` removes it.

A wait's registration outlives the wait: a connection in steady request/reply
use then pays no ``epoll_ctl`` pair per wait.  It is dropped by the first
wake-up that finds nobody waiting (the loop is level-triggered: leaving it
would spin), and by :func:`notify_closing`.

The fds are process-wide, so the table is too: an fd is registered with one
loop at a time.  An entry left by a loop that has since closed (a test's) is
dropped when the fd is next used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("hvemu.readiness")


class BusyResourceError(RuntimeError):
    """Another task already waits on this fd in this direction (or a persistent reader has it)."""


class ClosedResourceError(ConnectionError):
    """The fd was closed (:func:`notify_closing`) while a task waited on it."""


class _Fd:
    """What is registered for one fd, with which loop."""

    __slots__ = ("fd", "loop", "waiters", "registered", "callback")

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        #: The future of the task waiting to read ([0]) / to write ([1]), if any.
        self.waiters: list[asyncio.Future[None] | None] = [None, None]
        #: Whether the loop has our wake-up for reading / writing.
        self.registered = [False, False]
        #: A persistent reader (add_reader): then no task may wait to read.
        self.callback: Callable[[], object] | None = None

    def wake(self, write: int) -> None:
        fut = self.waiters[write]
        if fut is None:
            self.unregister(write)  # nobody waits: stop polling (level-triggered)
        elif not fut.done():
            fut.set_result(None)

    def unregister(self, write: int) -> None:
        if self.registered[write]:
            self.registered[write] = False
            if not self.loop.is_closed():
                (self.loop.remove_writer if write else self.loop.remove_reader)(self.fd)


_fds: dict[int, _Fd] = {}


def _entry(fd: int, loop: asyncio.AbstractEventLoop) -> _Fd:
    """The fd's entry for ``loop``; one left by a closed loop is replaced."""
    if fd < 0:
        raise ValueError(f"cannot wait on fd {fd}")
    entry = _fds.get(fd)
    if entry is not None and entry.loop is loop:
        return entry
    if entry is not None and not entry.loop.is_closed():
        if entry.callback is not None or any(w is not None and not w.done() for w in entry.waiters):
            raise BusyResourceError(f"fd {fd} is in use by another event loop")
        entry.unregister(0)
        entry.unregister(1)
    entry = _fds[fd] = _Fd(fd, loop)
    return entry


async def _wait(fd: int, write: int) -> None:
    loop = asyncio.get_running_loop()
    entry = _entry(fd, loop)
    if entry.waiters[write] is not None:
        raise BusyResourceError(f"another task already waits to {'write' if write else 'read'} fd {fd}")
    if not write and entry.callback is not None:
        raise BusyResourceError(f"fd {fd} has a persistent reader")
    fut: asyncio.Future[None] = loop.create_future()
    if not entry.registered[write]:
        (loop.add_writer if write else loop.add_reader)(fd, entry.wake, write)
        entry.registered[write] = True
    entry.waiters[write] = fut
    try:
        await fut
    finally:
        if entry.waiters[write] is fut:
            entry.waiters[write] = None


async def wait_readable(fd: int) -> None:
    """Suspend until ``fd`` is readable (or maybe spuriously); one task per fd; see the module docstring."""
    await _wait(fd, 0)


async def wait_writable(fd: int) -> None:
    """Suspend until ``fd`` is writable (or maybe spuriously); one task per fd; see the module docstring."""
    await _wait(fd, 1)


def notify_closing(fd: int, exc: BaseException | None = None) -> None:
    """``fd`` is about to be closed (or given up): fail its waiters with ``exc`` and drop its registrations.

    ``exc`` defaults to :class:`ClosedResourceError`.  A persistent reader is
    removed too.  Harmless for an fd nobody waits on; needs no running loop.
    """
    entry = _fds.pop(fd, None)
    if entry is None:
        return
    entry.callback = None
    entry.unregister(0)
    entry.unregister(1)
    for write, fut in enumerate(entry.waiters):
        entry.waiters[write] = None
        if fut is not None and not fut.done():
            fut.set_exception(exc if exc is not None else ClosedResourceError(f"fd {fd} was closed"))


def add_reader(fd: int, callback: Callable[[], object], on_error: Callable[[BaseException], object]) -> None:
    """Call ``callback()`` from the running loop whenever ``fd`` is readable, until :func:`remove_reader`.

    The callback must consume what made the fd readable (or remove itself),
    or the loop spins.  ``on_error(exc)`` gets any :class:`Exception` the
    callback raises, after it was logged with its traceback.
    """
    loop = asyncio.get_running_loop()
    entry = _entry(fd, loop)
    if entry.callback is not None or entry.waiters[0] is not None:
        raise BusyResourceError(f"fd {fd} already has a reader")

    def readable() -> None:
        try:
            callback()
        except Exception as exc:
            log.error("reader callback %s of fd %d failed", getattr(callback, "__qualname__", callback), fd,
                      exc_info=exc)
            on_error(exc)

    entry.unregister(0)  # a wait's lingering wake-up, if any
    loop.add_reader(fd, readable)
    entry.registered[0] = True
    entry.callback = callback


def remove_reader(fd: int) -> None:
    """Stop a persistent reader (no-op if ``fd`` has none)."""
    entry = _fds.get(fd)
    if entry is not None and entry.callback is not None:
        entry.callback = None
        entry.unregister(0)
        if not entry.registered[1] and entry.waiters[1] is None:
            del _fds[fd]
