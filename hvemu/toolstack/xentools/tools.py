"""Find Xen's real tools and run them against hvemu (``hvemu xen-tool``).

The binaries come from Debian's ``xen-utils-4.17`` package, fetched on first
use with ``apt-get download`` and unpacked with ``dpkg -x`` into the cache
(never installed: that would pull in a hypervisor), or from a path given.
They run with hvemu's drop-in libraries first on ``LD_LIBRARY_PATH`` (built
on first use, see :mod:`hvemu.toolstack.xentools.build`) and ``HVEMU_RUN_DIR`` naming
the hypervisor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hvemu.toolstack.xentools.build import cache_dir, ensure_built

PACKAGE = "xen-utils-4.17"
#: Where the package puts the tools.
BIN_DIR = "usr/lib/xen-4.17/bin"
#: The tools hvemu runs, and what each needs of a domain.
TOOLS = ("xenpaging", "xen-access")


class ToolUnavailable(Exception):
    """The binary cannot be had: the message says why (no apt-get, no network, ...)."""


def package_dir() -> Path:
    return cache_dir() / PACKAGE


def fetch_package(timeout: float = 300.0) -> Path:
    """The unpacked package's tool directory, fetched now if it is not in the cache."""
    bin_dir = package_dir() / BIN_DIR
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    apt = shutil.which("apt-get")
    dpkg = shutil.which("dpkg")
    if apt is None or dpkg is None:
        raise ToolUnavailable(f"fetching {PACKAGE} needs apt-get and dpkg (give the binary's path instead)")
    package_dir().parent.mkdir(parents=True, exist_ok=True)
    # Unpacked beside its place in the cache, so that the final rename stays on one file system.
    with tempfile.TemporaryDirectory(prefix=".xen-utils-", dir=package_dir().parent) as tmp:
        try:
            got = subprocess.run([apt, "download", PACKAGE], cwd=tmp, capture_output=True, text=True,
                                 timeout=timeout)
            if got.returncode and os.geteuid() == 0:
                # A fresh machine has no package lists yet (root may fetch them; nothing is installed).
                subprocess.run([apt, "update", "-qq"], capture_output=True, text=True, timeout=timeout)
                got = subprocess.run([apt, "download", PACKAGE], cwd=tmp, capture_output=True, text=True,
                                     timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolUnavailable(f"apt-get download {PACKAGE} took more than {timeout:.0f} s") from None
        debs = sorted(Path(tmp).glob("*.deb"))
        if got.returncode or not debs:
            why = (got.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise ToolUnavailable(f"apt-get download {PACKAGE} failed: {why}")
        unpacked = Path(tmp) / "root"
        done = subprocess.run([dpkg, "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True)
        if done.returncode:
            raise ToolUnavailable(f"dpkg -x {debs[0].name} failed: {done.stderr.strip()[-200:]}")
        if not all((unpacked / BIN_DIR / t).exists() for t in TOOLS):
            raise ToolUnavailable(f"{debs[0].name} has no {', '.join(TOOLS)} in /{BIN_DIR}")
        target = package_dir()
        try:
            os.rename(unpacked, target)
        except OSError:  # fetched by another process meanwhile
            if not all((bin_dir / t).exists() for t in TOOLS):
                raise
    return bin_dir


def find_tool(name: str, path: str | None = None) -> Path:
    """The binary of ``name``: ``path`` if given, else the cached package's (fetched if need be)."""
    if path is not None:
        p = Path(path)
        if not p.is_file() or not os.access(p, os.X_OK):
            raise ToolUnavailable(f"{path} is not an executable file")
        return p
    if name not in TOOLS:
        raise ToolUnavailable(f"unknown tool {name!r} (hvemu runs {', '.join(TOOLS)}; give a path for others)")
    return fetch_package() / name


def tool_env(run_dir: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a Xen tool runs in: the drop-in libraries first, and the hypervisor to reach."""
    env = dict(os.environ if base is None else base)
    libs = str(ensure_built())
    env["LD_LIBRARY_PATH"] = libs + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["HVEMU_RUN_DIR"] = run_dir
    env["HVEMU_PYTHON"] = sys.executable
    return env
