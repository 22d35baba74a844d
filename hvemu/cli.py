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
            else:
                raise ControlError(r or Errno.EINVAL, f"gfn {g}: {r}")
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
    return str(args.run_dir or protocol.default_run_dir())


def _pidfile(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.pid")


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        os.unlink(path)
        return None
    return pid


def _spawn(run_dir: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a detached background process logging to ``<run_dir>/<name>.log``."""
    if _read_pid(_pidfile(run_dir, name)) is not None:
        raise CliError(f"{name} is already running", "EBUSY")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(run_dir, f"{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    with open(_pidfile(run_dir, name), "w") as f:
        f.write(f"{proc.pid}\n")
    return proc


def _stop(run_dir: str, name: str, timeout: float) -> int:
    path = _pidfile(run_dir, name)
    pid = _read_pid(path)
    if pid is None:
        raise CliError(f"{name} is not running", "ESRCH")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise CliError(f"{name} (pid {pid}) did not stop within {timeout:.0f}s", "ETIMEDOUT")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return pid


def cmd_start(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    argv = ["-m", "hvemu.daemon", "--run-dir", run_dir, "--memory", str(args.memory), "--policy", args.policy]
    if args.trace:
        argv += ["--trace", os.path.abspath(args.trace)]
    argv += ["-v"] * args.verbose
    if args.foreground:
        os.execv(sys.executable, [sys.executable, *argv])
    pid = _spawn(run_dir, "hypervisor", argv).pid
    sock = protocol.socket_path(run_dir)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline or _read_pid(_pidfile(run_dir, "hypervisor")) is None:
            raise CliError(f"the hypervisor did not start; see {os.path.join(run_dir, 'hypervisor.log')}")
        time.sleep(0.05)
    return {"started": "hypervisor", "pid": pid, "socket": sock}


def cmd_stop(args: argparse.Namespace) -> Any:
    return {"stopped": "hypervisor", "pid": _stop(_run_dir(args), "hypervisor", args.timeout)}


def cmd_pager_attach(args: argparse.Namespace) -> Any:
    run_dir = _run_dir(args)
    argv = ["-m", "pager.xenpaging", "--run-dir", run_dir, "--domid", str(args.domid),
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
        return isinstance(info, dict) and bool(info.get("enabled"))

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
    argv = ["-m", "pager.examples.access_listener", "--run-dir", run_dir, "--domid", str(args.domid), *args.extra]
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
        return {"domid": reply.domid, "vcpus": args.vcpus, "gfns": gfns}
    finally:
        await conn.close()


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
    pages = int(args.memory * MiB) // abi.PAGE_SIZE
    await _call(args.run_dir, protocol.SetTarget(domid=args.domid, pages=pages))
    return {"domid": args.domid, "target_pages": pages}


async def cmd_map(args: argparse.Namespace) -> Any:
    conn = await _tool(args.run_dir)
    try:
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
    await run_top(args.run_dir, interval=args.interval, iterations=args.iterations)
    return None


# --------------------------------------------------------------------------
# output and entry point
# --------------------------------------------------------------------------


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
exit status: 0 done, 1 failed, 2 usage error, 130 interrupted."""


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
    s.add_argument("--memory", type=float, default=256, help="host memory budget, MiB")
    s.add_argument("--policy", choices=["seed", "claim"], default="seed")
    s.add_argument("--trace", default=None, help="record ring events to this file from the start")
    s.add_argument("--foreground", action="store_true", help="run in this terminal instead")
    s.add_argument("-v", "--verbose", action="count", default=0)
    s = add("stop", "stop the hypervisor (SIGTERM: domains destroyed, nothing left behind)")
    s.add_argument("--timeout", type=float, default=30)
    s = add("create", "create a domain")
    s.add_argument("--vcpus", type=int, default=1)
    s.add_argument("--memory", type=float, default=16, help="MiB")
    s.add_argument("--target", type=float, default=None, help="paging target, MiB")
    s.add_argument("--name", default="")
    s = add("destroy", "destroy a domain")
    s.add_argument("domid", type=int)
    add("list", "list domains")
    s = add("info", "one domain: vCPUs, pages, rings, counters, fault latency")
    s.add_argument("domid", type=int)
    s.add_argument("--raw", action="store_true", help="every counter the hypervisor keeps")
    s = add("mem-set", "set a domain's paging target (xl mem-set)")
    s.add_argument("domid", type=int)
    s.add_argument("memory", type=float, help="MiB")
    s = add("map", "foreign-map guest pages (retrying paged-out ones) and checksum them")
    s.add_argument("domid", type=int)
    s.add_argument("gfns", type=int, nargs="+")
    s.add_argument("--timeout", type=float, default=10.0)
    s = add("pager-attach", "start a xenpaging-like pager for a domain in the background")
    s.add_argument("domid", type=int)
    s.add_argument("--pagefile", default=None)
    s.add_argument("--target", type=float, default=None, help="MiB")
    s.add_argument("--policy", choices=["clock", "random"], default=EVICT_POLICY,
                   help="victim policy: clock (xenpaging's sweeping hand) or random")
    s.add_argument("--batch", type=int, default=EVICT_BATCH, help=f"pages per eviction batch (default {EVICT_BATCH})")
    s = add("pager-detach", "stop a domain's pager cleanly (pages everything back in)")
    s.add_argument("domid", type=int)
    s.add_argument("--timeout", type=float, default=60)
    s = add("listener-attach", "start an access listener (xen-access style) for a domain")
    s.add_argument("domid", type=int)
    s.add_argument("extra", nargs=argparse.REMAINDER, help="options for the listener")
    s = add("listener-detach", "stop a domain's access listener")
    s.add_argument("domid", type=int)
    s.add_argument("--timeout", type=float, default=30)
    s = add("top", "live view of every domain and ring")
    s.add_argument("--interval", type=float, default=1.0)
    s.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (0: until Ctrl-C)")
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
    if result is not None:
        print(json.dumps(result, indent=2) if args.json else _human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
