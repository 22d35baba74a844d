"""Fixtures for the tests that run Xen's own tools: the binaries, the drop-in libraries, a hypervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvemu import abi, protocol
from tests.integration.system import Hypervisor, running_hypervisor, stats


def unavailable(reason: str) -> None:
    """Skip with the reason, except in CI (``CI=true``), where a missing tool is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def xen_bin() -> Path:
    """The directory of Xen 4.17's tools (Debian's package, fetched into the cache once)."""
    from hvemu.toolstack.xentools.tools import ToolUnavailable, fetch_package

    try:
        return fetch_package()
    except ToolUnavailable as exc:
        unavailable(str(exc))
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def xen_libs() -> Path:
    from hvemu.toolstack.xentools.build import BuildError, ensure_built

    try:
        return ensure_built()
    except BuildError as exc:
        unavailable(str(exc))
    raise AssertionError("unreachable")


def make_hypervisor(run_dir: str, policy: str = "seed") -> Iterator[Hypervisor]:
    return running_hypervisor(run_dir, policy)


class XenTool:
    """A Xen tool run as ``hvemu xen-tool`` runs it: the drop-in libraries first, our hypervisor named."""

    def __init__(self, binary: Path, args: list[str], run_dir: str) -> None:
        from hvemu.toolstack.xentools.tools import tool_env

        self.name = binary.name
        self.out = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([str(binary), *args], env=tool_env(run_dir), stdout=self.out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)
        self.out.close()


async def create_vm_event_domain(hv: Hypervisor, vcpus: int, gfns: int) -> int:
    conn = await hv.tool()
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=vcpus, gfns=gfns, abi="vm_event"))
        assert isinstance(reply, protocol.DomainCreated)
        return reply.domid
    finally:
        await conn.close()


async def set_target(hv: Hypervisor, domid: int, pages: int) -> None:
    """``hvemu mem-set``: the hypervisor writes memory/target and memory/target-tot_pages (KiB)."""
    conn = await hv.tool()
    try:
        await conn.call(protocol.SetTarget(domid=domid, pages=pages))
    finally:
        await conn.close()


async def domain_stats(hv: Hypervisor, domid: int) -> dict[str, Any]:
    conn = await hv.tool()
    try:
        return await stats(conn, domid)
    finally:
        await conn.close()


async def until(hv: Hypervisor, domid: int, pred: object, what: str, timeout: float = 60.0,
                tool: XenTool | None = None) -> dict[str, Any]:
    """Poll the domain's stats until ``pred(stats)``; fail with ``what`` and the tool's output."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        st = await domain_stats(hv, domid)
        if pred(st):  # type: ignore[operator]
            return st
        if loop.time() > deadline:
            out = tool.output()[-3000:] if tool is not None else ""
            raise AssertionError(f"{what} not within {timeout}s: resident={st.get('resident')} "
                                 f"paged={st.get('paged')} paging={st.get('paging')}\n{out}")
        await asyncio.sleep(0.1)


def kib(pages: int) -> int:
    return pages * abi.PAGE_SIZE // 1024
