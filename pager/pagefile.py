"""The pager's backing store: one page slot per gfn in a sparse file.

Slot ``g`` lives at byte ``g * PAGE_SIZE``, so the file needs no index: which
gfns are paged out is read off the p2m (``ram_paged``), and a pager restarted
after ``kill -9`` finds every evicted page exactly where it left it.  The file
is sparse, so it costs disk only for pages actually written; a gfn that never
went through this pager reads back as zeros (a page never written).

Ordering that keeps a page safe across a crash: the copy is written here
*before* the evict that frees the guest frame, and it is never overwritten
while the gfn is paged out.

Which domain the pages belong to: a pagefile opened with an ``owner`` (the
domain handle, a UUID naming one domain instance) records it in one page
after the last slot.  :meth:`Pagefile.open_for` serves a pager attaching to
a domain: it keeps a file that records this very domain, and refuses one
that does not when pages are out (a re-attach after another daemon died, a
file left from an earlier domain with the same id) -- serving such a file
would hand the guest zeros or stale pages without a word.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
from collections.abc import Container, Iterable, Sequence
from typing import Protocol

from hvemu.abi import PAGE_SIZE


class PageStore(Protocol):
    """Where evicted pages live: one ``PAGE_SIZE`` slot per gfn.

    :class:`pager.base.Pager` calls, for each gfn, ``write`` when it pages
    the gfn out (after nominate, before evict), ``read`` when it pages it in,
    and ``discard`` once the copy is no longer needed.
    """

    def write(self, gfn: int, data: bytes | memoryview) -> None:
        """Keep ``data`` (one page) as the copy of ``gfn``, replacing any older copy."""
        ...

    def read(self, gfn: int) -> bytes:
        """The copy of ``gfn``; zeros (``PAGE_SIZE`` of them) for a gfn never written.

        A domain created on an overcommitted host starts with gfns paged out
        that no pager ever stored: they are pages never written, i.e. zeros.
        """
        ...

    def discard(self, gfns: Sequence[int]) -> None:
        """The copies of ``gfns`` are garbage: free them (or keep them: nothing reads them again).

        The safe point, guaranteed by :class:`pager.base.Pager`: each gfn's
        page is in the guest's memory (a load of it succeeded: the
        hypervisor never fills a frame twice), or the guest gave the gfn
        back, or an evict of it failed (the page kept its frame), and no
        eviction of the gfn has begun since; the next ``write`` of the gfn
        comes after this call.
        """
        ...


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


_OWNER_MAGIC = b"hvemu-pagefile 1\n"


class PagefileMismatch(Exception):
    """The pagefile does not hold the pages of the domain being served (see :meth:`Pagefile.open_for`)."""


class Pagefile:
    """A :class:`PageStore` in a sparse file, slot ``g`` at ``g * PAGE_SIZE``, that survives the pager."""

    @classmethod
    def open_for(cls, path: str, gfns: int, *, handle: str, reattached: bool, paged_out: int,
                 live_handles: Container[str] = ()) -> Pagefile:
        """The pagefile for a pager attaching to the domain ``handle``, locked for this pager.

        A file whose owner record names this domain (and size) is kept as it
        is: its pages are this domain's (a pager's clean stop discards the
        record, so a record means pages may be out).  Otherwise the file is
        started afresh, unless

        * pages of the domain are out whose bytes some pager stored
          (``paged_out``; see :meth:`pager.sdk.MemEventClient.stored_pages_out`):
          they are in another store, and serving this one would give the
          guest the wrong bytes;
        * the file records another domain that is still alive
          (``live_handles``): its pages may be out, and only this file has them;
        * another pager holds the file.

        Each refusal is a :class:`PagefileMismatch` saying why.  ``reattached``
        only shapes the message.
        """
        existed = os.path.lexists(path)
        pagefile = cls(path, gfns, resize=False)  # another domain's file must not change before it is judged
        try:
            if pagefile.owner() == handle:
                return pagefile
            record = _record_at(pagefile.fd)
            recorded = record[0] if record is not None else None
            if paged_out:
                if recorded is None:
                    what = "has no record of the domain it belongs to" if existed else "does not exist"
                else:
                    what = f"holds the pages of another domain instance (handle {recorded})"
                why = "the ring was handed over from a daemon that died" if reattached else "the ring is new"
                raise PagefileMismatch(
                    f"{paged_out} pages are out, {why}, and pagefile {path} {what}: they are in the store of "
                    f"the pager that paged them out; attach a pager that reads that store")
            if recorded is not None and recorded in live_handles:
                raise PagefileMismatch(f"pagefile {path} holds pages of another live domain (handle {recorded}): "
                                       "give this pager a pagefile of its own")
            pagefile.restart(handle)
            return pagefile
        except BaseException:
            pagefile.close()
            if not existed:
                os.unlink(path)
            raise

    def __init__(self, path: str, gfns: int, *, fresh: bool = False, owner: str | None = None,
                 resize: bool = True) -> None:
        """Open (or create) the pagefile and lock it for this pager; ``fresh`` empties it.

        With ``owner`` (a domain handle) the file carries an owner record
        after its last slot: written when ``fresh``, else it must match
        (:class:`PagefileMismatch` otherwise).  A file another pager holds is
        refused (:class:`PagefileMismatch`): two pagers writing one file
        would overwrite each other's pages.
        """
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
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PagefileMismatch(f"pagefile {path} is in use by another pager") from None
            if owner is not None and not fresh and self.owner() != owner:
                raise PagefileMismatch(f"pagefile {path} does not belong to domain {owner}")
        except BaseException:
            os.close(self.fd)
            raise
        if fresh:
            os.ftruncate(self.fd, 0)
        if resize and os.fstat(self.fd).st_size < gfns * PAGE_SIZE:
            os.ftruncate(self.fd, gfns * PAGE_SIZE)
        if owner is not None and fresh:
            self.restart(owner)

    def owner(self) -> str | None:
        """The domain handle this file records, or None (no record, or a file of another size)."""
        return _owner_at(self.fd, self.gfns)

    def restart(self, owner: str) -> None:
        """Empty the file and record ``owner`` as the domain whose pages it will hold."""
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, (self.gfns + 1) * PAGE_SIZE)
        record = _OWNER_MAGIC + json.dumps({"domain_handle": owner, "gfns": self.gfns}).encode() + b"\n"
        os.pwrite(self.fd, record.ljust(PAGE_SIZE, b"\0"), self.gfns * PAGE_SIZE)

    def clear(self) -> None:
        """Nothing of the domain is out any more: drop the pages and the owner record.

        Without its record, the file can no longer pass for the store of pages
        that a later pager (with another file) pages out.
        """
        os.ftruncate(self.fd, 0)

    def discard(self, gfns: Sequence[int]) -> None:
        """Nothing to do: a slot is overwritten when its gfn is next paged out.

        A stale slot costs disk (the file is at most the guest's size), not
        memory, and punching a hole per page-in would put a syscall per
        drain on the pager's fault path for no gain.
        """

    def _check(self, gfn: int) -> int:
        if not 0 <= gfn < self.gfns:
            raise ValueError(f"gfn {gfn} outside the pagefile's {self.gfns} slots")
        return gfn * PAGE_SIZE

    def write(self, gfn: int, data: bytes | memoryview) -> None:
        """Write the page into the gfn's slot."""
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(data)}")
        n = os.pwrite(self.fd, data, self._check(gfn))
        if n != PAGE_SIZE:
            raise OSError(f"short write to pagefile slot {gfn}: {n} bytes")

    def read(self, gfn: int) -> bytes:
        """The gfn's slot (zeros if never written: the file is sparse)."""
        data = os.pread(self.fd, PAGE_SIZE, self._check(gfn))
        if len(data) != PAGE_SIZE:
            raise OSError(f"short read from pagefile slot {gfn}: {len(data)} bytes")
        return data

    def read_into(self, gfn: int, buf: memoryview) -> None:
        """Read slot ``gfn`` straight into ``buf`` (a guest frame: the kernel's one copy of a page-in).

        ``OSError`` if the read is short or fails, ``EFAULT`` included (the
        frame's memory could not be had): ``buf`` is then only partly written.
        """
        if len(buf) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(buf)}")
        n = os.preadv(self.fd, [buf], self._check(gfn))
        if n != PAGE_SIZE:
            raise OSError(f"short read from pagefile slot {gfn}: {n} bytes")

    def close(self) -> None:
        """Close the file (and let go of its lock); the pages stay in it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_owner(path: str, gfns: int) -> str | None:
    """The domain handle a pagefile of ``gfns`` slots records, or None (no file, no record, other size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _owner_at(fd, gfns)
    finally:
        os.close(fd)


def _owner_at(fd: int, gfns: int) -> str | None:
    record = _record_at(fd)
    return record[0] if record is not None and record[1] == gfns else None


def _record_at(fd: int) -> tuple[str, int] | None:
    """The (domain handle, slots) a file records in its last page, or None.

    The record is the page after the last slot, and the last page: a file
    whose size does not fit the record's slot count has none (in a file of
    more slots, that page would be guest data, which could forge a record).
    """
    size = os.fstat(fd).st_size
    if size < PAGE_SIZE or size % PAGE_SIZE:
        return None
    gfns = size // PAGE_SIZE - 1
    raw = os.pread(fd, PAGE_SIZE, gfns * PAGE_SIZE)
    if not raw.startswith(_OWNER_MAGIC):
        return None
    try:
        record = json.loads(raw[len(_OWNER_MAGIC):].split(b"\n", 1)[0])
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("gfns") != gfns:
        return None
    handle = record.get("domain_handle")
    return (handle, gfns) if isinstance(handle, str) else None
