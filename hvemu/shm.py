"""POSIX shared-memory segments that leave nothing behind.

A segment is created under a random name, opened (and optionally opened a
second time read-only, so that a read-only fd can be handed to a less trusted
process), mapped, and its name unlinked at once: from then on it lives only as
long as some process holds an fd or a mapping, so no exit, ``kill -9``
included, can leave anything in ``/dev/shm``.  posix_ipc is used rather than
``multiprocessing.shared_memory``, whose resource tracker may unlink segments
that other processes still use (DESIGN section 8).
"""

from __future__ import annotations

import mmap
import os
import secrets

import posix_ipc

NAME_PREFIX = "/hvemu-"


class Segment:
    """A mapped, already-unlinked shared-memory segment and its fds."""

    def __init__(self, size: int, *, tag: str = "seg", read_only_twin: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        name = f"{NAME_PREFIX}{os.getpid()}-{tag}-{secrets.token_hex(6)}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        ro_fd = -1
        try:
            if read_only_twin:
                ro = posix_ipc.SharedMemory(name, 0, read_only=True)
                ro_fd = ro.fd
            self.map = mmap.mmap(shm.fd, size, mmap.MAP_SHARED)
        finally:
            shm.unlink()
        self.size = size
        self.fd: int = shm.fd
        #: An fd that can only be mapped read-only (or -1).
        self.ro_fd: int = ro_fd
        for fd in (self.fd, self.ro_fd):
            if fd >= 0:
                os.set_inheritable(fd, False)

    def release_range(self, offset: int, length: int) -> None:
        """Give the pages back to the host (they read back as zeros)."""
        self.map.madvise(mmap.MADV_REMOVE, offset, length)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            # A view is still exported (e.g. by a ring object being torn down);
            # the mapping goes when the last view does.
            pass
        for fd in (self.fd, self.ro_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.ro_fd = -1
