"""Finding Xen's tools and building the drop-in libraries: the failures a user meets, in one line each."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvemu.toolstack.xentools import build, tools
from tests.integration.xen_tools import unavailable


def test_no_apt_get_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVEMU_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    with pytest.raises(tools.ToolUnavailable, match="needs apt-get and dpkg"):
        tools.fetch_package()


def test_a_cached_package_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVEMU_CACHE_DIR", str(tmp_path))
    bin_dir = tmp_path / tools.PACKAGE / tools.BIN_DIR
    bin_dir.mkdir(parents=True)
    for t in tools.TOOLS:
        (bin_dir / t).write_text("")
    monkeypatch.setattr(tools.subprocess, "run", None)  # nothing is fetched
    assert tools.fetch_package() == bin_dir
    assert tools.find_tool("xen-access") == bin_dir / "xen-access"


def test_find_tool_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(tools.ToolUnavailable, match="unknown tool 'xl'"):
        tools.find_tool("xl")
    not_exec = tmp_path / "xenpaging"
    not_exec.write_text("")
    with pytest.raises(tools.ToolUnavailable, match="not an executable file"):
        tools.find_tool("xenpaging", str(not_exec))


def test_no_compiler_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="no C compiler"):
        build.compiler()


def test_the_build_is_named_after_its_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVEMU_CACHE_DIR", str(tmp_path))
    first = build.source_hash()
    assert first == build.source_hash() and len(first) == 16
    assert build.cache_dir() == tmp_path


def test_missing_binaries_skip_except_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and no apt-get"):
        unavailable("no apt-get")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no apt-get"):
        unavailable("no apt-get")
