"""``hvemu``: the toolstack command, in the manner of ``xl``.

One entry point, one subcommand per job, ``--help`` everywhere, ``--json`` on
every command that reads state.  Errors are one line on stderr and exit
status 1 (2 for usage errors), never a traceback; with ``--json`` that line is
one JSON object, ``{"error": ..., "errno": ..., "command": ...}`` (see
:func:`error_object`), so a script reads results from stdout and failures
from stderr, told apart by the exit status.

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
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from typing import Any, NoReturn

import uvloop

from hvemu import abi, protocol
from hvemu.abi import Errno
from hvemu.transport import Connection, ControlError, root_cause
from pager.defaults import EVICT_BATCH, EVICT_POLICY

MiB = 1 << 20


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


async def domain_info(conn: Connection, domid: int) -> dict[str, Any]:
    reply, _ = await conn.call(protocol.Stats(domid=domid))
    assert isinstance(reply, protocol.StatsReply)
    return dict(reply.stats)


async def domain_list(conn: Connection) -> list[protocol.DomainSummary]:
    reply, _ = await conn.call(protocol.DomainList())
    assert isinstance(reply, protocol.DomainListReply)
    return reply.domains


# --------------------------------------------------------------------------
# background processes
# --------------------------------------------------------------------------


def _run_dir(args: argparse.Namespace) -> str:
    # Absolute: the daemons are given it, and a pidfile is checked against their command line.
    return os.path.abspath(args.run_dir or protocol.default_run_dir())


def _pidfile(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.pid")


#: The module each kind of background daemon runs (``hypervisor``, ``pager-N``, ``listener-N``).
_MODULES = {"hypervisor": "hvemu.daemon", "pager": "pager.xenpaging", "listener": "pager.examples.access_listener"}
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


def _spawn(run_dir: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a detached background process logging to ``<run_dir>/<name>.log``."""
    if _read_pid(run_dir, name) is not None:
        raise CliError(f"{name} is already running", "EBUSY")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(run_dir, f"{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
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


def cmd_start(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    argv = ["-m", _MODULES["hypervisor"], "--run-dir", run_dir, "--memory", str(args.memory), "--policy", args.policy]
    if args.trace:
        argv += ["--trace", os.path.abspath(args.trace)]
    argv += ["-v"] * args.verbose
    if args.foreground:
        os.execv(sys.executable, [sys.executable, *argv])
    pid = _spawn(run_dir, "hypervisor", argv).pid
    sock = protocol.socket_path(run_dir)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline or _read_pid(run_dir, "hypervisor") is None:
            raise CliError(f"the hypervisor did not start; see {os.path.join(run_dir, 'hypervisor.log')}")
        time.sleep(0.05)
    return {"started": "hypervisor", "pid": pid, "socket": sock}


#: How long ``stop`` waits for pagers and listeners to exit once their hypervisor is gone.
DAEMON_EXIT_TIMEOUT = 10.0


def cmd_stop(args: argparse.Namespace) -> Any:
    """Stop the hypervisor; its pagers and listeners exit with it, and their pidfiles go too."""
    run_dir = _run_dir(args)
    for name in _domain_daemons(run_dir):
        _read_pid(run_dir, name)  # removes a stale pidfile
    pid = _stop(run_dir, "hypervisor", args.timeout)
    running = []
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    for name in _domain_daemons(run_dir):
        daemon = _read_pid(run_dir, name)
        if daemon is not None and not _wait_gone(daemon, run_dir, name, max(0.0, deadline - time.monotonic())):
            running.append(name)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_pidfile(run_dir, name))
    result: dict[str, Any] = {"stopped": "hypervisor", "pid": pid}
    if running:  # they lost their hypervisor and should exit; say which did not (yet)
        result["still_running"] = running
    return result


def cmd_pager_attach(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    argv = ["-m", _MODULES["pager"], "--run-dir", run_dir, "--domid", str(args.domid),
            "--pagefile", os.path.abspath(args.pagefile or os.path.join(run_dir, f"dom{args.domid}.pagefile")),
            "--policy", args.policy, "--batch", str(args.batch)]
    if args.target is not None:
        argv += ["--target", str(int(args.target * MiB) // abi.PAGE_SIZE)]
    name = f"pager-{args.domid}"
    proc = _spawn(run_dir, name, argv)
    _wait_attached(proc, run_dir, name, args.domid, "paging")
    return {"attached": "pager", "domid": args.domid, "pid": proc.pid}


def _wait_attached(proc: subprocess.Popen[bytes], run_dir: str, name: str, domid: int, ring: str,
                   timeout: float = 15.0) -> None:
    """Return once the daemon has enabled its ring; if it exits first, say why (from its log)."""
    path = _pidfile(run_dir, name)

    async def enabled() -> bool:
        conn = await _tool(run_dir)
        try:
            st = await domain_info(conn, domid)
        except ControlError:
            return False
        finally:
            await conn.close()
        info = st.get(ring, {})
        # An orphaned ring (its last daemon died) is enabled too: attached means owned.
        orphaned = st.get("rings_orphaned", [])
        return isinstance(info, dict) and bool(info.get("enabled")) and ring not in orphaned

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
        if uvloop.run(enabled()):
            return
        time.sleep(0.05)
    raise CliError(f"{name} did not attach within {timeout:.0f}s (log: {os.path.join(run_dir, name + '.log')})",
                   "ETIMEDOUT")


def _errno_named_in(text: str) -> str | None:
    """The first errno name a message mentions (a daemon's last log line: ``... ESRCH: no such domain``)."""
    return next((w for w in re.findall(r"\bE[A-Z0-9]+\b", text) if w in errno_mod.errorcode.values()), None)


def cmd_pager_detach(args: argparse.Namespace) -> Any:
    pid = _stop(_run_dir(args), f"pager-{args.domid}", args.timeout)
    return {"detached": "pager", "domid": args.domid, "pid": pid}


def cmd_listener_attach(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    argv = ["-m", _MODULES["listener"], "--run-dir", run_dir, "--domid", str(args.domid), *args.extra]
    name = f"listener-{args.domid}"
    proc = _spawn(run_dir, name, argv)
    _wait_attached(proc, run_dir, name, args.domid, "access")
    return {"attached": "listener", "domid": args.domid, "pid": proc.pid}


def cmd_listener_detach(args: argparse.Namespace) -> Any:
    pid = _stop(_run_dir(args), f"listener-{args.domid}", args.timeout)
    return {"detached": "listener", "domid": args.domid, "pid": pid}


# --------------------------------------------------------------------------
# domctls
# --------------------------------------------------------------------------


async def cmd_create(args: argparse.Namespace) -> Any:
    gfns = int(args.memory * MiB) // abi.PAGE_SIZE
    if args.target is not None and not 0 <= args.target <= args.memory:
        raise CliError(f"--target must be within 0..{args.memory} MiB (the domain's memory)", "EINVAL")
    conn = await _tool(args.run_dir)
    try:
        reply, _ = await conn.call(protocol.DomainCreate(max_vcpus=args.vcpus, gfns=gfns, name=args.name))
        assert isinstance(reply, protocol.DomainCreated)
        if args.target is not None:
            await conn.call(protocol.SetTarget(domid=reply.domid, pages=int(args.target * MiB) // abi.PAGE_SIZE))
        resident = int((await domain_info(conn, reply.domid)).get("resident", gfns))
    finally:
        await conn.close()
    if resident < gfns:  # the host budget is spent: the domain is created, but a guest would fault at once
        _warn(args, f"domain {reply.domid} starts with {resident} of its {gfns} pages resident (the host memory "
                    f"budget is spent); attach a pager (hvemu pager-attach {reply.domid}) before a guest runs, "
                    "or its first fault crashes the domain")
    return {"domid": reply.domid, "vcpus": args.vcpus, "gfns": gfns}


async def cmd_destroy(args: argparse.Namespace) -> Any:
    await _call(args.run_dir, protocol.DomainDestroy(domid=args.domid))
    return {"destroyed": args.domid}


async def cmd_list(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        return [{"domid": d.domid, "name": d.name, "vcpus": d.max_vcpus, "memory_mib": d.gfns * abi.PAGE_SIZE / MiB,
                 "resident_mib": round(d.resident * abi.PAGE_SIZE / MiB, 2), "crashed": d.crashed}
                for d in await domain_list(conn)]
    finally:
        await conn.close()


def summarise_info(st: dict[str, Any]) -> dict[str, Any]:
    """The figures a person wants from ``info``, out of the raw counters."""
    rings = {}
    for kind in abi.RingKind:
        r = st.get(str(kind), {})
        if isinstance(r, dict) and r.get("enabled"):
            rings[str(kind)] = {k: r.get(k, 0) for k in
                                ("occupancy", "size", "max_occupancy", "put", "lost", "refused", "blocked_now",
                                 "blocked_ever", "responses", "responses_rejected")}
    vcpus = int(st.get("max_vcpus", 0))
    return {
        "domid": st.get("domid"), "name": st.get("name", ""), "crashed": st.get("crashed", False),
        "vcpus": {"total": vcpus, "paused": st.get("vcpus_paused", 0), "blocked": st.get("vcpus_blocked", 0),
                  "running": vcpus - int(st.get("vcpus_paused", 0))},
        "pages": {"total": st.get("gfns", 0), "resident": st.get("resident", 0), "paged": st.get("paged", 0),
                  "paging_out": st.get("paging_out", 0), "in_flight": st.get("paging_in", 0),
                  "target": st.get("target", 0)},
        "events": {"put": st.get("events_put", 0), "lost": st.get("events_lost", 0),
                   "refused": sum(int(r.get("refused", 0)) for r in rings.values())},
        "rings": rings,
        "fault_latency_us": st.get("fault_latency_us", {}),
    }


async def cmd_info(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        st = await domain_info(conn, args.domid)
    finally:
        await conn.close()
    return st if args.raw else summarise_info(st)


async def cmd_mem_set(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        gfns = int((await domain_info(conn, args.domid)).get("gfns", 0))
        memory = gfns * abi.PAGE_SIZE / MiB
        if not 0 <= args.memory <= memory:  # in MiB, as given (the hypervisor would say pages)
            raise CliError(f"target {args.memory} MiB must be within 0..{memory} MiB (domain {args.domid}'s memory)",
                           "EINVAL")
        pages = int(args.memory * MiB) // abi.PAGE_SIZE
        await conn.call(protocol.SetTarget(domid=args.domid, pages=pages))
    finally:
        await conn.close()
    return {"domid": args.domid, "target_pages": pages}


async def cmd_map(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
        gfns = int((await domain_info(conn, args.domid)).get("gfns", 0))
        outside = [g for g in args.gfns if not 0 <= g < gfns]
        if outside:
            which = f"gfn {outside[0]} is" if len(outside) == 1 else f"gfns {', '.join(map(str, outside))} are"
            raise CliError(f"{which} outside domain {args.domid}'s {gfns} gfns (0..{gfns - 1})", "EINVAL")
        pages, retries = await map_foreign(conn, args.domid, args.gfns, timeout=args.timeout)
    finally:
        await conn.close()
    return {"domid": args.domid, "retries": retries,
            "pages": {str(g): {"crc32": f"{zlib.crc32(p):08x}", "head": p[:24].hex()}
                      for g, p in sorted(pages.items())}}


async def cmd_trace(args: argparse.Namespace) -> Any:
    from hvemu import trace

    if args.trace_cmd == "start":
        path = os.path.abspath(args.file)
        await _call(args.run_dir, protocol.TraceStart(path=path))
        return {"tracing": path}
    if args.trace_cmd == "stop":
        reply = await _call(args.run_dir, protocol.TraceStop())
        assert isinstance(reply, protocol.TraceStopped)
        return {"trace": reply.path, "records": reply.records}
    try:
        with open(args.file, "rb") as f:
            records = list(trace.read(f))
    except FileNotFoundError as exc:
        raise CliError(f"no trace file {args.file}", "ENOENT") from exc
    except trace.TraceFormatError as exc:
        raise CliError(f"{args.file}: {exc}", "EINVAL") from exc
    if args.trace_cmd == "summary":
        return trace.summarise(records)
    from hvemu.plots import plot_trace

    return {"plots": plot_trace(records, args.out)}


async def cmd_top(args: argparse.Namespace) -> Any:
    from hvemu.top import run_top

    await (await _tool(args.run_dir)).close()  # no hypervisor: the same one-line error as every command
    await run_top(args.run_dir, interval=args.interval, iterations=args.iterations, as_json=args.json)
    return None


# --------------------------------------------------------------------------
# output and entry point
# --------------------------------------------------------------------------


def _warn(args: argparse.Namespace, message: str) -> None:
    """A warning on one line of stderr (with ``--json``, one object: ``{"warning": ..., "command": ...}``)."""
    if args.json:
        print(json.dumps({"warning": message, "command": args.cmd}), file=sys.stderr)
    else:
        print(f"hvemu {args.cmd}: warning: {message}", file=sys.stderr)


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


_EPILOG = """output: text by default; with --json, results are JSON on stdout and a failure is one JSON
object on one line of stderr, {"error": "...", "errno": "ESRCH" or null, "command": "info"}.
exit status: 0 done, 1 failed, 2 usage error, 130 interrupted, 141 stdout closed early (| head)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one JSON line too when ``--json`` was given."""

    json_errors = False
    argv: list[str] = []

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        # A sub-parser's prog is "hvemu info" or "hvemu trace stop"; the top
        # one's errors (unrecognized arguments...) name the command in argv.
        command = self.prog.partition(" ")[2] or next((a for a in self.argv if a in _SYNC or a in _ASYNC), None)
        print(json.dumps(error_object(message, command, "EINVAL")), file=sys.stderr)
        self.exit(2)


def _finite(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are no size or time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _parser(json_errors: bool = False, argv: list[str] | None = None) -> argparse.ArgumentParser:
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
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    s = add("start", "start the hypervisor in the background")
    s.add_argument("--memory", type=_finite, default=256, help="host memory budget, MiB")
    s.add_argument("--policy", choices=["seed", "claim"], default="seed")
    s.add_argument("--trace", default=None, help="record ring events to this file from the start")
    s.add_argument("--foreground", action="store_true", help="run in this terminal instead")
    s.add_argument("-v", "--verbose", action="count", default=0)
    s = add("stop", "stop the hypervisor (SIGTERM: domains destroyed, nothing left behind)")
    s.add_argument("--timeout", type=_finite, default=30)
    s = add("create", "create a domain")
    s.add_argument("--vcpus", type=int, default=1)
    s.add_argument("--memory", type=_finite, default=16, help="MiB")
    s.add_argument("--target", type=_finite, default=None, help="paging target, MiB")
    s.add_argument("--name", default="")
    s = add("destroy", "destroy a domain")
    s.add_argument("domid", type=int)
    add("list", "list domains")
    s = add("info", "one domain: vCPUs, pages, rings, counters, fault latency")
    s.add_argument("domid", type=int)
    s.add_argument("--raw", action="store_true", help="every counter the hypervisor keeps")
    s = add("mem-set", "set a domain's paging target (xl mem-set)")
    s.add_argument("domid", type=int)
    s.add_argument("memory", type=_finite, help="MiB")
    s = add("map", "foreign-map guest pages (retrying paged-out ones) and checksum them")
    s.add_argument("domid", type=int)
    s.add_argument("gfns", type=int, nargs="+")
    s.add_argument("--timeout", type=_finite, default=10.0)
    s = add("pager-attach", "start a xenpaging-like pager for a domain in the background")
    s.add_argument("domid", type=int)
    s.add_argument("--pagefile", default=None)
    s.add_argument("--target", type=_finite, default=None, help="MiB")
    s.add_argument("--policy", choices=["clock", "random"], default=EVICT_POLICY,
                   help="victim policy: clock (xenpaging's sweeping hand) or random")
    s.add_argument("--batch", type=int, default=EVICT_BATCH, help=f"pages per eviction batch (default {EVICT_BATCH})")
    s = add("pager-detach", "stop a domain's pager cleanly (pages everything back in)")
    s.add_argument("domid", type=int)
    s.add_argument("--timeout", type=_finite, default=60)
    s = add("listener-attach", "start an access listener (xen-access style) for a domain")
    s.add_argument("domid", type=int)
    s.add_argument("extra", nargs=argparse.REMAINDER, help="options for the listener")
    s = add("listener-detach", "stop a domain's access listener")
    s.add_argument("domid", type=int)
    s.add_argument("--timeout", type=_finite, default=30)
    s = add("top", "live view of every domain and ring")
    s.add_argument("--interval", type=_finite, default=1.0)
    s.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (0: until Ctrl-C)")
    s.epilog = "with --json: one JSON object per refresh, on one line (the tables' figures)"
    s = add("trace", "record ring events (xentrace-like), summarise and plot them")
    tsub = s.add_subparsers(dest="trace_cmd", required=True, metavar="ACTION")
    t = tsub.add_parser("start", help="record every ring event to FILE", parents=[common])
    t.add_argument("file")
    tsub.add_parser("stop", help="stop recording", parents=[common])
    t = tsub.add_parser("summary", help="counts and fault latency per domain", parents=[common])
    t.add_argument("file")
    t = tsub.add_parser("plot", help="PNG plots: fault latency and ring occupancy over time", parents=[common])
    t.add_argument("file")
    t.add_argument("--out", default=".", help="directory for the PNG files")
    return p


_ASYNC = {"create": cmd_create, "destroy": cmd_destroy, "list": cmd_list, "info": cmd_info,
          "mem-set": cmd_mem_set, "map": cmd_map, "trace": cmd_trace, "top": cmd_top}
_SYNC = {"start": cmd_start, "stop": cmd_stop, "pager-attach": cmd_pager_attach,
         "pager-detach": cmd_pager_detach, "listener-attach": cmd_listener_attach,
         "listener-detach": cmd_listener_detach}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before parsing: a usage error is printed while parsing.  (A --json after
    # "--" or inside listener-attach's options is not ours, but a usage error
    # in JSON there does no harm.)
    wants_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    args = _parser(json_errors=wants_json, argv=argv).parse_args(argv)
    args.run_dir = getattr(args, "run_dir", None)
    args.json = getattr(args, "json", False)
    try:
        if args.cmd in _SYNC:
            result = _SYNC[args.cmd](args)
        else:
            result = uvloop.run(_ASYNC[args.cmd](args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - one line, never a traceback
        root = root_cause(exc)
        top = sys.modules.get("hvemu.top")
        if top is not None and isinstance(root, top.OutputClosed):  # top into a pipe whose reader left
            return _stdout_closed()
        if isinstance(root, CliError | ControlError | OSError | ValueError):
            if args.json:
                command = " ".join(filter(None, (args.cmd, getattr(args, "trace_cmd", None))))
                print(json.dumps(error_object(root, command)), file=sys.stderr)
            else:
                print(f"hvemu {args.cmd}: {root}", file=sys.stderr)
            return 1
        if isinstance(root, KeyboardInterrupt):
            return 130
        raise
    try:
        if result is not None:
            print(json.dumps(result, indent=2) if args.json else _human(result))
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
