"""The hypervisor process: control server, domain resources, ring drivers.

This is a thin driver around :class:`hvemu.core.hypervisor.Hypervisor`: every
control message becomes one core call followed by :func:`apply_effects`; a
daemon's event-channel kick becomes ``mem_event_resume``.  Roles: a connection
that says :class:`~hvemu.protocol.ToolHello` may run domctls; one that says
:class:`~hvemu.protocol.GuestHello` is bound to its domain and may only exit
for it.  The guest's first connection owns the domain: when it goes away the
domain is destroyed (the guest process died).  A ring's daemon connection
owns the ring: when it goes away without disabling, the ring is kept,
orphaned, for the next daemon to re-attach.

Concurrency.  Every task runs in the control server's task group
(:class:`hvemu.hypervisor.server.ControlServer`): its accept loop, each connection's
reader and worker, each request's handler.  The fault path starts no task:
vCPU exits and ring kicks are persistent reader callbacks on the event
channels (:meth:`hvemu.evtchn.EventChannel.watch`, registered through
:func:`hvemu.readiness.add_reader` like every reader), and so is the pidfd of
each ring's daemon.  An exception escaping one of them crashes the domain it
belongs to (:meth:`HypervisorDaemon._event_failed` says why); one that cannot
be pinned on a domain ends the server's task group and the hypervisor.
SIGTERM, SIGINT and SIGHUP stop it cleanly (:meth:`HypervisorDaemon.serve`).

Why one module of ~950 lines: :class:`HypervisorDaemon` is the one object the
control server and the event-channel readers call, and nearly every handler
touches the same state (the backends, the held load replies, the outbox's
drain, the connections' roles); its sections follow the protocol's groups
(hellos, domains, rings, paging, tracing, guest exits).  The work itself is
elsewhere: the rules in :mod:`hvemu.core`, a domain's resources in
:mod:`~hvemu.hypervisor.backend`, the sockets in :mod:`~hvemu.hypervisor.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import logging
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from hvemu import abi, logs, procs, protocol
from hvemu.abi import Errno, RingKind
from hvemu.core.domain import MAX_GFNS, MAX_VCPUS
from hvemu.core.errors import HypervisorError
from hvemu.core.hypervisor import Hypervisor
from hvemu.core.mem_event import NOTIFY_MODES
from hvemu.fdpass import FdLike, OwnedFd
from hvemu.hypervisor.backend import DomainBackend, Exit, RingBackend, apply_effects
from hvemu.hypervisor.janitor import Janitor
from hvemu.hypervisor.server import ConnState, ControlServer
from hvemu.hypervisor.shm import PosixSegment, Segment
from hvemu.hypervisor.trace_writer import TraceWriter
from hvemu.hypervisor.xenstored import XenstoreServer
from hvemu.names import ADMISSION_POLICIES
from hvemu.stats import VcpuStats
from hvemu.trace import ALL_EVENTS, NO_RING, NO_VCPU, RING_CODES, TraceEvent
from hvemu.xenstore import socket_path as xenstore_socket_path

log = logging.getLogger("hvemu.hypervisor.daemon")

Reply = tuple[protocol.Msg, list[FdLike]]

# Role checks of every request, as tuples built once (an ``A | B`` union is
# built anew at each evaluation).
_HELLOS = (protocol.ToolHello, protocol.GuestHello)
_GUEST_EXITS = protocol.GUEST_EXITS
_GUEST_OPS = (*_GUEST_EXITS, protocol.GuestHello)
_EXIT_ACCESS = int(abi.ExitType.ACCESS)
_EXIT_TRAP = int(abi.ExitType.TRAP)


class ConnCtx(ConnState):
    """One control connection as the hypervisor knows it: the server's state, and who the peer is to us."""

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        super().__init__(pid, uid, gid)
        self.role: str | None = None
        self.domid: int | None = None
        self.vcpu: int | None = None
        self.main_guest = False
        #: Foreign mappings this connection holds (``MapForeign(keep=True)``): gfns per domain.
        self.mappings: dict[int, collections.Counter[int]] = {}


def _err(errno: Errno, message: str) -> HypervisorError:
    return HypervisorError(errno, message)


#: Longest a reply to a load that resumed the paging ring is held, waiting for
#: the pager's next wake-up to ride on (see HypervisorDaemon._hold_load_reply).
LOAD_REPLY_HOLD = 0.002


def _cpu_seconds(guest: object | None) -> float | None:
    """The domain's CPU time, xl's ``Time(s)``: its vCPUs run in its guest process (None: no guest)."""
    if not isinstance(guest, ConnCtx):
        return None
    try:
        user, system = procs.cpu_ticks(guest.pid)
    except OSError:
        return None
    return round((user + system) / procs.CLK_TCK, 1)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class HypervisorDaemon:
    def __init__(self, run_dir: str, total_frames: int, *, policy: str = "seed",
                 ring_size: int | None = None, notify: str = "ring.h") -> None:
        self.run_dir = run_dir
        self.socket_path = protocol.socket_path(run_dir)
        self.hv = Hypervisor(total_frames, policy=policy, ring_size=ring_size,  # type: ignore[arg-type]
                             notify=notify)  # type: ignore[arg-type]
        self.backends: dict[int, DomainBackend] = {}
        #: Replies to PagingLoad(resume=True) held until the pager's next wake-up (see _hold_load_reply).
        self._held_load_replies: dict[int, list[asyncio.Future[None]]] = {}
        self._next_port = 1
        #: A drain scheduled by the outbox itself (see _drain_soon), if one is pending.
        self._drain_handle: asyncio.Handle | None = None
        self.hv.on_effects = self._drain_soon
        self._handlers: dict[type, Callable[[ConnCtx, Any], Awaitable[Reply]]] = {
            protocol.ToolHello: self._tool_hello,
            protocol.GuestHello: self._guest_hello,
            protocol.DomainCreate: self._domain_create,
            protocol.DomainDestroy: self._domain_destroy,
            protocol.DomainList: self._domain_list,
            protocol.DomainInfo: self._stats,
            protocol.Stats: self._stats,
            protocol.HostInfo: self._host_info,
            protocol.MemEventEnable: self._mem_event_enable,
            protocol.MemEventDisable: self._mem_event_disable,
            protocol.MemEventResume: self._mem_event_resume,
            protocol.PagingNominate: self._paging_nominate,
            protocol.PagingEvict: self._paging_evict,
            protocol.PagingPrep: self._paging_prep,
            protocol.PagingLoad: self._paging_load,
            protocol.AccessSet: self._access_set,
            protocol.AccessGet: self._access_get,
            protocol.AccessRequired: self._access_required,
            protocol.MapForeign: self._map_foreign,
            protocol.UnmapForeign: self._unmap_foreign,
            protocol.InjectTrap: self._inject_trap,
            protocol.DomainPause: self._domain_pause,
            protocol.DomainUnpause: self._domain_unpause,
            protocol.GuestYield: self._guest_yield,
            protocol.DebugControl: self._debug_control,
            protocol.SetTarget: self._set_target,
            protocol.GetTarget: self._get_target,
            protocol.SetHvmParam: self._set_hvm_param,
            protocol.GuestAccess: self._guest_access,
            protocol.GuestBalloonOut: self._guest_balloon_out,
            protocol.GuestTrap: self._guest_trap,
            protocol.TraceStart: self._trace_start,
            protocol.TraceStop: self._trace_stop,
        }
        self.trace: TraceWriter | None = None
        self.server: ControlServer | None = None
        #: The hypervisor's xenstore (``xenstored.sock``): domains' names and memory targets for Xen's tools.
        self.xenstored = XenstoreServer(run_dir)

    # ------------------------------------------------------------ plumbing
    @staticmethod
    def ctx(state: ConnState) -> ConnCtx:
        """The connection's state, which the server made with ``new_state=ConnCtx``."""
        assert isinstance(state, ConnCtx), state
        return state

    async def handle(self, state: ConnState, msg: protocol.Msg) -> Reply:
        ctx = self.ctx(state)
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise _err(Errno.ENOSYS, f"no such operation {type(msg).__name__}")
        if ctx.role is None and not isinstance(msg, _HELLOS):
            raise _err(Errno.EPERM, "say tool_hello or guest_hello first")
        if ctx.role == "guest" and not isinstance(msg, _GUEST_OPS):
            raise _err(Errno.EPERM, f"a guest may not {type(msg).__name__}")
        if ctx.role == "tool" and isinstance(msg, _GUEST_EXITS):
            raise _err(Errno.EPERM, "guest exits come from guest connections only")
        try:
            return await handler(ctx, msg)
        finally:
            self._after_op()

    def _drain_soon(self) -> None:
        """The core's outbox has effects: they are carried out by the end of this loop iteration.

        Every entry point drains right after its operation (``_after_op``), so
        that effects happen in order with the reply; this is the net under
        them: a path that forgets to drain delays its effects by a callback
        instead of leaving a vCPU paused for ever.
        """
        if self._drain_handle is None:
            try:
                self._drain_handle = asyncio.get_running_loop().call_soon(self._drain_late)
            except RuntimeError:  # no loop (a core call outside the server): the caller drains
                pass

    def _drain_late(self) -> None:
        self._drain_handle = None
        self._after_op()

    def _after_op(self) -> None:
        """Carry out the core's effects and what they make possible (the exits of vCPUs now runnable)."""
        self._carry_out()
        if self._drain_handle is not None and not self.hv.pending_effects():
            self._drain_handle.cancel()  # drained in time: the net is not needed
            self._drain_handle = None

    def _carry_out(self) -> None:
        if self._held_load_replies:
            self._release_load_replies()
        self._apply_effects()
        for be in list(self.backends.values()):
            exits = be.exits
            while exits.runnable_deferred and self.backends.get(be.domid) is be:
                vcpu = exits.runnable_deferred.pop(0)
                ex = exits.deferred.pop(vcpu, None)
                if ex is not None:
                    self._run_exit(be, vcpu, ex)
                    self._apply_effects()

    def _apply_effects(self) -> None:
        """Carry out the core's effects; hang up on the guests of domains that crashed."""
        for crash in apply_effects(self.hv, self.backends):
            be = self.backends.get(crash.domid)
            if be is not None:
                for ring in be.rings.values():
                    ring.close_channel()
                # The guest's vCPUs got ESRCH; one that never exits would not
                # notice, so hang up on it (it then exits, and the domain goes).
                self._disconnect_guest(be)

    def _release_load_replies(self) -> None:
        """Send the held load replies of domains whose paging ring has a request again (or is gone)."""
        for domid, held in list(self._held_load_replies.items()):
            be = self.backends.get(domid)
            paging = be.dom.rings[RingKind.paging] if be is not None else None
            if paging is None or paging.front is None or paging.occupancy() or be is None or be.dom.crashed:
                for fut in held:
                    _release(fut)
                del self._held_load_replies[domid]

    def on_disconnect(self, state: ConnState) -> None:
        ctx = self.ctx(state)
        for domid, held in ctx.mappings.items():  # a mapper's process is gone: so are its mappings
            if domid in self.backends and not self.backends[domid].dom.crashed:
                self.backends[domid].dom.foreign_unmap(list(held.elements()))
        ctx.mappings.clear()
        if ctx.role == "guest" and ctx.domid in self.backends:
            be = self.backends[ctx.domid]
            if ctx.main_guest:
                log.info("guest of domain %d disconnected: destroying the domain", ctx.domid)
                self._destroy(ctx.domid)
            elif ctx.vcpu is not None and be.vcpu_conns.get(ctx.vcpu) is ctx:
                del be.vcpu_conns[ctx.vcpu]
                be.exits.unbind(ctx.vcpu)
        for be in self.backends.values():
            for ring in be.rings.values():
                if ring.owner is ctx:
                    log.warning("daemon of domain %d %s ring went away: ring kept for re-attach",
                                be.domid, ring.kind)
                    ring.clear_owner()

    def _owner_exited(self, domid: int, kind: RingKind, ctx: ConnCtx) -> None:
        """The process of a ring's daemon is gone, though its connection may live on (see RingBackend)."""
        be = self.backends.get(domid)
        ring = be.rings.get(kind) if be is not None else None
        if ring is None or ring.owner is not ctx:
            return
        log.warning("daemon of domain %d %s ring (pid %d) exited: ring kept for re-attach",
                    domid, kind, ctx.pid)
        ring.clear_owner()

    def check_peer(self, uid: int) -> bool:
        return uid == os.getuid()

    def _backend(self, domid: int) -> DomainBackend:
        be = self.backends.get(domid)
        if be is None:
            raise _err(Errno.ESRCH, f"no domain {domid}")
        return be

    def _own_domain(self, ctx: ConnCtx) -> DomainBackend:
        assert ctx.domid is not None
        be = self._backend(ctx.domid)
        if be.dom.crashed:
            raise _err(Errno.ESRCH, f"domain {ctx.domid} has crashed")
        return be

    def _vcpu(self, be: DomainBackend, vcpu: int) -> int:
        if not 0 <= vcpu < be.dom.max_vcpus:
            raise _err(Errno.EINVAL, f"domain {be.domid} has no vCPU {vcpu}")
        return vcpu

    # ------------------------------------------------------------ hellos
    async def _tool_hello(self, ctx: ConnCtx, msg: protocol.ToolHello) -> Reply:
        if ctx.role is not None:
            raise _err(Errno.EBUSY, f"connection already has role {ctx.role}")
        ctx.role = "tool"
        return protocol.Welcome(role="tool"), []

    async def _guest_hello(self, ctx: ConnCtx, msg: protocol.GuestHello) -> Reply:
        if ctx.role is not None:
            raise _err(Errno.EBUSY, f"connection already has role {ctx.role}")
        be = self._backend(msg.domid)
        welcome = protocol.Welcome(role="guest", domid=msg.domid, max_vcpus=be.dom.max_vcpus, gfns=be.dom.gfns)
        if msg.vcpu is None:
            if be.guest is not None:
                raise _err(Errno.EBUSY, f"domain {msg.domid} already has a guest")
            be.guest = ctx
            ctx.main_guest = True
            fds: list[FdLike] = [be.memory.fd, be.p2m.ro_fd, be.inflight.fd, be.exits.page.fd]
            welcome.fds = ["memory", "p2m", "inflight", "ioreq"]
        else:
            if be.guest is None:
                raise _err(Errno.EPERM, f"domain {msg.domid}: connect the guest before its vCPUs")
            self._vcpu(be, msg.vcpu)
            if msg.vcpu in be.vcpu_conns:
                raise _err(Errno.EBUSY, f"vCPU {msg.vcpu} of domain {msg.domid} is already connected")
            # The vCPU's event channel: its exits go through its slot of the
            # ioreq page and this channel, not through this connection (which
            # still takes control-socket exits, and whose end unbinds the channel).
            port = self._next_port
            remote = be.exits.bind(msg.vcpu, port, functools.partial(self._on_vcpu_exit, be),
                                   functools.partial(self._event_failed, be.domid))
            self._next_port += 1
            be.vcpu_conns[msg.vcpu] = ctx
            ctx.vcpu = msg.vcpu
            welcome.port = port
            welcome.fds = ["evtchn"]
            fds = [OwnedFd(remote)]
        ctx.role, ctx.domid = "guest", msg.domid
        return welcome, fds

    # ------------------------------------------------------------ domains
    async def _domain_create(self, ctx: ConnCtx, msg: protocol.DomainCreate) -> Reply:
        # Checked before any segment is made (the core checks the same limits again).
        if not 1 <= msg.max_vcpus <= MAX_VCPUS:
            raise _err(Errno.EINVAL, f"max_vcpus must be within 1..{MAX_VCPUS}")
        if not 1 <= msg.gfns <= MAX_GFNS:
            raise _err(Errno.EINVAL, f"gfns must be within 1..{MAX_GFNS} ({MAX_GFNS * abi.PAGE_SIZE >> 30} GiB)")
        try:
            handle = uuid.UUID(msg.handle).hex if msg.handle else uuid.uuid4().hex
        except ValueError:
            raise _err(Errno.EINVAL, f"a domain handle is a UUID (32 hex digits), not {msg.handle!r}") from None
        if any(be.handle == handle for be in self.backends.values()):
            raise _err(Errno.EEXIST, f"a domain with handle {handle} exists")
        memory = PosixSegment(msg.gfns * abi.PAGE_SIZE, tag="mem")
        p2m = Segment(abi.p2m_table_size(msg.gfns), tag="p2m", read_only_twin=True)
        if msg.abi not in abi.RING_ABIS:
            raise _err(Errno.EINVAL, f"unknown ring ABI {msg.abi!r} (one of {', '.join(abi.RING_ABIS)})")
        inflight = Segment(abi.inflight_table_size(msg.max_vcpus), tag="inflight")
        try:
            dom = self.hv.create_domain(msg.max_vcpus, msg.gfns, p2m_buffer=p2m.map, name=msg.name,
                                        ring_abi=msg.abi)
        except BaseException:
            for seg in (memory, p2m, inflight):
                seg.close()
            raise
        self.backends[dom.domid] = DomainBackend(dom, memory, p2m, inflight, handle)
        kib = msg.gfns * abi.PAGE_SIZE // 1024
        self.xenstored.send(self.xenstored.store.introduce_domain(dom.domid, msg.name, kib, kib))
        log.info("created domain %d: %d vCPUs, %d pages", dom.domid, msg.max_vcpus, msg.gfns)
        return protocol.DomainCreated(domid=dom.domid), []

    def _disconnect_guest(self, be: DomainBackend) -> None:
        """Hang up on a domain's guest: it learns its domain is gone and exits."""
        if self.server is None:
            return
        current = asyncio.current_task()
        for ctx in [be.guest, *be.vcpu_conns.values()]:
            if isinstance(ctx, ConnCtx) and ctx.task is not current:
                self.server.disconnect(ctx)

    def _destroy(self, domid: int) -> None:
        be = self.backends.pop(domid, None)
        if be is None:
            return
        self._disconnect_guest(be)
        if domid in self.hv.domains:
            self.hv.destroy_domain(domid)
        self._after_op()
        be.close()
        self.xenstored.send(self.xenstored.store.release_domain(domid))
        log.info("destroyed domain %d", domid)

    async def _domain_destroy(self, ctx: ConnCtx, msg: protocol.DomainDestroy) -> Reply:
        self._backend(msg.domid)
        self._destroy(msg.domid)
        return protocol.Ok(), []

    async def _domain_list(self, ctx: ConnCtx, msg: protocol.DomainList) -> Reply:
        out = [protocol.DomainSummary(domid=be.domid, name=be.dom.name, handle=be.handle,
                                      max_vcpus=be.dom.max_vcpus, gfns=be.dom.gfns,
                                      resident=be.dom.p2m.resident, crashed=be.dom.crashed,
                                      abi=be.dom.ring_abi)
               for be in self.backends.values()]
        return protocol.DomainListReply(domains=out), []

    async def _stats(self, ctx: ConnCtx, msg: protocol.Stats | protocol.DomainInfo) -> Reply:
        be = self._backend(msg.domid)
        stats = be.dom.stats()
        # When these counters were read (CLOCK_MONOTONIC, shared by every process on the host):
        # a poller on a busy CPU may see the reply much later.
        stats.monotonic_ns = time.monotonic_ns()
        stats.handle, stats.target, stats.guest_connected = be.handle, be.target, be.guest is not None
        stats.cpu_time_s = _cpu_seconds(be.guest)
        stats.fault_latency_us = be.fault_latency.summary(scale=1000.0)
        stats.rings_orphaned = [str(k) for k, r in be.rings.items() if r.owner is None]
        stats.ring_owners = {str(k): r.owner_pid for k, r in be.rings.items() if r.owner is not None}
        stats.host_frames_total, stats.host_frames_used = self.hv.budget.total, self.hv.budget.used
        stats.vcpus = [VcpuStats(vcpu=v.vcpu_id, runnable=v.runnable, pauses=v.pause_count,
                                 congested=bool(v.pause_flags), connected=v.vcpu_id in be.vcpu_conns,
                                 in_exit=bool(be.exits.in_process[v.vcpu_id]) or (
                                     v.vcpu_id in be.waiters and not be.waiters[v.vcpu_id].done()))
                       for v in be.dom.vcpus]
        return protocol.StatsReply(domid=msg.domid, stats=stats), []

    async def _host_info(self, ctx: ConnCtx, msg: protocol.HostInfo) -> Reply:
        return protocol.HostInfoReply(total_frames=self.hv.budget.total, used_frames=self.hv.budget.used,
                                      policy=self.hv.policy, ring_size=self.hv.ring_size,
                                      domains=len(self.backends),
                                      tracing=self.trace.path if self.trace is not None else ""), []

    async def _set_target(self, ctx: ConnCtx, msg: protocol.SetTarget) -> Reply:
        be = self._backend(msg.domid)
        if not 0 <= msg.pages <= be.dom.gfns:
            raise _err(Errno.EINVAL, f"target must be within 0..{be.dom.gfns}")
        be.target = msg.pages
        self.xenstored.send(self.xenstored.store.set_target(be.domid, msg.pages * abi.PAGE_SIZE // 1024))
        if self.trace is not None:
            self.trace(TraceEvent.TARGET, be.domid, NO_RING, NO_VCPU, 0, msg.pages)
        return protocol.Ok(), []

    async def _get_target(self, ctx: ConnCtx, msg: protocol.GetTarget) -> Reply:
        return protocol.TargetReply(domid=msg.domid, pages=self._backend(msg.domid).target), []

    async def _set_hvm_param(self, ctx: ConnCtx, msg: protocol.SetHvmParam) -> Reply:
        be = self._backend(msg.domid)
        be.dom.set_hvm_param(msg.reason, msg.mode, msg.mask)  # the core answers EINVAL for a bad reason
        return protocol.Ok(), []

    # ------------------------------------------------------------ rings
    async def _mem_event_enable(self, ctx: ConnCtx, msg: protocol.MemEventEnable) -> Reply:
        be = self._backend(msg.domid)
        ring = be.rings.get(msg.ring)
        reattached = ring is not None
        if ring is not None:
            if ring.owner is not None:
                raise _err(Errno.EBUSY, f"domain {msg.domid} {msg.ring} ring already has a daemon")
        else:
            ring = RingBackend(be.domid, msg.ring, self._next_port)
            try:
                be.dom.mem_event_enable(msg.ring, ring.page.map)
            except BaseException:
                ring.close()
                raise
            self._next_port += 1
            be.rings[msg.ring] = ring
            if msg.ring == RingKind.paging:
                ring.open_load_area(be.dom.rings_size(msg.ring))
            self._trace_state(be, msg.ring)
        on_error = functools.partial(self._event_failed, be.domid)
        remote = ring.new_channel(functools.partial(self._on_kick, be.domid, msg.ring),
                                  functools.partial(self._on_kick, be.domid, msg.ring, hung_up=True), on_error)
        assert ring.evtchn is not None
        ring.set_owner(ctx, ctx.pid, lambda: self._owner_exited(be.domid, msg.ring, ctx), on_error)
        if reattached:
            front = be.dom.rings[msg.ring].front
            if front is not None:
                # A dead daemon may have written responses it never published
                # over request slots: the new one must see the requests.
                front.restore_unanswered()
            # The new daemon may find work already queued; make sure it looks.
            ring.evtchn.notify()
        reply = protocol.MemEventEnabled(
            domid=be.domid, ring=msg.ring, port=ring.port, ring_size=be.dom.rings_size(msg.ring),
            max_vcpus=be.dom.max_vcpus, gfns=be.dom.gfns, reattached=reattached, domain_handle=be.handle,
            abi=be.dom.ring_abi, fds=["ring", "evtchn", "memory", "p2m"])
        log.info("domain %d %s ring %s (port %d)", be.domid, msg.ring,
                 "re-attached" if reattached else "enabled", ring.port)
        fds: list[FdLike] = [ring.page.fd, OwnedFd(remote), be.memory.fd, be.p2m.ro_fd]
        if ring.load is not None:
            reply.fds.append("load")
            fds.append(ring.load.fd)
        return reply, fds

    def _on_kick(self, domid: int, kind: RingKind, hung_up: bool = False) -> None:
        """A daemon notified the ring's event channel (or its end is gone): resume (drain every response)."""
        be = self.backends.get(domid)
        ring = be.rings.get(kind) if be else None
        if be is None or ring is None or ring.evtchn is None:
            return
        try:
            self._resume(be, kind)
        except HypervisorError as exc:
            log.warning("resume of domain %d %s ring: %s", domid, kind, exc)
        if hung_up and ring.evtchn is not None:
            # The daemon's end is gone (it exited, was killed, or sent an empty
            # datagram, which reads the same): its responses were drained just
            # now.  Close our end rather than only stop reading it: whatever is
            # still queued (fds included, e.g. the daemon's own control
            # connection) is released with it.  A re-attach gets a new channel.
            ring.close_channel()
        self._after_op()

    def _event_failed(self, domid: int, exc: BaseException) -> None:
        """An exception escaped a reader callback of domain ``domid`` (:mod:`hvemu.readiness` logged its traceback).

        The callbacks (a vCPU's exit, a ring's kick, a ring daemon's exit)
        answer what a guest or a daemon can cause themselves (a
        :class:`HypervisorError` refuses an exit, or is logged); what escapes
        them is a hypervisor bug met while handling this domain's event, which
        may have left the domain half-changed.  So, as Xen's ``domain_crash``
        for a state it cannot go on from: the domain is crashed (its vCPUs'
        exits fail ``ESRCH``, its guest is hung up on) and the other domains
        go on.  If the domain is already gone, or crashing it fails too, the
        hypervisor's own state is in doubt: the error is raised in the control
        server's task group, which ends :meth:`serve` (every domain destroyed,
        exit status 1).
        """
        try:
            be = self.backends.get(domid)
            if be is None:
                raise RuntimeError(f"a reader callback of domain {domid}, which is gone, failed") from exc
            if not be.dom.crashed:
                self.hv.crash_domain(domid, f"hypervisor error handling an event: {type(exc).__name__}: {exc}")
            self._after_op()
        except Exception as bug:
            log.critical("domain %d: cannot contain a failed event callback: stopping", domid, exc_info=bug)
            if self.server is None:
                raise
            self.server.fail(bug)

    @staticmethod
    def _resume(be: DomainBackend, kind: RingKind) -> None:
        """``mem_event_resume``, after loading the pages staged for the responses it will consume.

        A staged page that found no host memory is left marked for the pager,
        which is kicked to make room and load it (its vCPU, resumed by the
        response, waits on the gfn meanwhile).
        """
        ring = be.rings.get(kind)
        if ring is None:
            be.dom.mem_event_resume(kind)  # (the core answers for a ring that is not there)
        elif ring.resume(be.dom, be.memory) and ring.evtchn is not None:
            ring.evtchn.notify()

    async def _mem_event_disable(self, ctx: ConnCtx, msg: protocol.MemEventDisable) -> Reply:
        be = self._backend(msg.domid)
        ring = be.rings.get(msg.ring)
        if ring is None:
            raise _err(Errno.ENOENT, f"domain {msg.domid} has no {msg.ring} ring")
        if ring.owner is not None and ring.owner is not ctx:
            raise _err(Errno.EPERM, f"domain {msg.domid} {msg.ring} ring belongs to another daemon")
        be.dom.mem_event_disable(msg.ring)
        del be.rings[msg.ring]
        ring.close()
        log.info("domain %d %s ring disabled", be.domid, msg.ring)
        return protocol.Ok(), []

    async def _mem_event_resume(self, ctx: ConnCtx, msg: protocol.MemEventResume) -> Reply:
        be = self._backend(msg.domid)
        self._resume(be, msg.ring)
        return protocol.Ok(), []

    # ------------------------------------------------------------ paging
    async def _restricting(self, be: DomainBackend, gfns: list[int], results: list[Errno | None]) -> Reply:
        """After a right was removed: wait out accesses in flight before answering."""
        changed = [g for g, r in zip(gfns, results, strict=True) if r is None]
        if not await be.shootdown(changed):
            self.hv.crash_domain(be.domid, "a vCPU did not leave a page during shootdown")
            raise _err(Errno.ESRCH, f"domain {be.domid} crashed during shootdown")
        return protocol.BatchResult(results=results), []

    async def _paging_nominate(self, ctx: ConnCtx, msg: protocol.PagingNominate) -> Reply:
        be = self._backend(msg.domid)
        return await self._restricting(be, msg.gfns, be.dom.paging_nominate(msg.gfns))

    async def _paging_evict(self, ctx: ConnCtx, msg: protocol.PagingEvict) -> Reply:
        be = self._backend(msg.domid)
        return protocol.BatchResult(results=be.dom.paging_evict(msg.gfns)), []

    async def _paging_prep(self, ctx: ConnCtx, msg: protocol.PagingPrep) -> Reply:
        be = self._backend(msg.domid)
        return protocol.BatchResult(results=be.dom.paging_prep(msg.gfns)), []

    async def _paging_load(self, ctx: ConnCtx, msg: protocol.PagingLoad) -> Reply:
        """Prep, fill and make ``ram_rw``: a frame is written only if allocated just now."""
        be = self._backend(msg.domid)
        if len(msg.gfns) != len(msg.pages):
            raise _err(Errno.EINVAL, "paging_load needs one page per gfn")
        if any(len(p) != abi.PAGE_SIZE for p in msg.pages):
            raise _err(Errno.EINVAL, f"every page must be {abi.PAGE_SIZE} bytes")
        pages = dict(zip(msg.gfns, msg.pages, strict=True))
        memory = be.memory

        def fill(gfn: int) -> None:
            memory.pwrite(gfn * abi.PAGE_SIZE, pages[gfn])  # never through the mapping: see PosixSegment

        results = be.dom.paging_load(msg.gfns, fill)
        if msg.resume and Errno.ENOMEM not in results:
            self._resume(be, RingKind.paging)
            self._after_op()  # the resumed vCPUs' exits answer now
            await self._hold_load_reply(be)
        return protocol.BatchResult(results=results), []

    async def _hold_load_reply(self, be: DomainBackend) -> None:
        """Coalesce the reply to a load that resumed the paging ring with the pager's next wake-up.

        Nothing in that reply is urgent (every page loaded, the vCPUs already
        run), yet sending it at once wakes the pager a second time per
        fault, only to go back to sleep on its ring.  So it is held until a
        request is next put on that ring (the pager must wake for it anyway
        and then finds both), or for :data:`LOAD_REPLY_HOLD` at most.  When
        requests are already waiting for the pager it is not held.
        """
        paging = be.dom.rings[RingKind.paging]
        if paging.front is None or paging.occupancy():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        held = self._held_load_replies.setdefault(be.domid, [])
        held.append(fut)
        timer = loop.call_later(LOAD_REPLY_HOLD, _release, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if fut in held:
                held.remove(fut)

    async def _access_set(self, ctx: ConnCtx, msg: protocol.AccessSet) -> Reply:
        be = self._backend(msg.domid)
        return await self._restricting(be, msg.gfns, be.dom.access_set(msg.gfns, msg.access))

    async def _access_required(self, ctx: ConnCtx, msg: protocol.AccessRequired) -> Reply:
        self._backend(msg.domid).dom.access_required = msg.required
        return protocol.Ok(), []

    async def _map_foreign(self, ctx: ConnCtx, msg: protocol.MapForeign) -> Reply:
        be = self._backend(msg.domid)
        results = be.dom.foreign_map(msg.gfns)
        pages: list[bytes | None] = []
        for i, (g, r) in enumerate(zip(msg.gfns, results, strict=True)):
            page = be.memory.pread(g * abi.PAGE_SIZE, abi.PAGE_SIZE) if r is None else None
            if page is not None and len(page) != abi.PAGE_SIZE:  # the guest shrank its own memory
                be.dom.foreign_unmap([g])
                results[i], page = Errno.EINVAL, None
            pages.append(page)
        mapped = [g for g, r in zip(msg.gfns, results, strict=True) if r is None]
        if msg.keep:
            ctx.mappings.setdefault(msg.domid, collections.Counter()).update(mapped)
        else:
            be.dom.foreign_unmap(mapped)  # copied: unmapped at once
        return protocol.ForeignPages(results=results, pages=pages), []

    async def _unmap_foreign(self, ctx: ConnCtx, msg: protocol.UnmapForeign) -> Reply:
        be = self._backend(msg.domid)
        held = ctx.mappings.get(msg.domid, collections.Counter())
        results: list[Errno | None] = []
        for g in msg.gfns:
            if held[g] > 0:  # only what this connection mapped: no one drops another's reference
                held[g] -= 1
                results += be.dom.foreign_unmap([g])
            else:
                results.append(Errno.ENOENT)
        return protocol.BatchResult(results=results), []

    async def _access_get(self, ctx: ConnCtx, msg: protocol.AccessGet) -> Reply:
        be = self._backend(msg.domid)
        return protocol.AccessReply(domid=msg.domid, gfn=msg.gfn, access=be.dom.access_get(msg.gfn)), []

    async def _inject_trap(self, ctx: ConnCtx, msg: protocol.InjectTrap) -> Reply:
        self._backend(msg.domid).dom.inject_trap(msg.vcpu, msg.vector)
        return protocol.Ok(), []

    async def _domain_pause(self, ctx: ConnCtx, msg: protocol.DomainPause) -> Reply:
        self._backend(msg.domid).dom.pause_by_controller()
        return protocol.Ok(), []

    async def _domain_unpause(self, ctx: ConnCtx, msg: protocol.DomainUnpause) -> Reply:
        self._backend(msg.domid).dom.unpause_by_controller()
        return protocol.Ok(), []

    async def _guest_yield(self, ctx: ConnCtx, msg: protocol.GuestYield) -> Reply:
        be = self._own_domain(ctx)
        vcpu = self._vcpu(be, msg.vcpu)
        await self._wait_runnable(be, vcpu)
        return self._resumed(be, vcpu)

    async def _debug_control(self, ctx: ConnCtx, msg: protocol.DebugControl) -> Reply:
        self._backend(msg.domid).dom.debug_control(msg.vcpu, msg.single_step)
        return protocol.Ok(), []

    @staticmethod
    def _resumed(be: DomainBackend, vcpu: int) -> Reply:
        """The reply that lets a vCPU go on: it carries a trap a tool injected meanwhile."""
        vector = be.dom.take_pending_trap(vcpu)
        return (protocol.Ok() if vector is None else protocol.TrapInjected(vector=vector)), []

    # ------------------------------------------------------------ tracing
    def start_trace(self, path: str, *, exclusive: bool = False, mask: int = ALL_EVENTS) -> None:
        trace = TraceWriter(path, exclusive=exclusive, mask=mask & ALL_EVENTS)
        self.stop_trace()
        self.trace = trace
        self.hv.tracer = self.trace
        # What a reader needs to draw the events that follow: every ring's size and every target now.
        for be in self.backends.values():
            self._trace_state(be)
        log.info("tracing ring events to %s", path)

    def _trace_state(self, be: DomainBackend, ring: RingKind | None = None) -> None:
        """Trace a domain's paging target and its rings' sizes (or only ``ring``'s), if tracing."""
        if self.trace is None:
            return
        if ring is None:
            self.trace(TraceEvent.TARGET, be.domid, NO_RING, NO_VCPU, 0, be.target)
        for kind in be.rings if ring is None else [ring]:
            self.trace(TraceEvent.RING, be.domid, RING_CODES[kind], NO_VCPU, 0, be.dom.rings_size(kind))

    def stop_trace(self) -> protocol.TraceStopped | None:
        trace, self.trace = self.trace, None
        if trace is None:
            return None
        self.hv.tracer = None
        trace.close()
        log.info("trace %s closed: %d records", trace.path, trace.records)
        return protocol.TraceStopped(path=trace.path, records=trace.records)

    async def _trace_start(self, ctx: ConnCtx, msg: protocol.TraceStart) -> Reply:
        if not os.path.isabs(msg.path):
            raise _err(Errno.EINVAL, "the trace path must be absolute (the hypervisor has its own cwd)")
        if self.trace is not None:
            raise _err(Errno.EBUSY, f"a trace is already being recorded to {self.trace.path} (stop it first)")
        try:
            # A caller names the file, the hypervisor writes it: a new file only, so
            # that no request can make it clobber an existing one (or follow a link).
            self.start_trace(msg.path, exclusive=True, mask=msg.mask)
        except FileExistsError as exc:
            raise _err(Errno.EBUSY, f"{msg.path} exists: a trace is only written to a new file") from exc
        except OSError as exc:
            raise _err(Errno.EINVAL, f"cannot write {msg.path}: {exc.strerror}") from exc
        return protocol.Ok(), []

    async def _trace_stop(self, ctx: ConnCtx, msg: protocol.TraceStop) -> Reply:
        stopped = self.stop_trace()
        if stopped is None:
            raise _err(Errno.ENOENT, "no trace is running")
        return stopped, []

    # ------------------------------------------------------------ guest exits
    def _on_vcpu_exit(self, be: DomainBackend, vcpu: int) -> None:
        """A vCPU kicked its event channel: handle the exit in its ioreq slot, in this callback.

        The core runs at once; the vCPU is answered now if it may run, else
        by the :class:`~hvemu.core.effects.VcpuRunnable` effect that names it
        (:meth:`DomainBackend.vcpu_runnable`).  A bad exit (a garbage type,
        a gfn outside the domain, a paused or crashed vCPU...) is refused
        with its errno in the slot, like a control-socket exit's error reply.
        """
        if self.backends.get(be.domid) is not be:
            return
        ex = be.exits.take(vcpu)
        if ex is None:
            return
        if not be.dom.crashed and not be.dom.vcpus[vcpu].runnable:
            # Paused (by a hypercall of its own under way on the control socket, or a tool's
            # pause): it executes nothing until it runs again, then this exit does.
            be.exits.deferred[vcpu] = ex
            return
        self._run_exit(be, vcpu, ex)
        self._after_op()

    def _run_exit(self, be: DomainBackend, vcpu: int, ex: Exit) -> None:
        """Run one exit through the core; answer now if the vCPU may run (else VcpuRunnable will)."""
        dom = be.dom
        try:
            if ex.kind == _EXIT_ACCESS:
                be.faults += 1
                dom.guest_access(vcpu, ex.a, ex.d, ex.gla, ex.c)
            elif ex.kind == _EXIT_TRAP:
                dom.hvm_trap(vcpu, ex.d, ex.a, ex.c, ex.gla)
            else:
                raise _err(Errno.EINVAL, f"no exit type {ex.kind}")
        except HypervisorError as exc:
            be.exits.refuse(vcpu, exc.errno)
        else:
            if dom.vcpus[vcpu].runnable:
                be.exits.resumed(vcpu, dom.take_pending_trap(vcpu))

    async def _wait_runnable(self, be: DomainBackend, vcpu: int) -> None:
        if be.dom.vcpus[vcpu].runnable:
            return
        fut = be.waiters.get(vcpu)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            be.waiters[vcpu] = fut
        self._after_op()
        await fut

    async def _guest_access(self, ctx: ConnCtx, msg: protocol.GuestAccess) -> Reply:
        be = self._own_domain(ctx)
        vcpu = self._vcpu(be, msg.vcpu)
        start = time.perf_counter_ns()
        be.faults += 1
        be.dom.guest_access(vcpu, msg.gfn, msg.access, msg.gla, msg.offset)
        if not be.dom.vcpus[vcpu].runnable:
            await self._wait_runnable(be, vcpu)
            be.fault_latency.record(time.perf_counter_ns() - start)
        return self._resumed(be, vcpu)

    async def _guest_trap(self, ctx: ConnCtx, msg: protocol.GuestTrap) -> Reply:
        be = self._own_domain(ctx)
        vcpu = self._vcpu(be, msg.vcpu)
        be.dom.hvm_trap(vcpu, msg.reason, msg.value, msg.old, msg.gla)  # EINVAL for a bad reason
        await self._wait_runnable(be, vcpu)
        return self._resumed(be, vcpu)

    async def _guest_balloon_out(self, ctx: ConnCtx, msg: protocol.GuestBalloonOut) -> Reply:
        be = self._own_domain(ctx)
        vcpu = self._vcpu(be, msg.vcpu)
        # One gfn at a time, like a preemptible hypercall: when a DROP_PAGE
        # trips the ring reservation the vCPU is paused, and the hypercall
        # continues only once it runs again, so no drop is ever lost to a
        # full ring (a whole batch at once would overrun the vCPU's one slot).
        results: list[Errno | None] = []
        for gfn in msg.gfns:
            await self._wait_runnable(be, vcpu)
            results += be.dom.decrease_reservation(vcpu, [gfn])
            self._after_op()
        await self._wait_runnable(be, vcpu)
        return await self._restricting(be, msg.gfns, results)

    # ------------------------------------------------------------ life
    #: How long a stopping hypervisor keeps answering after destroying its domains, so that their guests and
    #: daemons learn the domain was destroyed (and exit 0) rather than that the hypervisor vanished: at least
    #: STOP_LINGER when it had guests (a guest asks on a new connection once it sees its own closed), then
    #: until every connection has gone, at most STOP_GRACE.
    STOP_GRACE = 5.0
    STOP_LINGER = 1.0

    async def _stop_domains(self, server: ControlServer) -> None:
        """A clean stop: destroy every domain, then serve until their guests and daemons have asked and gone."""
        had_guests = any(be.guest is not None for be in self.backends.values())
        for domid in list(self.backends):
            self._destroy(domid)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() < start + self.STOP_GRACE and (
                server.connections or (had_guests and loop.time() < start + self.STOP_LINGER)):
            await asyncio.sleep(0.05)

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        prepare_run_dir(self.run_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with ControlServer(self.socket_path, self.handle, on_disconnect=self.on_disconnect,
                                     check_peer=self.check_peer, new_state=ConnCtx) as server:
                self.server = server
                await self.xenstored.start()
                log.info("hypervisor listening on %s (%d frames, %s policy)", self.socket_path,
                         self.hv.budget.total, self.hv.policy)
                if ready is not None:
                    ready()
                await stop.wait()
                log.info("stopping")
                await self._stop_domains(server)
        finally:
            for domid in list(self.backends):
                self._destroy(domid)
            self.stop_trace()
            await self.xenstored.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def prepare_run_dir(path: str) -> None:
    """Create the run directory owner-only, or refuse one others can enter."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise PermissionError(f"run directory {path} belongs to uid {st.st_uid}, not to us")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"run directory {path} is accessible to others (mode {stat.S_IMODE(st.st_mode):o})")
    sock = protocol.socket_path(path)
    if os.path.exists(sock):
        import socket

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
        except OSError:
            os.unlink(sock)  # stale, from a hypervisor that was killed
        else:
            raise RuntimeError(f"a hypervisor is already running on {sock}")
        finally:
            probe.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvemu-hypervisor", description="Run the hvemu hypervisor.")
    p.add_argument("--run-dir", default=None, help="directory of the control socket (owner-only)")
    p.add_argument("--memory", type=float, default=256.0, help="host memory budget in MiB")
    p.add_argument("--admission", choices=ADMISSION_POLICIES, default=ADMISSION_POLICIES[0],
                   help="mem_event admission policy")
    p.add_argument("--ring-size", type=int, default=None, help="ring slots (default: derived, 64)")
    p.add_argument("--notify", choices=list(NOTIFY_MODES), default="ring.h",
                   help="when a put kicks the daemon: as ring.h says (default), or after every put as Xen 4.2")
    p.add_argument("--ready-fd", type=int, default=None, help="write a byte to this fd once listening")
    p.add_argument("--trace", default=None, help="record every ring event to this file (hvemu trace ...)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("hypervisor", args.verbose)
    run_dir = args.run_dir or protocol.default_run_dir()
    frames = abi.mib_to_pages(args.memory)
    if frames < 1:
        print("hvemu-hypervisor: --memory must be at least one page", file=sys.stderr)
        return 2

    # Forked before anything is opened: removes the socket file if we are killed.
    janitor = Janitor.start(protocol.socket_path(run_dir))
    xs_janitor = Janitor.start(xenstore_socket_path(run_dir))  # the xenstore's socket, likewise

    def ready() -> None:
        janitor.arm()
        xs_janitor.arm()
        if args.ready_fd is not None:
            os.write(args.ready_fd, procs.ReadyPipe.READY)
            os.close(args.ready_fd)

    try:
        daemon = HypervisorDaemon(run_dir, frames, policy=args.admission, ring_size=args.ring_size,
                                  notify=args.notify)
        if args.trace:
            daemon.start_trace(os.path.abspath(args.trace))
        uvloop.run(daemon.serve(ready))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"hvemu-hypervisor: {exc}", file=sys.stderr)
        return 1
    finally:
        janitor.reap()
        xs_janitor.reap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
