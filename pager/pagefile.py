"""The pager's backing store: one page slot per gfn in a sparse file.

Slot ``g`` lives at byte ``g * PAGE_SIZE``, so the file needs no index: which
gfns are paged out is read off the p2m (``ram_paged``), and a pager restarted
after ``kill -9`` finds every evicted page exactly where it left it.  The file
is sparse, so it costs disk only for pages actually written; a gfn that never
went through this pager reads back as zeros (a page never written).

Ordering that keeps a page safe across a crash: the copy is written here
*before* the evict that frees the guest frame, and it is never overwritten
while the gfn is paged out.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterable
from typing import Protocol

from hvemu.abi import PAGE_SIZE


class PageStore(Protocol):
    """Where evicted pages live: one ``PAGE_SIZE`` slot per gfn."""

    def write(self, gfn: int, data: bytes | memoryview) -> None: ...

    def read(self, gfn: int) -> bytes: ...


def copy_out(store: PageStore, memory: mmap.mmap, gfns: Iterable[int]) -> None:
    """Copy each gfn's page from guest ``memory`` to its slot in ``store``.

    The one copy loop of eviction: the pager runs it between nominate and
    evict, and the benchmark's copy floor runs this very function, so the
    floor moves with any change made here.
    """
    write = store.write
    for g in gfns:
        off = g * PAGE_SIZE
        write(g, memory[off:off + PAGE_SIZE])


class Pagefile:
    def __init__(self, path: str, gfns: int, *, fresh: bool = False) -> None:
        """Open (or create) the pagefile; ``fresh`` empties it (a new domain has nothing in it)."""
        self.path = path
        self.gfns = gfns
        # Guest memory goes in here: never through a symlink, never into a file another
        # user owns or can read (a pagefile path in /tmp could have been planted).
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise PermissionError(f"pagefile {path} is not a regular file")
            if st.st_uid != os.getuid():
                raise PermissionError(f"pagefile {path} belongs to uid {st.st_uid}, not to us")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(self.fd, 0o600)
        except BaseException:
            os.close(self.fd)
            raise
        if fresh:
            os.ftruncate(self.fd, 0)
        if os.fstat(self.fd).st_size < gfns * PAGE_SIZE:
            os.ftruncate(self.fd, gfns * PAGE_SIZE)

    def _check(self, gfn: int) -> int:
        if not 0 <= gfn < self.gfns:
            raise ValueError(f"gfn {gfn} outside the pagefile's {self.gfns} slots")
        return gfn * PAGE_SIZE

    def write(self, gfn: int, data: bytes | memoryview) -> None:
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(data)}")
        n = os.pwrite(self.fd, data, self._check(gfn))
        if n != PAGE_SIZE:
            raise OSError(f"short write to pagefile slot {gfn}: {n} bytes")

    def read(self, gfn: int) -> bytes:
        data = os.pread(self.fd, PAGE_SIZE, self._check(gfn))
        if len(data) != PAGE_SIZE:
            raise OSError(f"short read from pagefile slot {gfn}: {len(data)} bytes")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
