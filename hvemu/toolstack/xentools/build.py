"""Build hvemu's drop-in Xen libraries with the system C compiler.

``python -m hvemu.toolstack.xentools.build [--out DIR]`` (``scripts/build-xenlibs.sh``)
compiles ``hvemu/toolstack/xentools/src`` into a directory that goes on a Xen tool's
``LD_LIBRARY_PATH``.  Each library has Xen's soname and a linker version
script that gives every exported symbol the version Xen's binaries import
(check with ``objdump -T``):

========================  ===========  =========================================
library                   version      Xen release it stands in for
========================  ===========  =========================================
``libxenctrl.so.4.17``    VERS_4.17.0  libxenctrl of Xen 4.17
``libxenevtchn.so.1``     VERS_1.0     libxenevtchn (stable ABI since Xen 4.7)
``libxenstore.so.4``      VERS_4.0     libxenstore (stable ABI, soname 4 since Xen 4.9)
``libxentoollog.so.1``    VERS_1.0     libxentoollog (stable ABI since Xen 4.7)
``libxenhvemu.so.1``      HVEMU_1      hvemu's own glue the four share
========================  ===========  =========================================

Without ``--out`` the libraries go to a cache directory named after a hash of
the sources (``$HVEMU_CACHE_DIR`` or ``$XDG_CACHE_HOME/hvemu`` or
``~/.cache/hvemu``, then ``xenlibs/<hash>``), so a build is done once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).with_name("src")


@dataclass(frozen=True)
class Library:
    soname: str
    sources: tuple[str, ...]
    version: str
    exports: str
    #: Other libraries of this set it links against (built before it).
    needs: tuple[str, ...] = ()


LIBRARIES = (
    Library("libxenhvemu.so.1", ("hvemu_glue.c",), "HVEMU_1", "hvemu_*"),
    Library("libxentoollog.so.1", ("xentoollog.c",), "VERS_1.0", "xtl_*", ("libxenhvemu.so.1",)),
    Library("libxenctrl.so.4.17", ("xenctrl.c",), "VERS_4.17.0", "xc_*", ("libxenhvemu.so.1", "libxentoollog.so.1")),
    Library("libxenevtchn.so.1", ("xenevtchn.c",), "VERS_1.0", "xenevtchn_*", ("libxenhvemu.so.1",)),
    Library("libxenstore.so.4", ("xenstore.c",), "VERS_4.0", "xs_*", ("libxenhvemu.so.1",)),
)
CFLAGS = ("-std=gnu11", "-O2", "-g", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
          "-fvisibility=hidden")


class BuildError(Exception):
    pass


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BuildError("no C compiler (cc, gcc or clang) on PATH: the drop-in Xen libraries are built from source")
    return cc


def source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(SRC.iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for lib in LIBRARIES:
        h.update(repr(lib).encode())
    h.update(repr(CFLAGS).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("HVEMU_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hvemu"


def build(out: Path) -> Path:
    """Compile every library into ``out`` (created); return it."""
    cc = compiler()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvemu-xenlibs-") as tmp:
        for lib in LIBRARIES:
            script = Path(tmp) / f"{lib.soname}.map"
            script.write_text(f"{lib.version} {{\n  global: {lib.exports};\n  local: *;\n}};\n")
            argv = [cc, *CFLAGS, "-shared", "-I", str(SRC), f"-Wl,--version-script={script}",
                    f"-Wl,-soname,{lib.soname}", "-Wl,-z,defs", "-Wl,-rpath,$ORIGIN", "-o", str(out / lib.soname),
                    *(str(SRC / s) for s in lib.sources), f"-L{out}", *(f"-l:{n}" for n in lib.needs), "-lpthread"]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                raise BuildError(f"building {lib.soname} failed:\n{done.stderr.strip()}")
    return out


def ensure_built() -> Path:
    """The cached build of the current sources, built now if it is not there."""
    target = cache_dir() / "xenlibs" / source_hash()
    if all((target / lib.soname).exists() for lib in LIBRARIES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))  # beside it: the rename stays on one fs
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp made it private; the libraries are not secrets
        try:
            os.rename(staging, target)
        except OSError:  # another process built it meanwhile
            if not all((target / lib.soname).exists() for lib in LIBRARIES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build-xenlibs", description="Build hvemu's drop-in Xen libraries.")
    p.add_argument("--out", default=None, help="put them here (default: the cache, printed)")
    args = p.parse_args(argv)
    try:
        where = build(Path(args.out)) if args.out else ensure_built()
    except BuildError as exc:
        print(f"build-xenlibs: {exc}", file=sys.stderr)
        return 1
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
