"""Test helpers: a daemon-side listener over a ring page, driving a core domain."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvemu import abi
from hvemu.abi import MemEvent, MemEventFlag, RingKind
from hvemu.core.domain import Domain
from hvemu.core.hypervisor import Hypervisor
from hvemu.ring import BackRing, SharedRing

R, W, X = abi.ACCESS_R, abi.ACCESS_W, abi.ACCESS_X
#: Flags a well-behaved daemon echoes back.
ECHO = MemEventFlag.VCPU_PAUSED | MemEventFlag.DROP_PAGE | MemEventFlag.EVICT_FAIL | MemEventFlag.FOREIGN


@dataclass
class Listener:
    """The back end of one ring, as a pager/listener daemon would drive it."""

    dom: Domain
    kind: RingKind = RingKind.paging
    page: bytearray = field(default_factory=lambda: bytearray(abi.PAGE_SIZE))
    enable: bool = True

    def __post_init__(self) -> None:
        if self.enable:
            self.dom.mem_event_enable(self.kind, self.page)
        size = self.dom.rings_size(self.kind)
        self.sring: SharedRing[MemEvent] = SharedRing(self.page, abi.MemEventCodec,
                                                      page_size=abi.ring_bytes(size))
        self.back: BackRing[MemEvent] = BackRing(self.sring)
        #: Consumed, not yet answered.
        self.pending: list[MemEvent] = []
        #: Answered (put on the ring), not yet consumed by a resume.
        self.answered: list[MemEvent] = []

    # ------------------------------------------------------------------ requests
    def unconsumed(self) -> list[MemEvent]:
        """Requests on the ring the listener has not consumed yet (peek, no side effect)."""
        n = (self.sring.req_prod - self.back.req_cons) & abi.RING_IDX_MASK
        return [self.sring.read_entry(self.back.req_cons + i) for i in range(n)]

    def consume(self, n: int | None = None) -> list[MemEvent]:
        got: list[MemEvent] = []
        while (n is None or len(got) < n) and self.back.unconsumed_requests():
            got.append(self.back.get_request())
        self.pending.extend(got)
        return got

    # ------------------------------------------------------------------ responses
    def respond(self, rsp: MemEvent) -> None:
        self.back.put_response(rsp)
        self.answered.append(rsp)

    def answer(self, n: int | None = None, *, prep: bool = True) -> list[MemEvent]:
        """Answer the oldest ``n`` pending requests as a correct daemon would (prep paging gfns first)."""
        take = self.pending if n is None else self.pending[:n]
        self.pending = self.pending[len(take):]
        for req in take:
            if prep and self.kind == RingKind.paging and not req.flags & MemEventFlag.DROP_PAGE:
                self.dom.paging_prep([req.gfn])
            self.respond(echo(req))
        return take

    def push(self) -> bool:
        return self.back.push_responses_and_check_notify()

    def kick(self) -> None:
        """Push every answer and resume (the daemon's notify + the hypervisor's drain)."""
        self.push()
        self.dom.mem_event_resume(self.kind)
        self.answered.clear()

    def serve_all(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            self.consume()
            self.answer()
            self.kick()

    def inflight(self) -> list[MemEvent]:
        """Every request not yet resumed: on the ring, consumed, or answered."""
        return self.unconsumed() + self.pending + self.answered


def echo(req: MemEvent, **changes: int) -> MemEvent:
    rsp = MemEvent(type=req.type, flags=req.flags & ECHO, vcpu_id=req.vcpu_id, gfn=req.gfn, p2mt=req.p2mt,
                   reason=req.reason)
    for k, v in changes.items():
        setattr(rsp, k, v)
    return rsp


def make(max_vcpus: int = 4, gfns: int = 64, *, policy: str = "seed", ring_size: int | None = None,
         total: int | None = None, resident: int | None = None) -> tuple[Hypervisor, Domain]:
    hv = Hypervisor(total if total is not None else gfns, policy=policy, ring_size=ring_size)  # type: ignore[arg-type]
    dom = hv.create_domain(max_vcpus, gfns, resident=resident)
    return hv, dom


def page_out(dom: Domain, gfns: list[int]) -> None:
    """Nominate and evict, asserting both succeed."""
    assert dom.paging_nominate(gfns) == [None] * len(gfns)
    assert dom.paging_evict(gfns) == [None] * len(gfns)


def check_accounting(dom: Domain) -> None:
    """Every pause is accounted for: events + marks + wait-queue sleeps; ``blocked`` matches the marks."""
    for v in dom.vcpus:
        marks = sum(1 for med in dom.rings.values() if v.test_flag(med.pause_flag))
        spinning = v.spinning_on is not None
        controller = int(dom.paused_by_controller)
        assert v.pause_count == v.event_pause_count + marks + v.waits + spinning + controller, v
        assert v.spinning_on is None or v in dom.spinners[v.spinning_on], v
        assert v.event_pause_count >= 0 and v.waits >= 0
    for med in dom.rings.values():
        assert med.blocked == sum(1 for v in dom.vcpus if v.test_flag(med.pause_flag)), med.kind
        assert med.occupancy() <= med.ring_size
    dom.p2m.check_counts()


def woken(hv: Hypervisor) -> list[int]:
    """Drain the outbox and return the vCPUs it says may run again, in order."""
    from hvemu.core.effects import VcpuRunnable

    return [e.vcpu_id for e in hv.take_effects() if isinstance(e, VcpuRunnable)]
