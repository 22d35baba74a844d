"""A mem_access listener in the spirit of Xen's ``xen-access``.

    python -m pager.examples.access_listener --domid 1 --gfns 0-63 --access rx --cr3 --int3

It attaches to the domain's *access* ring, restricts the access rights of
the chosen gfns (``--gfns all`` as xen-access does: the p2m's default access
through Xen's ``~0`` gfn, then every page), asks for CR3 writes, INT3s and
single steps as events (``HVM_PARAM_MEMORY_EVENT_*``), and prints one line
per event (on stdout, or appended to ``--log FILE``)::

    PAGE ACCESS: -w- for GFN 0x1c (offset 0x000123) gla 0x000000000001c123 (vcpu 0) [rx -> rwx]
    CR3 write: 0x5000 (vcpu 0)
    INT3: GFN 0x401 gla 0x0000000000401000 (vcpu 1)
    SINGLESTEP: GFN 0x402 gla 0x0000000000402000 (vcpu 1)

An INT3 is re-injected into the guest before it is answered (xen-access's
``xc_hvm_inject_trap``), so the guest's own breakpoint handler still runs;
``--singlestep`` single-steps every vCPU (``xc_domain_debug_control``).

Every request is answered (the vCPU that raised it waits for that answer).
A violation is answered after the gfn's access has been changed to
``--relax`` (``rwx`` by default, as xen-access does), so that the vCPU's
retry succeeds: with ``--relax none`` the restriction stays and the vCPU
faults again on every retry.  On SIGTERM/SIGINT it turns the traps off,
gives every restricted gfn ``rwx`` back, answers what is left on the ring and
disables it.  The first line on stdout is a JSON ``{"ready": ...}`` once the
restrictions are in place; the last is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import Counter
from typing import TextIO

import uvloop

from hvemu import abi
from hvemu.abi import MemEvent, MemEventReason, P2MAccess, RingKind
from hvemu.client import root_cause
from pager.sdk import DomainGone, MemEventClient, RequestBatch, SdkError, failures

_TRAPS = {"cr0": MemEventReason.CR0, "cr3": MemEventReason.CR3, "cr4": MemEventReason.CR4,
          "int3": MemEventReason.INT3, "singlestep": MemEventReason.SINGLESTEP}
#: Traps without an old value: Xen refuses ``onchangeonly`` for them.
_NO_ONCHANGEONLY = frozenset({MemEventReason.INT3, MemEventReason.SINGLESTEP})
#: The x86 breakpoint vector, re-injected after an INT3 event.
_BREAKPOINT_VECTOR = 3


def parse_gfns(spec: str, gfns: int) -> list[int]:
    """``all`` or a comma-separated list of gfns and ``first-last`` ranges (decimal or 0x hex)."""
    if spec == "all":
        return list(range(gfns))
    out: dict[int, None] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        lo, hi = int(first, 0), int(last or first, 0)
        if not 0 <= lo <= hi < gfns:
            raise ValueError(f"gfn range {part!r} is outside 0..{gfns - 1}")
        out.update(dict.fromkeys(range(lo, hi + 1)))
    return list(out)


def describe(req: MemEvent, relaxed_to: str | None) -> str:
    """One xen-access-like line for a request."""
    if req.reason == MemEventReason.VIOLATION:
        rwx = ("r" if req.access_r else "-") + ("w" if req.access_w else "-") + ("x" if req.access_x else "-")
        gla = f"{req.gla:#018x}" if req.gla_valid else "-"
        tail = f" [-> {relaxed_to}]" if relaxed_to else ""
        return (f"PAGE ACCESS: {rwx} for GFN {req.gfn:#x} (offset {req.offset:#08x}) gla {gla} "
                f"(vcpu {req.vcpu_id}){tail}")
    if req.reason in (MemEventReason.INT3, MemEventReason.SINGLESTEP):
        gla = f"{req.gla:#018x}" if req.gla_valid else "-"
        return f"{MemEventReason(req.reason).name}: GFN {req.gfn:#x} gla {gla} (vcpu {req.vcpu_id})"
    if req.reason in (MemEventReason.CR0, MemEventReason.CR3, MemEventReason.CR4):
        return f"{MemEventReason(req.reason).name} write: {req.gfn:#x} (vcpu {req.vcpu_id})"
    return f"event type {req.type} reason {req.reason} GFN {req.gfn:#x} (vcpu {req.vcpu_id})"


class Listener:
    """Logs every event of one access ring and answers it."""

    def __init__(self, client: MemEventClient, relax: int | None, out: TextIO | None = sys.stdout) -> None:
        self.client = client
        self.relax = relax
        #: Where event lines go (None: count only).  Its writes block the
        #: listener, and with it every vCPU waiting for an answer: give it a
        #: file, or a pipe somebody reads.
        self.out = out
        self.counts: Counter[str] = Counter()

    async def handle(self, batch: RequestBatch) -> None:
        """Relax the violated gfns (one domctl per drain), then answer the whole drain at once."""
        try:
            relaxed_to = None
            if self.relax is not None and (relax := sorted({r.gfn for r in batch.violations})):
                await self.client.domctl.access_set(relax, self.relax)
                relaxed_to = P2MAccess(self.relax).name
            for req in batch:
                if req.reason == MemEventReason.INT3:
                    await self.client.domctl.inject_trap(req.vcpu_id, _BREAKPOINT_VECTOR)
                    self.counts["reinjected"] += 1
                try:
                    name = MemEventReason(req.reason).name
                except ValueError:
                    name = f"reason{req.reason}"
                self.counts[name] += 1
                if self.out is not None:
                    self.out.write(describe(req, relaxed_to if req.reason == MemEventReason.VIOLATION else None) + "\n")
            if self.out is not None:
                self.out.flush()
        finally:
            # Answer even if the access change failed or we are being cancelled:
            # an unanswered request keeps its vCPU paused for good.
            self.client.respond_all(batch)
            await self.client.push()

    async def serve(self) -> None:
        async for batch in self.client.requests():
            await self.handle(batch)


async def listen(args: argparse.Namespace) -> dict[str, object]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relax = None if args.relax == "none" else int(P2MAccess[args.relax])
    traps = [reason for name, reason in _TRAPS.items() if getattr(args, name)]
    mode = abi.HVMPME_MODE_ASYNC if args.async_traps else abi.HVMPME_MODE_SYNC
    with contextlib.ExitStack() as files:
        out: TextIO | None = None
        if not args.quiet:
            out = sys.stdout if args.log == "-" else files.enter_context(open(args.log, "a", buffering=1))
        return await _listen(args, stop, relax, traps, mode, out)


async def _listen(args: argparse.Namespace, stop: asyncio.Event, relax: int | None,
                  traps: list[MemEventReason], mode: int, out: TextIO | None) -> dict[str, object]:
    gone = False
    async with MemEventClient(args.domid, RingKind.access, run_dir=args.run_dir) as client:
        listener = Listener(client, relax, out)
        restricted = parse_gfns(args.gfns, client.gfns) if args.gfns else []
        if args.required:
            await client.domctl.access_required(True)
        if args.gfns == "all":  # xen-access: the default access first, so a page given back keeps it
            await client.domctl.access_set([abi.DEFAULT_ACCESS_GFN], int(P2MAccess[args.access]))
        for i in range(0, len(restricted), 1024):
            chunk = restricted[i:i + 1024]
            bad = failures(chunk, await client.domctl.access_set(chunk, int(P2MAccess[args.access])))
            if bad:
                raise SdkError(f"cannot restrict {len(bad)} gfns, e.g. {next(iter(bad.items()))}")
        for reason in traps:
            onchange = args.onchangeonly and reason not in _NO_ONCHANGEONLY
            await client.domctl.set_hvm_param(reason, mode | (abi.HVMPME_ONCHANGEONLY if onchange else 0))
        if MemEventReason.SINGLESTEP in traps:
            for vcpu in range(client.max_vcpus):
                await client.domctl.debug_control(vcpu, True)
        print(json.dumps({"ready": True, "domid": args.domid, "restricted": len(restricted),
                          "access": args.access, "traps": [t.name for t in traps]}), flush=True)
        serving = asyncio.create_task(listener.serve(), name="serve")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if serving.done():
            gone = isinstance(root_cause(serving.exception() or Exception()), DomainGone)
            if not gone:
                serving.result()  # re-raise what stopped it
        else:
            # Stop producing events first (the serve task keeps answering meanwhile)...
            try:
                if MemEventReason.SINGLESTEP in traps:
                    for vcpu in range(client.max_vcpus):
                        await client.domctl.debug_control(vcpu, False)
                for reason in traps:
                    await client.domctl.set_hvm_param(reason, abi.HVMPME_MODE_DISABLED)
                if args.gfns == "all":
                    await client.domctl.access_set([abi.DEFAULT_ACCESS_GFN], int(P2MAccess.rwx))
                for i in range(0, len(restricted), 1024):
                    await client.domctl.access_set(restricted[i:i + 1024], int(P2MAccess.rwx))
                if args.required:
                    await client.domctl.access_required(False)
            except DomainGone:
                gone = True
            # ... then answer what is still on the ring, and let the client disable it.
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, DomainGone):
                await serving
            if not gone:
                with contextlib.suppress(DomainGone):
                    await listener.handle(client.take_requests())
    return {"domid": args.domid, "events": sum(listener.counts.values()), **dict(listener.counts),
            "domain_gone": gone}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="access_listener", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--gfns", default="", help="gfns to restrict: 'all' or e.g. '0-63,100' (default: none)")
    p.add_argument("--access", default="rx", choices=[a.name for a in P2MAccess],
                   help="access given to those gfns (default rx: writes are violations)")
    p.add_argument("--relax", default="rwx", choices=[*(a.name for a in P2MAccess), "none"],
                   help="access a gfn gets after a violation (none: keep the restriction)")
    for name in _TRAPS:
        p.add_argument(f"--{name}", action="store_true", help=f"report {name.upper()} events")
    p.add_argument("--async", dest="async_traps", action="store_true",
                   help="CR/INT3 events do not pause the vCPU (default: sync)")
    p.add_argument("--onchangeonly", action="store_true", help="CR writes of an unchanged value are not events")
    p.add_argument("--required", action="store_true",
                   help="access_required: if the listener goes away, a violation crashes the domain")
    p.add_argument("--log", default="-", help="file the event lines are appended to (default: stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="count events, print only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = uvloop.run(listen(args))
    except BaseException as exc:  # noqa: BLE001 - one clear line
        root = root_cause(exc)
        if isinstance(root, SdkError | OSError | ValueError):
            print(f"access_listener: dom{args.domid}: {root}", file=sys.stderr)
            return 1
        raise
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
