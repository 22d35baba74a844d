"""Linux ``userfaultfd`` serving the same kind of fault, in C: what a user would otherwise use.

The handler is ``uffd_bench.c`` beside this module, compiled with the
system's ``cc`` into the benchmark's scratch directory.  No compiler, a
kernel without userfaultfd, or a policy that refuses it (``EPERM``: see
``/proc/sys/vm/unprivileged_userfaultfd``; the program falls back to
``UFFD_USER_MODE_ONLY`` and ``/dev/userfaultfd`` before giving up) make the
figure ``null``, with the reason beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

from hvemu.toolstack.bench.common import Placement, Proc

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uffd_bench.c")


def _sysctl() -> str | None:
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return f.read().strip()
    except OSError:
        return None


async def run(placement: Placement, scratch: str, iterations: int, warmup: int) -> dict[str, Any]:
    """``{"p50_us": ..., ...}``, or ``{"p50_us": None, "reason": ...}`` when it cannot run here."""
    info: dict[str, Any] = {"unprivileged_userfaultfd": _sysctl(), "euid": os.geteuid()}
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return {"p50_us": None, "reason": "no C compiler (cc) on PATH", **info}
    binary = os.path.join(scratch, "uffd_bench")
    build = await asyncio.create_subprocess_exec(
        cc, "-O2", "-pthread", "-o", binary, SOURCE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await build.communicate()
    if build.returncode != 0:
        return {"p50_us": None, "reason": f"compile failed: {out.decode(errors='replace')[-500:]}", **info}
    proc = await Proc.start("uffd", [str(iterations), str(warmup), scratch], cpus=placement.guest,
                            executable=binary)
    try:
        line = await proc.line(timeout=60)
        status = await proc.stop(timeout=5, sig=0)
    finally:
        await proc.stop(timeout=5)
        proc.close()
    try:
        result: dict[str, Any] = json.loads(line) if line else {}
    except json.JSONDecodeError:
        result = {"error": f"unreadable output {line!r}"}
    if "error" in result or status != 0:
        return {"p50_us": None, "reason": result.get("error", f"exit status {status}"), **info}
    return {**result, **info}
