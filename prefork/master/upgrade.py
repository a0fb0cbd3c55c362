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

log = logging.getLogger("prefork.master")
UPGRADE_ENV = "PREFORK_UPGRADE_FROM"


class Upgrader:
    def __init__(self):
        self.child: subprocess.Popen | None = None

    @property
    def under_way(self) -> bool:
        return self.child is not None

    def begin(self, pid, config, overrides, listeners):
        value, fds = sockets.hand_over(listeners)
        env = dict(os.environ, **{sockets.INHERIT_ENV: value, UPGRADE_ENV: str(pid)})
        # The same prefork as this one, installed or not.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(prefork.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "prefork", "start", "--foreground"]
        if config.source:
            argv += ["-c", config.source]
        argv += configmod.override_args(overrides)
        log.info("upgrade: starting a new master on the same sockets: %s", " ".join(argv))
        self.child = subprocess.Popen(argv, env=env, pass_fds=fds, cwd=config.server.base)

    def watch(self):
        if self.child is not None and self.child.poll() is not None:
            log.error("upgrade failed: the new master exited with code %s; this one keeps "
                      "serving", self.child.returncode)
            self.child = None

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
