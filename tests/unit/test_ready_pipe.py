"""The started-handshake (:class:`hvemu.procs.ReadyPipe`): ready, died first, or too slow; nothing left open."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hvemu.procs import ReadyPipe

#: A stand-in daemon: ``--ready-fd N`` then what to do (``ready``, ``die``, ``hang``).
CHILD = """
import os, sys, time
fd, what = int(sys.argv[2]), sys.argv[3]
if what == "ready":
    os.write(fd, b"R")
    os.close(fd)
elif what == "hang":
    time.sleep(30)
"""


def _child(ready: ReadyPipe, what: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *ready.argv, what], pass_fds=ready.pass_fds)
    ready.spawned()
    return proc


@pytest.mark.parametrize("what, expected", [("ready", True), ("die", False), ("hang", False)])
async def test_started(what: str, expected: bool) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with ReadyPipe() as ready:
        proc = _child(ready, what)
        try:
            assert await ready.started(0.5 if what == "hang" else 20) is expected
        finally:
            proc.kill()
            proc.wait()
    assert set(os.listdir("/proc/self/fd")) == before


def test_started_blocking() -> None:
    with ReadyPipe() as ready:
        proc = _child(ready, "ready")
        try:
            assert ready.started_blocking(20)
        finally:
            proc.wait()
    with ReadyPipe() as ready:
        proc = _child(ready, "die")
        assert not ready.started_blocking(20)
        proc.wait()
