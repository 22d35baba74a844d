"""A POSIX shared-memory ring page for tests that drive a C back end: its path and its teardown."""

from __future__ import annotations

import mmap
from pathlib import Path

import posix_ipc

from hvemu.abi import MemEvent
from hvemu.ring import SharedRing


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / name.lstrip("/")


def release(name: str, shm: posix_ipc.SharedMemory, sring: SharedRing[MemEvent] | None,
            mm: mmap.mmap | None) -> None:
    """Let go of the ring's views, its mapping and its name; the segment must be gone from /dev/shm after."""
    if sring is not None:
        sring.release()
    if mm is not None:
        mm.close()
    try:
        shm.unlink()
    except posix_ipc.ExistentialError:
        pass
    if shm.fd >= 0:
        shm.close_fd()
    assert not shm_path(name).exists()
