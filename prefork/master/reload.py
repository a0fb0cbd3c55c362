"""Reload (HUP, `bin/prefork reload`): a new generation of workers on a
re-read config, with no moment where nothing serves.

Owns: the reload in progress (the new config, its generation, its listeners,
the control clients waiting for the outcome) and the reload history. Protocol:
re-read and validate the whole config, open any new listeners, boot a whole
new generation through the pool, and only once all of it is ready hand it to
the master (commit); on any failure stop the new generation, close what was
opened for it, keep the old one serving and say why (abort).
Must not: block, or change the master's config itself: the master adopts a
committed Reload.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from .. import config as configmod
from ..sockets import BindError, close_listener, listener_for
from ..tls import TlsError
from . import control, systemd
from .pool import Generation

log = logging.getLogger("prefork.master")
HISTORY = 10   # reloads remembered for status


@dataclasses.dataclass
class Reload:
    gen: Generation           # the new generation
    started: float
    waiters: list


class Reloader:
    def __init__(self, pool):
        self.pool = pool
        self.pending: Reload | None = None
        self.ok = 0
        self.failed = 0
        self.last_error = ""
        self.history: list[dict] = []   # newest last: {"at", "generation", "ok", "error"}

    def begin(self, current: Generation, overrides, now, waiter=None):
        """Start a reload from the running config's source and overrides."""
        if self.pending is not None:
            if waiter:
                self.pending.waiters.append(waiter)
            return
        waiters = [waiter] if waiter else []
        source = current.config.source
        log.info("reload requested: re-reading %s", source or "defaults")
        try:
            new = configmod.load(source or None, overrides)
        except configmod.ConfigError as exc:
            return self.failed_with(str(exc), waiters, current.number)
        opened = {}
        try:
            for bind in new.server.bind:
                opened[bind] = current.listeners.get(bind) or listener_for(bind, new.server)
        except BindError as exc:
            close_new(opened, current.listeners)
            return self.failed_with(str(exc), waiters, current.number)
        try:
            gen = Generation.made(current.number + 1, new, opened)
        except TlsError as exc:   # a file changed between the check and now
            close_new(opened, current.listeners)
            return self.failed_with(f"[tls] {exc}", waiters, current.number)
        systemd.notify("RELOADING=1", f"STATUS=reloading: starting generation {gen.number}")
        self.pending = Reload(gen, now, waiters)
        self.pool.clear_backoff()
        for _ in range(new.server.workers):
            self.pool.spawn(gen, now)

    def advance(self, current: Generation, now) -> Reload | None:
        """Each tick: the committed Reload once the new generation is ready."""
        pending = self.pending
        if pending is None:
            return None
        config = pending.gen.config
        if self.pool.ready_count(pending.gen.number) >= config.server.workers:
            self.pending = None
            self.ok += 1
            self.remember(pending.gen.number, "")
            return pending
        if now - pending.started > config.workers.boot_timeout:
            self.abort(f"new workers not ready within {config.workers.boot_timeout:g}s",
                       current, now)
        return None

    def abort(self, reason, current: Generation, now):
        """Stop the new generation, close its new listeners, report."""
        pending, self.pending = self.pending, None
        for rec in self.pool:
            if rec.generation == pending.gen.number:
                self.pool.stop(rec, "reload aborted", now, 0.0, fast=True)
        close_new(pending.gen.listeners, current.listeners)
        self.pool.clear_backoff()
        self.failed_with(reason, pending.waiters, current.number)

    def failed_with(self, reason, waiters, generation):
        self.failed += 1
        self.last_error = reason
        self.remember(generation + 1, reason)
        log.error("reload failed, generation %d keeps serving: %s", generation, reason)
        systemd.notify("READY=1", f"STATUS=reload failed, generation {generation} "
                                  f"keeps serving: {reason.splitlines()[-1]}")
        for waiter in waiters:
            control.reply(waiter, {"ok": False, "error": reason, "generation": generation})

    def remember(self, generation, error):
        self.history.append({"at": time.time(), "generation": generation, "ok": not error,
                             "error": error})
        del self.history[:-HISTORY]

    def describe(self) -> dict:
        return {"ok": self.ok, "failed": self.failed, "last_error": self.last_error,
                "history": list(self.history)}


def close_new(opened, kept):
    """Close the listeners a reload opened that the running generation lacks."""
    for bind, sock in opened.items():
        if bind not in kept:
            close_listener(sock, unlink=True)
