"""The agent of hvemu's drop-in Xen libraries: their domctls, on one control connection.

``libxenhvemu.so.1`` (``hvemu/toolstack/xentools/src/hvemu_glue.c``) starts ``python -m
hvemu.toolstack.xentools.agent`` once per process, with fd 3 one end of a
``SOCK_SEQPACKET`` socket pair.  Each datagram from the library is one request:
a text line (words, numbers in decimal), for ``load`` followed by the page.
Each answer is one datagram: ``ok`` and values, or an errno name and a
message; ``map ... copy`` appends the pages after the line; ``enable`` passes
the ring page, the event channel and the guest memory with ``SCM_RIGHTS``.
The agent exits when the library's end closes, whatever ended its process;
a ring it enabled is then orphaned (kept, for a successor) as any daemon's.
It ignores SIGINT/SIGTERM/SIGHUP: a tool stopped by one (xenpaging pages
everything back in on SIGTERM) still needs its domctls.

Commands (``D`` a domid, ``G`` a gfn, ``RING`` paging|access|sharing)::

    hello                         -> ok
    getinfo FIRST MAX             -> ok N {domid tot max paged vcpus crashed paused handle}...
    maxgpfn D                     -> ok GPFN
    enable D RING                 -> ok PORT GFNS SLOTS VCPUS  + fds ring, evtchn, memory, p2m (read-only)
    disable D RING | resume D RING -> ok
    nominate|evict|prep D G       -> ok R           (R: 0 or the gfn's errno name)
    load D G <page>               -> ok R
    map D shared|copy G...        -> ok R...        (copy: the pages follow the line)
    access D ACCESS default | access D ACCESS FIRST NR -> ok
    getaccess D G|default         -> ok ACCESS
    access-required D 0|1         -> ok
    hvm-param D REASON MODE [MASK] -> ok
    inject D VCPU VECTOR          -> ok
    debug D VCPU 0|1              -> ok
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

from hvemu import abi, logs, protocol, readiness
from hvemu.abi import Errno, RingKind
from hvemu.client import ControlClient, ControlError
from hvemu.fdpass import TransportError
from hvemu.stats import DomainStats
from pager.attach import CommandError, format_error, format_results, parse_number

log = logging.getLogger("hvemu.toolstack.xentools.agent")

AGENT_FD = 3
MAX_REQUEST = abi.PAGE_SIZE * 2 + 65536
#: Most gfns in one ``access`` request (the library batches by this many).
MAX_ACCESS_BATCH = 65536
#: The ring ABI Xen 4.17's tools are built for.
TOOLS_ABI = "vm_event"


class Agent:
    def __init__(self, conn: ControlClient) -> None:
        self.conn = conn

    async def call(self, msg: protocol.Msg) -> tuple[protocol.Msg, list[int]]:
        try:
            return await self.conn.call(msg)
        except ControlError as exc:
            raise CommandError(exc.errno, exc.message) from None

    async def _domain(self, domid: int) -> protocol.DomainSummary:
        reply, _ = await self.call(protocol.DomainList())
        assert isinstance(reply, protocol.DomainListReply)
        for d in reply.domains:
            if d.domid == domid:
                return d
        raise CommandError(Errno.ESRCH, f"no domain {domid}")

    async def _stats(self, domid: int) -> DomainStats:
        reply, _ = await self.call(protocol.Stats(domid=domid))
        assert isinstance(reply, protocol.StatsReply)
        return reply.stats

    async def execute(self, words: list[str], data: bytes) -> tuple[str, bytes, list[int]]:
        """``(reply line, data after it, fds)`` for one request."""
        if not words:
            raise CommandError(Errno.EINVAL, "empty request")
        op, args = words[0], words[1:]
        if op == "hello":
            return "ok", b"", []
        if op == "getinfo":
            first, most = parse_number(args[0], "domid"), parse_number(args[1], "count")
            reply, _ = await self.call(protocol.DomainList())
            assert isinstance(reply, protocol.DomainListReply)
            doms = sorted((d for d in reply.domains if d.domid >= first), key=lambda d: d.domid)[:most]
            fields = []
            for d in doms:
                st = await self._stats(d.domid)
                fields += [d.domid, d.resident, d.gfns, st.paged, d.max_vcpus, int(d.crashed), int(st.paused),
                           d.handle or "0" * 32]
            return " ".join(["ok", str(len(doms)), *map(str, fields)]), b"", []
        domid = parse_number(args[0], "domid") if args else -1
        if op == "maxgpfn":
            return f"ok {(await self._domain(domid)).gfns - 1}", b"", []
        if op == "enable":
            return await self._enable(domid, args[1])
        if op in ("disable", "resume"):
            ring = RingKind(args[1])
            # Xen consumes the responses a notify announced before xenevtchn_notify returns (the ring's
            # consumer runs in the hypercall); here the kick is read later, so drain before a disable, or
            # the responses a tool pushed just before it would never unpause their vCPUs.
            try:
                await self.call(protocol.MemEventResume(domid=domid, ring=ring))
            except CommandError:
                if op == "resume":
                    raise
            if op == "disable":
                await self.call(protocol.MemEventDisable(domid=domid, ring=ring))
            return "ok", b"", []
        if op in ("nominate", "evict", "prep", "load"):
            gfn = parse_number(args[1], "gfn")
            req: protocol.Msg
            if op == "load":
                if len(data) != abi.PAGE_SIZE:
                    raise CommandError(Errno.EINVAL, f"load needs one page of data, got {len(data)} bytes")
                req = protocol.PagingLoad(domid=domid, gfns=[gfn], pages=[data])
            else:
                req = {"nominate": protocol.PagingNominate, "evict": protocol.PagingEvict,
                       "prep": protocol.PagingPrep}[op](domid=domid, gfns=[gfn])
            reply, _ = await self.call(req)
            assert isinstance(reply, protocol.BatchResult)
            return format_results(reply.results[:1]), b"", []
        if op == "map":
            copy = args[1] == "copy"
            gfns = [parse_number(w, "gfn") for w in args[2:]]
            reply, _ = await self.call(protocol.MapForeign(domid=domid, gfns=gfns))
            assert isinstance(reply, protocol.ForeignPages)
            pages = b"".join(p or bytes(abi.PAGE_SIZE) for p in reply.pages) if copy else b""
            return format_results(reply.results), pages, []
        if op == "access":
            access = parse_number(args[1], "access")
            if args[2] == "default":
                gfns = [abi.DEFAULT_ACCESS_GFN]
            else:
                first, count = parse_number(args[2], "gfn"), parse_number(args[3], "count")
                if count > MAX_ACCESS_BATCH:
                    raise CommandError(Errno.EINVAL, f"at most {MAX_ACCESS_BATCH} gfns per access request")
                gfns = list(range(first, first + count))
            reply, _ = await self.call(protocol.AccessSet(domid=domid, gfns=gfns, access=access))
            assert isinstance(reply, protocol.BatchResult)
            failed = [r for r in reply.results if r is not None]
            if failed:
                raise CommandError(failed[0], f"{len(failed)} of {len(gfns)} gfns refused the access")
            return "ok", b"", []
        if op == "getaccess":
            gfn = abi.DEFAULT_ACCESS_GFN if args[1] == "default" else parse_number(args[1], "gfn")
            reply, _ = await self.call(protocol.AccessGet(domid=domid, gfn=gfn))
            assert isinstance(reply, protocol.AccessReply)
            return f"ok {reply.access}", b"", []
        if op == "access-required":
            await self.call(protocol.AccessRequired(domid=domid, required=args[1] == "1"))
            return "ok", b"", []
        if op == "hvm-param":
            await self.call(protocol.SetHvmParam(domid=domid, reason=parse_number(args[1], "reason"),
                                                 mode=parse_number(args[2], "mode"),
                                                 mask=parse_number(args[3], "mask") if len(args) > 3 else 0))
            return "ok", b"", []
        if op == "inject":
            await self.call(protocol.InjectTrap(domid=domid, vcpu=parse_number(args[1], "vcpu"),
                                                vector=parse_number(args[2], "vector")))
            return "ok", b"", []
        if op == "debug":
            await self.call(protocol.DebugControl(domid=domid, vcpu=parse_number(args[1], "vcpu"),
                                                  single_step=args[2] == "1"))
            return "ok", b"", []
        raise CommandError(Errno.ENOSYS, f"unknown request {op!r}")

    async def _enable(self, domid: int, ring_name: str) -> tuple[str, bytes, list[int]]:
        ring = RingKind(ring_name)
        dom = await self._domain(domid)
        if dom.abi != TOOLS_ABI:
            raise CommandError(Errno.EINVAL, f"domain {domid} has the {dom.abi!r} ring ABI; Xen 4.17's tools need "
                                           f"a domain created with --abi {TOOLS_ABI}")
        reply, fds = await self.call(protocol.MemEventEnable(domid=domid, ring=ring))
        assert isinstance(reply, protocol.MemEventEnabled)
        named = dict(zip(reply.fds, fds, strict=True))
        keep = [named.pop("ring"), named.pop("evtchn"), named.pop("memory"), named.pop("p2m")]
        for fd in named.values():  # the load area: the tools load pages with xc_mem_paging_load
            os.close(fd)
        return f"ok {reply.port} {reply.gfns} {reply.ring_size} {reply.max_vcpus}", b"", keep


async def serve(sock: socket.socket) -> None:
    conn = await ControlClient.connect(protocol.socket_path())
    await conn.call(protocol.ToolHello(client="xentools"))
    agent = Agent(conn)
    try:
        while True:
            await readiness.wait_readable(sock.fileno())
            try:
                data = sock.recv(MAX_REQUEST)
            except BlockingIOError:
                continue
            if not data:
                return
            line, _, rest = data.partition(b"\n")
            fds: list[int] = []
            try:
                reply, extra, fds = await agent.execute(line.decode("ascii", "replace").split(), rest)
            except CommandError as exc:
                reply, extra = format_error(exc.errno, exc.message), b""
            except (IndexError, ValueError) as exc:
                reply, extra = f"EINVAL malformed request {line[:60]!r}: {exc}", b""
            try:
                socket.send_fds(sock, [reply.encode() + b"\n" + extra], fds)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        readiness.notify_closing(sock.fileno())
        with contextlib.suppress(TransportError, OSError):
            await conn.hang_up()


def main() -> int:
    logs.setup("xentools-agent", 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        sock = socket.socket(fileno=AGENT_FD)
    except OSError:
        print("hvemu-xentools-agent: started without its socket (fd 3); the drop-in libraries start it",
              file=sys.stderr)
        return 2
    sock.setblocking(False)
    import uvloop

    try:
        uvloop.run(serve(sock))
    except (OSError, TransportError) as exc:
        print(f"hvemu: cannot reach the hypervisor of {protocol.default_run_dir()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
