"""``hvemu trace start|stop|summary|print|export|plot``: ring event traces, as ``xentrace``/``xenalyze``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from typing import Any

from hvemu import protocol
from hvemu.toolstack.cli.base import CliError, _call, _finite, arg, command


@command("trace start", "record ring events to FILE (a new file)",
         arg("file", metavar="FILE"),
         arg("--events", default=None, metavar="LIST",
             help="only these events, comma-separated: put,lost,refused,response,rejected,block,wake,pause,"
                  "unpause,evict,load (default: all)"),
         arg("--duration", type=_finite, default=None, metavar="SECONDS",
             help="record this long, then stop and report (default: until hvemu trace stop)"))
async def cmd_trace_start(args: argparse.Namespace) -> Any:
    from hvemu.trace import event_mask

    path = os.path.abspath(args.file)
    try:
        mask = event_mask(args.events.split(",")) if args.events else -1
    except ValueError as exc:
        raise CliError(f"--events: {exc}", "EINVAL") from exc
    if args.duration is not None and args.duration <= 0:
        raise CliError(f"--duration {args.duration} s is not above 0", "EINVAL")
    await _call(args.run_dir, protocol.TraceStart(path=path, mask=mask))
    if args.duration is None:
        return {"tracing": path}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C ends the recording early, cleanly
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    reply = await _call(args.run_dir, protocol.TraceStop())
    assert isinstance(reply, protocol.TraceStopped)
    return {"trace": reply.path, "records": reply.records}


@command("trace stop", "stop recording")
async def cmd_trace_stop(args: argparse.Namespace) -> Any:
    reply = await _call(args.run_dir, protocol.TraceStop())
    assert isinstance(reply, protocol.TraceStopped)
    return {"trace": reply.path, "records": reply.records}


def _records(path: str) -> Any:
    from hvemu.toolstack import tracetools
    from hvemu.trace import TraceFormatError

    try:
        with open(path, "rb") as f:
            return tracetools.read(f)
    except FileNotFoundError as exc:
        raise CliError(f"no trace file {path}", "ENOENT") from exc
    except TraceFormatError as exc:
        raise CliError(f"{path}: {exc}", "EINVAL") from exc


@command("trace summary", "counts and fault latency per domain", arg("file", metavar="FILE"))
def cmd_trace_summary(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    return tracetools.summarise(_records(args.file))


@command("trace print", "one line per event (as xentrace_format): seconds, domain, vCPU, ring, event, gfn, argument",
         arg("file", metavar="FILE"))
def cmd_trace_print(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    records = _records(args.file)
    if args.json:  # one object per line, the record's fields
        names = records.dtype.names
        return _Lines(json.dumps(dict(zip(names, r, strict=True))) for r in records.tolist())
    return _Lines(tracetools.print_lines(records))


class _Lines:
    """A result written line by line as it is produced (a trace printed whole would be held in memory)."""

    def __init__(self, lines: Any) -> None:
        self.lines = lines


@command("trace export", "convert a trace for other tools: --chrome writes trace-event JSON that ui.perfetto.dev "
         "and chrome://tracing open",
         arg("file", metavar="FILE"),
         arg("--chrome", required=True, metavar="OUT",
             help="the JSON file to write (per-vCPU fault spans, ring occupancy counters, evict/load batches)"),
         arg("--force", action="store_true", help="overwrite OUT if it exists"))
def cmd_trace_export(args: argparse.Namespace) -> Any:
    from hvemu.toolstack import tracetools

    records = _records(args.file)
    out = args.chrome
    if os.path.exists(out) and not args.force:
        raise CliError(f"{out} exists (--force to overwrite it)", "EEXIST")
    doc = tracetools.chrome_trace(records)
    with open(out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    return {"chrome_trace": os.path.abspath(out), "events": len(doc["traceEvents"]), "records": len(records)}


@command("trace plot", "PNG plots: ring occupancy, and fault latency over time and as a CDF, per domain",
         arg("file", metavar="FILE"),
         arg("--out", default=None, metavar="DIR", help="directory for the PNG files (default: the trace's own; "
             "the files are named after the trace)"),
         arg("--force", action="store_true", help="overwrite plots that exist"))
def cmd_trace_plot(args: argparse.Namespace) -> Any:
    from hvemu.toolstack.plots import PlotUnavailable, need_matplotlib, plot_trace

    records = _records(args.file)
    try:
        need_matplotlib()
    except PlotUnavailable as exc:
        raise CliError(str(exc), "ENOPKG") from exc
    out_dir = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.file))
    prefix = os.path.basename(args.file) + "."
    try:
        return {"plots": plot_trace(records, out_dir, prefix, force=args.force)}
    except FileExistsError as exc:
        raise CliError(str(exc), "EEXIST") from exc
