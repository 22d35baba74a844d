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
import contextlib
import errno as errno_mod
import inspect
import json
import os
import signal
import sys
from typing import Any, NoReturn

import uvloop

import hvemu
from hvemu.client import ControlError, root_cause
from hvemu.toolstack.cli import daemons, domains, traces, xen  # noqa: F401 - each registers its commands
from hvemu.toolstack.cli.base import COMMANDS, GROUPS, CliError, Command, _Literal
from hvemu.toolstack.cli.traces import _Lines

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
