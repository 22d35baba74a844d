"""hvemu's Python FrontRing against a back end written in C from DESIGN.md section 2.

``tests/c/ring_backend.c`` (with ``tests/c/mem_event_ring.h``: the struct and
the ``ring.h`` macros written out independently) is compiled here with the
system ``cc``; the test skips cleanly when there is none.  It maps the same
POSIX shm page (by inherited fd, or by name, unlinked as soon as it is
mapped), consumes the requests this process produces, answers each, and
exits.  Notifications go through two eventfds under ``ring.h``'s suppression
rules on both sides.  The indices start near 2**32 so that the run wraps.
"""

from __future__ import annotations

import mmap
import os
import select
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import posix_ipc
import pytest

from hvemu import abi
from hvemu.abi import MemEvent, MemEventCodec, MemEventFlag
from hvemu.ring import FrontRing, SharedRing
from tests.integration.helpers import shm_ring
from tests.integration.helpers.shm_ring import shm_path

C_DIR = Path(__file__).resolve().parents[1] / "c"
INCLUDE_DIR = Path(__file__).resolve().parents[2] / "hvemu" / "include"
U32 = 1 << 32
MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH")
    out = tmp_path_factory.mktemp("c_backend")
    probe = out / "probe.c"
    probe.write_text("#include <stdint.h>\n#include <sys/mman.h>\nint main(void){return 0;}\n")
    if subprocess.run([cc, "-o", str(out / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cc} cannot build a trivial C program (no libc headers?)")
    exe = out / "ring_backend"
    cmd = [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE_DIR),
           "-o", str(exe), str(C_DIR / "ring_backend.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:  # shm_open lives in librt before glibc 2.34
        res = subprocess.run([*cmd, "-lrt"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe



def request(i: int) -> MemEvent:
    return MemEvent(
        type=abi.MemEventType.PAGING if i % 3 else abi.MemEventType.ACCESS,
        flags=MemEventFlag.FOREIGN if i % 5 == 0 else 0,
        vcpu_id=i % 17,
        gfn=0x1_0000_0000 + i * 7,
        offset=0,
        gla=i * 4096 + 0x123,
        p2mt=abi.P2MType.ram_paged if i % 2 else abi.P2MType.ram_rw,
        access_r=bool(i & 1), access_w=bool(i & 2), access_x=bool(i & 4), gla_valid=bool(i & 8),
        reason=i % 7,
    )


def check_answer(i: int, rsp: MemEvent) -> None:
    req = request(i)
    assert rsp.gfn == req.gfn, (i, rsp)
    assert rsp.vcpu_id == req.vcpu_id
    assert rsp.reason == req.reason
    assert rsp.type == req.type
    assert rsp.flags == req.flags | MemEventFlag.VCPU_PAUSED
    assert rsp.gla == ~req.gla & MASK64
    assert rsp.p2mt == req.p2mt
    assert (rsp.access_r, rsp.access_w, rsp.gla_valid) == (req.access_r, req.access_w, req.gla_valid)
    assert rsp.access_x == (not req.access_x)
    assert rsp.offset == i  # the C side's own count: answers come back in order
    assert rsp.reserved_bits == 0


def run_c_backend(
    exe: Path, *, mapping: str, slots: int, count: int, start: int, deadline_s: float = 20,
    corrupt_req_prod: int | None = None,
) -> tuple[int, str, str, dict[str, int]]:
    """Drive the C back end; return (exit status, stdout, stderr, front-end counters)."""
    page_size = abi.RING_ENTRIES_OFFSET + slots * MemEventCodec.size
    name = f"/hvemu-test-cbe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + deadline_s
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=page_size)
    mm: mmap.mmap | None = None
    sring: SharedRing[MemEvent] | None = None
    child: subprocess.Popen[str] | None = None
    kick_back = os.eventfd(0)
    kick_front = os.eventfd(0)
    stats = {"pushes": 0, "kicks": 0, "sleeps": 0}
    try:
        mm = mmap.mmap(shm.fd, page_size)
        sring = SharedRing(mm, MemEventCodec, page_size)
        sring.init()
        # indices near the wrap, set before the child attaches
        sring.req_prod = sring.rsp_prod = start
        sring.req_event = sring.rsp_event = start + 1
        front: FrontRing[MemEvent] = FrontRing.attach(sring)
        if corrupt_req_prod is not None:
            sring.req_prod = corrupt_req_prod
        where = ["--name", name] if mapping == "name" else ["--fd", str(shm.fd)]
        child = subprocess.Popen(
            [str(exe), *where, str(page_size), str(kick_back), str(kick_front), str(count)],
            pass_fds=(kick_back, kick_front) if mapping == "name" else (shm.fd, kick_back, kick_front),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if mapping == "name":
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the C back end did not map the page in time"
            assert child.stdout.readline().strip() == "mapped", child.stderr.read() if child.stderr else ""
        shm.unlink()  # both ends have it mapped (or, with an fd, the child holds the fd)
        shm.close_fd()
        assert not shm_path(name).exists()
        if corrupt_req_prod is not None:
            out, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            return child.returncode, out, err, stats

        sent = received = 0
        while received < count:
            # produce whatever fits, in batches of up to 5
            while sent < count and front.free_requests():
                for _ in range(min(5, front.free_requests(), count - sent)):
                    front.put_request(request(sent))
                    sent += 1
                stats["pushes"] += 1
                if front.push_requests_and_check_notify():
                    stats["kicks"] += 1
                    os.eventfd_write(kick_back, 1)
            got = front.unconsumed_responses()
            for _ in range(got):
                check_answer(received, front.get_response())
                received += 1
            if got or front.final_check_for_responses():
                continue
            if child.poll() is not None:
                err = child.stderr.read() if child.stderr is not None else ""
                raise AssertionError(f"C back end exited early ({child.returncode}): {err}")
            stats["sleeps"] += 1
            woken, _w, _x = select.select([kick_front], [], [], max(0.0, deadline - time.monotonic()))
            if not woken:
                raise AssertionError(
                    f"lost wake-up: front end asleep past the deadline, {received}/{count} answers, "
                    f"req_prod={sring.req_prod} req_event={sring.req_event} "
                    f"rsp_prod={sring.rsp_prod} rsp_event={sring.rsp_event}"
                )
            os.eventfd_read(kick_front)
        assert front.unconsumed_responses() == 0
        assert front.req_prod_pvt == front.rsp_cons == sring.rsp_prod == (start + count) % U32
        out, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return child.returncode, out, err, stats
    finally:
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=10)
        os.close(kick_back)
        os.close(kick_front)
        shm_ring.release(name, shm, sring, mm)


def parse_stats(out: str) -> dict[str, int]:
    words = out.split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2) if words[i] != "mapped"}


@pytest.mark.parametrize("mapping", ["fd", "name"])
@pytest.mark.parametrize(
    ("slots", "count", "start"),
    [
        (64, 20_000, U32 - 10_000),  # the real page: wraps half-way
        (64, 300, U32 - 1),  # wraps after the first request
        (4, 20_000, U32 - 10_000),  # a tiny ring (page_size = 64 + 4 * 40)
        (64, 500, 0),
    ],
    ids=["page-wrap", "wrap-at-once", "tiny-wrap", "no-wrap"],
)
def test_c_backend_answers_python_front(
    backend: Path, mapping: str, slots: int, count: int, start: int
) -> None:
    rc, out, err, front_stats = run_c_backend(backend, mapping=mapping, slots=slots, count=count, start=start)
    assert rc == 0, err
    stats = parse_stats(out)
    assert stats["answered"] == count
    assert 0 < stats["kicks"] <= stats["pushes"]
    assert 0 < front_stats["kicks"] <= front_stats["pushes"]
    print(f"C back end: {stats}; Python front end: {front_stats}")


@pytest.mark.parametrize("delta", [65, 1000, U32 - 1])
def test_c_backend_refuses_corrupt_req_prod(backend: Path, delta: int) -> None:
    """The C side applies the same consumer check: a req_prod beyond the ring is corrupt."""
    start = U32 - 10
    rc, _out, err, _ = run_c_backend(
        backend, mapping="fd", slots=64, count=1, start=start, corrupt_req_prod=(start + delta) % U32
    )
    assert rc == 3, err
    assert "corrupt ring" in err
