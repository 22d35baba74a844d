"""What a new user reads first: ``--help`` of run.sh, soak.sh and the guest, the README's setup lines."""

from __future__ import annotations

import os
import re
import stat
import tomllib

from guest.__main__ import _parser as guest_parser
from hvemu.core.domain import MAX_VCPUS
from hvemu.toolstack import run, run_options, run_summary
from hvemu.toolstack.soak import _parser as soak_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _help(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def test_run_sh_help_gives_defaults_and_units() -> None:
    text = _help(run_options._parser().format_help())
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
    # Not a venv: the interpreter runs hvemu.toolstack.cli, told where the package is.
    fallback = run.hvemu_command(python)
    assert fallback.endswith("-m hvemu.toolstack.cli") and f"PYTHONPATH={ROOT} " in fallback, fallback
    script = os.path.join(bin_dir, "hvemu")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(script, stat.S_IRWXU)
    assert run.hvemu_command(python) == f"'{script}'", "the venv's hvemu, by its full path (quoted)"


def test_plot_is_an_extra_the_scripts_install() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"]), "matplotlib is optional"
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    with open(os.path.join(ROOT, "scripts", "_venv.sh")) as f:
        venv = f.read()
    extras = re.search(r'extras="([^"]+)"', venv)
    assert extras is not None and "plot" in extras.group(1).split(","), "the scripts install hvemu[plot]"
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "hvemu[plot]" in f.read()


def test_the_contract_is_in_the_repository() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "../shared" not in readme and "docs/contract.md" in readme
    with open(os.path.join(ROOT, "docs", "contract.md")) as f:
        contract = f.read()
    for heading in ("## 1. Processes", "## 2. The ring page", "## 4. The control protocol",
                    "## 6. Putting requests: the seed policy and the claim policy"):
        assert heading in contract, heading
    for path in re.findall(r"\]\((\.\./[^)#]+)\)", contract):  # every file it links to exists
        assert os.path.exists(os.path.join(ROOT, "docs", path)), path


def test_the_readme_sample_is_what_run_sh_prints() -> None:
    """The annotated sample's header is the summary's own, and fits 100 columns."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    sample = re.search(r"The summary \(fits 100 columns\).*?:\n\n```\n(.*?)```", readme, re.S)
    assert sample is not None
    lines = sample.group(1).splitlines()
    settings = run_options.Settings(domains=2, vcpus=4, memory_mib=64, host_memory_mib=96, target_mib=40,
                                 duration_s=3, pattern="hotcold", write_ratio=0.3, admission="seed", batch=256, seed=1)
    summary = run_summary.Summary(ok=True, complete=True, settings=settings, command="", domains=[],
                               host_memory_mib=96, admission="seed", duration_s=3)
    printed = run_summary.summary_lines(summary)
    assert lines[:2] == printed[:2] and lines[-1] == printed[-1]
    assert all(len(line) <= run_summary.SUMMARY_WIDTH for line in lines)
