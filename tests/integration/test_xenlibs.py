"""Every function of hvemu's drop-in Xen libraries, through a small C program (``tests/c/xenlibs_check.c``).

The program links against the drop-in libraries only and calls each function
as Xen's tools do, against a real hypervisor and a ``vm_event`` domain; it
prints ``ok <function>`` per check.  Every symbol the libraries export must be
checked at least once, and each symbol Xen's two binaries import must be
exported with the version they ask for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvemu.toolstack.xentools.build import LIBRARIES
from hvemu.toolstack.xentools.tools import tool_env
from tests.integration.system import Hypervisor
from tests.integration.xen_tools import create_vm_event_domain, make_hypervisor

ROOT = Path(__file__).resolve().parents[2]
GFNS = 64
#: The glue's own functions are hvemu's, not Xen's: they are exercised through the others.
GLUE = "libxenhvemu.so.1"


def exported(lib: Path) -> dict[str, str]:
    """``{symbol: version}`` of the functions a library exports."""
    out = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 7 and parts[1] == "g" and "DF" in parts and parts[3] == ".text":
            symbols[parts[-1]] = parts[-2].strip("()")
    return symbols


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    yield from make_hypervisor(os.path.join(str(tmp_path), "run"))


@pytest.fixture(scope="module")
def check_program(xen_libs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("xenlibs") / "xenlibs_check"
    libs = [f"-l:{lib.soname}" for lib in LIBRARIES if lib.soname != GLUE]
    built = subprocess.run([cc, "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                            str(ROOT / "tests" / "c" / "xenlibs_check.c"), f"-L{xen_libs}", *libs,
                            f"-Wl,-rpath,{xen_libs}"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return exe


async def test_every_library_function(hv: Hypervisor, xen_libs: Path, check_program: Path) -> None:
    domid = await create_vm_event_domain(hv, 1, GFNS)
    run = subprocess.run([str(check_program), str(domid), str(GFNS)], env=tool_env(hv.run_dir),
                         capture_output=True, text=True, timeout=120)
    # Then a process without a ring of the domain maps gfn 5 (loaded with 0xab above) and 6: copies.
    copy = subprocess.run([str(check_program), str(domid), str(GFNS), "map", "5"], env=tool_env(hv.run_dir),
                          capture_output=True, text=True, timeout=60)
    assert copy.returncode == 0 and copy.stdout == "ok xc_map_foreign_pages(copy)\n", copy.stdout + copy.stderr
    lines = run.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert not failed and run.returncode == 0, "\n".join(failed) + run.stderr[-2000:]
    checked = {line.split()[1].split("(")[0] for line in lines}
    functions = {name for lib in LIBRARIES if lib.soname != GLUE for name in exported(xen_libs / lib.soname)}
    assert functions - checked == set(), f"exported but never checked: {sorted(functions - checked)}"
    # Each unmodelled function said so on stderr, once per call.
    assert "xc_altp2m_create_view: altp2m: not modelled by hvemu (EOPNOTSUPP)" in run.stderr


def test_every_import_of_xens_tools_is_exported_with_its_version(xen_bin: Path, xen_libs: Path) -> None:
    ours: dict[str, str] = {}
    for lib in LIBRARIES:
        ours.update(exported(xen_libs / lib.soname))
    for tool in ("xenpaging", "xen-access"):
        out = subprocess.run(["nm", "-D", "--undefined-only", str(xen_bin / tool)], capture_output=True, text=True,
                             check=True).stdout
        prefixes = ("xc_", "xs_", "xtl_", "xenevtchn_")
        wanted = [w.split()[-1] for w in out.splitlines() if w.split()[-1].startswith(prefixes)]
        assert wanted, out
        for symbol in wanted:
            name, _, version = symbol.partition("@")
            assert ours.get(name) == version, f"{tool} imports {symbol}; we export {name}@{ours.get(name)}"
