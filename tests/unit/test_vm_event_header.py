"""The C header of the other ring ABIs (``hvemu/include/hvemu_vm_event.h``) against ``hvemu.abi``.

Built with the system compiler (skipped where there is none).  A request
packed by ``hvemu.abi`` is read back through the header's offsets.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvemu import abi

ROOT = Path(__file__).resolve().parents[2]


def test_the_header_matches_abi(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "vm_event_layout"
    built = subprocess.run([cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "hvemu" / "include"),
                            "-o", str(exe), str(ROOT / "tests" / "c" / "vm_event_layout.c")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    fields = {w[1]: int(w[2]) for w in (line.split() for line in out.splitlines()) if w[0] == "field"}
    for name, (offset, _size) in abi.VM_EVENT_FIELDS.items():
        assert fields["regs" if name == "data" else name] == offset, name
    u, regs = abi.VM_EVENT_U_OFFSET, abi.VM_EVENT_DATA_OFFSET
    assert fields["regs.x86.rip"] == regs + abi.VM_EVENT_REGS_X86_RIP
    assert fields["regs.x86.cr3"] == regs + abi.VM_EVENT_REGS_X86_CR3
    assert fields["u.mem_paging.flags"] == u + 12 and fields["u.mem_access.flags"] == u + 24
    assert fields["u.software_breakpoint.insn_length"] == u + 16 and fields["u.software_breakpoint.type"] == u + 20
    # Xen 4.2.0's entry: the seed's from gfn on, after a u32 flags and the vcpu_id.
    assert [fields[f"4.2.{f}"] for f in ("vcpu_id", "gfn", "p2mt", "reason")] == [4, 8, 32, 38]
    assert f"size vm_event {abi.VM_EVENT_SIZE}" in out
    # A breakpoint request packed by hvemu.abi, read at the header's offsets.
    ev = abi.MemEvent(type=abi.MemEventType.ACCESS, flags=abi.MemEventFlag.VCPU_PAUSED, vcpu_id=1, gfn=0x42,
                      gla=0x42000, gla_valid=True, reason=abi.MemEventReason.INT3)
    buf = bytearray(abi.VM_EVENT_SIZE)
    abi.entry_codec("vm_event", "access").pack_into(buf, 0, ev)
    assert struct.unpack_from("<I", buf, fields["version"])[0] == abi.VM_EVENT_INTERFACE_VERSION
    assert struct.unpack_from("<I", buf, fields["reason"])[0] == abi.VmEventReason.SOFTWARE_BREAKPOINT
    assert struct.unpack_from("<Q", buf, fields["u"])[0] == 0x42
    assert struct.unpack_from("<I", buf, fields["u.software_breakpoint.insn_length"])[0] == 1
    assert struct.unpack_from("<Q", buf, fields["regs.x86.rip"])[0] == 0x42000
