"""Helpers for tests that run the real processes (hypervisor, guests, pagers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from hvemu import protocol, xenstore
from hvemu.client import ControlClient
from hvemu.procs import ReadyPipe, die_with_parent
from hvemu.toolstack.host import guest_argv, hypervisor_argv, pager_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shm_segments(pid: int | None = None) -> list[str]:
    """hvemu's names in /dev/shm (all of them, or those created by ``pid``)."""
    prefix = "hvemu-" if pid is None else f"hvemu-{pid}-"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


class Proc:
    """A child process started with the project's interpreter, killed on teardown."""

    def __init__(self, *argv: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = argv
        # stderr goes to a file: a pipe nobody reads would fill up and block
        # the child on its next log line.
        self._err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent,
            stdout=subprocess.PIPE, stderr=self._err, text=True, pass_fds=pass_fds,
        )

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.p.wait(timeout)

    def communicate(self, timeout: float) -> tuple[str, str]:
        out, _ = self.p.communicate(timeout=timeout)
        return out or "", self.stderr()

    def stop(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait(5)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._err.close()
        return self.p.returncode

    def json_line(self, timeout: float) -> dict[str, Any]:
        """The next stdout line, parsed (for --linger guests and exiting pagers)."""
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    line = self.p.stdout.readline()
                    if not line:
                        break
                    if line.strip().startswith("{"):
                        data: dict[str, Any] = json.loads(line)
                        return data
        finally:
            sel.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)  # EOF on stdout: let it finish dying so that stderr is complete
        err = self.stderr() if not self.alive() else ""
        raise AssertionError(f"{self.argv[:2]} gave no JSON line within {timeout}s "
                             f"(status {self.p.poll()}): {err[-2000:]}")


class Hypervisor:
    """A hypervisor process in its own owner-only run directory."""

    def __init__(self, run_dir: str, memory_mib: float = 64, policy: str = "seed") -> None:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        self.run_dir = run_dir
        self.socket = protocol.socket_path(run_dir)
        # A started-handshake, not a poll for the socket file: a stale file from a
        # dead hypervisor exists before the new one has unlinked it and bound its own.
        with ReadyPipe() as ready:
            self.proc = Proc(*hypervisor_argv(run_dir, memory_mib, policy), *ready.argv, pass_fds=ready.pass_fds)
            ready.spawned()
            if not ready.started_blocking(30):
                self.proc.stop()
                raise RuntimeError(f"hypervisor did not listen within 30 s: {self.proc.stderr()[-2000:]}")

    def stop(self) -> int:
        return self.proc.stop()

    async def tool(self) -> ControlClient:
        conn = await ControlClient.connect(self.socket)
        await conn.call(protocol.ToolHello(client="test"))
        return conn

    async def create_domain(self, vcpus: int, gfns: int, target: int | None = None) -> int:
        """A new domain (and its paging target); its domid."""
        conn = await self.tool()
        try:
            reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns))
            assert isinstance(reply, protocol.DomainCreated)
            if target is not None:
                await conn.call(protocol.SetTarget(domid=reply.domid, pages=target))
            return reply.domid
        finally:
            await conn.close()

    def pager(self, domid: int, pagefile: str, *extra: str) -> Proc:
        return Proc(*pager_argv(self.run_dir, domid, pagefile, *extra))

    def guest(self, domid: int, *extra: str) -> Proc:
        return Proc(*guest_argv(self.run_dir, domid, *extra))


async def stats(conn: ControlClient, domid: int) -> dict[str, Any]:
    """A domain's stats as plain data (the SDK's ``stats()`` form), for tests that index them."""
    reply, _ = await conn.call(protocol.Stats(domid=domid))
    assert isinstance(reply, protocol.StatsReply)
    figures: dict[str, Any] = msgspec.to_builtins(reply.stats)
    return figures


async def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def ring_enabled(conn: ControlClient, domid: int, ring: str = "paging") -> bool:
    info = (await stats(conn, domid)).get(ring, {})
    return isinstance(info, dict) and bool(info.get("enabled"))


def running_hypervisor(run_dir: str, policy: str = "seed") -> Iterator[Hypervisor]:
    """A hypervisor for one test, then the checks that it stopped cleanly and left nothing behind."""
    hv = Hypervisor(run_dir, policy=policy)
    try:
        yield hv
    finally:
        status = hv.stop()
        assert status == 0, f"hypervisor exited with status {status}"
        assert not os.path.exists(hv.socket), "control socket left behind"
        assert not os.path.exists(xenstore.socket_path(run_dir)), "xenstore socket left behind"
        assert not shm_segments(hv.proc.pid), "shared-memory segments left in /dev/shm"
