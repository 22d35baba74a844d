"""The built-in pager, ``xenpaging``-like, written on the public SDK only.

It is :class:`pager.base.Pager` (which does the work: drains, batched
page-ins, eviction to a target, paging everything in on a clean stop) with a
victim policy from :mod:`pager.policy`, and this command line.  Killed, it
leaves ring and pagefile behind; a new pager on the same pagefile picks up
every unanswered request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from hvemu import logs, protocol
from hvemu.abi import RingKind
from hvemu.client import ControlError, root_cause
from hvemu.names import VICTIM_POLICIES
from pager.base import Pager, PageStore
from pager.defaults import EVICT_BATCH, EVICT_POLICY
from pager.gfns import GfnsOfType
from pager.pagefile import Pagefile, PagefileMismatch
from pager.policy import PolicyName, VictimPolicy, make_policy
from pager.sdk import MemEventClient, SdkError

log = logging.getLogger("pager")


class PolicyPager(Pager):
    """The built-in pager: :class:`pager.base.Pager` with a victim policy from :mod:`pager.policy`."""

    def __init__(self, client: MemEventClient, pagefile: PageStore, policy: VictimPolicy, *,
                 batch: int = EVICT_BATCH, poll_interval: float = 0.05, unbatched: bool = False,
                 progress: bool = False) -> None:
        super().__init__(client, pagefile, batch=batch, poll_interval=poll_interval, unbatched=unbatched,
                         progress=progress)
        self.policy = policy

    def choose_victims(self, candidates: GfnsOfType, count: int) -> list[int]:
        """The policy's choice (it avoids pages paged in lately)."""
        return self.policy.choose(candidates, count)

    def on_populate(self, gfns: list[int]) -> None:
        """Tell the policy, so that it does not evict these again soon."""
        self.policy.paged_in(gfns)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvemu-pager", description="A xenpaging-like pager for one domain.")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--pagefile", required=True, help="backing file (kept across restarts; removed once its "
                                                     "domain is destroyed, unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the pagefile when the domain is destroyed")
    p.add_argument("--target", type=int, default=None, help="resident pages to keep (default: the hypervisor's)")
    p.add_argument("--policy", choices=VICTIM_POLICIES, default=EVICT_POLICY,
                   help="victim policy: clock (xenpaging's sweeping hand, the default) or random")
    p.add_argument("--batch", type=int, default=EVICT_BATCH,
                   help=f"pages per eviction batch (default {EVICT_BATCH})")
    p.add_argument("--unbatched", action="store_true",
                   help="answer each request on its own (one load, push and notify per request); "
                        "for comparison only")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="show the initial page-out and the final page-in (auto: when stderr is a terminal)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--ready-fd", type=int, default=None,
                   help="write a byte to this fd once the ring is ours and the pagefile accepted")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


async def _main(args: argparse.Namespace) -> dict[str, int]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    policy_name: PolicyName = args.policy
    async with MemEventClient(args.domid, RingKind.paging, run_dir=args.run_dir) as client:
        assert client.info is not None
        # The pagefile must hold this domain's pages whenever some are out
        # (a re-attach after a crash, pages left out by another daemon):
        # otherwise the guest would be served zeros or stale pages.
        paged_out = await client.stored_pages_out()
        try:
            pagefile = Pagefile.open_for(args.pagefile, client.gfns, handle=client.info.domain_handle,
                                         reattached=client.info.reattached, paged_out=paged_out,
                                         live_handles=await _live_handles(client))
        except PagefileMismatch as exc:
            client.disable_on_exit = False  # keep the ring, and its requests, for the right pager
            raise SdkError(f"dom{args.domid}: {exc}; the ring is left as it is") from exc
        if args.target is not None:
            await client.domctl.call(protocol.SetTarget(domid=args.domid, pages=args.target))
        if args.ready_fd is not None:
            # Attached *and* accepted: owning the ring is not enough (the pagefile check above may refuse it).
            os.write(args.ready_fd, b"R")
            os.close(args.ready_fd)
        progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        pager = PolicyPager(client, pagefile, make_policy(policy_name, seed=args.seed), batch=args.batch,
                            unbatched=args.unbatched, progress=progress)
        try:
            await pager.run(stop)
            gone = pager.gone
            if gone is None:
                if not await client.stored_pages_out():
                    pagefile.clear()  # all in: the file can no longer pass for a store of pages out
            elif not await _hypervisor_alive(client.socket_path):
                # Not the end of a domain but of the hypervisor: say so, and fail.
                raise SdkError(f"lost the hypervisor ({gone}); ring and pagefile {args.pagefile} "
                               "left as they are") from gone
            else:
                log.info("dom%d: %s; exiting", args.domid, gone)
                client.disable_on_exit = False  # no ring left to disable, nor pages out to warn about
                pagefile.clear()  # the domain is gone, and its handle with it
                if not args.keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(args.pagefile)
        finally:
            pagefile.close()
    return pager.summary()


async def _live_handles(client: MemEventClient) -> set[str]:
    """The handles of the domains alive now (a pagefile of one of them must not be taken over)."""
    reply = await client.domctl.call(protocol.DomainList())
    return {d.handle for d in reply.domains} if isinstance(reply, protocol.DomainListReply) else set()


async def _hypervisor_alive(socket_path: str) -> bool:
    """Does anything still answer on the control socket?"""
    from hvemu.client import ControlClient

    try:
        conn = await asyncio.wait_for(ControlClient.connect(socket_path), 2)
    except (OSError, TimeoutError):
        return False
    try:
        await asyncio.wait_for(conn.call(protocol.ToolHello(client="pager:probe")), 2)
        return True
    except (OSError, TimeoutError, ControlError):
        return False
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch < 1:
        print("hvemu-pager: --batch must be at least 1", file=sys.stderr)
        return 2
    logs.setup("pager", args.verbose)
    import json

    import uvloop

    try:
        summary = uvloop.run(_main(args))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one clear line
        root = root_cause(exc)
        if isinstance(root, SdkError | ControlError | ConnectionError | OSError):
            text = str(root)
            prefix = "" if text.startswith(f"dom{args.domid}:") else f"dom{args.domid}: "
            print(f"hvemu-pager: {prefix}{text}", file=sys.stderr)
            return 1
        raise
    print(json.dumps({"domid": args.domid, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
