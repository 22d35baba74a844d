"""The C header hvemu ships (``hvemu/include/hvemu_mem_event.h``): its ring macros behave as Xen 4.2's.

Built with the system compiler; skipped where there is none.  The layout the
header describes is checked against ``hvemu.abi`` by ``test_abi_layout``; this
checks the macros, each pitfall of Xen's ``ring.h`` included.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "hvemu" / "include"
CHECKS = [
    "shared_ring_init_zeroes_the_indices", "a_page_is_64_slots", "ring_bytes_8_is_8_slots", "ring_bytes_8_is_384",
    "back_ring_attach_skips_to_req_prod_as_xen", "so_unanswered_requests_are_not_seen",
    "reattach_serves_every_request_after_rsp_prod", "indices_wrap", "slot_is_index_masked",
    "push_notifies_when_rsp_event_is_passed", "push_is_quiet_before_rsp_event", "final_check_rearms_req_event",
]


def test_ring_macros_behave_as_xens(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "ring_macros"
    built = subprocess.run([cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE), "-o", str(exe),
                            str(ROOT / "tests" / "c" / "ring_macros.c")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    assert run.stdout.split("\n")[:-1] == [f"ok {name}" for name in CHECKS], run.stdout
    assert run.returncode == 0

