"""What every ``hvemu`` command shares: the command table, the tool connection, the run directory's
pidfiles, the argument types."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno as errno_mod
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvloop

from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.client import ControlClient, ControlError
from hvemu.stats import DomainStats
from hvemu.toolstack.host import HYPERVISOR_MODULE, PAGER_MODULE
from hvemu.toolstack.sizes import SIZE_HELP, Size, SizeError, parse_size


class CliError(Exception):
    """A user-facing failure: printed as one line; ``errno`` names it for ``--json`` (None: no errno fits)."""

    def __init__(self, message: str, errno: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno


async def _tool(run_dir: str | None) -> ControlClient:
    path = protocol.socket_path(run_dir)
    try:
        conn = await ControlClient.connect(path)
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


async def map_foreign(conn: ControlClient, domid: int, gfns: list[int], *, timeout: float = 10.0,
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


async def domain_info(conn: ControlClient, domid: int) -> DomainStats:
    reply, _ = await conn.call(protocol.Stats(domid=domid))
    assert isinstance(reply, protocol.StatsReply)
    return reply.stats


async def domain_list(conn: ControlClient) -> list[protocol.DomainSummary]:
    reply, _ = await conn.call(protocol.DomainList())
    assert isinstance(reply, protocol.DomainListReply)
    return reply.domains


async def resolve_domain(conn: ControlClient, text: str) -> int:
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


#: How long ``stop`` waits for pagers and listeners to exit once their hypervisor is gone.
DAEMON_EXIT_TIMEOUT = 10.0


def _errno_named_in(text: str) -> str | None:
    """The first errno name a message mentions (a daemon's last log line: ``... ESRCH: no such domain``)."""
    return next((w for w in re.findall(r"\bE[A-Z0-9]+\b", text) if w in errno_mod.errorcode.values()), None)


class _Literal(str):
    """A result printed as it is, in text and in JSON mode alike (help text)."""


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


def _warn(args: argparse.Namespace, message: str) -> None:
    """A warning on one line of stderr (with ``--json``, one object: ``{"warning": ..., "command": ...}``)."""
    if args.json:
        print(json.dumps({"warning": message, "command": args.command}), file=sys.stderr)
    else:
        print(f"hvemu {args.command}: warning: {message}", file=sys.stderr)
