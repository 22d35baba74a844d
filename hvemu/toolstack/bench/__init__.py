"""``scripts/bench.sh``: the system measured as a user sees it, beside the floors it cannot beat.

Every figure is taken with real processes (hypervisor, guests, daemons) and,
in the same run and under the same CPU placement, the floor that bounds it:
a fault next to the same hops done bare by three processes with no hvemu code
on the path (the relay, before and after the system), page-in throughput next
to a bare ring between two processes, eviction next to the bare copy to a
pagefile, and a Linux ``userfaultfd`` handler in C next to all of it.  The
system's own exit path with a daemon that does no work is reported too, as
what hvemu's plumbing costs, never as a floor.  These machines are noisy, so
the ratios are what to read.

Modules: :mod:`.common` (placement, child processes, CPU times, percentiles),
:mod:`.relay` (the bare relay), :mod:`.vcpus` (a bench-only guest),
:mod:`.nulld` (a daemon that does no work), :mod:`.floors` (ring and copy
floors), :mod:`.uffd` (the C handler), :mod:`.suites` (one function per
benchmark), :mod:`.report` (ratios, targets, table), :mod:`.profile`
(cProfile on process time) and :mod:`.__main__` (the command line).
"""
