"""One logging set-up for every hvemu process: levelled, one line per event, quiet by default.

Lines are ``<UTC time> <LEVEL> <process>[<pid>] <logger>: <message> [key=value ...]``
(or one JSON object per line with ``json=True``), so that a run's logs from
the hypervisor, guests and pagers interleave readably and can be grepped or
parsed.  Extra fields passed as ``log.info("...", extra={"fields": {...}})``
are appended as ``key=value``.  The default level is WARNING: a healthy run
prints nothing; ``-v`` gives INFO (domain, ring and daemon life-cycle), ``-vv``
DEBUG.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def __init__(self, process: str, as_json: bool) -> None:
        super().__init__()
        self.process = process
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.as_json:
            return json.dumps({"ts": ts, "level": record.levelname, "process": self.process, "pid": record.process,
                               "logger": record.name, "msg": message, **fields})
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        return f"{ts} {record.levelname} {self.process}[{record.process}] {record.name}: {message}{tail}"


def setup(process: str, verbosity: int = 0, *, as_json: bool | None = None) -> None:
    """Configure the root logger for a process (``verbosity``: 0 WARNING, 1 INFO, 2+ DEBUG).

    ``HVEMU_LOG_JSON=1`` selects JSON lines when ``as_json`` is not given.
    """
    if as_json is None:
        as_json = os.environ.get("HVEMU_LOG_JSON", "") not in ("", "0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(process, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
