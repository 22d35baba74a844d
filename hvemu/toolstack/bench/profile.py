"""Where each process's CPU goes: run a benchmark's processes under cProfile, on CPU time.

``HVEMU_BENCH_PROFILE=DIR scripts/bench.sh --only fault_roundtrip``
    Every Python child the benchmark starts (:meth:`hvemu.toolstack.bench.common.Proc.start`)
    runs under ``python -m hvemu.toolstack.bench.profile wrap --out DIR/NAME`` and writes
    ``DIR/NAME-PID.prof``, NAME being its name in the benchmark
    (``hypervisor``, ``pager``, ``guest``, ``relay-uvloop-daemon``...).
    The profiler is off until the benchmark's measuring window opens
    (:func:`window`: ``SIGUSR1`` on, ``SIGUSR2`` off, called by
    :func:`~hvemu.toolstack.bench.common.open_window` and ``close_window`` at the
    instants the benchmark reads each process's CPU time), so that
    interpreter start-up, imports, warm-ups and the pager's initial eviction
    stay out of the profile.
``python -m hvemu.toolstack.bench.profile top DIR [--limit N]``
    Prints each profile's functions by own time (and by cumulative time), per
    fault if given ``--per N`` operations.

The timer is ``time.process_time``: on one CPU a wall-clock profiler charges
a function with the time its process sat preempted while a peer ran (a
``send`` that wakes the peer looks expensive), which is what hides where a
chain of processes burns its CPU.  cProfile adds a timer read to every call
and return, so the absolute figures under it are inflated (call-heavy code
most); read shares, and the CPU per fault from a run without it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import runpy
import signal
import sys
import time
from collections.abc import Iterable

#: The environment variable that turns profiling on for the benchmark's children.
ENV = "HVEMU_BENCH_PROFILE"


def wrap_argv(name: str, argv: list[str]) -> list[str]:
    """``argv`` (interpreter arguments ``-m MODULE ...``) run under the profiler if :data:`ENV` is set."""
    out_dir = os.environ.get(ENV)
    if not out_dir or argv[:1] != ["-m"]:
        return argv
    return ["-m", "hvemu.toolstack.bench.profile", "wrap", "--out", os.path.join(out_dir, name), "--", *argv]


def window(pids: Iterable[int], *, on: bool) -> None:
    """Open (``on``) or close the profiling window of wrapped children; nothing when not profiling."""
    if not os.environ.get(ENV):
        return
    for pid in pids:
        os.kill(pid, signal.SIGUSR1 if on else signal.SIGUSR2)


def _wrap(out: str, argv: list[str]) -> int:
    if argv[:1] != ["-m"] or len(argv) < 2:
        raise SystemExit("wrap: expected -m MODULE [ARGS...] after --")
    module = argv[1]
    sys.argv = [module, *argv[2:]]
    prof = cProfile.Profile(time.process_time)
    path = f"{out}-{os.getpid()}.prof"  # a benchmark may start a role more than once

    def dump() -> None:
        prof.disable()
        prof.dump_stats(path)

    def terminated(signum: int, frame: object) -> None:
        dump()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of it, as without the profiler (the bench checks the status)

    # Enabled from a signal handler, cProfile profiles the main thread (the event loop) from there on.
    # SA_RESTART: a blocking read(2) (the blocking relay's) goes on rather than failing with EINTR
    # (os.eventfd_read does not retry); the handler then runs when the read returns.
    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, lambda *_: prof.disable())
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.siginterrupt(sig, False)
    # A process that leaves SIGTERM to its default (the relay's, the bench guest's) would die without
    # writing its profile; one that handles SIGTERM itself (the hypervisor, the pager) replaces this.
    # It must interrupt a blocking read: an idle relay process is stopped in one.
    signal.signal(signal.SIGTERM, terminated)
    status: int = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        dump()
    return status


def _module(file: str, func: str) -> str:
    """Where a function lives, short: ``hvemu/client.py``, ``asyncio/queues.py``, ``<socket.send>``."""
    if file == "~":  # a built-in: name its type or module
        return f"<{func.split(' of ')[-1].strip('>')}>" if " of " in func else "<builtins>"
    parts = file.split(os.sep)
    for anchor in ("hvemu", "pager", "guest", "asyncio", "uvloop", "msgspec"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return parts[-1]


def _top(directory: str, limit: int, per: int) -> None:
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".prof"):
            continue
        stats = pstats.Stats(os.path.join(directory, name))
        total = stats.total_tt  # type: ignore[attr-defined]
        print(f"\n== {name}: {total:.3f} s of CPU under the profiler"
              + (f", {total * 1e6 / per:.0f} us per operation" if per else ""))
        by_file: dict[str, float] = {}
        for (file, _, func), (_, _, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            where = _module(file, func)
            by_file[where] = by_file.get(where, 0.0) + tt
        print("-- own time by module")
        for where, tt in sorted(by_file.items(), key=lambda kv: kv[1], reverse=True)[:limit]:
            print(f"{tt / total * 100 if total else 0.0:5.1f}%  {where}")
        for key in ("tottime", "cumulative"):
            print(f"-- by {key}")
            rows = sorted(stats.stats.items(),  # type: ignore[attr-defined]
                          key=lambda kv: kv[1][2] if key == "tottime" else kv[1][3], reverse=True)
            for (file, line, func), (_, calls, tt, ct, _) in rows[:limit]:
                where = f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({func})"
                share = (tt if key == "tottime" else ct) / total * 100 if total else 0.0
                print(f"{share:5.1f}%  tt {tt:7.3f}  ct {ct:7.3f}  calls {calls:8d}  {where}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvemu.toolstack.bench.profile", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    wrap = sub.add_parser("wrap")
    wrap.add_argument("--out", required=True)
    wrap.add_argument("rest", nargs=argparse.REMAINDER)
    top = sub.add_parser("top")
    top.add_argument("dir")
    top.add_argument("--limit", type=int, default=15)
    top.add_argument("--per", type=int, default=0, help="operations (faults) to divide the CPU by")
    args = p.parse_args(argv)
    if args.what == "wrap":
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return _wrap(args.out, rest)
    _top(args.dir, args.limit, args.per)
    return 0


if __name__ == "__main__":
    sys.exit(main())
