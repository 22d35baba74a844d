"""A non-blocking stream socket carrying frames with fds, for asyncio: the thin driver of :mod:`hvemu.framing`.

Both ends of the control socket use it: :class:`hvemu.client.ControlClient`
reads replies with it, :class:`hvemu.hypervisor.server.ControlServer` requests (with a
:class:`~hvemu.buffer_budget.BufferBudget` bounding what it holds).  It tries
the syscall first and waits (:mod:`hvemu.readiness`) only on ``EAGAIN``, or
when the last read came back short (the socket was drained: waiting first
saves a ``recvmsg`` that fails, and its exception, per frame).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hvemu import readiness
from hvemu.fdpass import MAX_FDS, ConnectionClosed, TransportError, close_fds, hung_up, recv_into, send_some
from hvemu.framing import Frame, FrameAssembler, TruncatedFrame
from hvemu.protocol import MAX_FRAME, ProtocolError

if TYPE_CHECKING:  # the server's; a client never loads it
    from hvemu.buffer_budget import BufferBudget

#: Bytes asked for by one ``recvmsg`` (into a buffer kept per connection:
#: ``recvmsg`` itself would allocate that much on every call, and above
#: 128 KiB that is an mmap/munmap each time).
RECV_SIZE = 64 * 1024


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
        self._fd = sock.fileno()
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
                    n = send_some(sock, view, pending)
                except (BlockingIOError, InterruptedError):
                    await readiness.wait_writable(self._fd)
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
                    await readiness.wait_readable(self._fd)
                    continue
            except ProtocolError as exc:  # reclaimed, while waiting for room or for bytes
                self._failed = exc
                self._drop_partial()
                raise
            try:
                n, fds, ctrunc = recv_into(sock, self._buf, self._max_fds)
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
        if self.sock is not None:
            readiness.notify_closing(self._fd, exc)  # wakes the reader; a later wait registers again

    def _check_peer(self) -> None:
        """Raise :class:`ConnectionClosed` if the peer hung up (for a reader that cannot read now)."""
        if self.sock is None or hung_up(self.sock):
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
                n, _, _ = recv_into(self.sock, self._buf, 0, socket.MSG_DONTWAIT)
            except OSError:
                return
            if not n:
                return
            left -= n

    async def hang_up(self, timeout: float) -> None:
        """Shut down writing, wait (at most ``timeout`` s) for the peer to close, then close.

        A server closes its end only after it has finished with the
        connection (a :class:`~hvemu.hypervisor.server.ControlServer` runs ``on_disconnect`` in the
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
        readiness.notify_closing(self._fd, ConnectionClosed("connection closed"))
        self._asm.close()
        for frame in self._frames:
            close_fds(frame.fds)
        self._frames.clear()
        sock.close()
