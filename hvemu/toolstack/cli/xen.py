"""``hvemu xen-tool`` (Xen's own xenpaging and xen-access) and ``hvemu xenstore read|write|rm|ls|watch``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from hvemu import protocol
from hvemu.toolstack.cli.base import CliError, _run_dir, arg, command


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
