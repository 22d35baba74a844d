"""The built-in pager, killing itself with SIGKILL at a chosen point of its work.

``python -m tests.integration.crashy_pager --die-at POINT --hit N <xenpaging options>``
runs ``pager.xenpaging`` unchanged except that the N-th time it reaches POINT
it sends itself ``SIGKILL`` (no handler, no cleanup: exactly ``kill -9``).
Points, in the order a page goes out and comes back:

``nominate``  pages nominated, not copied yet (they stay ``ram_paging_out``)
``pagefile``  in the middle of copying a batch to the pagefile, before the evict
``evict``     right after an evict returned (frames freed, pagefile written)
``load``      pages loaded for a drain, no response written yet
``respond``   in the middle of writing a drain's responses (written, unpublished)
``push``      right after the responses were published (the notify may be lost)
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pager import sdk, xenpaging
from pager.pagefile import Pagefile

POINTS = ("nominate", "pagefile", "evict", "load", "respond", "push")


def _arm(point: str, hit: int) -> None:
    count = 0

    def maybe_die(where: str) -> None:
        nonlocal count
        if where != point:
            return
        count += 1
        if count >= hit:
            os.kill(os.getpid(), signal.SIGKILL)

    def after(where: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if getattr(fn, "__code__", None) is not None and fn.__code__.co_flags & 0x80:  # a coroutine function
            @functools.wraps(fn)
            async def wrapped_async(*a: Any, **kw: Any) -> Any:
                result = await fn(*a, **kw)
                maybe_die(where)
                return result
            return wrapped_async

        @functools.wraps(fn)
        def wrapped(*a: Any, **kw: Any) -> Any:
            result = fn(*a, **kw)
            maybe_die(where)
            return result
        return wrapped

    sdk.Domctl.nominate = after("nominate", sdk.Domctl.nominate)  # type: ignore[method-assign]
    sdk.Domctl.evict = after("evict", sdk.Domctl.evict)  # type: ignore[method-assign]
    sdk.Domctl.load = after("load", sdk.Domctl.load)  # type: ignore[method-assign]
    sdk.MemEventClient.push = after("push", sdk.MemEventClient.push)  # type: ignore[method-assign]
    Pagefile.write = after("pagefile", Pagefile.write)  # type: ignore[method-assign]
    sdk.MemEventClient.respond = after("respond", sdk.MemEventClient.respond)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--die-at", choices=POINTS, required=True)
    p.add_argument("--hit", type=int, default=1)
    ours, rest = p.parse_known_args(argv)
    _arm(ours.die_at, ours.hit)
    return xenpaging.main(rest)


if __name__ == "__main__":
    sys.exit(main())
