"""Frames with fds, sans-I/O: which frame each batch of received fds belongs to.

The bytes are :mod:`hvemu.protocol`'s frames (u32 LE length + MessagePack
body, cut by its :class:`~hvemu.protocol.FrameDecoder`) on an ``AF_UNIX``
``SOCK_STREAM`` socket.  File descriptors travel as ``SCM_RIGHTS`` attached to
the *first byte of the frame they belong to*: the sender passes them with the
``sendmsg`` that starts the frame.  Linux never lets one ``recvmsg`` read past
the end of a message that carried fds, so the frame a batch of fds belongs to
is the last frame that starts in the chunk they arrived with.
:class:`FrameAssembler` does that bookkeeping: it is fed what each
``recvmsg`` returned and gives back :class:`Frame` s, and reads or waits for
nothing (:mod:`hvemu.stream` is its asyncio driver, :class:`hvemu.client.SyncControlClient`
its blocking one).  A reply that carries fds names them in its ``fds:
list[str]`` field; :func:`check_fd_count` holds it to that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from hvemu.abi import Errno
from hvemu.fdpass import TransportError, close_fds
from hvemu.protocol import HEADER_SIZE, MAX_FRAME, FrameDecoder, Msg, ProtocolError


class TruncatedFrame(ProtocolError):
    """The peer closed the stream in the middle of a frame."""

    def __init__(self, pending: int) -> None:
        super().__init__(Errno.EINVAL, f"truncated frame: connection closed with {pending} bytes of an "
                         "incomplete frame", fatal=True)
        self.pending = pending


def check_fd_count(msg: Msg, fds: Sequence[int]) -> None:
    """The message's ``fds`` field must name as many fds as arrived (no such field: none may)."""
    names = getattr(msg, "fds", None)
    if not isinstance(names, list):
        names = []
    if len(names) != len(fds):
        raise TransportError(f"{type(msg).__name__} announces {len(names)} fds {names}, {len(fds)} arrived")


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

