"""Generations of workers: reload (HUP) and master upgrade (USR2).

Owns: the reload protocol (re-read and validate the config, open any new
listeners, boot a whole new generation, retire the old one only once the new
one is ready; on any failure keep the old generation and report why) and the
upgrade protocol (exec a new master on the inherited listening sockets; the
new master stops the old one once its own workers are ready).
Functions over the Master's state, called from its loop; must not block.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

from . import config as configmod, control, sockets, systemd
from .logs import LogFiles, install_master_logging
from .sockets import BindError, close_listener, create_listener

log = logging.getLogger("prefork.master")
UPGRADE_ENV = "PREFORK_UPGRADE_FROM"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Reload:
    config: configmod.Config
    generation: int
    listeners: dict
    started: float
    waiters: list


def begin_reload(master, waiter=None):
    if master.stopping:
        return control.reply(waiter, {"ok": False, "error": "stopping"}) if waiter else None
    if master.pending is not None:
        if waiter:
            master.pending.waiters.append(waiter)
        return None
    log.info("reload requested: re-reading %s", master.config.source or "defaults")
    try:
        new = configmod.load(master.config.source or None, master.overrides)
    except configmod.ConfigError as exc:
        return reload_failed(master, str(exc), [waiter] if waiter else [])
    listeners = {}
    try:
        for bind in new.server.bind:
            listeners[bind] = master.listeners.get(bind) or create_listener(bind, new.server.backlog)
    except BindError as exc:
        for bind, sock in listeners.items():
            if bind not in master.listeners:
                close_listener(sock, unlink=True)
        return reload_failed(master, str(exc), [waiter] if waiter else [])
    generation = master.generation + 1
    systemd.notify("RELOADING=1", f"STATUS=reloading: starting generation {generation}")
    master.pending = Reload(new, generation, listeners, master.now, [waiter] if waiter else [])
    master.boot_failures = 0
    for _ in range(new.server.workers):
        master.spawn(new, generation, listeners)
    return None


def advance_reload(master):
    pending = master.pending
    if master.ready_count(pending.generation) >= pending.config.server.workers:
        return commit_reload(master)
    if master.now - pending.started > pending.config.workers.boot_timeout:
        abort_reload(master, f"new workers not ready within {pending.config.workers.boot_timeout:g}s")


def commit_reload(master):
    pending, master.pending = master.pending, None
    old_generation = master.generation
    for rec in list(master.workers.values()):
        if rec.generation < pending.generation:
            master.stop_worker(rec, "retired")
    for bind, sock in master.listeners.items():
        if bind not in pending.listeners:
            close_listener(sock, unlink=True)
    master.listeners = pending.listeners
    old_logging = master.config.logging
    master.config = pending.config
    master.generation = pending.generation
    master.target = pending.config.server.workers
    if master.config.logging != old_logging:
        master.files.close()
        master.files = LogFiles(master.config.logging, master.files.mirror_stderr)
        install_master_logging(master.files, master.config.logging.level)
    master.reloads["ok"] += 1
    log.info("reloaded: generation %d replaced generation %d; serving on %s",
             master.generation, old_generation, " ".join(master.urls()))
    systemd.notify("READY=1", master.status_line())
    for waiter in pending.waiters:
        control.reply(waiter, {"ok": True, "generation": master.generation,
                               "urls": master.urls()})


def abort_reload(master, reason):
    pending, master.pending = master.pending, None
    for rec in list(master.workers.values()):
        if rec.generation == pending.generation:
            master.stop_worker(rec, "reload aborted", graceful=False)
    for bind, sock in pending.listeners.items():
        if bind not in master.listeners:
            close_listener(sock, unlink=True)
    master.boot_failures = 0
    master.next_spawn_at = 0.0
    reload_failed(master, reason, pending.waiters)


def reload_failed(master, reason, waiters):
    master.reloads["failed"] += 1
    master.reloads["last_error"] = reason
    log.error("reload failed, generation %d keeps serving: %s", master.generation, reason)
    if not master.starting:
        systemd.notify("READY=1", f"STATUS=reload failed, generation {master.generation} "
                                  f"keeps serving: {reason.splitlines()[-1]}")
    for waiter in waiters:
        control.reply(waiter, {"ok": False, "error": reason, "generation": master.generation})


def begin_upgrade(master):
    if master.upgrade is not None or master.pending is not None or master.stopping:
        log.warning("upgrade refused: %s", "one is under way" if master.upgrade is not None
                    else "a reload or stop is under way")
        return
    value, fds = sockets.hand_over(master.listeners)
    env = dict(os.environ, **{sockets.INHERIT_ENV: value, UPGRADE_ENV: str(master.pid)})
    argv = [sys.executable, os.path.join(ROOT, "bin", "prefork"), "start", "--foreground"]
    if master.config.source:
        argv += ["-c", master.config.source]
    server = master.overrides.get("server", {})
    argv += [arg for bind in server.get("bind", []) for arg in ("--bind", bind)]
    for key in ("workers", "app", "pidfile"):
        if key in server:
            argv += [f"--{key}", str(server[key])]
    log.info("upgrade: starting a new master on the same sockets: %s", " ".join(argv))
    master.upgrade = subprocess.Popen(argv, env=env, pass_fds=fds, cwd=master.config.server.base)


def watch_upgrade(master):
    if master.upgrade is not None and master.upgrade.poll() is not None:
        log.error("upgrade failed: the new master exited with code %s; this one keeps "
                  "serving", master.upgrade.returncode)
        master.upgrade = None


def handed_over(master) -> bool:
    """True once a new master took over our sockets (we must not unlink them)."""
    return master.upgrade is not None and master.upgrade.poll() is None


def retire_predecessor(master):
    old = os.environ.pop(UPGRADE_ENV, "")
    if old:
        log.info("upgrade: ready; asking the old master (pid %s) to stop gracefully", old)
        try:
            os.kill(int(old), signal.SIGTERM)
        except ProcessLookupError:
            pass
