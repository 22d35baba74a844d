"""hvemu: Xen's memory-event rings emulated as real processes (hypervisor, guests, pagers).

The contract is ``docs/`` (ring ABI, processes, protocol, admission
policies); :data:`INCLUDE_DIR` holds the C header of the ring page, installed
with the package so that a daemon in C compiles against the same layout
(``cc -I "$(python -c 'import hvemu; print(hvemu.INCLUDE_DIR)')" ...``).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hvemu")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

#: The directory of ``hvemu_mem_event.h`` (the ring page and ``ring.h``'s macros, in C).
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
