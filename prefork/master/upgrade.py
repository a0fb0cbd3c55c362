"""Upgrade (USR2, `bin/prefork upgrade`): a new master on the same sockets.

Owns: the new master process while it boots (it is started through the
interpreter and the prefork module, with the listening sockets passed as
inherited descriptors and named in PREFORK_LISTENERS), and both ends of the
hand-over: the new master, once its workers are ready, asks the old one
(named in UPGRADE_ENV) to stop gracefully. If the new master exits first,
the old one keeps serving and says so.
Must not: block; unlink sockets a new master took over.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import prefork

from .. import config as configmod, sockets
from . import control

log = logging.getLogger("prefork.master")
UPGRADE_ENV = "PREFORK_UPGRADE_FROM"
REPORT_FD_ENV = "PREFORK_REPORT_FD"   # where the new master says READY or FAIL


class Upgrader:
    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.report_fd: int | None = None
        self.report = b""
        self.waiters: list = []   # control clients waiting for the outcome

    @property
    def under_way(self) -> bool:
        return self.child is not None

    def begin(self, pid, config, overrides, listeners, waiter=None):
        value, fds = sockets.hand_over(listeners)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = dict(os.environ, **{sockets.INHERIT_ENV: value, UPGRADE_ENV: str(pid)})
        # The same prefork as this one, installed or not.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(prefork.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        env[REPORT_FD_ENV] = str(write_fd)
        argv = [sys.executable, "-m", "prefork", "start", "--foreground"]
        if config.source:
            argv += ["-c", config.source]
        argv += configmod.override_args(overrides)
        log.info("upgrade: starting a new master on the same sockets: %s", " ".join(argv))
        try:
            self.child = subprocess.Popen(argv, env=env, pass_fds=fds + (write_fd,),
                                          cwd=config.server.base)
        finally:
            os.close(write_fd)
        self.report_fd, self.report = read_fd, b""
        self.waiters = [waiter] if waiter else []

    def watch(self):
        """Each tick: read the new master's report; a failure is told with
        its reason as soon as it is known, not after a timeout."""
        if self.child is None:
            return
        self._read_report()
        if self.report.startswith(b"READY ") and b"\0" in self.report:
            self._answer({"ok": True, "pid": self.child.pid})
        elif self.child.poll() is not None or self.report.startswith(b"FAIL "):
            reason = self.report[5:].split(b"\0")[0].decode("utf-8", "replace").strip() \
                if self.report.startswith(b"FAIL ") else \
                f"the new master exited with code {self.child.returncode}"
            log.error("upgrade failed: %s; this one keeps serving", reason)
            self._answer({"ok": False, "error": reason})
            if self.child.poll() is None:
                self.child.wait(5)   # it said FAIL: it is on its way out
            self.child = None

    def _read_report(self):
        try:
            while self.report_fd is not None:
                data = os.read(self.report_fd, 65536)
                if not data:
                    break
                self.report += data
        except BlockingIOError:
            pass

    def _answer(self, answer):
        for waiter in self.waiters:
            control.reply(waiter, answer)
        self.waiters = []
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None

    def handed_over(self) -> bool:
        """True once a new master took over our sockets (we must not unlink them)."""
        return self.child is not None and self.child.poll() is None


def retire_predecessor():
    """In a new master that is ready: stop the master it replaces."""
    old = os.environ.pop(UPGRADE_ENV, "")
    if old:
        log.info("upgrade: ready; asking the old master (pid %s) to stop gracefully", old)
        try:
            os.kill(int(old), signal.SIGTERM)
        except ProcessLookupError:
            pass
