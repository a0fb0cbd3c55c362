"""Log lines from a worker: formatted here, shipped to the master in batches.

Owns: the access-log formats (combined + microseconds, json, gunicorn-style
atoms) and the worker-side batches (access lines, and Python logging records
including the app's), shipped as one string per stats interval through the
Manager channel. Must not: open a log file (the master writes them).

What a SIGKILLed worker loses: its unshipped batch, i.e. at most the lines of
one [status] interval (or BATCH_LINES lines, whichever comes first).
"""
from __future__ import annotations

import json
import logging
import os
import time

from ..accessformat import Atoms
from ..ipc import ACCESS, ERROR, LINE_FORMAT

try:
    from ._combined import combined_line as _fast_combined_line   # the same line, in C
except ImportError:   # not built (no C compiler where prefork was installed)
    _fast_combined_line = None

# Ship early when a batch grows this large. Each shipment is a synchronous
# round trip to the Manager process, which on a loaded machine waits for a CPU,
# so the normal path is one shipment per stats interval; this is a memory cap.
BATCH_LINES = 20000


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def combined_line(environ, stamp, status, sent, duration):
    """Apache/nginx combined format, plus the request time in microseconds.
    The definition of the default line; _combined.c makes the same line
    faster, and hands the odd case back here (see it)."""
    uri = environ.get("RAW_URI", "-")
    referer = environ.get("HTTP_REFERER", "-")
    agent = environ.get("HTTP_USER_AGENT", "-")
    try:
        odd = ('"' in uri or '"' in agent or '"' in referer
               or "\\" in uri or "\\" in agent or "\\" in referer)
    except TypeError:   # an app put a non-str there (PEP 3333 asks for str)
        uri, referer, agent, odd = str(uri), str(referer), str(agent), True
    if odd:   # rare: then all three
        uri, referer, agent = _quote(uri), _quote(referer), _quote(agent)
    return (f'{environ.get("REMOTE_ADDR") or "-"} - - {stamp} '
            f'"{environ.get("REQUEST_METHOD", "-")} {uri} {environ.get("SERVER_PROTOCOL", "-")}" '
            f'{status} {sent} "{referer}" "{agent}" {int(duration * 1e6)}\n')


# The combined line's formatter: C where it is built; it returns None for
# what only the Python one does.
_combined_line = _fast_combined_line or combined_line


def json_line(environ, status, sent, duration, stamp):
    return json.dumps({
        "time": stamp[1:-1], "remote": environ["REMOTE_ADDR"],
        "method": environ["REQUEST_METHOD"], "uri": environ["RAW_URI"],
        "protocol": environ["SERVER_PROTOCOL"], "status": status, "bytes": sent,
        "referer": environ.get("HTTP_REFERER"), "user_agent": environ.get("HTTP_USER_AGENT"),
        "duration_us": int(duration * 1e6), "pid": os.getpid()}) + "\n"


def line_formatter(access_format: str):
    """The function that formats a line in access_format; None for
    "combined", which AccessLog.record formats itself (through _combined_line,
    the one call per request of the default format)."""
    if access_format == "combined":
        return None
    if access_format == "json":
        return json_line

    def custom(environ, status, sent, duration, stamp):
        return access_format % Atoms(environ, status, sent, duration, stamp) + "\n"
    return custom


class AccessLog:
    """Worker side: format each request's line, batch, ship per interval."""

    def __init__(self, logging_config, sink=None):
        self.enabled = bool(logging_config.access_log)
        self.format = line_formatter(logging_config.access_format)
        self._combined = self.enabled and self.format is None
        self.sink = sink
        self._lines = []
        self._stamp = ""

    def set_time(self, wall: float) -> None:
        self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(wall))

    def record(self, environ, status, sent, duration):
        if self._combined:
            line = (_combined_line(environ, self._stamp, status, sent, duration)
                    or combined_line(environ, self._stamp, status, sent, duration))
        elif self.enabled:
            line = self.format(environ, status, sent, duration, self._stamp)
        else:
            return
        lines = self._lines
        lines.append(line)
        if len(lines) >= BATCH_LINES:
            self.flush()

    def flush(self):
        if self._lines and self.sink is not None:
            self.sink.ship_logs((ACCESS, "".join(self._lines)))
            self._lines = []


class ShippingHandler(logging.Handler):
    """Worker side: Python logging records, batched and shipped to the master."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink
        self._lines = []
        self.setFormatter(logging.Formatter(LINE_FORMAT))

    def emit(self, record):
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:  # logging must never break serving
            self.handleError(record)
        if len(self._lines) >= BATCH_LINES:
            self.flush()

    def flush(self):
        # Under the handler's lock, as emit() runs: app threads log too.
        with self.lock:
            if self._lines:
                self.sink.ship_logs((ERROR, "".join(self._lines)))
                self._lines = []


def install_worker_logging(sink, level) -> ShippingHandler:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)   # the master's file handler: not ours
    handler = ShippingHandler(sink)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
