"""Clients of the control socket: :class:`ControlClient` (asyncio) and :class:`SyncControlClient` (blocking).

A client sends one request and gets its one reply, ``(reply, fds)``; an
:class:`~hvemu.protocol.Error` reply is raised as :class:`ControlError` (the
errno name the hypervisor chose, in Xen's words), a reply whose fds do not
match its ``fds`` field as :class:`~hvemu.fdpass.TransportError`.  Guests,
pagers and tools load this module and never the server's
(:mod:`hvemu.hypervisor.server`); ``tests/unit/test_imports.py`` holds them to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.fdpass import (
    MAX_FDS,
    ConnectionClosed,
    TransportError,
    TruncatedControlData,
    close_fds,
    recv_into,
    send_some,
)
from hvemu.framing import Frame, FrameAssembler, TruncatedFrame, check_fd_count
from hvemu.protocol import MAX_FRAME, Msg, ProtocolError
from hvemu.stream import RECV_SIZE, FramedStream

log = logging.getLogger("hvemu.client")


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
        check_fd_count(reply, frame.fds)
        if isinstance(reply, protocol.Error):
            raise ControlError(reply.errno, reply.message, request=request)
    except BaseException:
        close_fds(frame.fds)
        raise
    return reply, frame.fds


def _broken(request: Msg, exc: OSError | ProtocolError) -> BaseException:
    """What a call raises when its connection broke (and was closed): a :class:`TransportError`, caused by ``exc``."""
    if isinstance(exc, TransportError):
        return exc
    err = TransportError(f"{type(request).__name__}: {exc}")
    err.__cause__ = exc
    return err


class ControlClient:
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
    async def connect(cls, path: str, *, max_fds: int = MAX_FDS, max_frame: int = MAX_FRAME) -> ControlClient:
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
            sent = False
            try:
                while self._stale:
                    stale = await stream.recv_frame()
                    close_fds(stale.fds)
                    self._stale -= 1
                await stream.send(data, fds)
                sent = True
                frame = await stream.recv_frame()
            except asyncio.CancelledError:
                if sent:
                    self._stale += 1  # its reply is skipped when it comes
                elif stream.broken is not None:
                    self._abort()
                raise
            except (OSError, ProtocolError) as exc:
                self._abort()
                raise _broken(msg, exc)  # noqa: B904 - _broken sets its cause
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

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class SyncControlClient:
    """The blocking twin of :class:`ControlClient`, for simple tools and tests."""

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
                max_frame: int = MAX_FRAME) -> SyncControlClient:
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
            n, fds, ctrunc = recv_into(sock, self._buf, self._max_fds)
            data = self._buf[:n].tobytes()
            if not data:
                close_fds(fds)
                if self._asm.pending:
                    raise TruncatedFrame(self._asm.pending)
                raise ConnectionClosed("connection closed by peer")
            self._frames.extend(self._asm.feed(data, fds, ctrunc))
        return self._frames.popleft()

    def call(self, msg: Msg, fds: Sequence[int] = ()) -> tuple[Msg, list[int]]:
        """Send ``msg``, wait for its reply; like :meth:`ControlClient.call`.

        A timeout after the request went out leaves the connection usable (the
        late reply is skipped); any other transport failure closes it.
        """
        sock = self._sock
        if sock is None:
            raise ConnectionClosed("connection closed")
        data = protocol.encode(msg)  # may refuse an oversized message: nothing sent
        sent = False
        try:
            while self._stale:
                close_fds(self._recv_frame(sock).fds)
                self._stale -= 1
            view = memoryview(data)
            pending = list(fds)
            while view:
                n = send_some(sock, view, pending)
                pending = []
                view = view[n:]
            sent = True
            frame = self._recv_frame(sock)
        except (OSError, ProtocolError) as exc:
            if sent and isinstance(exc, TimeoutError):
                self._stale += 1  # its reply is skipped when it comes
                raise
            self.close()
            raise _broken(msg, exc)  # noqa: B904 - _broken sets its cause
        return _reply_of(frame, msg)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._asm.close()
            for frame in self._frames:
                close_fds(frame.fds)
            self._frames.clear()
            sock.close()

    def __enter__(self) -> SyncControlClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (a TaskGroup wraps what its tasks raised).

    Command-line front ends use it to print the one line that matters.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
