"""Logs: workers format and batch; only the master opens log files.

Owns: the access-log line format, the worker-side batches (access lines and
Python logging records, each shipped as one string per interval), and the
master-side LogFiles that write whole lines. Must not: open files in a worker.
"""
from __future__ import annotations

import logging
import os
import sys
import time

ERROR_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
# Ship early when a batch grows this large. Each shipment is a synchronous
# round trip to the Manager process, which on a loaded machine waits for a CPU:
# measured on 2 cores, 512-line batches cut hello-world throughput 4x, so the
# normal path is one shipment per stats interval and this is only a memory cap.
BATCH_LINES = 20000
ACCESS, ERROR = "access", "error"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Worker side: Apache/nginx combined format + request time in microseconds."""

    def __init__(self, logging_config, sink=None):
        self.enabled = bool(logging_config.access_log)
        self.sink = sink
        self._lines = []
        self._stamp = ""

    def set_time(self, wall: float) -> None:
        self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(wall))

    def record(self, environ, status, sent, duration):
        if not self.enabled:
            return
        self._lines.append(
            f'{environ["REMOTE_ADDR"]} - - {self._stamp} "{environ["REQUEST_METHOD"]} '
            f'{_quote(environ["RAW_URI"])} {environ["SERVER_PROTOCOL"]}" {status} {sent} '
            f'"{_quote(environ.get("HTTP_REFERER", "-"))}" '
            f'"{_quote(environ.get("HTTP_USER_AGENT", "-"))}" {int(duration * 1e6)}\n')
        if len(self._lines) >= BATCH_LINES:
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
        self.setFormatter(logging.Formatter(ERROR_FORMAT))

    def emit(self, record):
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:  # logging must never break serving
            self.handleError(record)
        if len(self._lines) >= BATCH_LINES:
            self.flush()

    def flush(self):
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


class LogFile:
    """Master side: one append-only file (or stdout/stderr for "-")."""

    def __init__(self, path: str, dash_stream):
        self.path = path
        self._dash = dash_stream
        self._fd = None
        self.error = None
        self.open()

    def open(self):
        if not self.path:
            return
        if self.path == "-":
            self._fd = self._dash.fileno()
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.error = None
        except OSError as exc:
            self._fd = None
            self.error = f"{self.path}: {exc.strerror}"
            print(f"prefork: cannot open log {self.error}", file=sys.stderr)

    def reopen(self):
        self.close()
        self.open()

    def write(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode("utf-8", "replace")
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            print(f"prefork: cannot write log {self.error}", file=sys.stderr)

    def close(self):
        if self._fd is not None and self.path != "-":
            os.close(self._fd)
        self._fd = None


class LogFiles:
    """Master side: the access and error logs."""

    def __init__(self, logging_config, mirror_stderr=False):
        self.access = LogFile(logging_config.access_log, sys.stdout)
        self.error = LogFile(logging_config.error_log, sys.stderr)
        self.mirror_stderr = mirror_stderr and logging_config.error_log != "-"

    def write(self, kind: str, text: str) -> None:
        if kind == ACCESS:
            self.access.write(text)
        else:
            self.write_error(text)

    def write_error(self, text: str) -> None:
        self.error.write(text)
        if self.mirror_stderr:
            sys.stderr.write(text)
            sys.stderr.flush()

    def reopen(self):
        self.access.reopen()
        self.error.reopen()

    def close(self):
        self.access.close()
        self.error.close()


class MasterHandler(logging.Handler):
    """The master's own Python logging goes straight into the error LogFile."""

    def __init__(self, files: LogFiles):
        super().__init__()
        self.files = files
        self.setFormatter(logging.Formatter(ERROR_FORMAT))

    def emit(self, record):
        try:
            self.files.write_error(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def install_master_logging(files: LogFiles, level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(MasterHandler(files))
    root.setLevel(level.upper())
