"""Control-plane transport: framed messages and ``SCM_RIGHTS`` over Unix stream sockets.

The bytes are :mod:`hvemu.protocol`'s frames (u32 LE length + MessagePack
body) on an ``AF_UNIX`` ``SOCK_STREAM`` socket.  File descriptors travel as
``SCM_RIGHTS`` ancillary data attached to the *first byte of the frame they
belong to*: the sender passes them with the ``sendmsg`` that starts the frame.
Linux never lets one ``recvmsg`` read past the end of a message that carried
fds, so the frame a batch of fds belongs to is the last frame that starts in
the chunk they arrived with; :class:`FrameAssembler` does that bookkeeping
sans-I/O.  A reply that carries fds names them in its ``fds: list[str]``
field and the receiver checks the count.

Received fds are close-on-exec (``MSG_CMSG_CLOEXEC``, then
``os.set_inheritable(fd, False)`` for good measure).  Truncated control data
(``MSG_CTRUNC``: the sender passed more fds than the receiver allowed) is
detected: the fds that did arrive are closed and the frame is reported as
truncated (:class:`TruncatedControlData`), while the byte stream stays in sync.

uvloop 0.23 has neither ``sock_sendmsg`` nor ``sock_recvmsg``, so the async
side drives non-blocking sockets with ``loop.add_reader``/``add_writer``, tries
the syscall first and waits only on ``EAGAIN`` (spurious wake-ups are fine).

Pieces:

* :func:`sendmsg_fds` / :func:`recvmsg_fds`: one blocking (or ``MSG_DONTWAIT``)
  syscall with fds, for any socket type (event-channel hand-over, tests).
* :func:`send_msg` / :func:`recv_msg`: one message with fds on a non-blocking
  socket from asyncio, no state kept between calls.
* :class:`Connection` (async) and :class:`SyncConnection` (blocking): a
  client's request/reply channel; an :class:`~hvemu.protocol.Error` reply is
  raised as :class:`ControlError`.
* :class:`ControlServer`: the listening side, one task per connection under an
  :class:`asyncio.TaskGroup`, one reply per request in order, bad frames
  answered with ``Error`` (and a close when the stream cannot be trusted).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno as _errno
import itertools
import logging
import os
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import msgspec

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.buffer_budget import BufferBudget
from hvemu.protocol import HEADER_SIZE, MAX_FRAME, FrameDecoder, Msg, ProtocolError

log = logging.getLogger("hvemu.transport")

#: Default number of fds a receiver accepts with one message (Linux's own
#: per-message limit, SCM_MAX_FD, is 253).
MAX_FDS = 32
#: Bytes asked for by one ``recvmsg`` (into a buffer kept per connection:
#: ``recvmsg`` itself would allocate that much on every call, and above
#: 128 KiB that is an mmap/munmap each time).
RECV_SIZE = 64 * 1024
_FD_SIZE = array.array("i").itemsize
_HEADER = struct.Struct("<I")
_PEERCRED = struct.Struct("3i")
# Plain ints: the IntFlag members of the socket module cost a microsecond per |.
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
#: Bytes of requests a server holds for all its clients at once (partial frames,
#: and complete ones not yet served): past it, no client brings in the OOM killer.
MAX_BUFFERED = 32 << 20
#: How often a connection whose peer half-closed is checked for a full hang-up.
HANGUP_POLL = 0.25


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


class TruncatedFrame(ProtocolError):
    """The peer closed the stream in the middle of a frame."""

    def __init__(self, pending: int) -> None:
        super().__init__(Errno.EINVAL, f"truncated frame: connection closed with {pending} bytes of an "
                         "incomplete frame", fatal=True)
        self.pending = pending


class ControlError(Exception):
    """The peer answered :class:`~hvemu.protocol.Error`: an errno name and a message.

    ``request`` is the message that failed.  When the failure was detected
    locally (an undecodable reply), the cause is chained (``__cause__``).
    """

    def __init__(self, errno: Errno | str, message: str = "", *, request: Msg | None = None) -> None:
        self.errno = Errno(errno)
        self.message = message
        self.request = request
        op = f"{type(request).__name__}: " if request is not None else ""
        super().__init__(f"{op}{self.errno}: {message}" if message else f"{op}{self.errno}")


def errno_of(exc: BaseException) -> Errno:
    """The errno name to answer for an exception a handler raised.

    The exception's ``errno`` attribute when it is an errno name (or an int
    whose name is one), else ``ENOMEM`` for :class:`MemoryError`, ``ENOSYS`` for
    :class:`NotImplementedError`, ``EPERM`` for :class:`PermissionError`,
    ``ENOENT`` for :class:`FileNotFoundError`, and ``EINVAL`` for everything else
    (``ValueError``, ``TypeError``, ``KeyError``... and bugs).
    """
    code = getattr(exc, "errno", None)
    if isinstance(code, Errno):
        return code
    if isinstance(code, str) and code in Errno.__members__:
        return Errno(code)
    if isinstance(code, int):
        name = _errno.errorcode.get(code)
        if name is not None and name in Errno.__members__:
            return Errno(name)
    for kind, name in ((MemoryError, Errno.ENOMEM), (NotImplementedError, Errno.ENOSYS),
                       (PermissionError, Errno.EPERM), (FileNotFoundError, Errno.ENOENT)):
        if isinstance(exc, kind):
            return name
    return Errno.EINVAL


# --------------------------------------------------------------------------
# fds: one syscall
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


def _raw_fds(fds: Sequence[FdLike]) -> list[int]:
    return [fd if isinstance(fd, int) else fd.fileno() for fd in fds]


def _release(fds: Sequence[FdLike]) -> None:
    for fd in fds:
        if not isinstance(fd, int):
            try:
                fd.close()
            except Exception:  # pragma: no cover - a close that fails is only logged
                log.exception("closing passed fd %r", fd)


def _rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _send_once(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int], flags: int = 0) -> int:
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


def _recv_into(sock: socket.socket, buf: memoryview, maxfds: int,
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


def _recv_once(sock: socket.socket, bufsize: int, maxfds: int,
               flags: int = 0) -> tuple[bytes, list[int], bool]:
    """One ``recvmsg`` of at most ``bufsize`` bytes: ``(data, fds, ctrunc)``."""
    buf = bytearray(bufsize)
    n, fds, ctrunc = _recv_into(sock, memoryview(buf), maxfds, flags)
    del buf[n:]
    return bytes(buf), fds, ctrunc


def sendmsg_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = (), flags: int = 0) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` (lent: not closed); returns bytes sent."""
    return _send_once(sock, data, fds, flags)


def recvmsg_fds(sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS,
                flags: int = 0) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` accepting up to ``maxfds`` fds; the fds are close-on-exec and now the caller's.

    Raises :class:`TruncatedControlData` (with the fds that arrived closed) if
    the sender passed more than ``maxfds``.
    """
    data, fds, ctrunc = _recv_once(sock, bufsize, maxfds, flags)
    if ctrunc:
        raise TruncatedControlData(
            f"truncated control data: the sender passed more than {maxfds} fds; those received were closed",
            data=data)
    return data, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected Unix socket (``SO_PEERCRED``)."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def _hung_up(sock: socket.socket) -> bool:
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


# --------------------------------------------------------------------------
# asyncio on a raw non-blocking socket
# --------------------------------------------------------------------------


class _Io:
    """Readiness waits on one fd with add_reader/add_writer, abortable on close.

    A registration outlives the wait that made it, so a connection in steady
    request/reply use does not pay an ``epoll_ctl`` pair per wait; it is
    dropped by the first wake-up that finds nobody waiting (the loop is
    level-triggered: leaving it would spin), by :meth:`release` and by
    :meth:`abort`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[bool, asyncio.Future[None]] = {}
        self._registered: set[bool] = set()
        self._closed: BaseException | None = None

    def _ready(self, write: bool) -> None:
        fut = self._waiters.get(write)
        if fut is None:
            self._unregister(write)
        elif not fut.done():
            fut.set_result(None)

    def _unregister(self, write: bool) -> None:
        if write in self._registered:
            self._registered.discard(write)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                (loop.remove_writer if write else loop.remove_reader)(self._fd)

    async def wait(self, write: bool) -> None:
        if self._closed is not None:
            raise self._closed
        if write in self._waiters:
            raise RuntimeError(f"two tasks wait to {'write' if write else 'read'} fd {self._fd}")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.release()
            self._loop = loop
        fut: asyncio.Future[None] = loop.create_future()
        if write not in self._registered:
            (loop.add_writer if write else loop.add_reader)(self._fd, self._ready, write)
            self._registered.add(write)
        self._waiters[write] = fut
        try:
            await fut
        finally:
            if self._waiters.get(write) is fut:
                del self._waiters[write]

    def release(self) -> None:
        """Drop the loop registrations (no waiter may be pending)."""
        for write in (False, True):
            self._unregister(write)

    def interrupt(self, exc: BaseException) -> None:
        """Fail the waiters of now, without closing (they may retry)."""
        for fut in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(exc)

    def abort(self, exc: BaseException) -> None:
        """Unregister from the loop and fail any waiter (before the fd is closed)."""
        self._closed = exc
        self.release()
        for write, fut in list(self._waiters.items()):
            del self._waiters[write]
            if not fut.done():
                fut.set_exception(exc)


async def _send_all(io: _Io, sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send every byte of ``data``, ``fds`` riding on the first one."""
    view = memoryview(data)
    pending = list(fds)
    while view:
        try:
            n = _send_once(sock, view, pending)
        except (BlockingIOError, InterruptedError):
            await io.wait(True)
            continue
        pending = []
        view = view[n:]


async def _recv_chunk(io: _Io, sock: socket.socket, bufsize: int,
                      maxfds: int) -> tuple[bytes, list[int], bool]:
    while True:
        try:
            return _recv_once(sock, bufsize, maxfds)
        except (BlockingIOError, InterruptedError):
            await io.wait(False)


async def send_msg(sock: socket.socket, msg: Msg, fds: Sequence[int] = ()) -> None:
    """Send one framed message with ``fds`` (lent) on a non-blocking stream socket.

    Not safe against a concurrent sender on the same socket (frames would
    interleave); :class:`Connection` and :class:`ControlServer` serialise.
    """
    io = _Io(sock)
    try:
        await _send_all(io, sock, protocol.encode(msg), fds)
    finally:
        io.release()


async def recv_msg(sock: socket.socket, *, decode: Callable[[bytes], Msg] = protocol.decode_reply,
                   max_fds: int = MAX_FDS, max_frame: int = MAX_FRAME) -> tuple[Msg, list[int]]:
    """Receive exactly one framed message and its fds from a non-blocking stream socket.

    Reads exactly the frame's bytes (nothing of the next frame), so it keeps no
    state between calls.  Raises :class:`ConnectionClosed` at EOF before a
    frame, :class:`TruncatedFrame` at EOF inside one, :class:`ProtocolError`
    for an oversized or undecodable frame, :class:`TruncatedControlData` when
    more than ``max_fds`` fds came with it (the frame is consumed first), and
    :class:`TransportError` if the message's ``fds`` field announces a
    different number of fds than arrived.  The fds are the caller's.
    """
    io = _Io(sock)
    fds: list[int] = []
    ctrunc = False
    try:
        header = bytearray()
        while len(header) < HEADER_SIZE:
            want = HEADER_SIZE - len(header)
            data, got, trunc = await _recv_chunk(io, sock, want, 0 if header else max_fds)
            fds += got
            ctrunc |= trunc
            if not data:
                if header:
                    raise TruncatedFrame(len(header))
                raise ConnectionClosed("connection closed by peer")
            header += data
        (length,) = _HEADER.unpack(header)
        if length > max_frame:
            raise ProtocolError(Errno.EINVAL, f"frame of {length} bytes exceeds the {max_frame}-byte limit",
                                fatal=True)
        body = bytearray()
        while len(body) < length:
            data, got, trunc = await _recv_chunk(io, sock, min(RECV_SIZE, length - len(body)), 0)
            ctrunc |= trunc or bool(got)
            close_fds(got)
            if not data:
                raise TruncatedFrame(HEADER_SIZE + len(body))
            body += data
        io.release()
        msg = decode(bytes(body))
        if ctrunc:
            raise TruncatedControlData("truncated control data: more fds than allowed came with "
                                       f"{type(msg).__name__}; those received were closed", reply=msg)
        _check_fd_count(msg, fds)
    except BaseException:
        io.release()
        close_fds(fds)
        raise
    return msg, fds


def _check_fd_count(msg: Msg, fds: Sequence[int], *, strict: bool = False) -> None:
    """The message's ``fds`` field must name as many fds as arrived (``strict``: no field means none)."""
    names = getattr(msg, "fds", None)
    if not isinstance(names, list):
        if not strict:
            return
        names = []
    if len(names) != len(fds):
        raise TransportError(f"{type(msg).__name__} announces {len(names)} fds {names}, {len(fds)} arrived")


# --------------------------------------------------------------------------
# Framing with fds (sans-I/O)
# --------------------------------------------------------------------------


class Frame(NamedTuple):
    """One frame's body, the fds that rode on its first byte, and whether some were cut off."""

    body: bytes
    fds: list[int]
    ctrunc: bool = False


class FrameAssembler:
    """:class:`~hvemu.protocol.FrameDecoder` plus the association of fds with frames.

    ``feed(data, fds, ctrunc)`` takes what one ``recvmsg`` returned.  fds
    belong to the last frame that *starts* within that chunk (the kernel ends
    a read at the end of the message that carried them); fds arriving with no
    frame start in their chunk are a protocol violation (fatal).  fds of a
    frame not yet complete are held until it is; :meth:`close` closes whatever
    is still held.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._dec = FrameDecoder(max_frame)
        self._fed = 0
        #: Stream offset where the first incomplete frame starts.
        self._start = 0
        self._held: list[int] = []
        self._held_ctrunc = False
        self._fatal: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero at EOF: a truncated frame)."""
        return self._dec.pending

    @property
    def fatal(self) -> ProtocolError | None:
        """A fatal error found after the frames last returned (the stream is over)."""
        return self._fatal

    def feed(self, data: bytes, fds: Sequence[int] = (), ctrunc: bool = False) -> list[Frame]:
        fds = list(fds)
        if self._fatal is not None:
            close_fds(fds)
            raise self._fatal
        a = self._fed
        try:
            bodies = self._dec.feed(data)
            if bodies and self._dec.pending >= HEADER_SIZE:
                try:
                    self._dec.feed(b"")  # an oversized header right after good frames?
                except ProtocolError as exc:
                    self._fatal = exc
        except ProtocolError as exc:
            self._fatal = exc
            close_fds(fds)
            self.close()
            raise
        self._fed += len(data)
        starts: list[int] = []
        cursor = self._start
        for body in bodies:
            starts.append(cursor)
            cursor += HEADER_SIZE + len(body)
        self._start = cursor
        frames = [Frame(body, [], False) for body in bodies]
        if frames and (self._held or self._held_ctrunc):
            frames[0] = Frame(frames[0].body, self._held, self._held_ctrunc)
            self._held, self._held_ctrunc = [], False
        if fds or ctrunc:
            if self._dec.pending and cursor >= a:
                close_fds(self._held)  # cannot happen with a sane kernel; never leak
                self._held, self._held_ctrunc = fds, ctrunc
            else:
                idx = [i for i, s in enumerate(starts) if s >= a]
                if not idx:
                    close_fds(fds)
                    for f in frames:
                        close_fds(f.fds)
                    self.close()
                    self._fatal = ProtocolError(
                        Errno.EINVAL, "file descriptors arrived in the middle of a frame", fatal=True)
                    raise self._fatal
                i = idx[-1]
                frames[i] = Frame(frames[i].body, frames[i].fds + fds, frames[i].ctrunc or ctrunc)
        if self._fatal is not None:
            self.close()
        return frames

    def close(self) -> None:
        """Close the fds held for an incomplete frame."""
        close_fds(self._held)
        self._held = []


class FramedStream:
    """A non-blocking stream socket carrying frames with fds, for asyncio.

    One task may :meth:`send` while another reads (:meth:`read_frames` /
    :meth:`recv_frame`), but not two of either.  :meth:`close` wakes both.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME, max_fds: int = MAX_FDS,
                 recv_size: int = RECV_SIZE, budget: BufferBudget | None = None) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        #: A server's budget of request bytes (see :mod:`hvemu.buffer_budget`): what this
        #: stream holds is its partial frame plus the frames handed out and not yet
        #: given back with :meth:`release`.  None: unbounded (a client reading replies).
        self._budget = budget
        self._outstanding = 0
        self._failed: BaseException | None = None
        if budget is not None:
            budget.register(self, self.fail)
        self._io = _Io(sock)
        self._max_frame = max_frame
        self._asm = FrameAssembler(max_frame)
        self._frames: deque[Frame] = deque()
        self._max_fds = max_fds
        self._buf = memoryview(bytearray(recv_size))
        #: The last read returned less than asked: the socket was drained, so
        #: the next read waits for readability first instead of paying a
        #: ``recvmsg`` that fails with ``EAGAIN`` (and its exception) per frame.
        self._drained = False
        #: Set once a read returned EOF.
        self.eof = False
        #: Why the stream cannot be used any more (a frame left half-sent...).
        self.broken: str | None = None

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionClosed("connection closed")
        if self.broken is not None:
            raise TransportError(self.broken)
        return self.sock

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one encoded frame, ``fds`` (lent) riding on its first byte."""
        sock = self._sock()
        view = memoryview(data)
        pending = list(fds)
        try:
            while view:
                try:
                    n = _send_once(sock, view, pending)
                except (BlockingIOError, InterruptedError):
                    await self._io.wait(True)
                    continue
                pending = []
                view = view[n:]
        except BaseException:
            if len(view) != len(data):
                self.broken = "a frame was left half-sent"
            raise

    async def read_frames(self) -> list[Frame]:
        """The frames complete after at least one read; ``[]`` at a clean EOF.

        Raises :class:`TruncatedFrame` at EOF inside a frame and a fatal
        :class:`ProtocolError` when the stream breaks the framing (only after
        the good frames before the fault were returned), or when the
        budget's bytes it held were reclaimed (:class:`~hvemu.buffer_budget.BufferFull`).
        With a budget, the bytes of the frames returned count as held until
        given back with :meth:`release`.
        """
        if self._frames:
            out = list(self._frames)
            self._frames.clear()
            return out
        budget = self._budget
        while True:
            sock = self._sock()
            if self._failed is not None:
                self._drop_partial()
                raise self._failed
            if self._asm.fatal is not None:
                raise self._asm.fatal
            if self.eof:
                return []
            try:
                if budget is not None and not budget.admits(self):
                    await budget.wait_for_room(self, self._check_peer)
                    continue
                if self._drained:
                    self._drained = False
                    await self._io.wait(False)
                    continue
            except ProtocolError as exc:  # reclaimed, while waiting for room or for bytes
                self._failed = exc
                self._drop_partial()
                raise
            try:
                n, fds, ctrunc = _recv_into(sock, self._buf, self._max_fds)
            except (BlockingIOError, InterruptedError):
                self._drained = True
                continue
            self._drained = n < len(self._buf)
            data = self._buf[:n].tobytes()
            if not data:
                close_fds(fds)
                self.eof = True
                if self._asm.pending:
                    raise TruncatedFrame(self._asm.pending)
                return []
            frames = self._asm.feed(data, fds, ctrunc)
            if budget is not None:
                self._outstanding += sum(len(f.body) for f in frames)
                self._account()
            if frames:
                return frames

    def release(self, frame: Frame) -> None:
        """A frame :meth:`read_frames` returned is served: its bytes no longer count as held."""
        if self._budget is not None:
            self._outstanding -= len(frame.body)
            self._account()

    def fail(self, exc: BaseException) -> None:
        """End reading with ``exc`` (the budget reclaimed this stream's bytes); the reader raises it."""
        self._failed = exc
        self._io.interrupt(exc)

    def _check_peer(self) -> None:
        """Raise :class:`ConnectionClosed` if the peer hung up (for a reader that cannot read now)."""
        if self.sock is None or _hung_up(self.sock):
            raise ConnectionClosed("connection closed by peer")

    def _drop_partial(self) -> None:
        """Let go of the bytes of the frame in progress (the stream is failed: it will not complete)."""
        self._asm.close()
        self._asm = FrameAssembler(self._max_frame)

    def _account(self) -> None:
        if self._budget is not None and self._failed is None:
            self._budget.set_held(self, self._asm.pending + self._outstanding)

    async def recv_frame(self) -> Frame:
        """The next frame; raises :class:`ConnectionClosed` at a clean EOF."""
        while not self._frames:
            frames = await self.read_frames()
            if not frames:
                raise ConnectionClosed("connection closed by peer")
            self._frames.extend(frames)
        return self._frames.popleft()

    def discard_input(self, limit: int = 1 << 20) -> None:
        """Throw away what is readable now (up to ``limit`` bytes), so a close is clean."""
        if self.sock is None:
            return
        left = limit
        while left > 0:
            try:
                n, _, _ = _recv_into(self.sock, self._buf, 0, socket.MSG_DONTWAIT)
            except OSError:
                return
            if not n:
                return
            left -= n

    async def hang_up(self, timeout: float) -> None:
        """Shut down writing, wait (at most ``timeout`` s) for the peer to close, then close.

        A server closes its end only after it has finished with the
        connection (a :class:`ControlServer` runs ``on_disconnect`` in the
        same step), so when this returns on the peer's EOF, whatever the
        server does on a disconnect is done.  Whatever still arrives is dropped.
        """
        sock = self.sock
        if sock is not None and self.broken is None:
            try:
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(timeout):
                    while await self.read_frames():
                        pass
            except (OSError, ProtocolError, TimeoutError):
                pass
        self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self._budget is not None:
            self._budget.forget(self)
        self._io.abort(ConnectionClosed("connection closed"))
        self._asm.close()
        for frame in self._frames:
            close_fds(frame.fds)
        self._frames.clear()
        sock.close()


def _reply_of(frame: Frame, request: Msg | None) -> tuple[Msg, list[int]]:
    """Decode and check a reply frame; raise what the caller should see."""
    try:
        try:
            reply = protocol.decode_reply(frame.body)
        except ProtocolError as exc:
            raise ControlError(exc.errno, f"undecodable reply: {exc.message}", request=request) from exc
        if frame.ctrunc:
            raise TruncatedControlData(
                f"truncated control data: {type(reply).__name__} came with more fds than allowed; "
                "those received were closed", reply=reply)
        _check_fd_count(reply, frame.fds, strict=True)
        if isinstance(reply, protocol.Error):
            raise ControlError(reply.errno, reply.message, request=request)
    except BaseException:
        close_fds(frame.fds)
        raise
    return reply, frame.fds


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


class Connection:
    """An async request/reply connection to a :class:`ControlServer`.

    ``await conn.call(msg)`` sends one request and returns ``(reply, fds)``;
    the fds are the caller's to close.  An ``Error`` reply raises
    :class:`ControlError`.  Calls from several tasks are serialised.  A call
    cancelled after its request went out leaves the connection usable (its
    reply is skipped when it comes); one cancelled half-way through sending
    breaks it (:class:`TransportError` afterwards).
    """

    def __init__(self, sock: socket.socket, *, max_fds: int = MAX_FDS, max_frame: int = MAX_FRAME) -> None:
        self._stream = FramedStream(sock, max_frame=max_frame, max_fds=max_fds)
        self._lock = asyncio.Lock()
        self._stale = 0

    @classmethod
    async def connect(cls, path: str, *, max_fds: int = MAX_FDS, max_frame: int = MAX_FRAME) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, max_fds=max_fds, max_frame=max_frame)

    @property
    def closed(self) -> bool:
        return self._stream.sock is None

    def fileno(self) -> int:
        return self._stream.sock.fileno() if self._stream.sock is not None else -1

    async def call(self, msg: Msg, fds: Sequence[int] = ()) -> tuple[Msg, list[int]]:
        data = protocol.encode(msg)  # may refuse an oversized message: nothing sent
        async with self._lock:
            stream = self._stream
            try:
                while self._stale:
                    stale = await stream.recv_frame()
                    close_fds(stale.fds)
                    self._stale -= 1
                await stream.send(data, fds)
            except asyncio.CancelledError:
                if stream.broken is not None:
                    self._abort()
                raise
            except (OSError, ProtocolError) as exc:
                self._abort()
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(f"{type(msg).__name__}: {exc}") from exc
            try:
                frame = await stream.recv_frame()
            except asyncio.CancelledError:
                self._stale += 1
                raise
            except (OSError, ProtocolError) as exc:
                self._abort()
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(f"{type(msg).__name__}: {exc}") from exc
            return _reply_of(frame, msg)

    def _abort(self) -> None:
        self._stream.close()

    async def close(self) -> None:
        """Close the connection; a call in progress fails with :class:`ConnectionClosed`."""
        self._stream.close()

    async def hang_up(self, timeout: float = 5.0) -> None:
        """Close, and return once the server has seen the close (or after ``timeout`` s).

        What the server does when a client goes away (a daemon's ring left
        orphaned for the next one) is done when this returns: a successor
        that connects at once is not refused ``EBUSY``.  A plain :meth:`close`
        returns before the server has even noticed.  No call may be in progress.
        """
        async with self._lock:
            frames = self._stale
            self._stale = 0
            if frames:
                log.debug("hanging up with %d replies unread", frames)
            await self._stream.hang_up(timeout)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class SyncConnection:
    """The blocking twin of :class:`Connection`, for simple tools and tests."""

    def __init__(self, sock: socket.socket, *, timeout: float | None = None, max_fds: int = MAX_FDS,
                 max_frame: int = MAX_FRAME) -> None:
        sock.settimeout(timeout)
        self._sock: socket.socket | None = sock
        self._asm = FrameAssembler(max_frame)
        self._frames: deque[Frame] = deque()
        self._max_fds = max_fds
        self._buf = memoryview(bytearray(RECV_SIZE))
        self._stale = 0

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = None, max_fds: int = MAX_FDS,
                max_frame: int = MAX_FRAME) -> SyncConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout=timeout, max_fds=max_fds, max_frame=max_frame)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _recv_frame(self, sock: socket.socket) -> Frame:
        while not self._frames:
            n, fds, ctrunc = _recv_into(sock, self._buf, self._max_fds)
            data = self._buf[:n].tobytes()
            if not data:
                close_fds(fds)
                if self._asm.pending:
                    raise TruncatedFrame(self._asm.pending)
                raise ConnectionClosed("connection closed by peer")
            self._frames.extend(self._asm.feed(data, fds, ctrunc))
        return self._frames.popleft()

    def call(self, msg: Msg, fds: Sequence[int] = ()) -> tuple[Msg, list[int]]:
        """Send ``msg``, wait for its reply; like :meth:`Connection.call`.

        A timeout after the request went out leaves the connection usable (the
        late reply is skipped); any other transport failure closes it.
        """
        sock = self._sock
        if sock is None:
            raise ConnectionClosed("connection closed")
        data = protocol.encode(msg)  # may refuse an oversized message: nothing sent
        try:
            while self._stale:
                close_fds(self._recv_frame(sock).fds)
                self._stale -= 1
            view = memoryview(data)
            pending = list(fds)
            while view:
                n = _send_once(sock, view, pending)
                pending = []
                view = view[n:]
        except (OSError, ProtocolError) as exc:
            self.close()
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"{type(msg).__name__}: {exc}") from exc
        try:
            frame = self._recv_frame(sock)
        except TimeoutError:
            self._stale += 1
            raise
        except (OSError, ProtocolError) as exc:
            self.close()
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"{type(msg).__name__}: {exc}") from exc
        return _reply_of(frame, msg)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._asm.close()
            for frame in self._frames:
                close_fds(frame.fds)
            self._frames.clear()
            sock.close()

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class ConnState:
    """What the server knows about one connection; handlers may keep their own data in ``data``."""

    _ids = itertools.count(1)

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        #: A number unique within the process.
        self.id = next(self._ids)
        #: Peer credentials read with ``SO_PEERCRED`` on accept.
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.connected_at = time.monotonic()
        self.requests = 0
        self.data: dict[str, Any] = {}
        #: The task serving this connection (see :meth:`ControlServer.disconnect`).
        self.task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"<ConnState #{self.id} pid={self.pid} uid={self.uid}>"


Reply = tuple[Msg, Sequence[FdLike]]
Handler = Callable[[ConnState, Msg], Awaitable[Reply]]


class _End(NamedTuple):
    """Queue item: no more requests; answer ``error`` (if any) then close."""

    error: ProtocolError | None


class _HungUp(Exception):
    pass


_Queue = asyncio.Queue[Frame | _End]


class ControlServer:
    """Serve framed requests on a Unix stream socket at ``path``.

    ``handler(state, msg)`` is awaited for every decoded request and returns
    ``(reply, fds)``; ``fds`` items are lent ``int`` fds or objects with
    ``fileno()``/``close()`` that the server closes once sent (see
    :data:`FdLike`).  The reply's ``fds`` field, if any, must name as many fds
    as are given.

    Per connection: requests are answered one at a time, in order (a slow
    handler delays only its own connection).  A frame that does not decode is
    answered ``Error(EINVAL)`` and the connection goes on; an oversized length
    prefix (the stream can no longer be trusted), or EOF inside a frame when
    the peer only shut down writing, is answered ``Error(EINVAL)`` then the
    connection is closed.  A request that carries fds is refused (``EINVAL``).
    A handler exception becomes an ``Error`` whose errno is
    :func:`errno_of` the exception, and is logged.  When the peer hangs up
    (closes both directions) the request in progress is cancelled and queued
    ones are dropped; if it only shut down writing, the requests already
    received are answered first.

    ``check_peer(uid) -> bool`` runs on accept with the peer's ``SO_PEERCRED``
    uid; a refused peer gets ``Error(EPERM)`` and is closed (and is never seen
    by ``handler``/``on_disconnect``).  ``on_disconnect(state)`` is called once
    for every accepted connection when it ends, including at server close.

    Lifetime: ``async with ControlServer(...)`` (or :meth:`start` /
    :meth:`close`).  The accept loop and every connection task live in one
    :class:`asyncio.TaskGroup`; :meth:`close` cancels them all, closes the
    listening socket and removes the socket file.
    """

    def __init__(self, path: str, handler: Handler, *,
                 on_disconnect: Callable[[ConnState], object] | None = None,
                 check_peer: Callable[[int], bool] | None = None,
                 backlog: int = 128, mode: int = 0o600, max_frame: int = MAX_FRAME,
                 queue_depth: int = 64, max_buffered: int = MAX_BUFFERED) -> None:
        self.path = path
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._check_peer = check_peer
        self._backlog = backlog
        self._mode = mode
        self._max_frame = max_frame
        self._queue_depth = queue_depth
        #: Request bytes held for all connections, and for each (see :mod:`hvemu.buffer_budget`);
        #: the total always leaves room for one frame of the largest size.
        self.buffers = BufferBudget(max(max_buffered, max_frame + HEADER_SIZE + RECV_SIZE), 2 * max_frame)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._main: asyncio.Task[None] | None = None
        self._conns: dict[int, ConnState] = {}
        self._closing = False

    def disconnect(self, state: ConnState) -> None:
        """Close one connection from the server's side (``on_disconnect`` still runs for it).

        The request in progress on it, if any, is cancelled.  A handler may not
        disconnect its own connection this way (it would cancel itself).
        """
        task = state.task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            raise RuntimeError("a handler cannot disconnect its own connection")
        task.cancel()

    # ------------------------------------------------------------ lifetime
    @property
    def connections(self) -> list[ConnState]:
        """The connections being served now."""
        return list(self._conns.values())

    @property
    def serving(self) -> bool:
        return self._main is not None and not self._main.done()

    async def start(self) -> None:
        if self._main is not None:
            raise RuntimeError("ControlServer already started")
        self._listener = self._bind()
        self._main = asyncio.create_task(self._run(), name=f"control-server {self.path}")

    async def serve_forever(self) -> None:
        """Start if needed, then wait until the server is closed."""
        if self._main is None:
            await self.start()
        assert self._main is not None
        await asyncio.wait({self._main})

    async def close(self) -> None:
        """Stop accepting, cancel every connection, remove the socket file (idempotent)."""
        self._closing = True
        main = self._main
        if main is not None and not main.done():
            main.cancel()
            await asyncio.wait({main})
        self._unbind()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _bind(self) -> socket.socket:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.setblocking(False)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale socket %s", path)
                os.unlink(path)
            except BlockingIOError:
                raise RuntimeError(f"a server is already listening on {path}") from None
            else:
                raise RuntimeError(f"a server is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a private name first, then renamed into place: a
        # client that sees the socket file can connect (no ECONNREFUSED before listen).
        # The name is no longer than the real one (a socket path has at most 107 bytes).
        staging = os.path.join(os.path.dirname(path), f".{os.getpid()}")
        if len(staging) > len(path):
            staging = path
        try:
            sock.setblocking(False)
            if staging != path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
            sock.bind(staging)
            try:
                os.chmod(staging, self._mode)
                sock.listen(self._backlog)
                if staging != path:
                    os.rename(staging, path)
                st = os.stat(path)
                self._inode = (st.st_dev, st.st_ino)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                raise
        except BaseException:
            sock.close()
            raise
        return sock

    def _unbind(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        sock, _ = await loop.sock_accept(listener)
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except Exception as exc:
                        # EMFILE, ENFILE, ENOBUFS...: back off, keep serving.
                        log.error("accept on %s failed: %s", self.path, exc)
                        await asyncio.sleep(0.1)
                        continue
                    tg.create_task(self._serve(sock))
        finally:
            self._unbind()

    # ------------------------------------------------------------ per connection
    async def _serve(self, sock: socket.socket) -> None:
        state: ConnState | None = None
        stream: FramedStream | None = None
        try:
            pid, uid, gid = peer_credentials(sock)
            stream = FramedStream(sock, max_frame=self._max_frame, max_fds=0, budget=self.buffers)
            if self._check_peer is not None and not self._check_peer(uid):
                log.warning("refusing connection from pid %d uid %d", pid, uid)
                err = protocol.Error(errno=Errno.EPERM, message=f"uid {uid} may not use this control socket")
                await asyncio.wait_for(stream.send(protocol.encode(err)), 5)
                stream.discard_input()
                return
            state = ConnState(pid, uid, gid)
            state.task = asyncio.current_task()
            self._conns[state.id] = state
            log.debug("connection %s", state)
            await self._serve_conn(state, stream)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection %s failed", state)
        finally:
            if stream is not None:
                stream.close()
            else:
                sock.close()
            if state is not None:
                self._conns.pop(state.id, None)
                log.debug("disconnected %s", state)
                if self._on_disconnect is not None:
                    try:
                        self._on_disconnect(state)
                    except Exception:
                        log.exception("on_disconnect(%s) failed", state)

    async def _serve_conn(self, state: ConnState, stream: FramedStream) -> None:
        queue: _Queue = asyncio.Queue(self._queue_depth)
        reader = asyncio.create_task(self._reader(stream, queue), name=f"conn#{state.id} reader")
        worker = asyncio.create_task(self._worker(state, stream, queue), name=f"conn#{state.id} worker")
        try:
            await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            worker.cancel()
            await asyncio.wait({reader, worker})
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, Frame):
                    close_fds(item.fds)

    async def _put(self, stream: FramedStream, queue: _Queue, item: Frame | _End) -> None:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        while True:  # a pipelining client: wait for room, but notice a hang-up meanwhile
            try:
                await asyncio.wait_for(queue.put(item), HANGUP_POLL)
                return
            except TimeoutError:
                if stream.sock is None or _hung_up(stream.sock):
                    if isinstance(item, Frame):
                        close_fds(item.fds)
                    raise _HungUp() from None

    async def _reader(self, stream: FramedStream, queue: _Queue) -> None:
        """Feed the worker; return when the peer has hung up (the worker is then cancelled)."""
        try:
            while True:
                try:
                    frames = await stream.read_frames()
                except ProtocolError as exc:
                    if stream.sock is None or _hung_up(stream.sock):
                        return
                    await self._put(stream, queue, _End(exc))
                    break
                except OSError:
                    return
                if not frames:
                    if stream.sock is None or _hung_up(stream.sock):
                        return
                    await self._put(stream, queue, _End(None))
                    break
                for frame in frames:
                    await self._put(stream, queue, frame)
        except _HungUp:
            return
        # Half-closed or broken: the worker finishes; keep an eye on a full hang-up.
        while stream.sock is not None and not _hung_up(stream.sock):
            await asyncio.sleep(HANGUP_POLL)

    async def _worker(self, state: ConnState, stream: FramedStream, queue: _Queue) -> None:
        while True:
            item = await queue.get()
            try:
                if isinstance(item, _End):
                    if item.error is not None:
                        log.info("%s: %s; closing", state, item.error.message)
                        err = protocol.Error(errno=item.error.errno, message=item.error.message)
                        await stream.send(protocol.encode(err))
                        stream.discard_input()
                    return
                state.requests += 1
                try:
                    reply, fds = await self._answer(state, item)
                finally:
                    stream.release(item)
                await self._send_reply(state, stream, reply, fds)
            except OSError as exc:
                log.debug("%s: peer gone while replying: %s", state, exc)
                return

    async def _answer(self, state: ConnState, frame: Frame) -> Reply:
        if frame.ctrunc or frame.fds:
            close_fds(frame.fds)
            return protocol.Error(errno=Errno.EINVAL, message="requests may not carry file descriptors"), ()
        try:
            msg = protocol.decode_request(frame.body)
        except ProtocolError as exc:
            log.info("%s: %s", state, exc.message)
            return protocol.Error(errno=exc.errno, message=exc.message), ()
        try:
            result = await self._handler(state, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = errno_of(exc)
            text = getattr(exc, "message", None)
            if not isinstance(text, str) or not text:
                text = str(exc) or type(exc).__name__
            if isinstance(getattr(exc, "errno", None), str):
                log.info("%s: %s -> %s: %s", state, type(msg).__name__, code, text)
            else:
                log.error("%s: handler failed on %s", state, type(msg).__name__, exc_info=exc)
                text = f"{type(exc).__name__}: {text}"
            return protocol.Error(errno=code, message=text), ()
        if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], Msg)
                or not isinstance(result[1], Sequence)):
            log.error("%s: handler returned %r for %s, not (reply, fds)", state, result, type(msg).__name__)
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Sequence):
                _release(result[1])
            return protocol.Error(errno=Errno.EINVAL, message="internal error: bad handler result"), ()
        return result

    async def _send_reply(self, state: ConnState, stream: FramedStream, reply: Msg,
                          fds: Sequence[FdLike]) -> None:
        try:
            data: bytes | None = None
            names = getattr(reply, "fds", None)
            expected = len(names) if isinstance(names, list) else 0
            if expected != len(fds):
                log.error("%s: %s announces %d fds but the handler gave %d", state, type(reply).__name__,
                          expected, len(fds))
                reply = protocol.Error(errno=Errno.EINVAL, message="internal error: reply fds mismatch")
                _release(fds)
                fds = ()
            try:
                data = protocol.encode(reply)
            except (ProtocolError, msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
                log.error("%s: cannot encode %s: %s", state, type(reply).__name__, exc)
                data = protocol.encode(protocol.Error(errno=Errno.EINVAL,
                                                      message=f"internal error: reply not encodable: {exc}"))
                _release(fds)
                fds = ()
            try:
                await stream.send(data, _raw_fds(fds))
            except OSError as exc:
                # A bad fd from the handler fails the very first sendmsg, before
                # any byte went out: answer that instead of dropping the peer.
                if not fds or exc.errno not in (_errno.EBADF, _errno.EINVAL) or stream.broken is not None:
                    raise
                log.error("%s: cannot pass the fds of %s: %s", state, type(reply).__name__, exc)
                await stream.send(protocol.encode(protocol.Error(
                    errno=Errno.EINVAL, message=f"internal error: cannot pass the reply's fds: {exc}")))
        finally:
            _release(fds)


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (a TaskGroup wraps what its tasks raised).

    Command-line front ends use it to print the one line that matters.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
