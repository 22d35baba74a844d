"""A child process playing one guest vCPU: writes pages through GuestMemory as fast as it can.

argv: memory_fd p2m_fd inflight_fd gfns seconds.  Prints the number of
successful and refused writes when done.
"""

from __future__ import annotations

import mmap
import sys
import time

from guest.memory import GuestMemory
from guest.stamp import make_page
from hvemu import abi


def main() -> None:
    mem_fd, p2m_fd, inflight_fd, gfns, seconds = (int(a) for a in sys.argv[1:6])
    memory = GuestMemory(mmap.mmap(mem_fd, gfns * abi.PAGE_SIZE, mmap.MAP_SHARED),
                         mmap.mmap(p2m_fd, abi.p2m_table_size(gfns), mmap.MAP_SHARED, mmap.PROT_READ),
                         mmap.mmap(inflight_fd, abi.inflight_table_size(1), mmap.MAP_SHARED), gfns, 1)
    pages = [make_page(g, 1) for g in range(gfns)]
    ok = refused = 0
    end = time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < end:
        for g in range(gfns):
            if memory.try_write(0, g, pages[g]):
                ok += 1
            else:
                refused += 1
    print(ok, refused, flush=True)
    memory.close()


if __name__ == "__main__":
    main()
