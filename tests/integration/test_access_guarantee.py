"""DESIGN section 5's guarantee, across two real processes: once a right is removed and the
shootdown returned, no vCPU write lands on the page any more."""

from __future__ import annotations

import subprocess
import sys
import time

from hvemu import abi
from hvemu.hypervisor.shm import Segment
from hvemu.ring import mb
from tests.integration.system import ROOT

GFNS = 8


def _shootdown(inflight: memoryview, gfn: int, timeout: float = 5.0) -> None:
    """The hypervisor half (hvemu.hypervisor.backend.DomainBackend.shootdown, minus the event loop)."""
    mb()
    deadline = time.monotonic() + timeout
    while inflight[0] == gfn + 1:
        assert time.monotonic() < deadline, "the vCPU never left the page"
        mb()


def test_no_write_lands_after_a_restriction_returns() -> None:
    memory = Segment(GFNS * abi.PAGE_SIZE, tag="t-mem")
    p2m = Segment(abi.p2m_table_size(GFNS), tag="t-p2m", read_only_twin=True)
    inflight = Segment(abi.inflight_table_size(1), tag="t-infl")
    types = memoryview(p2m.map)[:GFNS]
    access = memoryview(p2m.map)[GFNS:2 * GFNS]
    words = memoryview(inflight.map)[:8].cast("Q")
    for g in range(GFNS):
        types[g], access[g] = abi.P2MType.ram_rw, abi.P2MAccess.rw
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.helpers.writer_vcpu", str(memory.fd), str(p2m.ro_fd),
         str(inflight.fd), str(GFNS), "4"],
        cwd=ROOT, pass_fds=(memory.fd, p2m.ro_fd, inflight.fd), stdout=subprocess.PIPE, text=True)
    checked = 0
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        while child.poll() is None and checked < 300:
            for g in range(GFNS):
                off = g * abi.PAGE_SIZE
                types[g] = abi.P2MType.ram_paging_out if g % 2 else abi.P2MType.ram_rw
                access[g] = abi.P2MAccess.rw if g % 2 else abi.P2MAccess.r
                _shootdown(words, g)
                # The page now holds the last write that will ever land: clobber it
                # and check nothing overwrites the marker while the right is gone.
                memory.map[off:off + abi.PAGE_SIZE] = b"\xa5" * abi.PAGE_SIZE
            time.sleep(0.002)
            for g in range(GFNS):
                off = g * abi.PAGE_SIZE
                assert memory.map[off:off + abi.PAGE_SIZE] == b"\xa5" * abi.PAGE_SIZE, \
                    f"a write to gfn {g} landed after its right was removed"
                types[g], access[g] = abi.P2MType.ram_rw, abi.P2MAccess.rw
            time.sleep(0.002)
            checked += 1
        out, _ = child.communicate(timeout=20)
        ok, refused = (int(x) for x in out.split())
        assert ok > 1000 and refused > 1000, "the vCPU must both write and be refused for the test to mean much"
        assert checked >= 20
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for view in (types, access, words):
            view.release()
        for seg in (memory, p2m, inflight):
            seg.close()
