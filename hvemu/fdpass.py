"""Passing file descriptors over Unix sockets: one ``sendmsg``/``recvmsg`` with ``SCM_RIGHTS``.

File descriptors (ring page, event channel, guest memory, p2m) travel as
``SCM_RIGHTS`` ancillary data.  Received fds are close-on-exec
(``MSG_CMSG_CLOEXEC``, then ``os.set_inheritable(fd, False)``: on Python
3.11 ``recv_fds`` would hand back inheritable ones).  Truncated control data
(``MSG_CTRUNC``: the sender passed more fds than the receiver allowed) is
detected: the fds that did arrive are closed and the caller is told
(:class:`TruncatedControlData`), while the byte stream stays in sync.

Which bytes the fds belong to is the framing's business
(:mod:`hvemu.framing`); waiting for a socket is :mod:`hvemu.readiness`'s.
This module only makes the syscalls, for any socket type (the control
socket's frames, the event-channel hand-over, tests), plus the other two
things a Unix socket tells: the peer's credentials and whether it hung up.
The errors of a connection that cannot deliver live here too, since every
layer above raises them.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hvemu.protocol import Msg

log = logging.getLogger("hvemu.fdpass")

#: Default number of fds a receiver accepts with one message (Linux's own
#: per-message limit, SCM_MAX_FD, is 253).
MAX_FDS = 32
_FD_SIZE = array.array("i").itemsize
_PEERCRED = struct.Struct("3i")
# Plain ints: the IntFlag members of the socket module cost a microsecond per |.
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class TransportError(ConnectionError):
    """The connection cannot deliver what was asked (closed, desynchronised, bad fds)."""


class ConnectionClosed(TransportError):
    """The peer closed the connection (or it was closed locally)."""


class TruncatedControlData(TransportError):
    """``MSG_CTRUNC``: more fds were sent than the receiver allowed.

    The fds that did arrive have been closed.  ``data`` is what came with them
    (for :func:`recvmsg_fds`), ``reply`` the decoded reply (for a connection's
    ``call``; the connection stays usable).
    """

    def __init__(self, message: str, *, data: bytes = b"", reply: Msg | None = None) -> None:
        super().__init__(message)
        self.data = data
        self.reply = reply


# --------------------------------------------------------------------------
# fds: who owns them
# --------------------------------------------------------------------------


class SupportsFileno(Protocol):
    def fileno(self) -> int: ...


class _Closable(SupportsFileno, Protocol):
    def close(self) -> None: ...


#: An fd to pass: an ``int`` is *lent* (the caller keeps and closes it); an
#: object with ``fileno()`` and ``close()`` (a socket, an EventChannel, an
#: :class:`OwnedFd`) is *given*: closed once sent, or if sending fails.
FdLike = int | _Closable


class OwnedFd:
    """Wrap a raw fd whose ownership goes with the message (closed after sending)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"OwnedFd({self.fd})"


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def raw_fds(fds: Sequence[FdLike]) -> list[int]:
    """The fd numbers of ``fds`` (lent or given alike)."""
    return [fd if isinstance(fd, int) else fd.fileno() for fd in fds]


def release_fds(fds: Sequence[FdLike]) -> None:
    """Close the *given* fds of ``fds`` (their ownership went with the message, or nowhere)."""
    for fd in fds:
        if not isinstance(fd, int):
            try:
                fd.close()
            except Exception:  # pragma: no cover - a close that fails is only logged
                log.exception("closing passed fd %r", fd)


# --------------------------------------------------------------------------
# One syscall
# --------------------------------------------------------------------------


def _rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def send_some(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int], flags: int = 0) -> int:
    """One ``send`` (``sendmsg`` when there are fds): the bytes sent, the fds riding on the first one."""
    flags |= _MSG_NOSIGNAL
    if fds:
        return sock.sendmsg([data], _rights(fds), flags)
    return sock.send(data, flags)


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


def recv_into(sock: socket.socket, buf: memoryview, maxfds: int,
              flags: int = 0) -> tuple[int, list[int], bool]:
    """One ``recvmsg_into``: ``(nbytes, fds, ctrunc)``; on ``ctrunc`` the fds are already closed."""
    # CMSG_LEN, not CMSG_SPACE: the padding of CMSG_SPACE would make room for
    # more fds than asked for.
    anc = socket.CMSG_LEN(maxfds * _FD_SIZE) if maxfds > 0 else 0
    n, ancdata, msg_flags, _ = sock.recvmsg_into([buf], anc, flags | _MSG_CMSG_CLOEXEC)
    fds = _fds_from_ancdata(ancdata) if ancdata else []
    try:
        for fd in fds:
            os.set_inheritable(fd, False)
    except BaseException:
        close_fds(fds)
        raise
    ctrunc = bool(msg_flags & _MSG_CTRUNC)
    if ctrunc:
        close_fds(fds)
        fds = []
    return n, fds, ctrunc


def sendmsg_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = (), flags: int = 0) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` (lent: not closed); returns bytes sent."""
    return send_some(sock, data, fds, flags)


def recvmsg_fds(sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS,
                flags: int = 0) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` accepting up to ``maxfds`` fds; the fds are close-on-exec and now the caller's.

    Raises :class:`TruncatedControlData` (with the fds that arrived closed) if
    the sender passed more than ``maxfds``.
    """
    buf = bytearray(bufsize)
    n, fds, ctrunc = recv_into(sock, memoryview(buf), maxfds, flags)
    data = bytes(buf[:n])
    if ctrunc:
        raise TruncatedControlData(
            f"truncated control data: the sender passed more than {maxfds} fds; those received were closed",
            data=data)
    return data, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected Unix socket (``SO_PEERCRED``)."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def hung_up(sock: socket.socket) -> bool:
    """True when the peer closed both directions (not just shut down its writing)."""
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))

