"""``hvemu``: the toolstack command, in the manner of ``xl``.

One entry point, one subcommand per job, all of them declared once in
:data:`COMMANDS` (the parser, the help and the dispatch are built from that
table).  ``--help`` everywhere with defaults and units, ``--json`` on every
command that reads state.  xl's habits: sizes take a unit (``512m``, ``1g``,
``4096k``; a bare number is MiB), gfns may be hex (``0x10``), a domain is
named by its id or its name, ``list`` has xl's columns and state letters.

Errors are one line on stderr in the user's terms (``no domain 7``, sizes in
the units typed) and exit status 1 (2 for usage errors), never a traceback;
with ``--json`` that line is one JSON object, ``{"error": ..., "errno": ...,
"command": ...}`` (see :func:`error_object`), so a script reads results from
stdout and failures from stderr, told apart by the exit status.

``map`` is a foreign mapper: a paged-out gfn answers ``ENOENT`` (the
hypervisor has asked the pager for it) and the mapper retries, as Xen's
foreign-mapping callers do.  Background daemons started here (the hypervisor,
pagers, listeners) record their pid in the run directory so that ``stop`` and
``*-detach`` find them again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno as errno_mod
import inspect
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import msgspec
import uvloop

import hvemu
from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.client import Connection, ControlError, root_cause
from hvemu.names import ADMISSION_POLICIES as POLICIES
from hvemu.names import VICTIM_POLICIES
from hvemu.procs import ReadyPipe
from hvemu.stats import DomainStats
from hvemu.toolstack.host import HYPERVISOR_MODULE, PAGER_MODULE, hypervisor_argv, pager_argv
from hvemu.toolstack.sizes import SIZE_HELP, MiB, Size, SizeError, mib_text, parse_size
from pager.defaults import EVICT_BATCH, EVICT_POLICY


class CliError(Exception):
    """A user-facing failure: printed as one line; ``errno`` names it for ``--json`` (None: no errno fits)."""

    def __init__(self, message: str, errno: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# --------------------------------------------------------------------------
# talking to the hypervisor
# --------------------------------------------------------------------------


async def _tool(run_dir: str | None) -> Connection:
    path = protocol.socket_path(run_dir)
    try:
        conn = await Connection.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"no hypervisor at {path} ({exc.strerror}); start one with 'hvemu start'",
                       errno_mod.errorcode.get(exc.errno or 0)) from exc
    await conn.call(protocol.ToolHello(client="hvemu-cli"))
    return conn


async def _call(run_dir: str | None, msg: protocol.Msg) -> protocol.Msg:
    conn = await _tool(run_dir)
    try:
        reply, fds = await conn.call(msg)
        for fd in fds:
            os.close(fd)
        return reply
    finally:
        await conn.close()


async def map_foreign(conn: Connection, domid: int, gfns: list[int], *, timeout: float = 10.0,
                      delay: float = 0.001) -> tuple[dict[int, bytes], int]:
    """Map ``gfns`` of ``domid``, retrying the ENOENT ones until paged in; returns pages and retries."""
    pages: dict[int, bytes] = {}
    pending = list(gfns)
    retries = 0
    deadline = time.monotonic() + timeout
    while pending:
        reply, _ = await conn.call(protocol.MapForeign(domid=domid, gfns=pending))
        assert isinstance(reply, protocol.ForeignPages)
        again = []
        for g, r, page in zip(pending, reply.results, reply.pages, strict=True):
            if r is None and page is not None:
                pages[g] = page
            elif r == Errno.ENOENT:
                again.append(g)
            else:  # not RAM with a frame (or the guest shrank its memory): nothing to map
                raise ControlError(r or Errno.EINVAL, f"gfn {g} of domain {domid} cannot be mapped")
        pending = again
        if pending:
            retries += 1
            if time.monotonic() > deadline:
                raise ControlError(Errno.EAGAIN, f"{len(pending)} gfns still paged out after {timeout}s")
            await asyncio.sleep(delay)
    return pages, retries


async def domain_info(conn: Connection, domid: int) -> DomainStats:
    reply, _ = await conn.call(protocol.Stats(domid=domid))
    assert isinstance(reply, protocol.StatsReply)
    return reply.stats


async def domain_list(conn: Connection) -> list[protocol.DomainSummary]:
    reply, _ = await conn.call(protocol.DomainList())
    assert isinstance(reply, protocol.DomainListReply)
    return reply.domains


async def resolve_domain(conn: Connection, text: str) -> int:
    """A domain named as xl takes it, by id or by name, as its domid; ``no domain X`` if there is none."""
    domains = await domain_list(conn)
    if re.fullmatch(r"\d+", text.strip()):
        domid = int(text)
        if any(d.domid == domid for d in domains):
            return domid
    else:
        named = [d.domid for d in domains if d.name == text]
        if len(named) == 1:
            return named[0]
        if named:
            raise CliError(f"{len(named)} domains are named {text!r}: give the id ({', '.join(map(str, named))})",
                           "EINVAL")
    raise CliError(f"no domain {text}", "ESRCH")


async def _resolved(args: argparse.Namespace) -> int:
    conn = await _tool(args.run_dir)
    try:
        return await resolve_domain(conn, args.domain)
    finally:
        await conn.close()


def _domid(args: argparse.Namespace) -> int:
    """``args.domain`` as a domid, for the commands that run without an event loop."""
    return uvloop.run(_resolved(args))


# --------------------------------------------------------------------------
# background processes
# --------------------------------------------------------------------------


def _run_dir(args: argparse.Namespace) -> str:
    # Absolute: the daemons are given it, and a pidfile is checked against their command line.
    return os.path.abspath(args.run_dir or protocol.default_run_dir())


def _pidfile(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.pid")


#: The module each kind of background daemon runs (``hypervisor``, ``pager-N``, ``listener-N``).
_MODULES = {"hypervisor": HYPERVISOR_MODULE, "pager": PAGER_MODULE,
            "listener": "pager.examples.access_listener"}
#: A pidfile of a daemon a domain has (``pager-3.pid``).
_DOMAIN_PIDFILE = re.compile(r"(pager|listener)-\d+\.pid")


def _is_ours(pid: int, run_dir: str, name: str) -> bool:
    """Whether ``pid`` is still the daemon ``name`` that :func:`_spawn` started for ``run_dir``.

    Its ``/proc/PID/cmdline`` must run the daemon's module for this run
    directory (and, for ``pager-N``/``listener-N``, domain N): a pid the
    kernel has since given to another process is not ours to signal.  A
    zombie has no command line, so it counts as gone.
    """
    kind, _, domid = name.partition("-")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:  # gone (or not readable: not ours either)
        return False
    pairs = set(zip(argv, argv[1:], strict=False))
    run_dirs = [os.path.realpath(v) for k, v in pairs if k == "--run-dir"]
    return (("-m", _MODULES[kind]) in pairs and os.path.realpath(run_dir) in run_dirs
            and (not domid or ("--domid", domid) in pairs))


def _read_pid(run_dir: str, name: str) -> int | None:
    """The pid of the running daemon ``name``, or None; a pidfile naming anything else is removed (stale)."""
    path = _pidfile(run_dir, name)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    if pid > 0 and _is_ours(pid, run_dir, name):
        return pid
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return None


def _spawn(run_dir: str, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start a detached background process logging to ``<run_dir>/<name>.log`` (inheriting ``pass_fds``)."""
    if _read_pid(run_dir, name) is not None:
        raise CliError(f"{name} is already running", "EBUSY")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(run_dir, f"{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, pass_fds=pass_fds)
    # Popen can return while the exec is still under way (an empty /proc/PID/cmdline, which
    # _is_ours takes for "gone"): the pidfile is written once the command line is the daemon's.
    deadline = time.monotonic() + 5
    while proc.poll() is None and not _is_ours(proc.pid, run_dir, name) and time.monotonic() < deadline:
        time.sleep(0.002)
    with open(_pidfile(run_dir, name), "w") as f:
        f.write(f"{proc.pid}\n")
    return proc


def _wait_gone(pid: int, run_dir: str, name: str, timeout: float) -> bool:
    """Wait up to ``timeout`` for the daemon to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while _is_ours(pid, run_dir, name):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child (main() called in-process): reap it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop(run_dir: str, name: str, timeout: float) -> int:
    pid = _read_pid(run_dir, name)
    if pid is None:
        raise CliError(f"{name} is not running", "ESRCH")
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, run_dir, name, timeout):
        raise CliError(f"{name} (pid {pid}) did not stop within {timeout:.0f}s", "ETIMEDOUT")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_pidfile(run_dir, name))
    return pid


def _domain_daemons(run_dir: str) -> list[str]:
    """Names of the pagers and listeners with a pidfile in ``run_dir`` (``pager-1``...)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-len(".pid")] for n in names if _DOMAIN_PIDFILE.fullmatch(n))


# --------------------------------------------------------------------------
# the command table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call of a command, kept as data."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name (``trace print`` for an action of ``trace``), help, options and what runs it.

    ``run`` returns the result (a coroutine function's is run on uvloop);
    ``text`` formats it for a person (default :func:`_human`).
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], Any]
    args: tuple[Arg, ...] = ()
    epilog: str = ""
    text: Callable[[Any], str] | None = None


#: Every subcommand, in the order ``hvemu --help`` lists them.
COMMANDS: dict[str, Command] = {}
#: Help of the groups of actions (``trace``).
GROUPS = {"trace": "record ring events (xentrace-like); print, summarise, export and plot them",
          "xenstore": "the hypervisor's xenstore: read, write, rm, ls, watch (xenstore-read and friends)"}


def command(name: str, help: str, *args: Arg, epilog: str = "",
            text: Callable[[Any], str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = Command(name, help, run, args, epilog, text)
        return run

    return register


# argparse types: each refuses a bad value with one line in the user's terms.


def _size(text: str) -> Size:
    try:
        size = parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(f"{text} {exc}") from None
    if size.bytes < 0:
        raise argparse.ArgumentTypeError(f"{size} is below 0")
    return size


def _gfn(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a gfn (a number: 16 or 0x10)") from None
    return value


def _finite(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are no time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _ring_size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 1 or value & (value - 1) or value > abi.MEM_EVENT_RING_SIZE:
        raise argparse.ArgumentTypeError(f"{text} is not a power of two from 1 to {abi.MEM_EVENT_RING_SIZE}")
    return value


DOMAIN = arg("domain", metavar="DOMAIN", help="domain id or name")
SIZE_UNITS = SIZE_HELP


# --------------------------------------------------------------------------
# daemons: the hypervisor, pagers, listeners
# --------------------------------------------------------------------------


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


#: How long ``stop`` waits for pagers and listeners to exit once their hypervisor is gone.
DAEMON_EXIT_TIMEOUT = 10.0


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
            if readable and os.read(ready, 1):
                return
            continue  # nothing yet, or EOF: the daemon exited (the poll above reports it)
        if uvloop.run(enabled()):
            return
        time.sleep(0.05)
    raise CliError(f"{name} did not attach within {timeout:.0f}s (log: {os.path.join(run_dir, name + '.log')})",
                   "ETIMEDOUT")


def _errno_named_in(text: str) -> str | None:
    """The first errno name a message mentions (a daemon's last log line: ``... ESRCH: no such domain``)."""
    return next((w for w in re.findall(r"\bE[A-Z0-9]+\b", text) if w in errno_mod.errorcode.values()), None)


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


class _Literal(str):
    """A result printed as it is, in text and in JSON mode alike (help text)."""


# --------------------------------------------------------------------------
# domctls
# --------------------------------------------------------------------------


@command("create", "create a domain",
         arg("--vcpus", type=int, default=1, metavar="N", help="vCPUs"),
         arg("--memory", type=_size, default=_size("16"), metavar="SIZE", help=f"memory, {SIZE_UNITS}"),
         arg("--target", type=_size, default=None, metavar="SIZE",
             help=f"paging target, {SIZE_UNITS} (default: all of --memory)"),
         arg("--name", default="", help="a name to use instead of the id (default: none)"),
         arg("--abi", choices=abi.RING_ABIS, default=abi.DEFAULT_RING_ABI,
             help="ring entry layout: the seed's mem_event, Xen 4.2.0's, or Xen 4.17's vm_event (for Xen's tools)"))
async def cmd_create(args: argparse.Namespace) -> Any:
    memory: Size = args.memory
    gfns = memory.pages
    if gfns < 1:
        raise CliError(f"--memory {memory} is less than one page ({abi.PAGE_SIZE // 1024} KiB)", "EINVAL")
    if args.target is not None and args.target.bytes > memory.bytes:
        raise CliError(f"--target {args.target} is above --memory {memory}", "EINVAL")
    if args.name.strip().isdigit():
        raise CliError(f"--name {args.name} is a number: it would read as a domain id", "EINVAL")
    conn = await _tool(args.run_dir)
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=args.vcpus, gfns=gfns, name=args.name,
                                                         abi=args.abi))
        assert isinstance(reply, protocol.DomainCreated)
        if args.target is not None:
            await conn.call(protocol.SetTarget(domid=reply.domid, pages=args.target.pages))
        resident = (await domain_info(conn, reply.domid)).resident
    finally:
        await conn.close()
    if resident < gfns:  # the host budget is spent: the domain is created, but a guest would fault at once
        _warn(args, f"domain {reply.domid} starts with {mib_text(resident * abi.PAGE_SIZE)} of its {memory} "
                    f"resident (the host memory budget is spent); attach a pager (hvemu pager-attach "
                    f"{reply.domid}) before a guest runs, or its first fault crashes the domain")
    return {"domid": reply.domid, "vcpus": args.vcpus, "gfns": gfns, "abi": args.abi}


@command("destroy", "destroy a domain (its guest and daemons exit; its pagefile is removed)", DOMAIN)
async def cmd_destroy(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        await conn.call(protocol.DomainDestroy(domid=domid))
    finally:
        await conn.close()
    result: dict[str, Any] = {"destroyed": domid}
    running = await asyncio.to_thread(_wait_daemons_gone, _run_dir(args), [f"pager-{domid}", f"listener-{domid}"])
    if running:
        result["still_running"] = running
    return result


async def _pause_op(args: argparse.Namespace, op: type[protocol.DomainPause | protocol.DomainUnpause]) -> int:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        await conn.call(op(domid=domid))
    finally:
        await conn.close()
    return domid


@command("pause", "pause a domain: every vCPU stops at its next step (xl pause)", DOMAIN)
async def cmd_pause(args: argparse.Namespace) -> Any:
    return {"paused": await _pause_op(args, protocol.DomainPause)}


@command("unpause", "let a paused domain run again (xl unpause)", DOMAIN)
async def cmd_unpause(args: argparse.Namespace) -> Any:
    return {"unpaused": await _pause_op(args, protocol.DomainUnpause)}


def _wait_daemons_gone(run_dir: str, names: list[str]) -> list[str]:
    """Wait for these daemons (their domain or hypervisor gone) to exit and drop their pidfiles; who did not."""
    running = []
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    for name in names:
        daemon = _read_pid(run_dir, name)
        if daemon is not None and not _wait_gone(daemon, run_dir, name, max(0.0, deadline - time.monotonic())):
            running.append(name)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_pidfile(run_dir, name))
    return running


def _state(st: DomainStats) -> str:
    """xl's six state letters ``rbpscd``: running, blocked (no vCPU runs: waiting, or no guest), paused, crashed."""
    if st.crashed:
        return "----c-"
    if st.paused:
        return "--p---"
    running = st.guest_connected and any(v.runnable for v in st.vcpus)
    return "r-----" if running else "-b----"


def _list_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<20} {'ID':>5} {'Mem':>7} {'VCPUs':>5}  {'State':<6} {'Time(s)':>8} {'Resident':>9} "
             f"{'Target':>8}"]
    lines += [f"{(r['name'] or '(unnamed)')[:20]:<20} {r['domid']:>5} {mib_text(r['memory_mib'] * MiB):>7} "
              f"{r['vcpus']:>5}  {r['state']:<6} {r['time_s'] if r['time_s'] is not None else '-':>8} "
              f"{mib_text(r['resident_mib'] * MiB):>9} {mib_text(r['target_mib'] * MiB):>8}" for r in rows]
    return "\n".join(lines)


@command("list", "list domains, with xl's columns (memory in MiB) and state letters", text=_list_text)
async def cmd_list(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    page = abi.pages_to_mib(1)
    rows = []
    try:
        for d in await domain_list(conn):
            try:
                st = await domain_info(conn, d.domid)
            except ControlError:  # destroyed since the list
                continue
            rows.append({"domid": d.domid, "name": d.name, "vcpus": d.max_vcpus, "memory_mib": d.gfns * page,
                         "resident_mib": round(d.resident * page, 2), "target_mib": st.target * page,
                         "state": _state(st), "time_s": st.cpu_time_s, "crashed": d.crashed})
    finally:
        await conn.close()
    return rows


def summarise_info(st: DomainStats) -> dict[str, Any]:
    """The figures a person wants from ``info``, out of the raw counters."""
    rings = {str(kind): {k: getattr(r, k) for k in ("occupancy", "size", "max_occupancy", "put", "lost", "refused",
                                                   "blocked_now", "blocked_ever", "responses", "responses_rejected")}
             for kind in abi.RingKind if (r := st.ring(kind)).enabled}
    return {
        "domid": st.domid, "name": st.name, "crashed": st.crashed, "ring_abi": st.abi,
        "vcpus": {"total": st.max_vcpus, "paused": st.vcpus_paused, "blocked": st.vcpus_blocked,
                  "running": st.max_vcpus - st.vcpus_paused},
        "pages": {"total": st.gfns, "resident": st.resident, "paged": st.paged, "paging_out": st.paging_out,
                  "in_flight": st.paging_in, "target": st.target},
        "events": {"put": st.events_put, "lost": st.events_lost, "refused": sum(r["refused"] for r in rings.values())},
        "rings": rings,
        "fault_latency_us": st.fault_latency_us,
    }


@command("info", "the host (xl info), or one domain: vCPUs, pages, rings, counters, fault latency",
         arg("domain", metavar="DOMAIN", nargs="?", default=None, help="domain id or name (default: the host)"),
         arg("--raw", action="store_true", help="every counter the hypervisor keeps for the domain"))
async def cmd_info(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        if args.domain is None:
            reply, _ = await conn.call(protocol.HostInfo())
            assert isinstance(reply, protocol.HostInfoReply)
            page = abi.pages_to_mib(1)
            return {"total_memory_mib": reply.total_frames * page, "used_memory_mib": reply.used_frames * page,
                    "free_memory_mib": (reply.total_frames - reply.used_frames) * page, "nr_domains": reply.domains,
                    "policy": reply.policy, "ring_size": reply.ring_size, "tracing": reply.tracing or None,
                    "run_dir": _run_dir(args), "hvemu_version": hvemu.__version__}
        st = await domain_info(conn, await resolve_domain(conn, args.domain))
    finally:
        await conn.close()
    return msgspec.to_builtins(st) if args.raw else summarise_info(st)


def _vcpu_text(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<20} {'ID':>5} {'VCPU':>5}  {'State':<5} {'Pauses':>6}  Congested"]
    lines += [f"{(r['name'] or '(unnamed)')[:20]:<20} {r['domid']:>5} {r['vcpu']:>5}  {r['state']:<5} "
              f"{r['pauses']:>6}  {'yes' if r['congested'] else 'no'}" for r in rows]
    return "\n".join(lines)


@command("vcpu-list", "every vCPU (of one domain): running, or blocked waiting for the pager",
         arg("domain", metavar="DOMAIN", nargs="?", default=None, help="domain id or name (default: all)"),
         text=_vcpu_text)
async def cmd_vcpu_list(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    rows = []
    try:
        domids = [await resolve_domain(conn, args.domain)] if args.domain is not None else \
            [d.domid for d in await domain_list(conn)]
        for domid in domids:
            try:
                st = await domain_info(conn, domid)
            except ControlError:
                continue
            for v in st.vcpus:
                rows.append({"name": st.name, "domid": domid, "vcpu": v.vcpu,
                             "state": "r--" if v.runnable and v.connected else ("-b-" if not v.runnable else "---"),
                             "pauses": v.pauses, "congested": v.congested, "connected": v.connected,
                             "in_exit": v.in_exit})
    finally:
        await conn.close()
    return rows


@command("mem-set", "set a domain's paging target (xl mem-set: also memory/target and, for xenpaging, "
                    "memory/target-tot_pages in xenstore, in KiB)",
         DOMAIN, arg("memory", type=_size, metavar="SIZE", help=f"the target, {SIZE_UNITS}"))
async def cmd_mem_set(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        gfns = (await domain_info(conn, domid)).gfns
        if args.memory.bytes > gfns * abi.PAGE_SIZE:  # in the user's units (the hypervisor would say pages)
            raise CliError(f"target {args.memory} is above domain {args.domain}'s memory "
                           f"({mib_text(gfns * abi.PAGE_SIZE)} MiB)", "EINVAL")
        pages = args.memory.pages
        await conn.call(protocol.SetTarget(domid=domid, pages=pages))
    finally:
        await conn.close()
    return {"domid": domid, "target_pages": pages}


@command("xen-tool", "run Xen 4.17's own xenpaging or xen-access against a domain (created with --abi vm_event), "
                     "through hvemu's drop-in libraries",
         arg("--path", default=None, metavar="FILE",
             help="the binary to run (default: the one of Debian's xen-utils-4.17, fetched into the cache on "
                  "first use with apt-get download + dpkg -x, never installed)"),
         arg("tool", metavar="TOOL", help="xenpaging or xen-access"),
         arg("tool_args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments, as Xen's docs give them"),
         epilog="examples: hvemu xen-tool xenpaging -d 1 -f /tmp/dom1.paging; hvemu xen-tool xen-access 1 write")
def cmd_xen_tool(args: argparse.Namespace) -> Any:
    from hvemu.toolstack.xentools.build import BuildError
    from hvemu.toolstack.xentools.tools import ToolUnavailable, find_tool, tool_env

    run_dir = _run_dir(args)
    if not os.path.exists(protocol.socket_path(run_dir)):
        raise CliError(f"no hypervisor runs in {run_dir} (hvemu start)", "ENOENT")
    try:
        binary = find_tool(args.tool, args.path)
        env = tool_env(run_dir)
    except (ToolUnavailable, BuildError) as exc:
        raise CliError(str(exc)) from None
    sys.stdout.flush()
    os.execve(binary, [args.tool, *args.tool_args], env)


@command("map", "foreign-map guest pages (retrying paged-out ones) and checksum them",
         DOMAIN, arg("gfns", type=_gfn, nargs="+", metavar="GFN", help="gfns: 16 or 0x10"),
         arg("--timeout", type=_finite, default=10.0, metavar="SECONDS", help="give up after, seconds"))
async def cmd_map(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        domid = await resolve_domain(conn, args.domain)
        gfns = (await domain_info(conn, domid)).gfns
        outside = [g for g in args.gfns if not 0 <= g < gfns]
        if outside:
            which = f"gfn {outside[0]} is" if len(outside) == 1 else f"gfns {', '.join(map(str, outside))} are"
            raise CliError(f"{which} outside domain {args.domain}'s {gfns} gfns (0..{gfns - 1})", "EINVAL")
        pages, retries = await map_foreign(conn, domid, args.gfns, timeout=args.timeout)
    finally:
        await conn.close()
    return {"domid": domid, "retries": retries,
            "pages": {str(g): {"crc32": f"{zlib.crc32(p):08x}", "head": p[:24].hex()}
                      for g, p in sorted(pages.items())}}


def _xenstore(args: argparse.Namespace) -> Any:
    from hvemu.xenstore import XsClient, socket_path

    path = socket_path(_run_dir(args))
    try:
        return XsClient(path, timeout=None if getattr(args, "count", None) is not None else 30.0)
    except OSError as exc:
        raise CliError(f"no hypervisor xenstore at {path}: {exc.strerror}", "ENOENT") from None


def _xs_call(args: argparse.Namespace, what: Callable[[Any], Any]) -> Any:
    from hvemu.xenstore import XsError

    with _xenstore(args) as xs:
        try:
            return what(xs)
        except XsError as exc:
            raise CliError(f"xenstore {args.path}: {exc}", exc.errno) from None


XS_PATH = arg("path", metavar="PATH", help="a xenstore path (relative ones are under /local/domain/0)")


@command("xenstore read", "read a xenstore key (xenstore-read)", XS_PATH, text=str)
def cmd_xenstore_read(args: argparse.Namespace) -> Any:
    return _xs_call(args, lambda xs: xs.read(args.path).decode(errors="replace"))


@command("xenstore write", "write a xenstore key (xenstore-write); watches on it and above it fire",
         XS_PATH, arg("value", metavar="VALUE"))
def cmd_xenstore_write(args: argparse.Namespace) -> Any:
    _xs_call(args, lambda xs: xs.write(args.path, args.value.encode()))
    return {"path": args.path, "value": args.value}


@command("xenstore rm", "remove a xenstore key and everything below it (xenstore-rm)", XS_PATH)
def cmd_xenstore_rm(args: argparse.Namespace) -> Any:
    _xs_call(args, lambda xs: xs.rm(args.path))
    return {"removed": args.path}


@command("xenstore ls", "list a xenstore directory with values (xenstore-ls)", XS_PATH,
         text=lambda rows: "\n".join(f"{r['key']} = \"{r['value']}\"" for r in rows))
def cmd_xenstore_ls(args: argparse.Namespace) -> Any:
    def listing(xs: Any) -> list[dict[str, str]]:
        base = args.path.rstrip("/") or "/"
        rows = []
        for child in xs.directory(base):
            key = f"{base.rstrip('/')}/{child}"
            rows.append({"key": key, "value": xs.read(key).decode(errors="replace")})
        return rows

    return _xs_call(args, listing)


@command("xenstore watch", "print PATH and TOKEN of each event of a watch (xenstore-watch); it fires once at once",
         XS_PATH, arg("--count", "-n", type=int, default=0, metavar="N", help="stop after N events (0: never)"))
def cmd_xenstore_watch(args: argparse.Namespace) -> Any:
    def watching(xs: Any) -> None:
        xs.watch(args.path, "hvemu")
        seen = 0
        while not args.count or seen < args.count:
            path, _token = xs.read_watch()
            print(path, flush=True)
            seen += 1

    _xs_call(args, watching)
    return None


@command("top", "live view of every domain and ring (xentop); q quits",
         arg("--interval", "-d", type=_finite, default=1.0, metavar="SECONDS", help="refresh every, seconds"),
         arg("--iterations", "-i", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)"),
         arg("--batch", "-b", action="store_true",
             help="plain columns, one block per refresh, as xentop -b (the default when stdout is not a terminal)"),
         epilog="with --json: one JSON object per refresh, on one line (the tables' figures)")
async def cmd_top(args: argparse.Namespace) -> Any:
    from hvemu.toolstack.top import run_top

    await (await _tool(args.run_dir)).close()  # no hypervisor: the same one-line error as every command
    await run_top(args.run_dir, interval=args.interval, iterations=args.iterations, as_json=args.json,
                  batch=args.batch)
    return None


# --------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------


@command("trace start", "record ring events to FILE (a new file)",
         arg("file", metavar="FILE"),
         arg("--events", default=None, metavar="LIST",
             help="only these events, comma-separated: put,lost,refused,response,rejected,block,wake,pause,"
                  "unpause,evict,load (default: all)"),
         arg("--duration", type=_finite, default=None, metavar="SECONDS",
             help="record this long, then stop and report (default: until hvemu trace stop)"))
async def cmd_trace_start(args: argparse.Namespace) -> Any:
    from hvemu.trace import event_mask

    path = os.path.abspath(args.file)
    try:
        mask = event_mask(args.events.split(",")) if args.events else -1
    except ValueError as exc:
        raise CliError(f"--events: {exc}", "EINVAL") from exc
    if args.duration is not None and args.duration <= 0:
        raise CliError(f"--duration {args.duration} s is not above 0", "EINVAL")
    await _call(args.run_dir, protocol.TraceStart(path=path, mask=mask))
    if args.duration is None:
        return {"tracing": path}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C ends the recording early, cleanly
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    reply = await _call(args.run_dir, protocol.TraceStop())
    assert isinstance(reply, protocol.TraceStopped)
    return {"trace": reply.path, "records": reply.records}


@command("trace stop", "stop recording")
async def cmd_trace_stop(args: argparse.Namespace) -> Any:
    reply = await _call(args.run_dir, protocol.TraceStop())
    assert isinstance(reply, protocol.TraceStopped)
    return {"trace": reply.path, "records": reply.records}


def _records(path: str) -> Any:
    from hvemu.toolstack import tracetools
    from hvemu.trace import TraceFormatError

    try:
        with open(path, "rb") as f:
            return tracetools.read(f)
    except FileNotFoundError as exc:
        raise CliError(f"no trace file {path}", "ENOENT") from exc
    except TraceFormatError as exc:
        raise CliError(f"{path}: {exc}", "EINVAL") from exc


@command("trace summary", "counts and fault latency per domain", arg("file", metavar="FILE"))
def cmd_trace_summary(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    return tracetools.summarise(_records(args.file))


@command("trace print", "one line per event (as xentrace_format): seconds, domain, vCPU, ring, event, gfn, argument",
         arg("file", metavar="FILE"))
def cmd_trace_print(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    records = _records(args.file)
    if args.json:  # one object per line, the record's fields
        names = records.dtype.names
        return _Lines(json.dumps(dict(zip(names, r, strict=True))) for r in records.tolist())
    return _Lines(tracetools.print_lines(records))


class _Lines:
    """A result written line by line as it is produced (a trace printed whole would be held in memory)."""

    def __init__(self, lines: Any) -> None:
        self.lines = lines


@command("trace export", "convert a trace for other tools: --chrome writes trace-event JSON that ui.perfetto.dev "
         "and chrome://tracing open",
         arg("file", metavar="FILE"),
         arg("--chrome", required=True, metavar="OUT",
             help="the JSON file to write (per-vCPU fault spans, ring occupancy counters, evict/load batches)"),
         arg("--force", action="store_true", help="overwrite OUT if it exists"))
def cmd_trace_export(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    records = _records(args.file)
    out = args.chrome
    if os.path.exists(out) and not args.force:
        raise CliError(f"{out} exists (--force to overwrite it)", "EEXIST")
    doc = tracetools.chrome_trace(records)
    with open(out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    return {"chrome_trace": os.path.abspath(out), "events": len(doc["traceEvents"]), "records": len(records)}


@command("trace plot", "PNG plots: ring occupancy, and fault latency over time and as a CDF, per domain",
         arg("file", metavar="FILE"),
         arg("--out", default=None, metavar="DIR", help="directory for the PNG files (default: the trace's own; "
             "the files are named after the trace)"),
         arg("--force", action="store_true", help="overwrite plots that exist"))
def cmd_trace_plot(args: argparse.Namespace) -> Any:
    from hvemu.toolstack.plots import PlotUnavailable, need_matplotlib, plot_trace

    records = _records(args.file)
    try:
        need_matplotlib()
    except PlotUnavailable as exc:
        raise CliError(str(exc), "ENOPKG") from exc
    out_dir = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.file))
    prefix = os.path.basename(args.file) + "."
    try:
        return {"plots": plot_trace(records, out_dir, prefix, force=args.force)}
    except FileExistsError as exc:
        raise CliError(str(exc), "EEXIST") from exc


# --------------------------------------------------------------------------
# output and entry point
# --------------------------------------------------------------------------


def _warn(args: argparse.Namespace, message: str) -> None:
    """A warning on one line of stderr (with ``--json``, one object: ``{"warning": ..., "command": ...}``)."""
    if args.json:
        print(json.dumps({"warning": message, "command": args.command}), file=sys.stderr)
    else:
        print(f"hvemu {args.command}: warning: {message}", file=sys.stderr)


#: The exit status when stdout's reader went away (``hvemu info 1 | head``): a shell's status for SIGPIPE.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def _stdout_closed() -> int:
    """stdout's reader is gone: no traceback, and nothing more to write (exit at once, quietly).

    What is still buffered goes to /dev/null, so the interpreter's final
    flush cannot fail again.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE_CLOSED


def _human(result: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(result, dict):
        lines = []
        for k, v in result.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(_human(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
        return "\n".join(lines)
    if isinstance(result, list):
        if result and all(isinstance(r, dict) for r in result):
            cols = list(result[0])
            widths = [max(len(c), *(len(str(r.get(c, ""))) for r in result)) for c in cols]
            out = [pad + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
            out += [pad + "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True))
                    for r in result]
            return "\n".join(out)
        return "\n".join(f"{pad}{r}" for r in result) or f"{pad}(none)"
    return f"{pad}{result}"


def error_object(exc: BaseException | str, command: str | None, errno: str | None = None) -> dict[str, Any]:
    """A failure as ``--json`` prints it: one object on one line of stderr.

    ``error`` is the text the plain mode prints after ``hvemu COMMAND:``;
    ``errno`` the errno name when the failure has one (``ESRCH``,
    ``ENOENT``... as the hypervisor answered, or the OS error), else null;
    ``command`` the subcommand (``info``, ``trace stop``; null if none was
    recognised).
    """
    if isinstance(exc, ControlError):
        errno = str(exc.errno)
    elif isinstance(exc, CliError):
        errno = exc.errno
    elif isinstance(exc, OSError):
        errno = errno_mod.errorcode.get(exc.errno or 0)
    elif isinstance(exc, ValueError):
        errno = "EINVAL"
    return {"error": str(exc), "errno": errno, "command": command}


_EPILOG = """sizes: 512m, 1g, 4096k (a bare number is MiB); gfns: 16 or 0x10; a DOMAIN is an id or a name.
output: text by default; with --json, results are JSON on stdout and a failure is one JSON
object on one line of stderr, {"error": "...", "errno": "ESRCH" or null, "command": "info"}.
exit status: 0 done, 1 failed, 2 usage error, 130 interrupted, 141 stdout closed early (| head)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one worth saying (not None, False or suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one JSON line too when ``--json`` was given."""

    json_errors = False
    argv: list[str] = []

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        # A sub-parser's prog is "hvemu info" or "hvemu trace stop"; the top
        # one's errors (unrecognized arguments...) name the command in argv.
        command = self.prog.partition(" ")[2] or next((a for a in self.argv if a in _TOP_NAMES), None)
        print(json.dumps(error_object(message, command, "EINVAL")), file=sys.stderr)
        self.exit(2)


_TOP_NAMES = {name.partition(" ")[0] for name in COMMANDS}


def _parser(json_errors: bool = False, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, built from :data:`COMMANDS`."""
    # SUPPRESS: an option given before the subcommand must not be reset by the
    # subcommand's own copy of it (argparse applies sub-parser defaults last).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", default=argparse.SUPPRESS,
                        help="hypervisor run directory (default: $HVEMU_RUN_DIR or a per-user directory)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of text (errors: one JSON object on stderr)")
    # Sub-parsers are made of the same class, so they answer in JSON too.
    parser_class = type("Parser", (_Parser,), {"json_errors": json_errors, "argv": list(argv or [])})
    p = parser_class(prog="hvemu", parents=[common], description="Toolstack for the hvemu hypervisor (xl-like).",
                     epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"hvemu {hvemu.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    groups: dict[str, Any] = {}
    for name, c in COMMANDS.items():
        group, _, action = name.partition(" ")
        where = sub
        if action:
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group], parents=[common],
                                   formatter_class=HelpFormatter)
                groups[group] = g.add_subparsers(dest="action", required=True, metavar="ACTION")
            where = groups[group]
        sp = where.add_parser(action or name, help=c.help, description=c.help, epilog=c.epilog, parents=[common],
                              formatter_class=HelpFormatter, add_help=name != "listener-attach")
        for a in c.args:
            sp.add_argument(*a.flags, **a.options)
        sp.set_defaults(command=name)
    return p


def _print_result(result: Any, cmd: Command, as_json: bool) -> None:
    if isinstance(result, _Lines):
        for line in result.lines:
            print(line)
    elif isinstance(result, _Literal):
        print(result, end="" if result.endswith("\n") else "\n")
    elif as_json:
        print(json.dumps(result, indent=2))
    else:
        print((cmd.text or _human)(result))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before parsing: a usage error is printed while parsing.  (A --json after
    # "--" or inside listener-attach's options is not ours, but a usage error
    # in JSON there does no harm.)
    wants_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    parser = _parser(json_errors=wants_json, argv=argv)
    if "listener-attach" in argv:  # its --help is the listener's options (argparse would refuse it)
        after = argv[argv.index("listener-attach") + 1:]
        if after[:1] in (["-h"], ["--help"]):
            argv = [a for a in argv if a not in ("-h", "--help")]
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare hvemu: what it can do
        parser.print_help()
        return 0
    args.run_dir = getattr(args, "run_dir", None)
    args.json = getattr(args, "json", False)
    cmd = COMMANDS[args.command]
    try:
        result = cmd.run(args)
        if inspect.iscoroutine(result):
            result = uvloop.run(result)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - one line, never a traceback
        root = root_cause(exc)
        top = sys.modules.get("hvemu.toolstack.top")
        if top is not None and isinstance(root, top.OutputClosed):  # top into a pipe whose reader left
            return _stdout_closed()
        if isinstance(root, CliError | ControlError | OSError | ValueError):
            if args.json:
                print(json.dumps(error_object(root, args.command)), file=sys.stderr)
            else:
                print(f"hvemu {args.command}: {root}", file=sys.stderr)
            return 1
        if isinstance(root, KeyboardInterrupt):
            return 130
        raise
    try:
        if result is not None:
            _print_result(result, cmd, args.json)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
