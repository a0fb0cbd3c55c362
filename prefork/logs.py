"""Logs: workers format and batch; only the master opens log files.

Owns: the access-log formats, the worker-side batches (access lines and Python
logging records, shipped as one string per stats interval), and the
master-side files: whole batches written with one write(2) each, rotation by
size or time, optional gzip of rotated files, reopen on USR1.
Must not: open a log file in a worker; split a line across files.

What a SIGKILLed worker loses: its unshipped batch, i.e. at most the lines of
one [status] interval (or BATCH_LINES lines, whichever comes first).
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import shutil
import sys
import threading
import time

ERROR_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
# Ship early when a batch grows this large. Each shipment is a synchronous
# round trip to the Manager process, which on a loaded machine waits for a CPU,
# so the normal path is one shipment per stats interval; this is a memory cap.
BATCH_LINES = 20000
ACCESS, ERROR = "access", "error"


def _quote(value: str) -> str:
    if '"' in value or "\\" in value:   # rare: test before building new strings
        return value.replace("\\", "\\\\").replace('"', '\\"')
    return value


class Atoms:
    """gunicorn-style access-log atoms, computed on demand:
    h remote address, l '-', u remote user, t time [..], r request line,
    m method, U path, q query, H protocol, s status, b body bytes ('-' if 0),
    B body bytes, f referer, a user agent, T seconds, D microseconds,
    M milliseconds, p pid, {header}i request header, {key}e environ key."""

    __slots__ = ("environ", "status", "sent", "duration", "stamp")

    def __init__(self, environ, status, sent, duration, stamp):
        self.environ, self.status, self.sent = environ, status, sent
        self.duration, self.stamp = duration, stamp

    def __getitem__(self, key):
        simple = _ATOMS.get(key)
        if simple is not None:
            return simple(self, self.environ)
        if key.startswith("{") and len(key) > 3:
            name, kind = key[1:-2], key[-1]
            if kind == "i":
                return self.environ.get("HTTP_" + name.upper().replace("-", "_"), "-")
            if kind == "e":
                return str(self.environ.get(name, "-"))
        raise KeyError(key)


# Atom -> value, from (Atoms, environ); built once, looked up per atom.
_ATOMS = {
    "h": lambda a, env: env.get("REMOTE_ADDR", "-"),
    "l": lambda a, env: "-",
    "u": lambda a, env: env.get("REMOTE_USER", "-"),
    "t": lambda a, env: a.stamp,
    "r": lambda a, env: f'{env.get("REQUEST_METHOD")} {env.get("RAW_URI")} '
                        f'{env.get("SERVER_PROTOCOL")}',
    "m": lambda a, env: env.get("REQUEST_METHOD", "-"),
    "U": lambda a, env: env.get("PATH_INFO", "-"),
    "q": lambda a, env: env.get("QUERY_STRING", ""),
    "H": lambda a, env: env.get("SERVER_PROTOCOL", "-"),
    "s": lambda a, env: a.status,
    "b": lambda a, env: a.sent or "-",
    "B": lambda a, env: a.sent,
    "f": lambda a, env: env.get("HTTP_REFERER", "-"),
    "a": lambda a, env: env.get("HTTP_USER_AGENT", "-"),
    "T": lambda a, env: int(a.duration),
    "D": lambda a, env: int(a.duration * 1e6),
    "M": lambda a, env: int(a.duration * 1e3),
    "p": lambda a, env: f"<{os.getpid()}>",
}


def check_format(fmt: str):
    """None if fmt formats a sample request, else what is wrong."""
    sample = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "SERVER_PROTOCOL": "HTTP/1.1",
              "PATH_INFO": "/", "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}
    try:
        fmt % Atoms(sample, 200, 0, 0.0, "[01/Jan/2026:00:00:00 +0000]")
    except KeyError as exc:
        return f"unknown atom {exc.args[0]!r}"
    except (ValueError, TypeError) as exc:
        return f"bad format string: {exc}"
    return None


def combined_line(environ, status, sent, duration, stamp):
    """Apache/nginx combined format, plus the request time in microseconds."""
    return (f'{environ["REMOTE_ADDR"]} - - {stamp} "{environ["REQUEST_METHOD"]} '
            f'{_quote(environ["RAW_URI"])} {environ["SERVER_PROTOCOL"]}" {status} {sent} '
            f'"{_quote(environ.get("HTTP_REFERER", "-"))}" '
            f'"{_quote(environ.get("HTTP_USER_AGENT", "-"))}" {int(duration * 1e6)}\n')


def json_line(environ, status, sent, duration, stamp):
    return json.dumps({
        "time": stamp[1:-1], "remote": environ["REMOTE_ADDR"],
        "method": environ["REQUEST_METHOD"], "uri": environ["RAW_URI"],
        "protocol": environ["SERVER_PROTOCOL"], "status": status, "bytes": sent,
        "referer": environ.get("HTTP_REFERER"), "user_agent": environ.get("HTTP_USER_AGENT"),
        "duration_us": int(duration * 1e6), "pid": os.getpid()}) + "\n"


def line_formatter(access_format: str):
    if access_format == "combined":
        return combined_line
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
        self.sink = sink
        self._lines = []
        self._stamp = ""

    def set_time(self, wall: float) -> None:
        self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(wall))

    def record(self, environ, status, sent, duration):
        if not self.enabled:
            return
        self._lines.append(self.format(environ, status, sent, duration, self._stamp))
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


def next_rollover(when: str, now: float) -> float:
    """The next local midnight or top of the hour after `now` (0: never)."""
    if not when:
        return 0.0
    t = time.localtime(now)
    if when == "H":
        return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour + 1, 0, 0, 0, 0, -1))
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))


class LogFile:
    """Master side: one append-only file (or stdout/stderr for "-") that
    rotates by size (path.1, path.2, ...) or time (path.YYYY-MM-DD[_HH])."""

    def __init__(self, path: str, dash_stream, config=None):
        self.path = path
        self._dash = dash_stream
        self.max_bytes = config.max_bytes if config else 0
        self.backups = config.backups if config else 0
        self.when = config.when if config else ""
        self.compress = config.compress if config else False
        self._fd = None
        self.size = 0
        self.rollover_at = next_rollover(self.when, time.time())
        self.error = None
        self.lost_lines = 0
        self.rotations = 0
        self._compressing = None
        self.open()

    @property
    def is_file(self):
        return bool(self.path) and self.path != "-"

    def open(self):
        if not self.path:
            return
        if self.path == "-":
            self._fd = self._dash.fileno()
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)
            self.size = os.fstat(self._fd).st_size
            self.error = None
        except OSError as exc:
            self._fd = None
            self.fail(f"cannot open {self.path}: {exc.strerror}")

    def fail(self, message):
        if message != self.error:   # say each distinct problem once
            print(f"prefork: log problem: {message}", file=sys.stderr, flush=True)
        self.error = message

    def reopen(self):
        self.close()
        self.open()

    def write(self, text: str) -> None:
        if not self.path:
            return
        if self.is_file:
            if self._fd is None or not os.path.exists(self.path):
                self.reopen()   # retry after a failure, or after the file vanished
            if self.when and time.time() >= self.rollover_at:
                self.rotate(timed=True)
            elif self.max_bytes and self.size and self.size + len(text) > self.max_bytes:
                self.rotate(timed=False)
        if self._fd is None:
            self.lost_lines += text.count("\n")
            return
        data = text.encode("utf-8", "replace")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self.size += len(data)
        except OSError as exc:
            self.lost_lines += text.count("\n")
            self.fail(f"cannot write {self.path}: {exc.strerror}")
            self.close()

    # -- rotation ---------------------------------------------------------------
    def rotate(self, timed: bool):
        self.close()
        if timed:
            suffix = time.strftime("%Y-%m-%d_%H" if self.when == "H" else "%Y-%m-%d",
                                   time.localtime(self.rollover_at - 1))
            target = f"{self.path}.{suffix}"
            self.rollover_at = next_rollover(self.when, time.time())
        else:
            self.shift_numbered()
            target = f"{self.path}.1"
        try:
            os.replace(self.path, target)
            self.rotations += 1
        except OSError as exc:
            self.fail(f"cannot rotate {self.path}: {exc.strerror}")
        self.open()
        if timed:
            self.prune_timed()
        if self.compress and os.path.exists(target):
            self._compressing = threading.Thread(target=gzip_file, args=(target,), daemon=True)
            self._compressing.start()

    def shift_numbered(self):
        """path.N-1 -> path.N ... path.1 -> path.2; beyond `backups` is removed."""
        for index in range(max(self.backups, 1), 0, -1):
            for ext in ("", ".gz"):
                source = f"{self.path}.{index}{ext}"
                if not os.path.exists(source):
                    continue
                if index >= self.backups:
                    os.unlink(source)
                else:
                    os.replace(source, f"{self.path}.{index + 1}{ext}")

    def prune_timed(self):
        rotated = sorted(p for p in glob.glob(glob.escape(self.path) + ".*")
                         if not p.endswith(".tmp"))
        for old in rotated[:-self.backups] if self.backups else rotated:
            os.unlink(old)

    def wait_compression(self):
        if self._compressing is not None:
            self._compressing.join()
            self._compressing = None

    def close(self):
        self.wait_compression()
        if self._fd is not None and self.is_file:
            os.close(self._fd)
        self._fd = None

    def describe(self) -> dict:
        return {"path": self.path, "error": self.error, "lost_lines": self.lost_lines,
                "rotations": self.rotations}


def gzip_file(path: str) -> None:
    """Compress a rotated file beside itself (runs in a thread: file I/O only)."""
    try:
        with open(path, "rb") as src, gzip.open(path + ".gz.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(path + ".gz.tmp", path + ".gz")
        os.unlink(path)
    except OSError as exc:
        print(f"prefork: log problem: cannot compress {path}: {exc.strerror}", file=sys.stderr)


class LogFiles:
    """Master side: the access and error logs."""

    def __init__(self, logging_config, mirror_stderr=False):
        self.access = LogFile(logging_config.access_log, sys.stdout, logging_config)
        self.error = LogFile(logging_config.error_log, sys.stderr, logging_config)
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

    def describe(self) -> dict:
        return {"access": self.access.describe(), "error": self.error.describe()}


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
