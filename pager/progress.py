"""Progress of a pager's long operations: a bar on a terminal, plain lines otherwise.

The initial page-out to the target and the page-everything-in of a clean
stop can take a while on a big guest.  On a terminal (stderr is a tty) they
show a ``rich`` progress bar; in a log (not a tty) a plain line every 10% so
that logs stay readable and greppable.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class Progressbar:
    """``with Progressbar("paging out", total) as p: p.update(done)``."""

    def __init__(self, title: str, total: int, *, stream: TextIO | None = None,
                 force_terminal: bool | None = None) -> None:
        self.title = title
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        tty = self.stream.isatty() if force_terminal is None else force_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._next_line = 0
        self._start = time.monotonic()
        if tty:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(file=self.stream), transient=False)

    def __enter__(self) -> Progressbar:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total or None)
        else:
            self._line(0)
        return self

    def update(self, done: int) -> None:
        done = min(max(done, 0), self.total) if self.total else done
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done)
        elif self.total and done * 10 // self.total >= self._next_line:
            self._line(done)

    def _line(self, done: int) -> None:
        pct = 100 * done // self.total if self.total else 100
        self.stream.write(f"{self.title}: {done}/{self.total} pages ({pct}%), "
                          f"{time.monotonic() - self._start:.1f}s\n")
        self.stream.flush()
        self._next_line = pct // 10 + 1

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif et is None and self._next_line <= 10:
            self._line(self.total)
