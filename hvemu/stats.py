"""What a ``Stats`` reply carries: the counters and facts of one domain, typed.

Part of the contract (it imports nothing else of the project).  The core
keeps its counters in :class:`DomainCounters` and :class:`RingCounters`
(incremented in place; the names are the ones users read), and its
``stats()`` is a :class:`DomainStats`, which the hypervisor process
completes with what only it knows (the domain's handle, target, guest
connection, fault latency, ring owners) and sends as ``StatsReply.stats``.
A client reads attributes instead of defensive ``.get()``s; the SDK's
``stats()`` hands daemons the same data as a plain ``dict`` (its keys are
these fields, listed in ``docs/sdk-reference.md``).
"""

from __future__ import annotations

import msgspec


class RingCounters(msgspec.Struct):
    """What a user watching a ring wants to know, all monotonic."""

    #: Requests copied onto the ring.
    put: int = 0
    #: Events not put because the ring was full (seed ``EAGAIN``): gone for good.
    lost: int = 0
    lost_foreign: int = 0
    lost_guest: int = 0
    #: Claim policy: foreign producers told ``EBUSY`` (nothing changed, they retry).
    refused: int = 0
    #: Events with no ring to go to (``ENOSYS``).
    no_ring: int = 0
    #: Guest vCPUs marked and paused for ring congestion.
    blocked_ever: int = 0
    #: ...and released by the wake-up rule (or disable).
    woken: int = 0
    #: Claim policy: guest producers that slept on the wait queue for a slot.
    waited: int = 0
    #: Largest number of unanswered requests ever on the ring.
    max_occupancy: int = 0
    #: Event-channel kicks asked for.
    notifies: int = 0
    #: Responses consumed (every kind, valid or not).
    responses: int = 0
    #: Responses refused as a whole: no such vCPU, gfn out of range.
    responses_rejected: int = 0
    #: Responses carrying flag or bitfield bits this ABI does not define (ignored, the rest obeyed, as Xen).
    responses_unknown_bits: int = 0
    #: Paging responses for a gfn its load had already made ``ram_rw`` (the load-then-respond path).
    responses_loaded: int = 0
    #: Paging responses whose gfn was neither prepared nor loaded: p2m left alone.
    responses_stale: int = 0
    #: ``DUMMY`` responses: consumed and otherwise ignored.
    responses_dummy: int = 0
    #: ``VCPU_PAUSED`` responses that found no event pause to release.
    unpause_ignored: int = 0


class RingStats(RingCounters, kw_only=True):
    """One ring: its counters, and its state now."""

    enabled: bool = False
    #: Slots in the ring.
    size: int = 0
    #: Requests put and not yet answered.
    occupancy: int = 0
    free: int = 0
    #: vCPUs marked for congestion now, and (claim) producers asleep for a slot.
    blocked_now: int = 0
    waiting_now: int = 0


class DomainCounters(msgspec.Struct):
    """Per-domain counters (ring counters live with each ring)."""

    faults: int = 0
    access_violations: int = 0
    populates: int = 0
    foreign_populates: int = 0
    foreign_maps: int = 0
    nominated: int = 0
    #: Populates of a nominated gfn: its evict will fail (``EVICT_FAIL``), a fault the batch caused.
    evict_fails: int = 0
    evicted: int = 0
    prepped: int = 0
    loaded: int = 0
    paged_in: int = 0
    dropped: int = 0
    ballooned: int = 0
    traps: int = 0
    single_steps: int = 0
    traps_injected: int = 0
    #: Guest accesses to a ``ram_paging_in`` gfn: re-executed until it settles, no request put.
    spins: int = 0
    unshare_enomem: int = 0
    finalized_on_disable: int = 0


class VcpuStats(msgspec.Struct):
    vcpu: int
    runnable: bool
    #: Its pause count (every reason: events, congestion, a tool's pause...).
    pauses: int
    #: Marked for congestion on some ring.
    congested: bool
    #: Its own connection (and event channel) is up.
    connected: bool
    #: An exit of it is being handled now (the vCPU waits in its slot).
    in_exit: bool


class DomainStats(DomainCounters, kw_only=True):
    """A domain: the core's counters and p2m counts, its rings, then what the hypervisor process adds."""

    domid: int
    name: str = ""
    #: The admission policy of its rings (``seed`` or ``claim``).
    policy: str = "seed"
    #: The layout of its rings' entries (``abi.RING_ABIS``: ``seed``, ``4.2``, ``vm_event``).
    abi: str = "seed"
    max_vcpus: int = 0
    gfns: int = 0
    crashed: bool = False
    #: Paused by the toolstack (``hvemu pause``).
    paused: bool = False
    #: Gfns with a frame, and the p2m type counts.
    resident: int = 0
    ram_rw: int = 0
    paging_out: int = 0
    paged: int = 0
    paging_in: int = 0
    removed: int = 0
    vcpus_paused: int = 0
    vcpus_blocked: int = 0
    #: Sums over the rings.
    events_put: int = 0
    events_lost: int = 0
    paging: RingStats = msgspec.field(default_factory=RingStats)
    access: RingStats = msgspec.field(default_factory=RingStats)
    sharing: RingStats = msgspec.field(default_factory=RingStats)
    # ---- what the hypervisor process adds
    #: When these were read (CLOCK_MONOTONIC, shared by every process on the host).
    monotonic_ns: int = 0
    #: The domain handle: names this instance of the domain.
    handle: str = ""
    #: The paging target in pages (``memory/target``).
    target: int = 0
    guest_connected: bool = False
    #: CPU time of its guest process, seconds (None: no guest), as xl's ``Time(s)``.
    cpu_time_s: float | None = None
    #: The vCPUs' fault latency as the hypervisor saw it (a histogram summary: n, p50, p99... in us).
    fault_latency_us: dict[str, float] = msgspec.field(default_factory=dict)
    #: Rings enabled whose daemon went away, and the pid of each owned ring's daemon.
    rings_orphaned: list[str] = msgspec.field(default_factory=list)
    ring_owners: dict[str, int] = msgspec.field(default_factory=dict)
    host_frames_total: int = 0
    host_frames_used: int = 0
    vcpus: list[VcpuStats] = msgspec.field(default_factory=list)

    def ring(self, kind: str) -> RingStats:
        """The ring named ``kind`` (``paging``, ``access``, ``sharing``)."""
        stats: RingStats = getattr(self, str(kind))
        return stats

    def ring_owned(self, ring: str, pid: int | None = None) -> bool:
        """Whether a daemon (process ``pid``, if given) owns ``ring``.

        An enabled ring whose daemon died stays enabled (orphaned) until the
        hypervisor notices the death; only ``ring_owners`` says whose it is
        now, so a waiter for a new daemon compares pids (0: the owner's pid
        is not known, e.g. it is in another pid namespace).
        """
        if not self.ring(ring).enabled or ring in self.rings_orphaned:
            return False
        return pid is None or self.ring_owners.get(ring, 0) in (0, pid)
