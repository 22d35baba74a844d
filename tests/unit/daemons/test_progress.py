"""Progress output: plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io

from pager.progress import Progressbar


def test_plain_lines_every_tenth_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progressbar("paging out", 1000, stream=out, force_terminal=False) as p:
        for done in range(0, 1001, 7):
            p.update(done)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("paging out: 0/1000 pages (0%)")
    assert lines[-1].startswith("paging out: 1000/1000 pages (100%)")
    assert 10 <= len(lines) <= 12, lines


def test_a_bar_on_a_terminal() -> None:
    out = io.StringIO()
    with Progressbar("paging in", 50, stream=out, force_terminal=True) as p:
        p.update(25)
        p.update(50)
    assert "paging in" in out.getvalue() and "50/50" in out.getvalue()
