"""The tree stays ``ruff`` and ``mypy`` clean (both come with the ``dev`` extra that scripts/test.sh installs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tool", [["ruff", "check", "--no-cache", "."], ["mypy"]])
def test_tree_is_clean(tool: list[str]) -> None:
    if importlib.util.find_spec(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed (pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory(prefix="hvemu-lint-") as cache:
        extra = ["--cache-dir", cache] if tool[0] == "mypy" else []
        proc = subprocess.run([sys.executable, "-m", *tool, *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
