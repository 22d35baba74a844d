"""Every snippet of docs/writing-a-daemon.md, run against a real hypervisor and guest.

Each code block of the guide is preceded by ``<!-- test: NAME -->``; a block
without a name, or with a name no test here runs, fails
:func:`test_every_snippet_is_run`, so the guide cannot grow a snippet nobody
runs nor drift from the code.  The Python snippets are executed as they are
printed (the guide's own text, through ``exec``), the shell one by ``bash``,
the C one compiled into a tiny program run under ``pager.attach``.  Also here:
the generated SDK reference must be up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from hvemu import abi
from tests.integration.hostile import wait_proc
from tests.integration.system import ROOT, Hypervisor

GUIDE = os.path.join(ROOT, "docs", "writing-a-daemon.md")
_BLOCK = re.compile(r"(?:<!-- test: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
RUN = {"pager", "store", "client", "attach-shell", "c-command", "usage", "xen-tools"}


def snippets() -> dict[str, tuple[str, str]]:
    """The guide's code blocks with a language, by test name: ``{name: (lang, code)}``."""
    with open(GUIDE) as f:
        text = f.read()
    out: dict[str, tuple[str, str]] = {}
    for m in _BLOCK.finditer(text):
        if not m["lang"]:
            continue  # a diagram or a table in a block, not code
        name = m["name"] or f"unnamed {m['lang']} block at offset {m.start()}"
        out[name] = (m["lang"], m["body"])
    return out


def test_every_snippet_is_run() -> None:
    found = snippets()
    assert set(found) == RUN, (f"snippets without a test: {set(found) - RUN}; "
                               f"tests without a snippet: {RUN - set(found)}")


def test_the_sdk_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "api_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _exec(name: str) -> dict[str, Any]:
    lang, code = snippets()[name]
    assert lang == "python"
    namespace: dict[str, Any] = {"__name__": f"guide_{name}"}
    exec(compile(code, f"{GUIDE}:{name}", "exec"), namespace)  # noqa: S102 - the guide's own code, on purpose
    return namespace


@pytest.fixture
def guided(hypervisor: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> Hypervisor:
    """The snippets name no run directory: they find the hypervisor by ``$HVEMU_RUN_DIR``."""
    monkeypatch.setenv("HVEMU_RUN_DIR", hypervisor.run_dir)
    return hypervisor


def _report(out: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", ["Pagefile", "MemoryStore"])
async def test_the_pager_snippet_pages_a_guest_until_it_exits(guided: Hypervisor, tmp_path: object,
                                                              capsys: pytest.CaptureFixture[str], store: str) -> None:
    ns = _exec("pager")
    if store == "MemoryStore":  # the store snippet in place of the pagefile
        memory_store = _exec("store")["MemoryStore"]
        ns["Pagefile"] = type("P", (), {"open_for": staticmethod(lambda *a, **kw: _Closable(memory_store()))})
    domid = await guided.create_domain(2, 512, target=128)
    guest = guided.guest(domid, "--duration", "2", "--pattern", "uniform", "--write-ratio", "0.5")
    try:
        await asyncio.wait_for(ns["main"](domid, os.path.join(str(tmp_path), "pages"), asyncio.Event()), 60)
        status = await wait_proc(guest, 30)
        out, err = guest.communicate(10)
    finally:
        guest.stop()
    report = _report(out)
    assert status == 0 and report["ok"] and report["integrity_failures"] == 0, err[-2000:]
    assert report["faults"] > 0, "the guest never faulted: nothing was paged"
    assert f"dom{domid}: " in capsys.readouterr().out, "the snippet did not report the domain going"


class _Closable:
    """A store with the ``close`` the snippet calls on its pagefile."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def close(self) -> None:
        pass


@pytest.mark.timeout(120)
async def test_the_client_snippet_answers_violations_until_the_guest_exits(
        guided: Hypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _exec("client")
    domid = await guided.create_domain(1, 64)
    listener = asyncio.ensure_future(ns["listen"](domid))
    conn = await guided.tool()
    try:
        while not (await _stats(conn, domid)).get("access", {}).get("enabled"):
            assert not listener.done(), listener
            await asyncio.sleep(0.02)
        guest = guided.guest(domid, "--duration", "1", "--pattern", "uniform", "--write-ratio", "0.5")
        try:
            await asyncio.wait_for(listener, 60)  # returns when the guest exits and its domain goes
            status = await wait_proc(guest, 30)
            out, err = guest.communicate(10)
        finally:
            guest.stop()
    finally:
        listener.cancel()
        await conn.close()
    assert status == 0 and _report(out)["integrity_failures"] == 0, err[-2000:]
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert printed and all(0 <= int(words[0]) < 64 and words[2] == "True" for words in printed), printed[:5]


async def _stats(conn: Any, domid: int) -> dict[str, Any]:
    from tests.integration.system import stats

    return await stats(conn, domid)


async def test_the_attach_shell_snippet(guided: Hypervisor) -> None:
    lang, code = snippets()["attach-shell"]
    assert lang == "sh" and "--domid 1" in code
    assert await guided.create_domain(1, 16) == 1
    proc = await asyncio.create_subprocess_exec("bash", "-c", code, cwd=ROOT, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE,
                                                env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:"
                                                     f"{os.environ['PATH']}"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "ping -> ok pong" or lines[0].startswith("ping -> ok"), lines
    assert lines[1] == "target -> ok 16", lines
    assert lines[2].startswith("stats -> ok {") and json.loads(lines[2].split(" ", 3)[3])["gfns"] == 16


async def test_the_c_command_snippet(guided: Hypervisor, tmp_path: object) -> None:
    lang, code = snippets()["c-command"]
    assert lang == "c"
    source = os.path.join(str(tmp_path), "command.c")
    binary = os.path.join(str(tmp_path), "command")
    with open(source, "w") as f:
        f.write("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include <unistd.h>\n\n" + code + """
int main(void)
{
    int ctl = atoi(getenv("HVEMU_CTL_FD"));
    char r[4096];
    ctl_in = fdopen(dup(ctl), "r");
    if (command(ctl, "ping\\n", NULL, 0, r, sizeof r) != 1)
        return 1;
    printf("%s", r);
    if (command(ctl, "nominate 10 11 99\\n", NULL, 0, r, sizeof r) != 1)
        return 1;
    printf("%s", r);
    return 0;
}
""")
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", binary, source], check=True, timeout=60)
    assert await guided.create_domain(1, 16) == 1
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pager.attach", "--domid", "1", "--keep", "--", binary, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[1] == "ok 0 0 EINVAL", out


def test_the_usage_snippet_matches_the_attach_options() -> None:
    lang, code = snippets()["usage"]
    assert lang == "sh"
    help_text = subprocess.run([sys.executable, "-m", "pager.attach", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=30, check=True).stdout
    named = set(re.findall(r"--[\w-]+", code))
    assert named and named <= set(re.findall(r"--[\w-]+", help_text)), (named, help_text)
    choices = re.search(r"--ring (\S+)\]", code)
    assert choices is not None and choices[1].split("|") == [k.value for k in abi.RingKind]


@pytest.mark.timeout(180)
async def test_the_xen_tools_snippet(guided: Hypervisor, xen_bin: object, xen_libs: object) -> None:
    """Xen 4.17's xenpaging and xen-access, as the guide runs them (skipped without the Debian package)."""
    lang, code = snippets()["xen-tools"]
    assert lang == "sh"
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = await asyncio.create_subprocess_exec("bash", "-ec", code, cwd=ROOT, stdout=out_f, stderr=err_f,
                                                    start_new_session=True,
                                                    env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:"
                                                         f"{os.environ['PATH']}"})
        try:
            await asyncio.wait_for(proc.wait(), 120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the snippet left running
            out_f.seek(0)
            err_f.seek(0)
            out, err = out_f.read(), err_f.read()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()[-3000:]
    assert "\n2048\n" in text, text  # target-tot_pages, in KiB
    assert "xenpaging exited 0" in text, text + err.decode()[-3000:]
    assert text.count("Breakpoint: rip=") == 3, text
