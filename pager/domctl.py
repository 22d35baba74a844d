"""The domctls a daemon issues, each on a batch of gfns, and the SDK's errors.

:class:`Domctl` is one control connection's worth of domctls for one domain
(nominate, evict, load, access rights...): one result per gfn, ``None`` or
an :class:`~hvemu.abi.Errno` name; a domctl that fails as a whole raises
:class:`DomctlError`.  A :class:`pager.sdk.MemEventClient` is one too, on
the connection that owns its ring; :mod:`pager.sdk` re-exports all of this,
which is where daemons import it from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import msgspec

from hvemu import abi, protocol
from hvemu.abi import Errno, MemEventReason, RingKind
from hvemu.client import ControlClient, ControlError
from hvemu.fdpass import TransportError


class SdkError(Exception):
    """Base of the SDK's errors; ``errno`` is an :class:`~hvemu.abi.Errno` name when known."""

    def __init__(self, message: str, errno: Errno | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AttachError(SdkError):
    """Enabling or mapping the ring failed; ``__cause__`` says why."""


class StateError(SdkError):
    """The client is not in a state that allows this call."""


class DomctlError(SdkError):
    """A whole domctl failed (per-gfn failures come back as results instead)."""


class DomainGone(SdkError):
    """The domain was destroyed (or the hypervisor stopped): the ring is gone.

    For a daemon this is the normal end of its work, as for ``xenpaging``
    when its guest shuts down.
    """


def pages_out(types: bytes) -> int:
    """Gfns paged out or on their way back in, in a p2m type array: the pages a pager holds.

    The one count behind "keep the paging ring while pages are out": a
    disabled ring would crash the domain on the next touch of one of them,
    while a ring left orphaned waits for the pager that holds them (the
    SDK's :meth:`MemEventClient.detach` and ``pager.attach`` both ask it).
    """
    return types.count(abi.P2MType.ram_paged) + types.count(abi.P2MType.ram_paging_in)


class Domctl:
    """The domctls a daemon issues for one domain, each on a batch of gfns.

    A :class:`MemEventClient` is one (on the connection that owns its ring);
    :meth:`MemEventClient.open_domctl` gives another on its own connection, so
    that slow background work (eviction) never delays page-ins.
    """

    def __init__(self, domid: int, conn: ControlClient | None = None) -> None:
        self.domid = domid
        self._conn = conn
        #: Set once a call found the domain gone (:class:`DomainGone`): nothing more to do for it.
        self.gone = False

    @classmethod
    async def open(cls, domid: int, socket_path: str) -> Domctl:
        """A connection of its own (a tool connection: it owns no ring); :meth:`close` it."""
        conn = await ControlClient.connect(socket_path)
        try:
            await conn.call(protocol.ToolHello(client="sdk:domctl"))
        except BaseException:
            await conn.close()
            raise
        return cls(domid, conn)

    def use(self, conn: ControlClient | None) -> None:
        """Issue the domctls on ``conn`` from now on (None: none; a :class:`~pager.sdk.MemEventClient`
        attaching and detaching).  The connection stays its owner's to close."""
        self._conn = conn

    async def close(self) -> None:
        """Close the connection (a :class:`MemEventClient` closes its own on :meth:`~MemEventClient.detach`)."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # --------------------------------------------------------------- domctls
    def _connection(self) -> ControlClient:
        if self._conn is None:
            raise StateError("not connected")
        return self._conn

    async def call(self, msg: protocol.Msg) -> protocol.Msg:
        """Send one domctl; ESRCH or a lost hypervisor raise :class:`DomainGone`."""
        conn = self._connection()
        try:
            reply, fds = await conn.call(msg)
        except ControlError as exc:
            if exc.errno == Errno.ESRCH:
                self.gone = True
                raise DomainGone(f"dom{self.domid} is gone ({type(msg).__name__}: {exc})", exc.errno) from exc
            raise DomctlError(f"{type(msg).__name__} on dom{self.domid}: {exc}", exc.errno) from exc
        except TransportError as exc:
            raise DomainGone(f"lost the hypervisor during {type(msg).__name__}: {exc}") from exc
        for fd in fds:
            os.close(fd)
        return reply

    async def _batch(self, msg: protocol.Msg) -> list[Errno | None]:
        reply = await self.call(msg)
        if not isinstance(reply, protocol.BatchResult):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to {type(msg).__name__}")
        return reply.results

    async def nominate(self, gfns: Sequence[int]) -> list[Errno | None]:
        """``ram_rw`` -> ``ram_paging_out`` (``EBUSY``: not pageable).  Copy the page out only after this."""
        return await self._batch(protocol.PagingNominate(domid=self.domid, gfns=list(gfns)))

    async def evict(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Free the frames of nominated gfns (``EBUSY``: touched since nominate, keep the page)."""
        return await self._batch(protocol.PagingEvict(domid=self.domid, gfns=list(gfns)))

    async def prep(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Give paged gfns a zeroed frame (``ENOMEM``: host budget spent; ``ENOENT``: not paged).

        Fill the frame through :attr:`MemEventClient.memory` (:meth:`MemEventClient.fill`),
        then respond and push: the hypervisor's resume, on the kick, makes the
        gfn ``ram_rw``.  No page travels in a message.  Never fill a gfn whose
        prep failed, and never respond for one whose fill failed.
        """
        return await self._batch(protocol.PagingPrep(domid=self.domid, gfns=list(gfns)))

    async def load(self, gfns: Sequence[int], pages: Sequence[bytes], *, resume: bool = False) -> list[Errno | None]:
        """Allocate and fill frames; ``resume``: then drain the paging ring (unless a gfn got ``ENOMEM``).

        With ``resume``, publish the responses first (:meth:`MemEventClient.push`
        with ``notify=False``): the page-in then costs one domctl and no kick.
        """
        return await self._batch(protocol.PagingLoad(domid=self.domid, gfns=list(gfns), pages=list(pages),
                                                     resume=resume))

    async def resume(self, ring: RingKind = RingKind.paging) -> None:
        """The domctl twin of an event-channel kick: the hypervisor drains the ring's responses."""
        await self.call(protocol.MemEventResume(domid=self.domid, ring=ring))

    async def access_set(self, gfns: Sequence[int], access: int) -> list[Errno | None]:
        """Set the ``p2m_access_t`` (:class:`~hvemu.abi.P2MAccess`) of each gfn.

        When it returns, no vCPU can still use a right it removed.
        """
        return await self._batch(protocol.AccessSet(domid=self.domid, gfns=list(gfns), access=int(access)))

    async def access_required(self, required: bool) -> None:
        """``access_required``: with no access listener, a violation crashes the domain
        (else the restriction is dropped and the guest goes on)."""
        await self.call(protocol.AccessRequired(domid=self.domid, required=required))

    async def set_hvm_param(self, reason: MemEventReason | int, mode: int) -> None:
        """``HVM_PARAM_MEMORY_EVENT_{CR0,CR3,CR4,INT3}``: send those events on the access ring.

        ``mode`` is ``abi.HVMPME_MODE_SYNC`` (the vCPU waits for the response),
        ``HVMPME_MODE_ASYNC`` (it does not) or ``HVMPME_MODE_DISABLED``, plus
        ``HVMPME_ONCHANGEONLY`` to skip writes of an unchanged value.
        """
        await self.call(protocol.SetHvmParam(domid=self.domid, reason=int(reason), mode=int(mode)))

    async def set_target(self, pages: int) -> None:
        """The paging target (resident pages), as xenstore's ``memory/target``."""
        await self.call(protocol.SetTarget(domid=self.domid, pages=pages))

    async def map_foreign(self, gfns: Sequence[int], *, keep: bool = False) -> protocol.ForeignPages:
        """Map gfns as a tool: a paged gfn is populated (no vCPU paused) and answers ``ENOENT``; retry it.

        With ``keep`` each mapped page stays referenced (its nominate and evict
        answer ``EBUSY``, as on Xen) until :meth:`unmap_foreign` or the connection ends.
        """
        reply = await self.call(protocol.MapForeign(domid=self.domid, gfns=list(gfns), keep=keep))
        if not isinstance(reply, protocol.ForeignPages):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to MapForeign")
        return reply

    async def unmap_foreign(self, gfns: Sequence[int]) -> list[Errno | None]:
        """Drop mappings this connection kept (``ENOENT`` per gfn it did not map)."""
        return await self._batch(protocol.UnmapForeign(domid=self.domid, gfns=list(gfns)))

    async def access_get(self, gfn: int) -> int:
        """``xc_hvm_get_mem_access``: a gfn's access (``abi.DEFAULT_ACCESS_GFN``: the default)."""
        reply = await self.call(protocol.AccessGet(domid=self.domid, gfn=gfn))
        if not isinstance(reply, protocol.AccessReply):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to AccessGet")
        return reply.access

    async def inject_trap(self, vcpu: int, vector: int) -> None:
        """``xc_hvm_inject_trap``: the vCPU takes ``vector`` on its next entry (re-inject an INT3: 3)."""
        await self.call(protocol.InjectTrap(domid=self.domid, vcpu=vcpu, vector=vector))

    async def debug_control(self, vcpu: int, single_step: bool) -> None:
        """``xc_domain_debug_control`` SINGLE_STEP_ON/OFF: the vCPU reports every step (``SINGLESTEP``)."""
        await self.call(protocol.DebugControl(domid=self.domid, vcpu=vcpu, single_step=single_step))

    async def get_target(self) -> int:
        """The paging target in pages (follow it: the toolstack may change it at run time)."""
        reply = await self.call(protocol.GetTarget(domid=self.domid))
        if not isinstance(reply, protocol.TargetReply):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to GetTarget")
        return reply.pages

    async def stats(self) -> dict[str, object]:
        """The hypervisor's counters for the domain (p2m counts, per-ring counters, target...)."""
        reply = await self.call(protocol.Stats(domid=self.domid))
        if not isinstance(reply, protocol.StatsReply):
            raise DomctlError(f"unexpected reply {type(reply).__name__} to Stats")
        out: dict[str, object] = msgspec.to_builtins(reply.stats)  # the fields of hvemu.stats.DomainStats
        return out
