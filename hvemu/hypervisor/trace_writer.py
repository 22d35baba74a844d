"""The hypervisor's trace file writer: the core's tracer callback, timestamped, filtered, buffered.

The format and the events are the contract's (:mod:`hvemu.trace`); writing a
file is the hypervisor process's business, so the core, which only calls a
tracer, never loads this module.
"""

from __future__ import annotations

import os
import time

from hvemu.trace import ALL_EVENTS, HEADER, MAGIC, RECORD, STATE_EVENTS, VERSION


class TraceWriter:
    """Buffered writer: the hypervisor's tracer callback."""

    FLUSH_AT = 1 << 16

    def __init__(self, path: str, *, exclusive: bool = False, mask: int = ALL_EVENTS) -> None:
        """Open ``path`` owner-only; ``exclusive``: only as a new file (never truncate one, never follow a link).

        Only the events in ``mask`` (bit ``1 << event``) are written, and the
        state events (:data:`STATE_EVENTS`) always.
        """
        self.path = path
        self.mask = mask | STATE_EVENTS
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_EXCL | os.O_NOFOLLOW if exclusive else os.O_TRUNC
        self._fd = os.open(path, flags, 0o600)
        self._buf = bytearray(HEADER.pack(MAGIC, VERSION, RECORD.size))
        self.records = 0

    def __call__(self, event: int, domid: int, ring: int, vcpu: int, gfn: int, arg: int) -> None:
        if not self.mask >> event & 1:
            return
        self._buf += RECORD.pack(time.monotonic_ns(), domid & 0xFFFF, ring, event,
                                 vcpu & 0xFFFFFFFF, gfn & 0xFFFFFFFFFFFFFFFF, arg & 0xFFFFFFFF)
        self.records += 1
        if len(self._buf) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done:])

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1
