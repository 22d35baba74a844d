"""Shared-memory segments that leave nothing behind and that no peer can shrink.

A segment is an anonymous ``memfd`` (it never has a name, so no exit, ``kill
-9`` included, can leave anything in ``/dev/shm``), mode ``0600``, mapped here
and passed to other processes by ``SCM_RIGHTS``.  Its size is *sealed*
(``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): a process holding a writable
fd (a guest its memory, a daemon its ring page) cannot ``ftruncate`` it, which
would otherwise turn the hypervisor's next access to the mapping into a
``SIGBUS`` and bring every domain down with it.

A read-only twin (an ``O_RDONLY`` open of the same object, through
``/proc/self/fd``) is what a less trusted process gets when it may only look
(the p2m table).  ``O_RDONLY`` alone does not keep it from writing: anyone
holding the fd can open ``/proc/self/fd/N`` again, read-write.  So a segment
with a read-only twin is also sealed with ``F_SEAL_FUTURE_WRITE`` once the
hypervisor has mapped it: no ``write``, no new writable mapping, no
``mprotect`` to writable and no hole punched, by anyone; the hypervisor's
own mapping, made before the seal, is the only way to change it.

``multiprocessing.shared_memory`` is not used: its resource tracker may unlink
segments that other processes still use (DESIGN section 8).  Like a POSIX shm
segment, a memfd is shmem: ``MADV_REMOVE`` really gives its pages back.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets

import posix_ipc

NAME_PREFIX = "hvemu-"
#: Seals every segment carries once sized: nobody may change its size, or the seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Linux >= 5.1: writes only through mappings that exist already (Python 3.11's fcntl lacks the name).
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
MODE = 0o600


class Segment:
    """A mapped, size-sealed, nameless shared-memory segment and its fds."""

    def __init__(self, size: int, *, tag: str = "seg", read_only_twin: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        fd = os.memfd_create(f"{NAME_PREFIX}{tag}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        ro_fd = -1
        try:
            os.fchmod(fd, MODE)  # a memfd is created 0777
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED)
            if read_only_twin:
                ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            # The seal comes after our mapping, which it spares; F_SEAL_SEAL last.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | (F_SEAL_FUTURE_WRITE if read_only_twin else 0))
        except BaseException:
            if hasattr(self, "map"):
                self.map.close()
            for f in (fd, ro_fd):
                if f >= 0:
                    os.close(f)
            raise
        self.size = size
        self.fd: int = fd
        #: An fd that can only be mapped read-only (or -1).
        self.ro_fd: int = ro_fd

    def release_range(self, offset: int, length: int) -> None:
        """Give the pages back to the host (they read back as zeros)."""
        self.map.madvise(mmap.MADV_REMOVE, offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        """Read through the fd, never the mapping (see :class:`PosixSegment`)."""
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

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


class PosixSegment(Segment):
    """A POSIX shared-memory segment (posix_ipc), its name unlinked as soon as it is mapped.

    This is what guest memory is (DESIGN section 3: names unlinked once
    mapped, so nothing is left in ``/dev/shm`` after any exit).  A POSIX
    segment cannot be sealed, and the guest holds a writable fd to it, so it
    could ``ftruncate`` it; the hypervisor therefore never loads or stores
    through its mapping of guest memory: it reads and writes pages with
    ``pread``/``pwrite`` on the fd (a shrunk segment gives a short read, not a
    ``SIGBUS``) and uses the mapping only for ``MADV_REMOVE``, which touches no
    page.  Segments the hypervisor must access through a mapping (ring pages,
    the p2m and in-flight tables) are sealed memfds (:class:`Segment`).
    """

    def __init__(self, size: int, *, tag: str = "seg", read_only_twin: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        name = f"/{NAME_PREFIX}{os.getpid()}-{tag}-{secrets.token_hex(6)}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=MODE, size=size)
        ro_fd = -1
        try:
            if read_only_twin:
                ro_fd = posix_ipc.SharedMemory(name, 0, read_only=True).fd
            self.map = mmap.mmap(shm.fd, size, mmap.MAP_SHARED)
        except BaseException:
            for f in (shm.fd, ro_fd):
                if f >= 0:
                    os.close(f)
            raise
        finally:
            shm.unlink()
        self.size = size
        self.fd = shm.fd
        self.ro_fd = ro_fd
        for f in (self.fd, self.ro_fd):
            if f >= 0:
                os.set_inheritable(f, False)
