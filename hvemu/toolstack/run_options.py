"""``scripts/run.sh``'s options: the parser, the checks made before anything starts, and the settings.

What a run depends on is a :class:`Settings`: written into ``--json``'s file
and read back by ``--from``, so that a run can be repeated from its file.
Every value is refused here, with the option and the value as typed, before
a process is started (:func:`option_problems`).
"""

from __future__ import annotations

import argparse
import os
import re

import msgspec

from hvemu import abi
from hvemu.core.domain import MAX_GFNS, MAX_VCPUS
from hvemu.names import ADMISSION_POLICIES as POLICIES
from hvemu.names import PATTERNS
from hvemu.toolstack.bench.common import format_cpus, parse_cpus
from hvemu.toolstack.sizes import MiB, Size, SizeError, gib_or_mib, parse_size
from pager.defaults import EVICT_BATCH

#: The guests' access patterns (``guest --pattern``).
#: Runs longer than this print a progress line every ``--progress`` seconds.
PROGRESS_AFTER_S = 10.0


PROGRESS_EVERY_S = 5.0


#: What one domain's two Python processes (guest and pager) take at least, besides guest memory:
#: ``--domains`` beyond what the host has room for is refused before anything starts.
PROCESS_PAIR_BYTES = 80 * MiB


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a run depends on: written into ``--json``'s file, read back by ``--from``."""

    domains: int
    vcpus: int
    memory_mib: float
    host_memory_mib: float
    target_mib: float
    duration_s: float
    pattern: str
    write_ratio: float
    admission: str
    batch: int
    seed: int
    #: CPUs every process was pinned to (``taskset -c`` form), None: not pinned.
    cpus: str | None = None
    #: The domains' ring ABI (``abi.RING_ABIS``).
    abi: str = "seed"

    def argv(self) -> list[str]:
        """The ``run.sh`` options that give these settings."""
        argv = ["--domains", str(self.domains), "--vcpus", str(self.vcpus), "--memory", _num(self.memory_mib),
                "--host-memory", _num(self.host_memory_mib), "--target", _num(self.target_mib),
                "--duration", _num(self.duration_s), "--pattern", self.pattern, "--write-ratio",
                _num(self.write_ratio), "--admission", self.admission, "--batch", str(self.batch),
                "--seed", str(self.seed)]
        argv += ["--abi", self.abi] if self.abi != "seed" else []
        return argv + (["--cpus", self.cpus] if self.cpus else [])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none (None: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.sh", formatter_class=_HelpFormatter,
                                description="Run an overcommitted host: hypervisor, guests, pagers.",
                                epilog=f"sizes take a unit (512m, 1g, 4096k) and a bare number is MiB (1 MiB = "
                                       f"{MiB // abi.PAGE_SIZE} pages of {abi.PAGE_SIZE // 1024} KiB); times are "
                                       "seconds; exit status: 0 ok, 1 failed, 2 an option refused, 128+N stopped "
                                       "by signal N (130 Ctrl-C, 129 terminal closed, 143 SIGTERM), 141 stdout "
                                       "closed early")
    p.add_argument("--domains", type=int, default=2, metavar="N",
                   help="number of domains, each with a guest and a pager")
    p.add_argument("--vcpus", type=int, default=4, metavar="N", help=f"vCPUs per domain, 1 to {MAX_VCPUS}")
    p.add_argument("--memory", default="64", metavar="SIZE", help="memory per domain, MiB")
    p.add_argument("--host-memory", default="96", metavar="SIZE",
                   help="host memory budget, MiB; below the domains' total, so paging happens")
    p.add_argument("--target", default="40", metavar="SIZE",
                   help="paging target per domain, MiB (what its pager keeps resident), 0 to --memory")
    p.add_argument("--duration", type=float, default=10, metavar="SECONDS",
                   help="how long each guest runs its workload, seconds")
    p.add_argument("--pattern", choices=PATTERNS, default="hotcold", help="the guests' access pattern")
    p.add_argument("--write-ratio", type=float, default=0.3, metavar="R",
                   help="fraction of the guests' accesses that write, 0 to 1")
    p.add_argument("--admission", choices=POLICIES, default=POLICIES[0],
                   help="mem_event admission policy of the hypervisor")
    p.add_argument("--abi", choices=abi.RING_ABIS, default=abi.DEFAULT_RING_ABI,
                   help="the domains' ring ABI: the seed's mem_event, Xen 4.2.0's, or Xen 4.17's vm_event")
    p.add_argument("--batch", type=int, default=EVICT_BATCH, metavar="PAGES", help="pages per pager eviction batch")
    p.add_argument("--seed", type=int, default=1, help="workload seed (domain N's guest uses seed + N)")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin every process to these CPUs (taskset -c list: 0, 0,2 or 0-3; CPUs this shell may "
                        "use; default: not pinned)")
    p.add_argument("--progress", type=float, default=None, metavar="SECONDS",
                   help=f"a progress line on stderr every SECONDS while the guests run (default: every "
                        f"{_num(PROGRESS_EVERY_S)} s on runs longer than {_num(PROGRESS_AFTER_S)} s; 0: none)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the summary, with every setting, as JSON to this file (default: none)")
    p.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                   help="run again with the settings of a --json file (options given as well override them)")
    return p


def _num(value: float) -> str:
    """A number as the user would have typed it (``80``, not ``80.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


#: A ``taskset -c`` list as :func:`~hvemu.toolstack.bench.common.parse_cpus` reads it: ``0``, ``0,2``, ``0-3,6``.
_CPU_LIST = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*(\d+(\s*-\s*\d+)?)?)*\s*")


def _mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def option_problems(args: argparse.Namespace) -> list[str]:
    """One line per option value refused, naming the option and the value as typed (empty: all good).

    Checked before anything is started, including what only the hypervisor
    or the host would refuse later (a domain bigger than the hypervisor
    allows, more domains than the host has memory for their processes).
    The sizes are parsed here (``args.memory`` etc. become :class:`Size`),
    and ``--cpus`` too (``args.cpus`` becomes the set of CPUs), so that an
    invalid value is one message of ours, not taskset's or a child's.
    """
    problems = [f"--{name} {getattr(args, name)} is below 1" for name in ("domains", "vcpus", "batch")
                if getattr(args, name) < 1]
    if args.vcpus > MAX_VCPUS:
        problems.append(f"--vcpus {args.vcpus} is above {MAX_VCPUS} (the hypervisor's limit)")
    sizes: dict[str, Size | None] = {}
    for name in ("memory", "host_memory", "target"):
        try:
            sizes[name] = parse_size(getattr(args, name))
        except SizeError as exc:
            sizes[name] = None
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} {exc}")
    for name in ("duration", "write_ratio"):
        if not _finite(getattr(args, name)):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is not a finite number")
    memory, host, target = sizes["memory"], sizes["host_memory"], sizes["target"]
    for name, size in (("memory", memory), ("host-memory", host)):
        if size is not None and size.bytes <= 0:
            problems.append(f"--{name} {size} is not above 0")
    if memory is not None and memory.bytes > 0:
        if memory.pages < 1:
            problems.append(f"--memory {memory} is less than one page ({abi.PAGE_SIZE // 1024} KiB)")
        elif memory.pages > MAX_GFNS:
            problems.append(f"--memory {memory} is above the {gib_or_mib(MAX_GFNS * abi.PAGE_SIZE)} the "
                            "hypervisor gives a domain")
    if target is not None and target.bytes < 0:
        problems.append(f"--target {target} is below 0")
    elif target is not None and memory is not None and memory.bytes > 0 and target.bytes > memory.bytes:
        problems.append(f"--target {target} is above --memory {memory}")
    if _finite(args.duration) and args.duration <= 0:
        problems.append(f"--duration {_num(args.duration)} s is not above 0")
    if _finite(args.write_ratio) and not 0 <= args.write_ratio <= 1:
        problems.append(f"--write-ratio {_num(args.write_ratio)} is outside 0..1")
    if args.progress is not None and not (_finite(args.progress) and args.progress >= 0):
        problems.append(f"--progress {args.progress} is not a number of seconds (0: none)")
    available = _mem_available()
    if available is not None and host is not None and host.bytes > available:
        problems.append(f"--host-memory {host} is above the {gib_or_mib(available)} this host has available")
    elif available is not None and host is not None and args.domains >= 1:
        needed = args.domains * PROCESS_PAIR_BYTES + max(host.bytes, 0)
        if needed > available:
            problems.append(f"--domains {args.domains} needs about {gib_or_mib(needed)} for its "
                            f"{2 * args.domains} guest and pager processes and the host budget; this host has "
                            f"{gib_or_mib(available)} available")
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            problems.append(f"--json {args.json}: no directory {parent} to write it in")
    if args.cpus is not None:
        text = args.cpus
        if not _CPU_LIST.fullmatch(text):
            problems.append(f"--cpus {text!r} is not a CPU list (taskset -c form: 0, 0,2 or 0-3)")
        else:
            try:
                args.cpus = parse_cpus(text)
            except ValueError as exc:  # no CPU at all, or CPUs this process may not use
                problems.append(f"--cpus {text}: {exc}")
    if not problems:
        args.memory, args.host_memory, args.target = memory, host, target
    return problems


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of checked options (:func:`option_problems` found nothing)."""
    return Settings(domains=args.domains, vcpus=args.vcpus, memory_mib=args.memory.mib,
                    host_memory_mib=args.host_memory.mib, target_mib=args.target.mib, duration_s=args.duration,
                    pattern=args.pattern, write_ratio=args.write_ratio, admission=args.admission, batch=args.batch,
                    seed=args.seed, cpus=format_cpus(args.cpus) if args.cpus is not None else None, abi=args.abi)


def _from_file(path: str) -> list[str]:
    """The options that repeat the run a ``--json`` file describes."""
    try:
        with open(path, "rb") as f:
            data = msgspec.json.decode(f.read())
        settings = data["settings"]
        if isinstance(settings, dict) and "admission" not in settings and "policy" in settings:
            settings["admission"] = settings.pop("policy")  # a file written before --policy was --admission
        return msgspec.convert(settings, Settings).argv()
    except OSError as exc:
        raise ValueError(f"--from {path}: {exc.strerror}") from exc
    except KeyError as exc:
        raise ValueError(f"--from {path}: not a run.sh --json file (no settings)") from exc
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"--from {path}: not a run.sh --json file ({exc})") from exc
