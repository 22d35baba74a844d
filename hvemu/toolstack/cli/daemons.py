"""``hvemu start|stop``, ``pager-attach|detach``, ``listener-attach|detach``: the background daemons."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
import time
from typing import Any

import uvloop

from hvemu import abi, protocol
from hvemu.client import ControlError
from hvemu.names import ADMISSION_POLICIES as POLICIES
from hvemu.names import VICTIM_POLICIES
from hvemu.procs import ReadyPipe
from hvemu.toolstack.cli.base import (
    _MODULES,
    DOMAIN,
    SIZE_UNITS,
    CliError,
    _domain_daemons,
    _domid,
    _errno_named_in,
    _finite,
    _Literal,
    _pidfile,
    _read_pid,
    _ring_size,
    _run_dir,
    _size,
    _spawn,
    _stop,
    _tool,
    _wait_daemons_gone,
    arg,
    command,
    domain_info,
)
from hvemu.toolstack.host import hypervisor_argv, pager_argv
from pager.defaults import EVICT_BATCH, EVICT_POLICY


@command("start", "start the hypervisor in the background",
         arg("--memory", type=_size, default=_size("256"), metavar="SIZE", help=f"host memory budget, {SIZE_UNITS}"),
         arg("--admission", choices=POLICIES, default=POLICIES[0],
             help="mem_event admission policy: the seed's rule, or claim a slot before producing"),
         arg("--ring-size", type=_ring_size, default=None, metavar="SLOTS",
             help=f"slots per ring, a power of two up to {abi.MEM_EVENT_RING_SIZE} (default: "
                  f"{abi.MEM_EVENT_RING_SIZE}, what fits a page)"),
         arg("--trace", default=None, metavar="FILE", help="record ring events to this file from the start"),
         arg("--foreground", action="store_true", help="run in this terminal instead"),
         arg("-v", "--verbose", action="count", default=0, help="log INFO (-vv: DEBUG) to the log file"))
def cmd_start(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    if args.memory.pages < 1:
        raise CliError(f"--memory {args.memory} is less than one page", "EINVAL")
    argv = hypervisor_argv(run_dir, args.memory.mib, args.admission, ring_size=args.ring_size,
                           verbose=args.verbose)
    if args.trace:
        argv += ["--trace", os.path.abspath(args.trace)]
    if args.foreground:
        os.execv(sys.executable, [sys.executable, *argv])
    with ReadyPipe() as ready:
        pid = _spawn(run_dir, "hypervisor", argv + ready.argv, ready.pass_fds).pid
        ready.spawned()
        if not ready.started_blocking(10):
            raise CliError(f"the hypervisor did not start; see {os.path.join(run_dir, 'hypervisor.log')}")
    return {"started": "hypervisor", "pid": pid, "socket": protocol.socket_path(run_dir)}


@command("stop", "stop the hypervisor (domains destroyed, their guests and daemons exit, nothing left behind)",
         arg("--timeout", type=_finite, default=30, metavar="SECONDS", help="wait this long, seconds"))
def cmd_stop(args: argparse.Namespace) -> Any:
    """Stop the hypervisor; its pagers and listeners exit with it, and their pidfiles go too."""
    run_dir = _run_dir(args)
    for name in _domain_daemons(run_dir):
        _read_pid(run_dir, name)  # removes a stale pidfile
    pid = _stop(run_dir, "hypervisor", args.timeout)
    running = _wait_daemons_gone(run_dir, _domain_daemons(run_dir))
    result: dict[str, Any] = {"stopped": "hypervisor", "pid": pid}
    if running:  # they lost their hypervisor and should exit; say which did not (yet)
        result["still_running"] = running
    return result


@command("pager-attach", "start a xenpaging-like pager for a domain in the background",
         DOMAIN,
         arg("--pagefile", default=None, metavar="FILE", help="where evicted pages go (default: "
             "<run dir>/domN.pagefile; removed when the domain is destroyed, unless --keep)"),
         arg("--keep", action="store_true", help="keep the pagefile when the domain is destroyed"),
         arg("--target", type=_size, default=None, metavar="SIZE",
             help=f"resident memory to page down to, {SIZE_UNITS} (default: the domain's target)"),
         arg("--policy", choices=VICTIM_POLICIES, default=EVICT_POLICY,
             help="victim policy: clock (xenpaging's sweeping hand) or random"),
         arg("--batch", type=int, default=EVICT_BATCH, metavar="PAGES", help="pages per eviction batch"))
def cmd_pager_attach(args: argparse.Namespace) -> Any:
    domid = _domid(args)
    run_dir = _run_dir(args)
    argv = pager_argv(run_dir, domid, os.path.abspath(args.pagefile or os.path.join(run_dir, f"dom{domid}.pagefile")),
                      "--policy", args.policy, "--batch", str(args.batch))
    if args.keep:
        argv.append("--keep")
    if args.target is not None:
        argv += ["--target", str(args.target.pages)]
    name = f"pager-{domid}"
    ready_r, ready_w = os.pipe()
    try:
        proc = _spawn(run_dir, name, [*argv, "--ready-fd", str(ready_w)], pass_fds=(ready_w,))
        os.close(ready_w)
        ready_w = -1
        _wait_attached(proc, run_dir, name, domid, "paging", ready=ready_r)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return {"attached": "pager", "domid": domid, "pid": proc.pid}


def _wait_attached(proc: subprocess.Popen[bytes], run_dir: str, name: str, domid: int, ring: str,
                   timeout: float = 15.0, ready: int | None = None) -> None:
    """Return once the daemon has enabled its ring; if it exits first, say why (from its log).

    ``ready``: the read end of the daemon's ``--ready-fd``, written once it
    has accepted the ring (a pager may own it for a moment and then refuse
    it, e.g. over its pagefile); without it, owning the ring is attached.
    """
    path = _pidfile(run_dir, name)

    async def enabled() -> bool:
        conn = await _tool(run_dir)
        try:
            st = await domain_info(conn, domid)
        except ControlError:
            return False
        finally:
            await conn.close()
        return st.ring_owned(ring, proc.pid)  # attached means owned by this daemon

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # it exited: no pidfile, and say why
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log_path = os.path.join(run_dir, f"{name}.log")
            with open(log_path) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            last = lines[-1] if lines else "no message"
            raise CliError(f"{name} exited: {last} (log: {log_path})", _errno_named_in(last))
        if ready is not None:
            readable, _, _ = select.select([ready], [], [], 0.05)
            if readable:
                if os.read(ready, 1):
                    return
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # EOF: the daemon is exiting (the poll above reports why)
            continue
        if uvloop.run(enabled()):
            return
        time.sleep(0.05)
    raise CliError(f"{name} did not attach within {timeout:.0f}s (log: {os.path.join(run_dir, name + '.log')})",
                   "ETIMEDOUT")


def _daemon_domid(args: argparse.Namespace) -> int:
    """The domid of a daemon to stop: a number as it is (its domain may be gone already), a name looked up."""
    return int(args.domain) if args.domain.strip().isdigit() else _domid(args)


@command("pager-detach", "stop a domain's pager cleanly (pages everything back in)",
         DOMAIN, arg("--timeout", type=_finite, default=60, metavar="SECONDS", help="wait this long, seconds"))
def cmd_pager_detach(args: argparse.Namespace) -> Any:
    domid = _daemon_domid(args)
    pid = _stop(_run_dir(args), f"pager-{domid}", args.timeout)
    return {"detached": "pager", "domid": domid, "pid": pid}


@command("listener-attach", "start an access listener (xen-access style) for a domain; its options follow "
         "the domain (hvemu listener-attach --help lists them)",
         arg("domain", metavar="DOMAIN", nargs="?", help="domain id or name"),
         arg("extra", nargs=argparse.REMAINDER, metavar="LISTENER-OPTIONS", help="options for the listener"))
def cmd_listener_attach(args: argparse.Namespace) -> Any:
    if args.domain is None or args.domain in ("-h", "--help"):
        from pager.examples.access_listener import _parser as listener_parser

        usage = listener_parser().format_help().replace("--domid DOMID", "DOMAIN")
        return _Literal(f"usage: hvemu listener-attach DOMAIN [LISTENER-OPTIONS]\n\nthe listener's options:\n"
                        f"{usage.split(chr(10), 1)[1]}")
    domid = _domid(args)
    run_dir = _run_dir(args)
    argv = ["-m", _MODULES["listener"], "--run-dir", run_dir, "--domid", str(domid), *args.extra]
    name = f"listener-{domid}"
    proc = _spawn(run_dir, name, argv)
    _wait_attached(proc, run_dir, name, domid, "access")
    return {"attached": "listener", "domid": domid, "pid": proc.pid}


@command("listener-detach", "stop a domain's access listener",
         DOMAIN, arg("--timeout", type=_finite, default=30, metavar="SECONDS", help="wait this long, seconds"))
def cmd_listener_detach(args: argparse.Namespace) -> Any:
    domid = _daemon_domid(args)
    pid = _stop(_run_dir(args), f"listener-{domid}", args.timeout)
    return {"detached": "listener", "domid": domid, "pid": pid}
