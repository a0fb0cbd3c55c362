"""Development reload ([server] reload_on_change, `start --reload`): a new
generation when a .py file of the app changes.

Owns: the list of files watched and their last mtimes. The files are the .py
files under the directory of the app's top-level package (found without
importing it) and under [server] pythonpath entries that hold it; polled once
a second with stat(). A library (watchdog, watchfiles) would add a dependency
for what a few hundred stats a second do here; WATCH_LIMIT bounds the cost.
Must not: import the app (the master never does) or block.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger("prefork.master")
POLL_EVERY = 1.0
WATCH_LIMIT = 5000   # files; a tree larger than this is watched in part (logged)
SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", ".tox"}


def app_root(config) -> str | None:
    """The directory holding the app's top-level package or module."""
    top = config.server.app.partition(":")[0].split(".")[0]
    extra = [p for p in config.server.pythonpath + (config.server.base,) if p not in sys.path]
    sys.path[:0] = extra
    try:
        spec = importlib.util.find_spec(top)   # a top-level name: nothing is imported
    except (ImportError, ValueError):
        spec = None
    finally:
        del sys.path[:len(extra)]
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    if spec.submodule_search_locations:
        return os.path.dirname(spec.origin)         # a package: its directory
    return spec.origin                              # a module: the file alone


class CodeWatcher:
    def __init__(self, config):
        self.root = app_root(config)
        self.next_poll = 0.0
        self.mtimes = self.scan()
        log.info("reload_on_change: watching %d file(s) under %s", len(self.mtimes), self.root)

    def scan(self) -> dict:
        found = {}
        if self.root is None:
            return found
        if os.path.isfile(self.root):
            return {self.root: self._mtime(self.root)}
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    found[path] = self._mtime(path)
                    if len(found) >= WATCH_LIMIT:
                        log.warning("reload_on_change: watching the first %d files only",
                                    WATCH_LIMIT)
                        return found
        return found

    @staticmethod
    def _mtime(path):
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return None

    def changed(self, now) -> str | None:
        """The first changed (or added, or removed) file, polled at most once a second."""
        if now < self.next_poll:
            return None
        self.next_poll = now + POLL_EVERY
        current = self.scan()
        if current == self.mtimes:
            return None
        changed = next((p for p in current if current[p] != self.mtimes.get(p)),
                       next(iter(set(self.mtimes) - set(current)), "a file"))
        self.mtimes = current
        return changed
