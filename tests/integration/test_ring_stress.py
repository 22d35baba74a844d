"""Two real processes, one tiny ring, notification suppression on: no lost wake-up.

The test process is the *front* end (the hypervisor's role): several producer
threads share one :class:`~hvemu.ring.FrontRing` under a lock and a response
thread (the main thread) consumes the answers.  A child process started with
``subprocess`` is the *back* end.  The ring page is a POSIX shm segment
(posix_ipc) whose fd the child inherits; the name is unlinked as soon as the
test process has mapped it, so nothing is ever left in ``/dev/shm``.

Notifications go through two ``os.eventfd``s, strictly as ``ring.h`` says:
a side kicks only when ``push_*_and_check_notify`` says so, and sleeps in a
read of its eventfd only after ``final_check_for_*`` said there is no work.
A lost wake-up therefore leaves one side asleep with work on the ring; the
front end's every wait has its own limit (``stall_s``: healthy wake-ups take
well under a millisecond) and turns that into a failure, under an overall
deadline (and pytest-timeout is the backstop).  The child is killed in ``finally``.

Run as a script (``python test_ring_stress.py --child ...``) this file is the
back end.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the child: make hvemu importable without an install
    sys.path.insert(0, str(ROOT))

from hvemu import abi  # noqa: E402
from hvemu.abi import MemEvent, MemEventCodec, MemEventFlag  # noqa: E402
from hvemu.ring import BackRing, FrontRing, SharedRing  # noqa: E402
from tests.integration.helpers import shm_ring  # noqa: E402
from tests.integration.helpers.shm_ring import shm_path  # noqa: E402

U32 = 1 << 32
GLA_XOR = 0x5A5A_5A5A_5A5A_5A5A


class LostWakeup(AssertionError):
    """A side waited longer than the stall limit for a kick: the ring stalled."""


# --------------------------------------------------------------------------
# The back end (child process)
# --------------------------------------------------------------------------


def answer(req: MemEvent) -> MemEvent:
    return MemEvent(
        type=req.type, flags=req.flags | MemEventFlag.VCPU_PAUSED, vcpu_id=req.vcpu_id, gfn=req.gfn,
        offset=req.offset, gla=req.gla ^ GLA_XOR, p2mt=req.p2mt, access_r=req.access_r,
        access_w=req.access_w, access_x=req.access_x, gla_valid=req.gla_valid, reason=req.reason,
    )


def back_main(argv: list[str]) -> int:
    """The back end.  ``mode`` is "normal", or one of two deliberately broken protocols
    used to show that the harness catches a lost wake-up: "never-kick" (no notification
    at all) and "skip-recheck" (RING_FINAL_CHECK_FOR_REQUESTS without its second look)."""
    shm_fd, page_size, kick_back, kick_front, total = (int(x) for x in argv[:5])
    mode = argv[5]
    mm = mmap.mmap(shm_fd, page_size)
    os.close(shm_fd)
    sring: SharedRing[MemEvent] = SharedRing(mm, MemEventCodec, page_size)
    back: BackRing[MemEvent] = BackRing.attach(sring)  # resumes from rsp_prod
    answered = pushes = kicks = sleeps = 0
    while answered < total:
        n = back.unconsumed_requests()
        if n:
            for _ in range(n):
                back.put_response(answer(back.get_request()))
                answered += 1
                # publish each answer on its own: many notify decisions
                pushes += 1
                if back.push_responses_and_check_notify() and mode != "never-kick":
                    os.eventfd_write(kick_front, 1)
                    kicks += 1
            continue
        if mode == "skip-recheck":
            # deliberately broken (harness self-test): arm req_event but take no second look
            sring.req_event = back.req_cons + 1
        elif back.final_check_for_requests():
            continue
        sleeps += 1
        os.eventfd_read(kick_back)  # blocking: only the front end's kick wakes us
    stats = {"answered": answered, "pushes": pushes, "kicks": kicks, "sleeps": sleeps}
    print(json.dumps(stats), flush=True)
    sring.release()
    mm.close()
    return 0


# --------------------------------------------------------------------------
# The front end (this process)
# --------------------------------------------------------------------------



def run_stress(
    tmp_path: Path, *, slots: int, producers: int, per_producer: int, deadline_s: float,
    stall_s: float = 10.0, mode: str = "normal",
) -> dict[str, Any]:
    page_size = abi.RING_ENTRIES_OFFSET + slots * MemEventCodec.size
    total = producers * per_producer
    start = U32 - total // 2  # the indices wrap half-way through
    name = f"/hvemu-test-stress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + deadline_s
    child: subprocess.Popen[bytes] | None = None
    kick_back = kick_front = -1
    mm: mmap.mmap | None = None
    sring: SharedRing[MemEvent] | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=page_size)
    try:
        mm = mmap.mmap(shm.fd, page_size)
        shm.unlink()  # the child inherits the fd: the name is not needed any more
        assert not shm_path(name).exists()
        sring = SharedRing(mm, MemEventCodec, page_size)
        assert sring.size == slots
        sring.init()
        sring.req_prod = sring.rsp_prod = start
        sring.req_event = sring.rsp_event = start + 1
        front: FrontRing[MemEvent] = FrontRing.attach(sring)
        kick_back = os.eventfd(0)  # front -> back
        kick_front = os.eventfd(0)  # back -> front
        tmp_path.mkdir(parents=True, exist_ok=True)
        stderr_path = tmp_path / "back.stderr"
        with open(stderr_path, "wb") as err:
            child = subprocess.Popen(
                [sys.executable, __file__, "--child", str(shm.fd), str(page_size), str(kick_back),
                 str(kick_front), str(total), mode],
                pass_fds=(shm.fd, kick_back, kick_front), stdout=subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        shm.close_fd()

        def wait_limit() -> float:
            """How long one wait may last: the stall limit, or what is left of the deadline."""
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the run took more than {deadline_s}s (too slow, not a stall)")
            return min(stall_s, left)

        cond = threading.Condition()
        counters = {"pushes": 0, "kicks": 0, "full_waits": 0}

        def producer(pid: int) -> None:
            try:
                seq = 0
                while seq < per_producer and not stop.is_set():
                    with cond:
                        while front.full():
                            counters["full_waits"] += 1
                            if not cond.wait(timeout=wait_limit()):
                                raise LostWakeup(f"producer {pid} waited {stall_s}s for a free slot")
                        # a batch of 1..3 requests per push
                        for _ in range(min(1 + (seq % 3), front.free_requests(), per_producer - seq)):
                            front.put_request(MemEvent(
                                type=abi.MemEventType.PAGING, vcpu_id=pid, gfn=(pid << 32) | seq,
                                offset=seq & 0xFFF, gla=seq * 4096, p2mt=abi.P2MType.ram_paged,
                                access_r=bool(seq & 1), gla_valid=bool(seq & 2), reason=seq % 7,
                            ))
                            seq += 1
                        notify = front.push_requests_and_check_notify()
                        counters["pushes"] += 1
                        if notify:
                            counters["kicks"] += 1
                    if notify:
                        os.eventfd_write(kick_back, 1)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=producer, args=(p,), daemon=True) for p in range(producers)]
        for t in threads:
            t.start()

        expected = [0] * producers
        received = sleeps = 0
        while received < total:
            if errors:
                raise errors[0]
            if child.poll() is not None:
                raise AssertionError(f"back end exited early ({child.returncode}): {stderr_path.read_text()}")
            batch: list[MemEvent] = []
            with cond:
                while front.unconsumed_responses():
                    batch.append(front.get_response())
                if batch:
                    cond.notify_all()
                    work = True
                else:
                    work = front.final_check_for_responses()
            for rsp in batch:
                pid, seq = rsp.gfn >> 32, rsp.gfn & 0xFFFFFFFF
                assert rsp.vcpu_id == pid, rsp
                assert seq == expected[pid], f"producer {pid}: got answer {seq}, expected {expected[pid]}"
                assert rsp.flags == MemEventFlag.VCPU_PAUSED
                assert rsp.gla == (seq * 4096) ^ GLA_XOR
                assert rsp.offset == seq & 0xFFF and rsp.reason == seq % 7
                assert rsp.access_r == bool(seq & 1) and rsp.gla_valid == bool(seq & 2)
                assert rsp.p2mt == abi.P2MType.ram_paged
                expected[pid] += 1
                received += 1
            if work:
                continue
            # asleep until the back end kicks us
            sleeps += 1
            ready, _, _ = select.select([kick_front], [], [], wait_limit())
            if not ready:
                raise LostWakeup(
                    f"front end asleep for {stall_s}s with {received}/{total} answers: "
                    f"req_prod={sring.req_prod} req_event={sring.req_event} rsp_prod={sring.rsp_prod} "
                    f"rsp_event={sring.rsp_event} rsp_cons={front.rsp_cons} req_prod_pvt={front.req_prod_pvt}"
                )
            os.eventfd_read(kick_front)
        assert expected == [per_producer] * producers
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        assert errors == []
        out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert child.returncode == 0, (tmp_path / "back.stderr").read_text()
        back_stats = json.loads(out.decode().strip().splitlines()[-1])
        assert front.req_prod_pvt == front.rsp_cons == (start + total) % U32
        assert sring.req_prod == sring.rsp_prod == (start + total) % U32
        return {"front": {**counters, "sleeps": sleeps}, "back": back_stats}
    finally:
        stop.set()
        if child is not None and child.poll() is None:
            child.kill()
        if child is not None:
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()
        for t in threads:
            t.join(timeout=5)
        for fd in (kick_back, kick_front):
            if fd >= 0:
                os.close(fd)
        shm_ring.release(name, shm, sring, mm)


def test_stress_tiny_ring_many_producers(tmp_path: Path) -> None:
    stats = run_stress(tmp_path, slots=4, producers=4, per_producer=12_500, deadline_s=60)
    front, back = stats["front"], stats["back"]
    assert back["answered"] == 50_000
    # suppression really was on: fewer kicks than pushes on both sides, and both sides slept
    assert 0 < front["kicks"] < front["pushes"]
    assert 0 < back["kicks"] < back["pushes"] == 50_000
    assert front["sleeps"] > 0 and back["sleeps"] > 0
    assert front["full_waits"] > 0  # the tiny ring really was full


def test_stress_full_size_ring(tmp_path: Path) -> None:
    stats = run_stress(tmp_path, slots=64, producers=3, per_producer=3_000, deadline_s=30)
    assert stats["back"]["answered"] == 9_000


def test_lost_wakeup_is_a_failure(tmp_path: Path) -> None:
    """The harness itself: a back end that never kicks makes the front end fail, in bounded time."""
    t0 = time.monotonic()
    with pytest.raises(LostWakeup):
        run_stress(tmp_path, slots=4, producers=2, per_producer=200, deadline_s=30, stall_s=1.0,
                   mode="never-kick")
    assert time.monotonic() - t0 < 15


def test_racy_lost_wakeup_is_caught(tmp_path: Path) -> None:
    """The harness itself: a back end whose final check skips the re-check loses a wake-up
    (publish-then-check races with arm-then-sleep), and the front end reports it."""
    for attempt in range(3):
        try:
            stats = run_stress(tmp_path / str(attempt), slots=4, producers=4, per_producer=12_500,
                               deadline_s=60, stall_s=1.5, mode="skip-recheck")
        except LostWakeup:
            return
    pytest.skip(f"the broken back end got lucky 3 times (no lost wake-up in 50k requests): {stats}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(back_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} --child SHM_FD PAGE_SIZE KICK_BACK KICK_FRONT TOTAL MODE")
