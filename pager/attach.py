"""Raw attach: hand a domain's mem_event ring to a program written in any language.

Usage::

    python -m pager.attach [--run-dir DIR] --domid N [--ring paging|access|sharing] \\
        [--keep | --force-disable] [-v] -- PROGRAM [ARGS...]

``attach`` enables the ring (or re-attaches to one whose daemon died), starts
PROGRAM with the ring page, the event channel, the guest's memory and its p2m
table as inherited file descriptors, serves PROGRAM's domctls on a line-based
command channel, forwards SIGTERM/SIGINT/SIGHUP to it, and when it exits
tears down (resume, then disable the ring) and exits with its status
(``128 + N`` if it died of signal N).  ``docs/writing-a-daemon.md`` is the
full contract; in short:

Environment of PROGRAM (numbers in decimal)
    ``HVEMU_RING_FD``      the ring page: ``mmap(PAGE_SIZE, PROT_READ|PROT_WRITE, MAP_SHARED)``
    ``HVEMU_RING_SIZE``    slots in ``ring[]`` (a power of two, 64 unless the hypervisor was told otherwise)
    ``HVEMU_RING_ABI``     the entry layout: ``seed`` (hvemu_mem_event.h), ``4.2`` or ``vm_event`` (docs/contract.md)
    ``HVEMU_EVTCHN_FD``    the event channel (``AF_UNIX`` ``SOCK_SEQPACKET``; see :mod:`hvemu.evtchn`)
    ``HVEMU_PORT``         its port (the 4-byte little-endian message a notify writes)
    ``HVEMU_MEMORY_FD``    guest memory, ``HVEMU_GFNS * HVEMU_PAGE_SIZE`` bytes, read-write
    ``HVEMU_P2M_FD``       the p2m table, read-only: type of gfn g at byte g, access at byte ``GFNS + g``
    ``HVEMU_CTL_FD``       the command channel (below)
    ``HVEMU_DOMID``, ``HVEMU_RING`` (kind), ``HVEMU_GFNS``, ``HVEMU_MAX_VCPUS``, ``HVEMU_PAGE_SIZE``,
    ``HVEMU_REATTACHED`` (1 if the ring was orphaned: start at ``rsp_prod``, every request after it
    is unanswered), ``HVEMU_DOMAIN_HANDLE`` (the domain's handle, 32 hex digits: record it with the
    pages you store, and refuse a store of another handle on a re-attach), ``HVEMU_RUN_DIR`` and
    ``HVEMU_SOCKET`` (the control socket, for programs that speak the msgpack protocol themselves).

At the end a paging ring with pages still out is kept (not disabled) unless
``--force-disable``: disabled, a guest touching one of those pages would crash
its domain; kept, it waits for the pager that holds them.

Command channel (``HVEMU_CTL_FD``, a stream socket)
    One command per line, words separated by blanks, numbers decimal or
    ``0x`` hex; exactly one reply line per command: ``ok`` plus values, or an
    errno name plus a message.  Batched commands answer one word per gfn:
    ``0`` for success or the errno name.  ``load G...`` is followed, right
    after its newline, by one raw page per gfn.  See :data:`HELP`.

Why one module of ~630 lines: the raw attach is one program (ring, child process, command channel,
teardown); its command table is the bulk of it and is read by the help, the parser and the executor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from hvemu import abi, logs, protocol, readiness
from hvemu.abi import Errno, MemEventReason, P2MAccess, RingKind
from hvemu.client import ControlClient, ControlError, root_cause
from hvemu.fdpass import TransportError
from pager.sdk import DomainGone, Domctl, SdkError, pages_out

log = logging.getLogger("pager.attach")

#: Version of the command channel, answered by ``hello``.
PROTOCOL_VERSION = 1
#: Longest command line accepted (a batch of about 50 000 gfns).
MAX_LINE = 1 << 20
#: Most gfns in one command (a ``load`` of this many pages is 4 MiB).
MAX_BATCH = 1024
#: Signals forwarded to the program.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_REASONS = {"cr0": MemEventReason.CR0, "cr3": MemEventReason.CR3, "cr4": MemEventReason.CR4,
            "int3": MemEventReason.INT3}
_MODES = {"disabled": abi.HVMPME_MODE_DISABLED, "async": abi.HVMPME_MODE_ASYNC, "sync": abi.HVMPME_MODE_SYNC}


class CommandError(Exception):
    """A command that cannot be run as written; answered ``ERRNO message``."""

    def __init__(self, errno: Errno, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message


@dataclass
class Command:
    """One parsed command line."""

    name: str
    args: list[str] = field(default_factory=list)
    gfns: list[int] = field(default_factory=list)
    #: Raw pages that follow the line on the channel (``load`` only).
    pages: int = 0


def parse_number(word: str, what: str) -> int:
    """A non-negative number (decimal or ``0x`` hex) of a command line; :class:`CommandError` if not."""
    try:
        value = int(word, 0)
    except ValueError:
        raise CommandError(Errno.EINVAL, f"{what} {word!r} is not a number") from None
    if value < 0:
        raise CommandError(Errno.EINVAL, f"{what} {word!r} is negative")
    return value


def data_pages(line: bytes) -> int:
    """How many raw pages follow this line on the channel, decided before any validation.

    ``load`` is followed by one page per word after it, whatever the words
    are: a malformed ``load`` is answered with an error but its pages are
    still read, so that the channel stays in step.
    """
    words = line.split()
    return len(words) - 1 if words and words[0] == b"load" else 0


def parse_command(line: bytes) -> Command:
    """Parse one line (without or with its newline); raise :class:`CommandError` if it is malformed."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError(Errno.EINVAL, "commands are ASCII text") from None
    words = text.split()
    if not words:
        raise CommandError(Errno.EINVAL, "empty command")
    name, rest = words[0], words[1:]
    spec = COMMANDS.get(name)
    if spec is None:
        raise CommandError(Errno.EINVAL, f"unknown command {name!r} (try 'help')")
    cmd = Command(name, pages=data_pages(line))
    spec.parse(cmd, rest)
    return cmd


def _no_args(cmd: Command, rest: list[str]) -> None:
    if rest:
        raise CommandError(Errno.EINVAL, f"{cmd.name} takes no arguments")


def _gfns(cmd: Command, rest: list[str]) -> None:
    if not rest:
        raise CommandError(Errno.EINVAL, f"{cmd.name} needs at least one gfn")
    if len(rest) > MAX_BATCH:
        raise CommandError(Errno.EINVAL, f"{cmd.name}: at most {MAX_BATCH} gfns per command")
    cmd.gfns = [parse_number(w, "gfn") for w in rest]


def _access(cmd: Command, rest: list[str]) -> None:
    if len(rest) < 2:
        raise CommandError(Errno.EINVAL, "usage: access ACCESS GFN...")
    if len(rest) - 1 > MAX_BATCH:
        raise CommandError(Errno.EINVAL, f"access: at most {MAX_BATCH} gfns per command")
    cmd.args = [str(parse_access(rest[0]))]
    cmd.gfns = [parse_number(w, "gfn") for w in rest[1:]]


def _access_required(cmd: Command, rest: list[str]) -> None:
    if rest not in (["0"], ["1"]):
        raise CommandError(Errno.EINVAL, "usage: access-required 0|1")
    cmd.args = rest


def _hvm_param(cmd: Command, rest: list[str]) -> None:
    usage = "usage: hvm-param cr0|cr3|cr4|int3 disabled|async|sync [onchangeonly]"
    if len(rest) not in (2, 3) or (len(rest) == 3 and rest[2] != "onchangeonly"):
        raise CommandError(Errno.EINVAL, usage)
    reason = _REASONS.get(rest[0].lower())
    mode = _MODES.get(rest[1].lower())
    if reason is None or mode is None:
        raise CommandError(Errno.EINVAL, usage)
    if len(rest) == 3:
        mode |= abi.HVMPME_ONCHANGEONLY
    cmd.args = [str(int(reason)), str(mode)]


def _target(cmd: Command, rest: list[str]) -> None:
    if len(rest) > 1:
        raise CommandError(Errno.EINVAL, "usage: target [PAGES]")
    cmd.args = [str(parse_number(w, "target")) for w in rest]


def parse_access(word: str) -> int:
    """A ``p2m_access_t`` by name (``rx``) or number (``5``)."""
    if word in P2MAccess.__members__:
        return int(P2MAccess[word])
    try:
        value = int(word, 0)
    except ValueError:
        value = -1
    if value not in {int(a) for a in P2MAccess}:
        raise CommandError(Errno.EINVAL, f"unknown access {word!r} (n r w rw x rx wx rwx rx2rw n2rwx)")
    return value


def format_results(results: Sequence[Errno | None]) -> str:
    """``ok`` and one word per gfn: ``0`` or the errno name."""
    return " ".join(["ok", *("0" if r is None else str(r) for r in results)])


def format_error(errno: Errno | str | None, message: str) -> str:
    """An error reply: the errno name and a message, on one line."""
    text = " ".join(message.split())
    return f"{errno or Errno.EINVAL} {text}".rstrip()


class CommandServer:
    """Runs parsed commands as domctls on the attachment's control connection."""

    def __init__(self, domctl: Domctl, ring: RingKind) -> None:
        self.domctl = domctl
        self.ring = ring
        self.commands = 0

    async def execute(self, cmd: Command, data: bytes = b"") -> str:
        """The reply line (without its newline) for one command."""
        self.commands += 1
        try:
            return await COMMANDS[cmd.name].run(self, cmd, data)
        except DomainGone as exc:
            return format_error(Errno.ESRCH, str(exc))
        except SdkError as exc:
            return format_error(exc.errno, str(exc))

    async def handle_line(self, line: bytes, data: bytes) -> str:
        """Parse and run one line; malformed commands become error replies."""
        try:
            cmd = parse_command(line)
        except CommandError as exc:
            return format_error(exc.errno, exc.message)
        return await self.execute(cmd, data)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer commands until the program closes its end."""
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning("command channel closed in the middle of a line: %r", exc.partial[:80])
                    return
                except asyncio.LimitOverrunError:
                    writer.write(format_error(Errno.EINVAL, f"line longer than {MAX_LINE} bytes; "
                                              "closing the command channel").encode() + b"\n")
                    await writer.drain()
                    return
                data = b""
                pages = data_pages(line)
                if pages:
                    try:
                        data = await reader.readexactly(pages * abi.PAGE_SIZE)
                    except asyncio.IncompleteReadError:
                        log.warning("command channel closed in the middle of a load's pages")
                        return
                reply = await self.handle_line(line, data)
                writer.write(reply.encode("ascii", "replace") + b"\n")
                await writer.drain()
        except (ConnectionError, BrokenPipeError):
            return

async def _pages(server: CommandServer, cmd: Command, data: bytes) -> str:
    pages = [data[i * abi.PAGE_SIZE:(i + 1) * abi.PAGE_SIZE] for i in range(len(cmd.gfns))]
    return format_results(await server.domctl.load(cmd.gfns, pages))


async def _target_run(server: CommandServer, cmd: Command, data: bytes) -> str:
    if cmd.args:
        await server.domctl.set_target(int(cmd.args[0]))
    return f"ok {await server.domctl.get_target()}"


class CommandSpec(NamedTuple):
    """One command of the channel: its help line, how its words parse, and what it runs."""

    usage: str
    parse: Callable[[Command, list[str]], None]
    run: Callable[[CommandServer, Command, bytes], Awaitable[str]]


#: The command channel, one row per command: the help text, the parser and the executor all read it.
COMMANDS: dict[str, CommandSpec] = {
    "hello": CommandSpec("hello                      -> ok hvemu-attach <version>", _no_args,
                         lambda s, c, d: _ok_text(f"ok hvemu-attach {PROTOCOL_VERSION}")),
    "ping": CommandSpec("ping                       -> ok", _no_args, lambda s, c, d: _ok_text("ok")),
    "nominate": CommandSpec("nominate G...              -> ok R...    ram_rw -> ram_paging_out; then copy the "
                            "page out", _gfns, lambda s, c, d: _results(s.domctl.nominate(c.gfns))),
    "evict": CommandSpec("evict G...                 -> ok R...    free nominated frames (EBUSY: touched since "
                         "nominate)", _gfns, lambda s, c, d: _results(s.domctl.evict(c.gfns))),
    "prep": CommandSpec("prep G...                  -> ok R...    zeroed frames for paged gfns; fill them via "
                        "HVEMU_MEMORY_FD", _gfns, lambda s, c, d: _results(s.domctl.prep(c.gfns))),
    "load": CommandSpec("load G... <pages>          -> ok R...    allocate and fill from the raw pages after the "
                        "line", _gfns, _pages),
    "map": CommandSpec("map G...                   -> ok R...    foreign map: a paged gfn is populated and "
                       "answers ENOENT", _gfns, lambda s, c, d: _mapped(s, c)),
    "resume": CommandSpec("resume                     -> ok         have the hypervisor drain responses (instead "
                          "of a notify)", _no_args, lambda s, c, d: _then_ok(s.domctl.resume(s.ring))),
    "access": CommandSpec("access ACCESS G...         -> ok R...    set p2m access (n r w rw x rx wx rwx rx2rw "
                          "n2rwx, or 0-9)", _access,
                          lambda s, c, d: _results(s.domctl.access_set(c.gfns, int(c.args[0])))),
    "access-required": CommandSpec("access-required 0|1        -> ok", _access_required,
                                   lambda s, c, d: _then_ok(s.domctl.access_required(c.args[0] == "1"))),
    "hvm-param": CommandSpec("hvm-param REASON MODE [onchangeonly] -> ok   REASON cr0 cr3 cr4 int3; MODE disabled "
                             "async sync", _hvm_param,
                             lambda s, c, d: _then_ok(s.domctl.set_hvm_param(int(c.args[0]), int(c.args[1])))),
    "target": CommandSpec("target [PAGES]             -> ok PAGES   read (or set) the paging target", _target,
                          _target_run),
    "stats": CommandSpec("stats                      -> ok {json}", _no_args, lambda s, c, d: _stats(s)),
    "help": CommandSpec("help                       -> ok <this text on one line>", _no_args,
                        lambda s, c, d: _ok_text("ok " + " | ".join(line.strip() for line in _help().splitlines()))),
}

HELP: str = "\n".join(spec.usage for spec in COMMANDS.values()) + \
    "\nR is 0 for success or an errno name; a failed command answers ERRNO message."


def _help() -> str:
    return HELP


async def _ok_text(text: str) -> str:
    return text


async def _results(results: Awaitable[Sequence[Errno | None]]) -> str:
    return format_results(await results)


async def _then_ok(done: Awaitable[None]) -> str:
    await done
    return "ok"


async def _mapped(server: CommandServer, cmd: Command) -> str:
    return format_results((await server.domctl.map_foreign(cmd.gfns)).results)


async def _stats(server: CommandServer) -> str:
    return "ok " + json.dumps(await server.domctl.stats(), separators=(",", ":"), default=str)



def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: its code, or 128 + the signal that killed it."""
    return returncode if returncode >= 0 else 128 - returncode


def child_env(base: dict[str, str], reply: protocol.MemEventEnabled, fds: dict[str, int], ctl_fd: int,
              run_dir: str, socket_path: str) -> dict[str, str]:
    """The program's environment: ``base`` plus every ``HVEMU_*`` fact of the contract."""
    env = dict(base)
    env.update({
        "HVEMU_DOMID": str(reply.domid),
        "HVEMU_RING": str(reply.ring),
        "HVEMU_RING_FD": str(fds["ring"]),
        "HVEMU_RING_SIZE": str(reply.ring_size),
        "HVEMU_RING_ABI": reply.abi,
        "HVEMU_EVTCHN_FD": str(fds["evtchn"]),
        "HVEMU_PORT": str(reply.port),
        "HVEMU_MEMORY_FD": str(fds["memory"]),
        "HVEMU_P2M_FD": str(fds["p2m"]),
        "HVEMU_CTL_FD": str(ctl_fd),
        "HVEMU_GFNS": str(reply.gfns),
        "HVEMU_MAX_VCPUS": str(reply.max_vcpus),
        "HVEMU_PAGE_SIZE": str(abi.PAGE_SIZE),
        "HVEMU_REATTACHED": "1" if reply.reattached else "0",
        "HVEMU_DOMAIN_HANDLE": reply.domain_handle,
        protocol.RUN_DIR_ENV: run_dir,
        "HVEMU_SOCKET": socket_path,
    })
    return env


def _child_setup() -> None:
    """``preexec_fn``: die with attach (PR_SET_PDEATHSIG), in a process group of its own.

    Its own group: a terminal's Ctrl-C reaches attach alone, which forwards it
    once (the program would otherwise get it twice).
    """
    from hvemu.procs import die_with_parent

    os.setpgid(0, 0)
    die_with_parent()


class Attach:
    """One run: enable, start the program, serve it, tear down."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir: str = args.run_dir or protocol.default_run_dir()
        self.socket_path = protocol.socket_path(self.run_dir)
        self.ring = RingKind(args.ring)
        self.conn: ControlClient | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.ring_view: memoryview | None = None
        self._ring_map: mmap.mmap | None = None
        self._p2m_map: mmap.mmap | None = None
        self._gfns = 0
        self._pending_signal: int | None = None

    # ------------------------------------------------------------ signals
    def _on_signal(self, sig: int) -> None:
        if self.child is not None and self.child.poll() is None:
            log.info("forwarding %s to pid %d", signal.Signals(sig).name, self.child.pid)
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(sig)
        elif self.child is None:
            self._pending_signal = sig

    # ------------------------------------------------------------ ring
    def _unanswered(self) -> int:
        view = self.ring_view
        if view is None:
            return 0
        return (view[abi.REQ_PROD_WORD] - view[abi.RSP_PROD_WORD]) & abi.RING_IDX_MASK

    async def _enable(self) -> tuple[protocol.MemEventEnabled, dict[str, int]]:
        self.conn = await ControlClient.connect(self.socket_path)
        await self.conn.call(protocol.ToolHello(client=f"attach:{self.ring}"))
        reply, fds = await self.conn.call(protocol.MemEventEnable(domid=self.args.domid, ring=self.ring))
        if not isinstance(reply, protocol.MemEventEnabled) or len(reply.fds) != len(fds):
            for fd in fds:
                os.close(fd)
            raise SdkError(f"unexpected reply {type(reply).__name__} to MemEventEnable")
        named = dict(zip(reply.fds, fds, strict=True))
        # attach only looks at the indices (to know whether a disable would strand vCPUs).
        self._ring_map = mmap.mmap(named["ring"], abi.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self.ring_view = memoryview(self._ring_map)[:abi.RING_ENTRIES_OFFSET].cast("I")
        # ...and at the p2m types, to know whether pages are out when the program is done.
        self._p2m_map = mmap.mmap(named["p2m"], abi.p2m_table_size(reply.gfns), mmap.MAP_SHARED, mmap.PROT_READ)
        self._gfns = reply.gfns
        return reply, named

    async def _teardown(self) -> None:
        """Resume (consume what the program pushed), then disable unless that would strand vCPUs."""
        conn = self.conn
        if conn is None:
            return
        domctl = Domctl(self.args.domid, conn)
        try:
            await domctl.resume(self.ring)
        except SdkError as exc:
            log.info("dom%d %s ring: no resume at teardown (%s)", self.args.domid, self.ring, exc)
            if isinstance(exc, DomainGone):
                return
        left = self._unanswered()
        if self.args.keep:
            log.info("dom%d %s ring left attached for the next daemon (--keep), %d requests unanswered",
                     self.args.domid, self.ring, left)
            return
        if left and not self.args.force_disable:
            log.warning("dom%d %s ring: the program left %d requests unanswered; the ring is kept for "
                        "the next daemon to re-attach (--force-disable to disable it anyway)",
                        self.args.domid, self.ring, left)
            return
        if left:
            log.warning("disabling dom%d %s ring with %d requests unanswered: their vCPUs stay paused",
                        self.args.domid, self.ring, left)
        out = self._pages_out()
        if out and not self.args.force_disable:
            log.warning("dom%d: %d pages are still out; the paging ring is kept for the pager that holds them "
                        "(--force-disable to disable it anyway)", self.args.domid, out)
            return
        try:
            await domctl.call(protocol.MemEventDisable(domid=self.args.domid, ring=self.ring))
            log.info("dom%d %s ring disabled", self.args.domid, self.ring)
        except DomainGone:
            pass
        except SdkError as exc:
            log.warning("disable of dom%d %s ring failed: %s", self.args.domid, self.ring, exc)

    def _pages_out(self) -> int:
        """Pages out (the SDK's count, from the p2m table) if this is the paging ring, else 0."""
        if self.ring != RingKind.paging or self._p2m_map is None:
            return 0
        start = abi.p2m_type_index(self._gfns, 0)
        return pages_out(self._p2m_map[start:start + self._gfns])

    async def _close(self) -> None:
        if self.ring_view is not None:
            self.ring_view.release()
            self.ring_view = None
        if self._p2m_map is not None:
            self._p2m_map.close()
            self._p2m_map = None
        if self._ring_map is not None:
            self._ring_map.close()
            self._ring_map = None
        if self.conn is not None:
            await self.conn.hang_up()  # a ring left orphaned is free for a successor when we exit
            self.conn = None

    # ------------------------------------------------------------ run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            await self._close()

    async def _run(self) -> int:
        args = self.args
        try:
            reply, named = await self._enable()
        except ControlError as exc:
            print(f"hvemu-attach: cannot attach to dom{args.domid} {self.ring} ring: {exc}", file=sys.stderr)
            return 1
        log.info("dom%d %s ring %s (port %d)", args.domid, self.ring,
                 "re-attached" if reply.reattached else "enabled", reply.port)
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._pending_signal is not None:
                print(f"hvemu-attach: {signal.Signals(self._pending_signal).name} before the program started",
                      file=sys.stderr)
                await self._teardown()
                return 128 + self._pending_signal
            env = child_env(dict(os.environ), reply, named, ctl_child.fileno(), self.run_dir, self.socket_path)
            try:
                self.child = subprocess.Popen([args.program, *args.program_args], env=env,
                                              pass_fds=(*named.values(), ctl_child.fileno()),
                                              preexec_fn=_child_setup)
            except OSError as exc:
                print(f"hvemu-attach: cannot run {args.program}: {exc.strerror}", file=sys.stderr)
                await self._teardown()
                return 127 if isinstance(exc, FileNotFoundError) else 126
        finally:
            # The program has its copies: ours would keep the event channel open
            # after the program died (the hypervisor would not see it go).
            ctl_child.close()
            for fd in named.values():
                os.close(fd)
        child = self.child
        log.info("started %s as pid %d", args.program, child.pid)
        reader, writer = await asyncio.open_connection(sock=ctl_parent, limit=MAX_LINE)
        server = CommandServer(Domctl(args.domid, self.conn), self.ring)
        serving = asyncio.create_task(server.serve(reader, writer), name="attach-commands")
        try:
            returncode = await self._wait_child(child)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            writer.close()
        status = exit_status(returncode)
        log.info("%s exited with status %d after %d commands", args.program, status, server.commands)
        await self._teardown()
        return status

    @staticmethod
    async def _wait_child(child: subprocess.Popen[bytes]) -> int:
        """Wait for the program without blocking the loop: a pidfd becomes readable when it exits."""
        try:
            pidfd = os.pidfd_open(child.pid)
        except ProcessLookupError:  # already reaped (a forwarded signal polls it)
            return child.wait()
        try:
            await readiness.wait_readable(pidfd)
        finally:
            readiness.notify_closing(pidfd)
            os.close(pidfd)
        return child.wait()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvemu-attach", usage="%(prog)s [options] --domid N [--ring KIND] -- PROGRAM [ARGS...]",
        description="Attach to a domain's mem_event ring and run PROGRAM with its file descriptors "
                    "(see docs/writing-a-daemon.md).",
        epilog="Command channel (HVEMU_CTL_FD):\n" + HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--ring", choices=[k.value for k in RingKind], default="paging")
    p.add_argument("--run-dir", default=None, help="the hypervisor's run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", action="store_true",
                   help="never disable the ring: leave it (and its requests) for the next daemon")
    g.add_argument("--force-disable", action="store_true",
                   help="disable the ring at exit even with requests unanswered (their vCPUs stay paused)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("program", help="the daemon to run")
    p.add_argument("program_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the program, even words that look like our options.
    if "--" in argv:
        i = argv.index("--")
        ours, theirs = argv[:i], argv[i + 1:]
    else:
        ours, theirs = argv, []
    parser = _parser()
    if theirs:
        args = parser.parse_args([*ours, theirs[0]])
        args.program_args = theirs[1:]
    else:
        args = parser.parse_args(ours)
    logs.setup("attach", args.verbose)
    import uvloop

    try:
        return uvloop.run(Attach(args).run())
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one clear line
        root = root_cause(exc)
        if isinstance(root, SdkError | ControlError | TransportError | OSError):
            print(f"hvemu-attach: dom{args.domid}: {root}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
