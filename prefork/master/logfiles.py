"""The log files: only the master opens them.

Owns: the access and error log files, each written a whole batch per write(2)
(a batch never splits across files), rotation by size (path.1, path.2...) or
time (path.YYYY-MM-DD[_HH]), optional gzip of rotated files in a thread,
reopen on USR1, and the record of trouble (error text, lines lost) that status
shows. A failing log is said once on stderr and never stops serving.
Must not: be used in a worker (workers ship lines: worker/logship.py).
"""
from __future__ import annotations

import glob
import gzip
import logging
import os
import shutil
import sys
import threading
import time

from ..ipc import ACCESS, LINE_FORMAT


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
        self.fd = None
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
            self.fd = self._dash.fileno()
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)
            self.size = os.fstat(self.fd).st_size
            self.error = None
        except OSError as exc:
            self.fd = None
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
            if self.fd is None or not os.path.exists(self.path):
                self.reopen()   # retry after a failure, or after the file vanished
            if self.when and time.time() >= self.rollover_at:
                self.rotate(timed=True)
            elif self.max_bytes and self.size and self.size + len(text) > self.max_bytes:
                self.rotate(timed=False)
        if self.fd is None:
            self.lost_lines += text.count("\n")
            return
        data = text.encode("utf-8", "replace")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
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
        if self.fd is not None and self.is_file:
            os.close(self.fd)
        self.fd = None

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

    def descriptors(self) -> list:
        """Open file descriptors of the log files (not stdout/stderr)."""
        return [f.fd for f in (self.access, self.error) if f.fd is not None and f.is_file]


class MasterHandler(logging.Handler):
    """The master's own Python logging goes straight into the error LogFile."""

    def __init__(self, files: LogFiles):
        super().__init__()
        self.files = files
        self.setFormatter(logging.Formatter(LINE_FORMAT))

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
