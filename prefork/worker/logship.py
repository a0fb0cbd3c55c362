"""Log lines from a worker: formatted here, shipped to the master in batches.

Owns: the access-log formats (combined + microseconds, json, gunicorn-style
atoms) and the worker-side batches (access lines, and Python logging records
including the app's), shipped as one string per stats interval through the
Manager channel, or sooner when a batch is full. Must not: open a log file
(the master writes them).

The batches are ipc.SharedBatch memory that the master mapped before the fork:
a worker killed by a signal loses no line, the master writes what it left.
A line that finds its batch full (the Manager away for long) is counted lost.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ..accessformat import Atoms
from ..ipc import ACCESS, ACCESS_BATCH_BYTES, ERROR, ERROR_BATCH_BYTES, LINE_FORMAT, SharedBatch

try:   # the same line, in C: into a str, or straight into the shared batch
    from ._combined import combined_into as _combined_into
    from ._combined import combined_line as _fast_combined_line
except ImportError:   # not built (no C compiler where prefork was installed)
    _fast_combined_line = _combined_into = None


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
    """Worker side: format each request's line into the shared batch, ship
    per interval (or when the batch is full). batch: the SharedBatch the
    master made for this worker (one of its own by default)."""

    def __init__(self, logging_config, sink=None, batch=None):
        self.enabled = bool(logging_config.access_log)
        self.format = line_formatter(logging_config.access_format)
        self._combined = self.enabled and self.format is None
        self.sink = sink
        self.batch = batch or SharedBatch(ACCESS_BATCH_BYTES, "latin-1")
        self._mem = self.batch.mem
        self._into = _combined_into if self._combined else None
        self._stamp = ""

    def set_time(self, wall: float) -> None:
        self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(wall))

    def record(self, environ, status, sent, duration):
        into = self._into
        if into is not None and into(self._mem, environ, self._stamp, status, sent, duration):
            return   # the usual line, written in C where the master can read it
        if self._combined:
            line = (_combined_line(environ, self._stamp, status, sent, duration)
                    or combined_line(environ, self._stamp, status, sent, duration))
        elif self.enabled:
            line = self.format(environ, status, sent, duration, self._stamp)
        else:
            return
        keep(self.batch, line, self.flush, self.sink)

    def flush(self):
        ship(self.batch, ACCESS, self.sink)


def keep(batch, line, flush, sink):
    """A line into its batch; when it is full, ship first; when it is still
    full (the Manager is away), the line is counted lost."""
    if batch.append(line):
        return
    flush()
    if not batch.append(line) and sink is not None:
        sink.count_lost(line.count("\n"))


def ship(batch, kind, sink):
    """The batch's text to the Manager; cleared once the Manager took it."""
    if sink is None:
        return
    text = batch.text()
    if text and sink.ship_logs((kind, text)):
        batch.shipped(sink.shipped[kind])


class ShippingHandler(logging.Handler):
    """Worker side: Python logging records, into the shared error batch,
    shipped to the master. emit() runs under the handler's lock (app threads
    log too), and so does flush()."""

    def __init__(self, sink, batch=None):
        super().__init__()
        self.sink = sink
        self.batch = batch or SharedBatch(ERROR_BATCH_BYTES, "utf-8")
        self.setFormatter(logging.Formatter(LINE_FORMAT))

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
        except Exception:  # logging must never break serving
            self.handleError(record)
            return
        keep(self.batch, line, self.flush, self.sink)

    def flush(self):
        with self.lock:
            ship(self.batch, ERROR, self.sink)


def install_worker_logging(sink, level, batch=None) -> ShippingHandler:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)   # the master's file handler: not ours
    handler = ShippingHandler(sink, batch)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
