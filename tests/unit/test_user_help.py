"""What a new user reads first: ``--help`` of run.sh, soak.sh and the guest, the README's setup lines."""

from __future__ import annotations

import os
import re
import stat
import tomllib

from guest.__main__ import _parser as guest_parser
from hvemu import launcher
from hvemu.core.domain import MAX_VCPUS
from hvemu.soak import _parser as soak_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _help(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def test_run_sh_help_gives_defaults_and_units() -> None:
    text = _help(launcher._parser().format_help())
    for needle in ("--duration SECONDS", "seconds (default: 10)", "--memory SIZE",
                   "memory per domain, MiB (default: 64)", "--host-memory SIZE", "(default: 96)", "--target SIZE",
                   "a bare number is MiB", "512m, 1g",
                   "(default: 40)",
                   f"1 to {MAX_VCPUS} (default: 4)", "--batch PAGES", "(default: 0.3)", "(default: hotcold)"):
        assert needle in text, needle
    assert "None" not in text, "a default of None says nothing"


def test_guest_help_says_what_the_default_run_dir_is() -> None:
    text = _help(guest_parser().format_help())
    assert "None" not in text
    assert "$HVEMU_RUN_DIR" in text and "/tmp/hvemu-UID" in text


def test_soak_target_is_in_pages() -> None:
    text = _help(soak_parser().format_help())
    assert "--target PAGES" in text and "not MiB" in text


def test_readme_lists_the_runtime_packages_pyproject_requires() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = [re.split(r"[~<>=!\[; ]", d, maxsplit=1)[0] for d in deps]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    listed = re.search(r"runtime packages[^:]*:([^)]*)\)", readme)
    assert listed is not None
    assert sorted(n.strip() for n in listed.group(1).replace("\n", " ").split(",")) == sorted(names)
    assert "source .venv/bin/activate" in readme


def test_the_watch_hint_runs_hvemu_from_anywhere(tmp_path: object) -> None:
    bin_dir = os.path.join(str(tmp_path), "venv dir", "bin")
    os.makedirs(bin_dir)
    python = os.path.join(bin_dir, "python")
    # Not a venv: the interpreter runs hvemu.cli, told where the package is.
    fallback = launcher.hvemu_command(python)
    assert fallback.endswith("-m hvemu.cli") and f"PYTHONPATH={ROOT} " in fallback, fallback
    script = os.path.join(bin_dir, "hvemu")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(script, stat.S_IRWXU)
    assert launcher.hvemu_command(python) == f"'{script}'", "the venv's hvemu, by its full path (quoted)"
