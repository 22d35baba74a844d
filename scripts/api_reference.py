"""Generate docs/sdk-reference.md from the SDK's docstrings, enums and a live ``Stats`` reply.

    python scripts/api_reference.py            # print the reference
    python scripts/api_reference.py --write    # rewrite docs/sdk-reference.md
    python scripts/api_reference.py --check    # exit 1 if docs/sdk-reference.md is stale

The guide (docs/writing-a-daemon.md) explains; this lists, so that what a
daemon author needs is never found only in the source: every public method
of the SDK with its signature and whether it is a coroutine, the enum names
and values, and the keys a ``Stats`` reply carries (read from a hypervisor
daemon created in this process, so the list cannot drift from the code).
``tests/integration/test_guide.py`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import inspect
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import msgspec  # noqa: E402

from hvemu import abi, protocol  # noqa: E402
from pager import base, gfns, pagefile, sdk  # noqa: E402

OUT = os.path.join(ROOT, "docs", "sdk-reference.md")

#: (title, class, members to list: None for every public one defined or inherited from the SDK).
CLASSES: list[tuple[str, type, list[str] | None]] = [
    ("pager.sdk.MemEventClient", sdk.MemEventClient, None),
    ("pager.sdk.Domctl", sdk.Domctl, None),
    ("pager.sdk.RequestBatch", sdk.RequestBatch, None),
    ("pager.base.Pager", base.Pager, None),
    ("pager.pagefile.PageStore", pagefile.PageStore, ["write", "read", "discard"]),
    ("pager.pagefile.Pagefile", pagefile.Pagefile, ["open_for", "clear", "discard", "write", "read", "close"]),
    ("pager.gfns.GfnsOfType", gfns.GfnsOfType, None),
]
FUNCTIONS = [sdk.response_for, sdk.failures]
ERRORS = [sdk.SdkError, sdk.AttachError, sdk.DomctlError, sdk.DomainGone, sdk.StateError]
ENUMS: list[type[enum.Enum]] = [abi.RingKind, abi.MemEventType, abi.MemEventFlag, abi.MemEventReason,
                                abi.P2MType, abi.P2MAccess, abi.Errno]
CONSTANTS = ["HVMPME_MODE_DISABLED", "HVMPME_MODE_SYNC", "HVMPME_MODE_ASYNC", "HVMPME_ONCHANGEONLY",
             "ACCESS_R", "ACCESS_W", "ACCESS_X", "PAGE_SIZE"]


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    para = doc.split("\n\n", 1)[0]
    return " ".join(para.split())


def _kind(obj: Any) -> str:
    fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
    if isinstance(obj, property):
        return "property"
    if inspect.isasyncgenfunction(fn):
        return "async iterator"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    return "classmethod" if isinstance(obj, classmethod) else "method"


def _signature(name: str, obj: Any) -> str:
    if isinstance(obj, property):
        return name
    fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    return f"{name}({', '.join(str(p).replace(' ', '') if p.kind is p.VAR_POSITIONAL else str(p) for p in params)})"


def _members(cls: type, names: list[str] | None) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] not in ("pager",):
            continue
        for name, obj in vars(klass).items():
            if name in seen or (names is None and name.startswith("_")) or (names is not None and name not in names):
                continue
            if not (callable(obj) or isinstance(obj, property | classmethod | staticmethod)):
                continue
            seen.add(name)
            out.append((name, obj))
    order = {n: i for i, n in enumerate(names or [])}
    return sorted(out, key=lambda m: (order.get(m[0], 0), m[0]))


async def _stats_keys() -> tuple[list[str], list[str]]:
    """The keys of a live Stats reply: of the domain, and of each enabled ring's dict."""
    from hvemu.hypervisor.daemon import ConnCtx, HypervisorDaemon

    with tempfile.TemporaryDirectory() as run_dir:
        daemon = HypervisorDaemon(run_dir, 64)
        state = ConnCtx(os.getpid(), os.getuid(), os.getgid())
        await daemon.handle(state, protocol.ToolHello(client="api-reference"))
        created, _ = await daemon.handle(state, protocol.DomainCreate(max_vcpus=1, gfns=16))
        assert isinstance(created, protocol.DomainCreated)
        _, fds = await daemon.handle(state, protocol.MemEventEnable(domid=created.domid, ring=abi.RingKind.paging))
        for fd in fds:
            if not isinstance(fd, int):
                fd.close()
        reply, _ = await daemon.handle(state, protocol.Stats(domid=created.domid))
        assert isinstance(reply, protocol.StatsReply)
        daemon._destroy(created.domid)
    stats = msgspec.to_builtins(reply.stats)  # what the SDK's stats() gives a daemon
    ring = stats["paging"]
    assert isinstance(ring, dict)
    rings = {str(k) for k in abi.RingKind}
    return sorted(k for k in stats if k not in rings), sorted(ring)


def render() -> str:
    lines = ["# SDK reference", "",
             "Generated by `python scripts/api_reference.py --write` from the docstrings (do not edit by hand;",
             "`tests/integration/test_guide.py` fails when it is stale). The guide is",
             "[writing-a-daemon.md](writing-a-daemon.md); this page lists what it names.", ""]
    lines += ["## Classes", ""]
    for title, cls, names in CLASSES:
        lines += [f"### `{title}`", "", _summary(cls), "", "| member | kind | what |", "|---|---|---|"]
        for name, obj in _members(cls, names):
            summary = _summary(obj).replace("|", "\\|")
            lines.append(f"| `{_signature(name, obj)}` | {_kind(obj)} | {summary} |")
        lines.append("")
    lines += ["## Functions", "", "| function | what |", "|---|---|"]
    for fn in FUNCTIONS:
        lines.append(f"| `pager.sdk.{_signature(fn.__name__, fn)}` | {_summary(fn)} |")
    lines += ["", "## Errors", "",
              "Every one is a `pager.sdk.SdkError` with the errno name in `.errno` when known.", "",
              "| error | when |", "|---|---|"]
    for err in ERRORS:
        lines.append(f"| `{err.__name__}` | {_summary(err)} |")
    lines += ["", "## Enums and constants (`hvemu.abi`)", ""]
    for e in ENUMS:
        values = ", ".join(f"`{m.name}`={m.value if isinstance(m.value, int) else repr(m.value)}" for m in e)
        lines.append(f"- `{e.__name__}`: {values}")
    lines.append("- " + ", ".join(f"`{c}`={getattr(abi, c)}" for c in CONSTANTS))
    domain_keys, ring_keys = asyncio.run(_stats_keys())
    lines += ["", "## `stats()` keys", "",
              "What `MemEventClient.stats()` (the `Stats` domctl) returns for a domain with a paging ring; the",
              "guide says what the ones a daemon uses mean. Each enabled ring's counters are a dict under the",
              "ring's name (`paging`, `access`, `sharing`).", "",
              "- domain: " + ", ".join(f"`{k}`" for k in domain_keys),
              "- per ring: " + ", ".join(f"`{k}`" for k in ring_keys), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    a = p.parse_args()
    text = render()
    if a.write:
        with open(OUT, "w") as f:
            f.write(text)
    elif a.check:
        with open(OUT) as f:
            if f.read() != text:
                print(f"{OUT} is stale: run python scripts/api_reference.py --write", file=sys.stderr)
                return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
