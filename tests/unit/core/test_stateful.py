"""A hypothesis state machine over the core: N vCPUs (1-32), foreign mappers, a pager and
an access listener consuming at random pace, under both admission policies.

Checked after every step:

* the ring never holds more than its size, and every request produced is
  exactly one of: on the ring, consumed by the listener, answered;
* every pause is accounted for (event pauses + ring marks + wait-queue sleeps),
  ``blocked`` matches the marks, the p2m counts match a scan, the budget
  matches the resident frames;
* no guest vCPU event is lost: a vCPU held by event pauses has at least as
  many ``VCPU_PAUSED`` requests still in flight (so its response can come);
* round robin: while a vCPU is marked (or waits for a slot), fewer than N
  other vCPUs are woken (or granted) before it;
* seed policy: only foreign events are lost, each one counted (a guest event
  is lost only once foreign events have eaten into the per-vCPU reserve);
  claim policy: nothing is lost, and refused foreign producers are counted;
* after a full drain (rule ``drain`` and at the end of every run) every
  vCPU runs again and every access the guest wanted has succeeded.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hvemu import abi
from hvemu.abi import Errno, MemEventFlag, MemEventReason, P2MType, RingKind
from hvemu.core.hypervisor import Hypervisor

from ._support import Listener, R, W, check_accounting, echo

IDX = st.integers(0, 1 << 16)


class CoreMachine(RuleBasedStateMachine):
    POLICY = "seed"
    RING_SIZES: tuple[int, ...] = (64,)

    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        ring_size = data.draw(st.sampled_from(self.RING_SIZES), label="ring_size")
        n = data.draw(st.integers(1, min(32, self.max_vcpus(ring_size))), label="n")
        gfns = data.draw(st.integers(8, 48), label="gfns")
        resident = data.draw(st.integers(0, gfns), label="resident")
        self.n, self.gfns = n, gfns
        # The host has exactly a frame per gfn: a prep can never fail, so a drain always converges.
        self.hv = Hypervisor(gfns, policy=self.POLICY, ring_size=ring_size)  # type: ignore[arg-type]
        self.dom = self.hv.create_domain(n, gfns, resident=resident)
        self.pager = Listener(self.dom, RingKind.paging)
        self.acc = Listener(self.dom, RingKind.access)
        self.dom.set_hvm_param(MemEventReason.CR3, abi.HVMPME_MODE_SYNC)
        self.want: dict[int, tuple[int, int]] = {}
        self.removed: set[int] = set()
        #: Foreign mappings held, per gfn.
        self.mapped: Counter[int] = Counter()
        self.overtaken: dict[RingKind, list[int]] = {k: [0] * n for k in RingKind}
        self.overtaken_wq: dict[RingKind, list[int]] = {k: [0] * n for k in RingKind}
        self.reserve_intruded = False
        self.expect_lost_foreign = 0
        self.expect_refused = 0
        self.expect_rejected = 0

    @staticmethod
    def max_vcpus(ring_size: int) -> int:
        return 32

    # ------------------------------------------------------------------ helpers
    @property
    def listeners(self) -> tuple[Listener, Listener]:
        return (self.pager, self.acc)

    def _allowed(self, gfn: int) -> bool:
        return self.dom.p2m.get_type(gfn) == P2MType.ram_rw  # access rights stay rwx here

    def _attempt(self, v: int) -> bool:
        """The vCPU (runnable) retries its access; True once it succeeded."""
        gfn, access = self.want[v]
        if gfn in self.removed or self._allowed(gfn):
            del self.want[v]
            return True
        self.dom.guest_access(v, gfn, access)
        if self.dom.vcpus[v].runnable and self._allowed(gfn):
            del self.want[v]
            return True
        return False

    def _kick(self, lis: Listener) -> None:
        """Push + resume, tracking who was woken/granted to check round robin."""
        dom = self.dom
        marked_before = {k: {v.vcpu_id for v in dom.vcpus if v.test_flag(med.pause_flag)}
                         for k, med in dom.rings.items()}
        waiting_before = {k: [v.vcpu_id for v, _ in med.waiters] for k, med in dom.rings.items()}
        self.expect_rejected += sum(1 for r in lis.answered if r.vcpu_id >= self.n)
        lis.kick()
        for kind, med in dom.rings.items():
            after = {v.vcpu_id for v in dom.vcpus if v.test_flag(med.pause_flag)}
            woken = marked_before[kind] - after
            for vid in marked_before[kind] & after:
                self.overtaken[kind][vid] += len(woken)
            for vid in woken:
                self.overtaken[kind][vid] = 0
            still = [v.vcpu_id for v, _ in med.waiters]
            granted = len(waiting_before[kind]) - len(still)
            for vid in still:
                self.overtaken_wq[kind][vid] += granted
            for vid in set(waiting_before[kind]) - set(still):
                self.overtaken_wq[kind][vid] = 0

    def _stranded(self) -> list[int]:
        """``ram_paging_in`` gfns that no request in flight names (a lost or rejected foreign event)."""
        named = {r.gfn for lis in (self.pager,) for r in lis.inflight()}
        named |= {r.gfn for _, r in self.dom.mem_paging.waiters}
        return [g for g in range(self.gfns)
                if self.dom.p2m.get_type(g) == P2MType.ram_paging_in and g not in named]

    def _quiesce(self) -> None:
        """The listener drains everything, runnable vCPUs retry, until nothing moves.

        Once the rings are quiet, the pager's sweep loads gfns left ``ram_paging_in``
        with no request (vCPUs touching them re-execute without a request, as on Xen).
        """
        for _ in range(4 * self.n + 40):
            progress = False
            for v in list(self.want):
                if self.dom.vcpus[v].runnable:
                    self._attempt(v)
                    progress = True
            for lis in self.listeners:
                if lis.unconsumed() or lis.pending or lis.answered:
                    lis.consume()
                    lis.answer()
                    self._kick(lis)
                    progress = True
            if not progress and (stranded := self._stranded()):
                assert self.dom.paging_load(stranded, lambda g: None) == [None] * len(stranded)
                progress = True
            if not progress:
                break
        stuck = [v for v in self.dom.vcpus if not v.runnable]
        assert not stuck, f"vCPUs still paused after the listener drained: {stuck}"
        assert not self.want, f"accesses never satisfied: {self.want}"
        for med in self.dom.rings.values():
            assert med.occupancy() == 0 and not med.waiters and med.blocked == 0

    # ------------------------------------------------------------------ guest
    @rule(v=IDX, g=IDX, write=st.booleans())
    def vcpu_access(self, v: int, g: int, write: bool) -> None:
        v, g = v % self.n, g % self.gfns
        if not self.dom.vcpus[v].runnable or v in self.want or g in self.removed:
            return
        self.want[v] = (g, W if write else R)
        self._attempt(v)

    @rule()
    def vcpus_retry(self) -> None:
        for v in list(self.want):
            if self.dom.vcpus[v].runnable:
                self._attempt(v)

    @rule(k=st.integers(1, 32), data=st.data())
    def vcpus_fault_burst(self, k: int, data: st.DataObject) -> None:
        """Several idle vCPUs touch gfns that are not ram_rw at once (the congestion maker)."""
        p2m = self.dom.p2m
        cold = [g for g in range(self.gfns) if g not in self.removed and p2m.get_type(g) != P2MType.ram_rw]
        if not cold:
            return
        for v in range(self.n):
            if k == 0:
                break
            if self.dom.vcpus[v].runnable and v not in self.want:
                self.want[v] = (data.draw(st.sampled_from(cold), label="gfn"), R)
                self._attempt(v)
                k -= 1

    @rule(k=st.integers(1, 32))
    def vcpus_cr3_burst(self, k: int) -> None:
        for v in range(self.n):
            if k == 0:
                break
            if self.dom.vcpus[v].runnable and v not in self.want:
                self.dom.hvm_trap(v, MemEventReason.CR3, k, 0)
                k -= 1

    @rule(v=IDX, value=st.integers(0, 2**32))
    def vcpu_cr3_write(self, v: int, value: int) -> None:
        v %= self.n
        if self.dom.vcpus[v].runnable and v not in self.want:
            self.dom.hvm_trap(v, MemEventReason.CR3, value, value ^ 1)

    @rule(v=IDX, g=IDX)
    def vcpu_balloon_out(self, v: int, g: int) -> None:
        v, g = v % self.n, g % self.gfns
        if not self.dom.vcpus[v].runnable or v in self.want or g in self.removed:
            return
        assert self.dom.decrease_reservation(v, [g]) == [None]
        self.removed.add(g)
        self.mapped.pop(g, None)

    # ------------------------------------------------------------------ tools
    @rule(gs=st.lists(IDX, max_size=8), evict=st.booleans())
    def pager_page_out(self, gs: list[int], evict: bool) -> None:
        gfns = [g % self.gfns for g in gs]
        self.dom.paging_nominate(gfns)
        if evict:
            self.dom.paging_evict(gfns)

    @rule(gs=st.lists(IDX, min_size=1, max_size=12))
    def foreign_map(self, gs: list[int]) -> None:
        for g in gs:
            self._foreign_map_one(g % self.gfns)

    @rule(gs=st.lists(IDX, min_size=1, max_size=12))
    def foreign_unmap(self, gs: list[int]) -> None:
        for g in gs:
            g %= self.gfns
            held = self.mapped[g] > 0
            assert self.dom.foreign_unmap([g]) == [None if held else Errno.ENOENT]
            self.mapped[g] -= held

    def _foreign_map_one(self, g: int) -> None:
        dom, med = self.dom, self.dom.mem_paging
        p2mt = dom.p2m.get_type(g)
        has_frame = dom.p2m.has_frame(g)
        free, put = med.free_requests(), med.counters.put
        unmarked = sum(1 for v in dom.vcpus if not v.test_flag(med.pause_flag))
        res = dom.foreign_map([g])
        if g in self.removed:
            assert res == [Errno.EINVAL]
        elif has_frame and p2mt != P2MType.ram_paging_in:
            assert res == [None], "a page with its frame maps, nominated or not (Xen 4.2)"
            self.mapped[g] += 1
        elif p2mt == P2MType.ram_paged:
            assert res == [Errno.ENOENT]
            if free == 0:
                if self.POLICY == "seed":
                    self.expect_lost_foreign += 1
                else:
                    self.expect_refused += 1
                    assert dom.p2m.get_type(g) == p2mt, "a refused claim changes nothing"
            else:
                assert med.counters.put == put + 1
                if med.free_requests() < unmarked:
                    self.reserve_intruded = True
        else:
            assert p2mt == P2MType.ram_paging_in
            assert res == [Errno.ENOENT] and med.counters.put == put

    # ------------------------------------------------------------------ listener, at random pace
    @rule(which=st.integers(0, 1), k=st.integers(1, 70))
    def listener_consume(self, which: int, k: int) -> None:
        self.listeners[which].consume(k)

    @rule(which=st.integers(0, 1), k=st.integers(1, 70), junk=st.booleans())
    def listener_answer(self, which: int, k: int, junk: bool) -> None:
        lis = self.listeners[which]
        take, lis.pending = lis.pending[:k], lis.pending[k:]
        for req in take:
            if lis is self.pager and not req.flags & MemEventFlag.DROP_PAGE:
                self.dom.paging_prep([req.gfn])
            if junk and req.flags & MemEventFlag.FOREIGN:
                lis.respond(echo(req, vcpu_id=self.n + 5))  # nobody waits on it: garbage is harmless
            else:
                lis.respond(echo(req))

    @rule(which=st.integers(0, 1))
    def listener_kick(self, which: int) -> None:
        self._kick(self.listeners[which])

    @rule()
    def drain(self) -> None:
        self._quiesce()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def ring_never_holds_more_than_its_size(self) -> None:
        for lis in self.listeners:
            med = self.dom.rings[lis.kind]
            assert med.occupancy() <= med.ring_size
            assert (lis.sring.req_prod - lis.sring.rsp_prod) & abi.RING_IDX_MASK <= med.ring_size
            assert len(lis.inflight()) == med.occupancy()

    @invariant()
    def every_pause_is_accounted_for(self) -> None:
        check_accounting(self.dom)
        assert self.hv.budget.used == self.dom.p2m.resident
        assert dict(+self.mapped) == self.dom.p2m.refs, "references follow maps and unmaps"
        assert all(self.dom.p2m.get_type(g) == P2MType.ram_paging_in for g in self.dom.spinners), \
            "a vCPU spins only on a gfn still on its way back"

    @invariant()
    def no_guest_event_is_lost(self) -> None:
        in_flight: Counter[int] = Counter()
        for lis in self.listeners:
            for r in lis.inflight():
                if r.flags & MemEventFlag.VCPU_PAUSED:
                    in_flight[r.vcpu_id] += 1
        for med in self.dom.rings.values():
            for v, r in med.waiters:
                if r.flags & MemEventFlag.VCPU_PAUSED:
                    in_flight[v.vcpu_id] += 1
        for v in self.dom.vcpus:
            assert v.event_pause_count <= in_flight[v.vcpu_id], f"{v} waits for a response no request asks"

    @invariant()
    def losses_are_only_foreign_and_counted(self) -> None:
        paging = self.dom.mem_paging.counters
        for kind, med in self.dom.rings.items():
            c = med.counters
            if self.POLICY == "claim":
                assert c.lost == 0
            elif kind != RingKind.paging:
                assert c.lost == 0  # no foreign producer there
        if self.POLICY == "seed":
            assert paging.lost_foreign == self.expect_lost_foreign
            assert paging.lost_guest == 0 or self.reserve_intruded
        else:
            assert paging.refused == self.expect_refused
        assert sum(m.counters.responses_rejected for m in self.dom.rings.values()) == self.expect_rejected

    @invariant()
    def round_robin_no_vcpu_waits_forever_while_others_are_woken(self) -> None:
        for kind in RingKind:
            assert max(self.overtaken[kind]) <= self.n - 1, self.overtaken[kind]
            assert max(self.overtaken_wq[kind]) <= self.n - 1, self.overtaken_wq[kind]

    def teardown(self) -> None:
        if hasattr(self, "dom"):
            self._quiesce()


SETTINGS = settings(max_examples=80, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class SeedPolicyMachine(CoreMachine):
    POLICY = "seed"
    RING_SIZES = (8, 16, 32, 64)

    @staticmethod
    def max_vcpus(ring_size: int) -> int:
        return ring_size  # the seed's guarantees need vCPUs <= slots (test_policies: the lock-up beyond)


class ClaimPolicyMachine(CoreMachine):
    POLICY = "claim"
    RING_SIZES = (8, 16, 64)


TestSeedPolicy = SeedPolicyMachine.TestCase
TestSeedPolicy.settings = SETTINGS
TestClaimPolicy = ClaimPolicyMachine.TestCase
TestClaimPolicy.settings = SETTINGS
