"""The control plane: msgspec messages and their length-prefixed framing.

Every request is a tagged ``Struct``; every request gets exactly one reply,
either its own reply type or :class:`Error` carrying an errno name from
:class:`hvemu.abi.Errno`.  A frame is a little-endian u32 body length followed
by a MessagePack body.  The :class:`FrameDecoder` is sans-I/O: it is fed bytes
and yields bodies, so the hypervisor, the guest and the pager share it whatever
their transport.

File descriptors (ring page, event channel, guest memory, p2m) travel beside a
reply with ``SCM_RIGHTS``; the reply says how many and in which order
(``fds`` field names), so a receiver can check it got what was announced.

Why one module of ~500 lines: every message of the control protocol is declared here and only
here, so that a reader (and the fuzzers) find the whole wire format in one file.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

from hvemu.abi import Errno, RingKind
from hvemu.stats import DomainStats

#: A body larger than this is refused (and the connection closed): it can only
#: be a bug or an attack, the largest legitimate message is a batch of pages.
MAX_FRAME = 8 << 20
_LEN = struct.Struct("<I")
HEADER_SIZE = _LEN.size


class ProtocolError(Exception):
    """A frame that cannot be decoded; ``errno`` says how to answer it."""

    def __init__(self, errno: Errno, message: str, *, fatal: bool = False) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message
        #: True when the byte stream can no longer be trusted (close it).
        self.fatal = fatal


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class Msg(msgspec.Struct, tag_field="op", tag=_snake, forbid_unknown_fields=True):
    """Base of every control message; ``op`` names it on the wire."""


# --------------------------------------------------------------------------
# Replies shared by many requests
# --------------------------------------------------------------------------


class Ok(Msg):
    pass


class Error(Msg):
    errno: Errno
    message: str = ""


class BatchResult(Msg):
    """Per-gfn outcome of a batched tool op: ``None`` for success, else an errno name."""

    results: list[Errno | None]


# --------------------------------------------------------------------------
# ControlClient roles
# --------------------------------------------------------------------------


class ToolHello(Msg):
    """First message of a toolstack or daemon connection."""

    client: str = "tool"


class GuestHello(Msg):
    """First message of a guest connection: binds it to one domain (and vCPU)."""

    domid: int
    vcpu: int | None = None


class Welcome(Msg):
    """Reply to either hello."""

    role: Literal["tool", "guest"]
    domid: int | None = None
    max_vcpus: int = 0
    gfns: int = 0
    #: A vCPU's hello: the port of its event channel (the fd named ``evtchn``), for exits through
    #: its slot of the ioreq page (the fd named ``ioreq`` of the domain's hello).
    port: int | None = None
    #: Names of the fds passed with this reply, in order.
    fds: list[str] = []


# --------------------------------------------------------------------------
# Domctls (tool role)
# --------------------------------------------------------------------------


class DomainCreate(Msg):
    max_vcpus: int
    gfns: int
    name: str = ""
    #: Xen's domain handle (``xen_domain_handle_t``): a UUID as 32 hex digits
    #: naming this domain instance; the hypervisor picks one when empty.
    #: Domain ids are reused across hypervisor runs, handles are not: a
    #: pager's store records the handle of the domain whose pages it holds.
    handle: str = ""
    #: The layout of the domain's ring entries: ``seed``, ``4.2`` or ``vm_event`` (``abi.RING_ABIS``).
    abi: str = "seed"


class DomainCreated(Msg):
    domid: int


class DomainDestroy(Msg):
    domid: int


class DomainList(Msg):
    pass


class DomainSummary(msgspec.Struct):
    domid: int
    name: str
    max_vcpus: int
    gfns: int
    resident: int
    crashed: bool = False
    handle: str = ""
    abi: str = "seed"


class DomainListReply(Msg):
    domains: list[DomainSummary]


class MemEventEnable(Msg):
    """Enable (or re-attach to an orphaned) mem_event ring of a domain."""

    domid: int
    ring: RingKind


class MemEventEnabled(Msg):
    domid: int
    ring: RingKind
    port: int
    ring_size: int
    max_vcpus: int
    gfns: int
    #: True when an orphaned ring (its daemon died) was handed over as is.
    reattached: bool = False
    #: The domain's handle (see :class:`DomainCreate`).
    domain_handle: str = ""
    #: The domain's ring ABI: build the ring with ``abi.entry_codec(abi, ring)``.
    abi: str = "seed"
    fds: list[str] = []


class MemEventDisable(Msg):
    domid: int
    ring: RingKind


class MemEventResume(Msg):
    """The domctl twin of a daemon's event-channel kick: drain responses."""

    domid: int
    ring: RingKind


class PagingNominate(Msg):
    domid: int
    gfns: list[int]


class PagingEvict(Msg):
    domid: int
    gfns: list[int]


class PagingPrep(Msg):
    """Allocate frames for paged gfns; the daemon fills them through its mapping."""

    domid: int
    gfns: list[int]


class PagingLoad(Msg):
    """Allocate and fill frames: one ``PAGE_SIZE`` bytes object per gfn.

    ``resume``: then drain the paging ring's responses, as
    :class:`MemEventResume` does, in the same call (two domctls batched, like a
    Xen multicall).  A pager that published its responses for these gfns
    first saves an event-channel kick and a round trip on every page-in.  The
    resume is skipped when a gfn failed with ``ENOMEM``: the pager makes room,
    loads again, then resumes itself.
    """

    domid: int
    gfns: list[int]
    pages: list[bytes]
    resume: bool = False


class AccessSet(Msg):
    domid: int
    gfns: list[int]
    access: int


class AccessGet(Msg):
    """``p2m_get_mem_access`` of one gfn (``abi.DEFAULT_ACCESS_GFN``: the p2m's default)."""

    domid: int
    gfn: int


class AccessReply(Msg):
    domid: int
    gfn: int
    access: int


class AccessRequired(Msg):
    domid: int
    required: bool


class MapForeign(Msg):
    """Map gfns from a tool: paged ones are populated and answer ``ENOENT``.

    The reply carries a copy of each mapped page.  With ``keep`` the mapping
    stays, holding a reference on each page (its nominate and evict answer
    ``EBUSY``, as on Xen) until :class:`UnmapForeign` or the connection ends;
    without it the pages are unmapped as soon as they are copied.
    """

    domid: int
    gfns: list[int]
    keep: bool = False


class UnmapForeign(Msg):
    """Drop mappings taken with ``MapForeign(keep=True)`` (``ENOENT`` per gfn not mapped here)."""

    domid: int
    gfns: list[int]


class ForeignPages(Msg):
    results: list[Errno | None]
    pages: list[bytes | None]


class SetTarget(Msg):
    """The paging target (resident pages), as xenstore's ``memory/target``."""

    domid: int
    pages: int


class Stats(Msg):
    domid: int


class StatsReply(Msg):
    domid: int
    #: Counters and facts (:mod:`hvemu.stats`); nested per ring.
    stats: DomainStats


class GetTarget(Msg):
    domid: int


class TargetReply(Msg):
    domid: int
    pages: int


class DomainInfo(Msg):
    domid: int


class HostInfo(Msg):
    """The host as a whole, as ``xl info`` shows it."""


class HostInfoReply(Msg):
    total_frames: int
    used_frames: int
    policy: str
    #: Slots of every ring this hypervisor makes.
    ring_size: int
    domains: int
    #: The trace file being recorded ("" if none).
    tracing: str = ""


# --------------------------------------------------------------------------
# Guest exits (guest role, own domain only).  The reply to an exit that
# paused the vCPU comes when the vCPU runs again: the guest then retries.
# --------------------------------------------------------------------------


class GuestAccess(Msg):
    """A vCPU could not access ``gfn`` directly (p2m type or access right).

    ``offset`` is where in the page the access went (an access event's ``offset``).
    """

    vcpu: int
    gfn: int
    access: int
    gla: int | None = None
    offset: int = 0


class GuestBalloonOut(Msg):
    """XENMEM_decrease_reservation: give gfns back (paged ones -> DROP_PAGE)."""

    vcpu: int
    gfns: list[int]


class GuestTrap(Msg):
    """A CR0/CR3/CR4 write, an INT3 or a single step, for hvm_memory_event_traps.

    The guest reports a step (``SINGLESTEP``) after each access while its
    vCPU's single-step flag is set in the p2m segment's vCPU table.
    """

    vcpu: int
    reason: int
    value: int = 0
    old: int = 0
    gla: int | None = None


class TrapInjected(Msg):
    """The reply to a guest exit when a tool injected a trap meanwhile (``HVMOP_inject_trap``):
    the guest delivers ``vector`` to its own handler as it resumes."""

    vector: int


class DomainPause(Msg):
    """``xl pause``: every vCPU stops at its next step until :class:`DomainUnpause` (both idempotent)."""

    domid: int


class DomainUnpause(Msg):
    domid: int


class GuestYield(Msg):
    """A vCPU found its domain paused by the toolstack: the reply comes when it may run again."""

    vcpu: int


class InjectTrap(Msg):
    """``HVMOP_inject_trap``: deliver ``vector`` to a vCPU on its next entry (xen-access re-injects INT3)."""

    domid: int
    vcpu: int
    vector: int


class DebugControl(Msg):
    """XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON/OFF for one vCPU."""

    domid: int
    vcpu: int
    single_step: bool


class SetHvmParam(Msg):
    """HVM_PARAM_MEMORY_EVENT_{CR0,CR3,CR4,INT3}: abi.HVMPME_* mode flags.

    ``mask``: register bits whose changes alone send no event (Xen 4.17's
    ``write_ctrlreg_mask``, e.g. CR4.PGE); CR0/CR3/CR4 only.
    """

    domid: int
    reason: int
    mode: int
    mask: int = 0


class TraceStart(Msg):
    """Record ring events to ``path`` (format: :mod:`hvemu.trace`); ``EBUSY`` while a trace is recorded."""

    path: str
    #: Events recorded, bit ``1 << TraceEvent`` each (``hvemu.trace.event_mask``); -1: every event.
    mask: int = -1


class TraceStop(Msg):
    pass


class TraceStopped(Msg):
    path: str
    records: int


TOOL_REQUESTS = (
    ToolHello | GuestHello | DomainCreate | DomainDestroy | DomainList
    | MemEventEnable | MemEventDisable | MemEventResume
    | PagingNominate | PagingEvict | PagingPrep | PagingLoad
    | AccessSet | AccessGet | AccessRequired | MapForeign | UnmapForeign | SetTarget | GetTarget | Stats
    | DomainInfo | InjectTrap | DebugControl | DomainPause | DomainUnpause | GuestYield | HostInfo
    | GuestAccess | GuestBalloonOut | GuestTrap | SetHvmParam | TraceStart | TraceStop
)

Request = TOOL_REQUESTS
#: What only a guest connection may send: its vCPUs' exits (and hypercalls) for its own domain.
GUEST_EXITS = (GuestAccess, GuestBalloonOut, GuestTrap, GuestYield)
Reply = (
    Ok | Error | BatchResult | Welcome | DomainCreated | DomainListReply
    | MemEventEnabled | ForeignPages | StatsReply | TargetReply | TraceStopped | AccessReply | TrapInjected
    | HostInfoReply
)

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)  # type: ignore[valid-type]
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)  # type: ignore[valid-type]


def encode(msg: Msg) -> bytes:
    """One complete frame: length prefix and body."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(Errno.EINVAL, f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode_request(body: bytes) -> Msg:
    try:
        msg: Msg = _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(Errno.EINVAL, f"malformed request: {exc}") from exc
    return msg


def decode_reply(body: bytes) -> Msg:
    try:
        msg: Msg = _reply_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(Errno.EINVAL, f"malformed reply: {exc}") from exc
    return msg


class FrameDecoder:
    """Sans-I/O de-framer: ``feed`` bytes, get complete bodies back."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every body now complete, in order.

        An oversized length prefix raises a fatal :class:`ProtocolError`, but
        only once the complete frames before it have been returned: a call
        that returned bodies may leave it for the next call.
        """
        self._buf += data
        bodies: list[bytes] = []
        while len(self._buf) >= HEADER_SIZE:
            (length,) = _LEN.unpack_from(self._buf, 0)
            if length > self._max:
                if bodies:
                    # Hand out the good frames before it first; the next
                    # feed (even of b"") raises.
                    break
                raise ProtocolError(
                    Errno.EINVAL, f"frame of {length} bytes exceeds the {self._max}-byte limit", fatal=True
                )
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            bodies.append(bytes(self._buf[HEADER_SIZE:end]))
            del self._buf[:end]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero at EOF means a truncated frame)."""
        return len(self._buf)


# --------------------------------------------------------------------------
# Where the control socket lives.
# --------------------------------------------------------------------------

SOCKET_NAME = "control.sock"
RUN_DIR_ENV = "HVEMU_RUN_DIR"


def default_run_dir() -> str:
    """``$HVEMU_RUN_DIR``, else a per-user directory under ``$XDG_RUNTIME_DIR`` or ``/tmp``."""
    import os

    explicit = os.environ.get(RUN_DIR_ENV)
    if explicit:
        return explicit
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"hvemu-{os.getuid()}")


def socket_path(run_dir: str | None = None) -> str:
    import os

    return os.path.join(run_dir or default_run_dir(), SOCKET_NAME)
