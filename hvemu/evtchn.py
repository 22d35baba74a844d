"""Event channels: Xen's pending bit over a Unix socket pair.

A channel is a *port* number plus one end of an ``AF_UNIX`` ``SOCK_SEQPACKET``
socket pair.  The hypervisor keeps one end; the other is handed to a daemon
with ``SCM_RIGHTS`` (see :mod:`hvemu.fdpass`).  Either side may notify the
other.

Wire contract (what a program in C needs to know)
--------------------------------------------------
* The fd is a connected ``AF_UNIX`` ``SOCK_SEQPACKET`` socket.  Each message is
  one datagram that only means "port P is pending": the port as a 4-byte
  little-endian unsigned integer.  There is no other payload and no reply.
* **Notify**: ``write(fd, &port_le32, 4)`` (or ``send`` with ``MSG_DONTWAIT``).
  If it fails with ``EAGAIN`` the peer has a full queue of unread
  notifications, so it is already pending: drop the notification, do not
  retry.  ``EPIPE``/``ECONNRESET``/``ECONNREFUSED`` mean the peer has gone
  (Xen drops a notification to an unbound port the same way).  Use
  ``MSG_NOSIGNAL`` or ignore ``SIGPIPE``.
* **Wait**: ``poll()`` for ``POLLIN`` (or a blocking ``read``).
* **Drain**: read messages (``recv(fd, buf, 4, MSG_DONTWAIT)``) until
  ``EAGAIN``.  Every message read is the same pending bit: however many were
  queued, the receiver has *one* event per port and handles it once (then
  re-checks its ring, as Xen's ``RING_FINAL_CHECK_FOR_*`` demands).
  A read of 0 bytes means the peer closed its end; no empty message is ever
  sent.  A message whose length is not 4 is counted as a notification of the
  channel's own port.
* The fd's file status flags are never changed by this module (every call
  uses ``MSG_DONTWAIT``), so the end a daemon receives is a normal blocking
  socket and it may set ``O_NONBLOCK`` on it if it likes.  The Python side
  creates both ends close-on-exec; a launcher that wants a child to inherit
  one must say so explicitly.

Semantics
---------
Notifications coalesce like Xen's pending bit: several notifies before the
receiver runs are one event.  The sender never blocks and never raises because
the peer is slow or gone; :meth:`EventChannel.notify` returns whether a message
was actually queued.  :meth:`EventChannel.drain` is non-blocking and returns
the *set* of pending ports (each once).  For asyncio (uvloop included),
:meth:`EventChannel.wait` sleeps until something is pending
(:func:`hvemu.readiness.wait_readable`), tolerating spurious wake-ups;
:meth:`EventChannel.watch` installs a persistent callback instead
(:func:`hvemu.readiness.add_reader`: no task, no future per notification).
Closing the channel wakes a waiter with :class:`ChannelClosed` and removes
the reader.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from types import TracebackType

from hvemu import readiness

log = logging.getLogger("hvemu.evtchn")

_PORT = struct.Struct("<I")
#: Size of one notification message on the wire.
MESSAGE_SIZE = _PORT.size
#: The largest port number a message can carry.
MAX_PORT = 0xFFFFFFFF
#: Upper bound of messages read by one :meth:`EventChannel.drain`, so that a
#: peer notifying in a tight loop cannot keep the receiver draining forever
#: (what is left is still readable and reported by the next drain).
DRAIN_BATCH = 4096

_RECV_SIZE = 64  # larger than a message, so an oversized one is seen as such
#: Flags of every notify, as a plain int: or-ing the ``MsgFlag`` members costs a microsecond per call.
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_RECV_FLAGS = int(socket.MSG_DONTWAIT)


class ChannelClosed(ConnectionError):
    """The channel was closed locally, or its peer closed the other end."""


class EventChannel:
    """One end of an event channel.

    ``EventChannel(sock_or_fd, port)`` takes ownership of a connected
    ``AF_UNIX`` ``SOCK_SEQPACKET`` (or ``SOCK_DGRAM``) socket, given as a
    :class:`socket.socket` or a raw fd (e.g. one received by ``SCM_RIGHTS``).
    If the constructor raises, a raw fd is left open and still the caller's.
    """

    def __init__(self, sock: socket.socket | int, port: int) -> None:
        if not 0 <= port <= MAX_PORT:
            raise ValueError(f"port {port} out of range")
        if isinstance(sock, int):
            s = socket.socket(fileno=sock)
            try:
                self._check(s)
            except BaseException:
                s.detach()
                raise
        else:
            self._check(sock)
            s = sock
        self._sock: socket.socket | None = s
        self._fd = s.fileno()
        self.port = port
        self._msg = _PORT.pack(port)
        #: True once a read returned EOF or a notify found the peer gone.
        self.peer_closed = False
        #: Notifications queued to the peer / dropped because the peer was
        #: already pending (queue full) or gone.
        self.sent = 0
        self.coalesced = 0
        #: Messages read by :meth:`drain` (several may make one event).
        self.received = 0
        self._watch_cb: Callable[[set[int]], object] | None = None
        self._watch_close_cb: Callable[[], object] | None = None

    @staticmethod
    def _check(sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type not in (socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
            raise ValueError(f"an event channel needs an AF_UNIX SOCK_SEQPACKET socket, not {sock!r}")

    @classmethod
    def pair(cls, port: int) -> tuple[EventChannel, EventChannel]:
        """A connected ``(local, remote)`` pair for ``port``; both close-on-exec.

        Keep ``local``; pass ``remote.fileno()`` (or ``remote.detach()``) to the
        other process, then close ``remote`` here.
        """
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            return cls(a, port), cls(b, port)
        except BaseException:
            a.close()
            b.close()
            raise

    # ------------------------------------------------------------------ basics
    def fileno(self) -> int:
        """The socket's fd (-1 once closed or detached)."""
        return self._fd if self._sock is not None else -1

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("I/O operation on a closed event channel")
        return self._sock

    def notify(self) -> bool:
        """Mark the port pending at the peer; never blocks.

        Returns True when a message was queued, False when it was dropped
        because the peer already has unread notifications (its queue is full:
        it is pending anyway) or has gone away.  Raises only if this end is
        closed.
        """
        sock = self._socket()
        try:
            sock.send(self._msg, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            self.coalesced += 1
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.coalesced += 1
                return False
            if isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN:
                if not self.peer_closed:
                    log.debug("port %d: peer gone (%s); notifications dropped", self.port, exc)
                self.peer_closed = True
                self.coalesced += 1
                return False
            raise
        self.sent += 1
        return True

    def drain(self) -> set[int]:
        """Read every queued notification without blocking; the set of pending ports.

        An empty set means nothing was pending (a spurious wake-up, or the
        peer closed: see :attr:`peer_closed`).
        """
        sock = self._socket()
        ports: set[int] = set()
        for _ in range(DRAIN_BATCH):
            try:
                data = sock.recv(_RECV_SIZE, _RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionError:
                self.peer_closed = True
                break
            if not data:
                if sock.type == socket.SOCK_SEQPACKET:
                    self.peer_closed = True
                    break
                ports.add(self.port)  # an empty datagram still woke us
                continue
            self.received += 1
            if len(data) == MESSAGE_SIZE:
                ports.add(_PORT.unpack(data)[0])
            else:
                log.debug("port %d: %d-byte message counted as a notification", self.port, len(data))
                ports.add(self.port)
        return ports

    def detach(self) -> int:
        """Give up the fd without closing it (e.g. to pass it on); the channel is closed."""
        sock = self._socket()
        self._sock = None
        try:
            self._release_fd(ChannelClosed(f"event channel {self.port} detached"))
        finally:
            fd = sock.detach()
        return fd

    def close(self) -> None:
        """Close this end (idempotent); a pending :meth:`wait` raises :class:`ChannelClosed`."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        try:
            self._release_fd(ChannelClosed(f"event channel {self.port} closed"))
        finally:
            sock.close()

    def _release_fd(self, exc: BaseException) -> None:
        """Before the fd goes: end a watch (calling its ``on_close``), fail a waiter with ``exc``."""
        try:
            self._stop_watch(True)
        finally:
            readiness.notify_closing(self._fd, exc)

    def __enter__(self) -> EventChannel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # A loop may still have our fd registered: never leave it polling a
        # closed (and soon reused) fd.  Only possible if close() was skipped.
        if getattr(self, "_sock", None) is not None:
            try:
                readiness.notify_closing(self._fd)
            except Exception:  # the loop may be closed already
                pass

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._fd}"
        return f"<EventChannel port={self.port} {state}{' peer-closed' if self.peer_closed else ''}>"

    # ----------------------------------------------------------------- asyncio
    async def wait(self) -> set[int]:
        """Sleep until something is pending; return the pending ports (drained).

        Returns at once if notifications are already queued.  Raises
        :class:`ChannelClosed` if the channel is closed while waiting or the
        peer has closed its end with nothing pending.  Only one task may wait
        on a channel at a time (:class:`~hvemu.readiness.BusyResourceError`).
        """
        while True:
            ports = self.drain()
            if ports:
                return ports
            if self.peer_closed:
                raise ChannelClosed(f"event channel {self.port}: peer closed")
            await readiness.wait_readable(self._fd)
            # Readable, but maybe only spuriously: drain and check again.

    def watch(self, callback: Callable[[set[int]], object], on_close: Callable[[], object] | None = None,
              *, on_error: Callable[[BaseException], object] | None = None) -> None:
        """Call ``callback(ports)`` from the running loop whenever ports become pending.

        The callback runs with the notifications already drained.  When the
        peer closes its end the reader is removed (so a dead peer cannot make
        the loop spin on an always-readable fd) and ``on_close()`` is called;
        it is also called when this end is closed.  :meth:`unwatch` stops
        watching without calling it.  An exception escaping ``callback`` or
        ``on_close`` is logged with its traceback and given to ``on_error``
        (:func:`hvemu.readiness.add_reader`); without one it is only logged.
        """
        if self._watch_cb is not None:
            raise readiness.BusyResourceError(f"event channel {self.port} is already watched")
        fd = self._fd

        def readable() -> None:
            if self._sock is None:
                return
            ports = self.drain()
            if ports:
                callback(ports)
            if self.peer_closed and self._watch_cb is callback:
                self._stop_watch(True)

        readiness.add_reader(fd, readable, on_error or _only_logged)
        self._watch_cb = callback
        self._watch_close_cb = on_close

    def unwatch(self) -> None:
        """Stop a :meth:`watch` (no-op if not watching)."""
        self._stop_watch(False)

    def _stop_watch(self, closing: bool) -> None:
        """Remove the reader of a :meth:`watch`; ``closing``: call its ``on_close``."""
        if self._watch_cb is None:
            return
        close_cb = self._watch_close_cb
        self._watch_cb = self._watch_close_cb = None
        readiness.remove_reader(self._fd)
        if closing and close_cb is not None:
            close_cb()


def _only_logged(exc: BaseException) -> None:
    """The ``on_error`` of a watch that was given none: :mod:`hvemu.readiness` has logged ``exc``."""
