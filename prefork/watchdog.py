"""The master's watch over serving workers: hangs, deadlines, recycling.

Owns: the decisions, made each tick from the scoreboard and psutil,
  - a worker whose loop stops beating for [workers] timeout (outside the app),
    or whose current request passes request_timeout (timeout when 0), gets its
    thread stacks dumped to the error log (faulthandler on SIGUSR2), then
    SIGTERM, then SIGKILL after kill_grace;
  - slow_request_log dumps the stacks of a request running that long, once,
    without stopping anything (PHP-FPM's slowlog);
  - recycling (max_requests + jitter, max_rss over RSS_SAMPLES samples in a
    row, max_age) through one scheduler: at most max_recycling at a time, and
    the replacement is ready before the old worker stops accepting.
Must not: signal or spawn except through the master's own methods.
"""
from __future__ import annotations

import logging
import random
import signal

import psutil

log = logging.getLogger("prefork.master")
DUMP_SIGNAL = signal.SIGUSR2
DUMP_WAIT = 0.3          # seconds between the stack dump and SIGTERM
RSS_SAMPLES = 3          # consecutive samples over max_rss before recycling
RSS_EVERY = 1.0          # seconds between RSS samples of one worker


def recycle_limit(workers_config) -> int:
    """This worker's max_requests, jittered so workers do not recycle together."""
    if not workers_config.max_requests:
        return 0
    return workers_config.max_requests + random.randint(0, workers_config.max_requests_jitter)


def check(master, rec, now):
    """Look at one ready worker; act if it is hung, slow or due for recycling."""
    cfg = master.config.workers
    view = master.scoreboard.read(rec.slot)
    if view.state == "busy":
        running = now - view.request_start
        limit = cfg.request_timeout or cfg.timeout
        if running > limit:
            return stop_hung(master, rec, now, f"request {view.method} {view.path} has run "
                                                f"{running:.1f}s (limit {limit:g}s)")
        if cfg.slow_request_log and running > cfg.slow_request_log \
                and rec.slow_logged != view.request_start:
            rec.slow_logged = view.request_start
            log.warning("slow request: worker %d (pid %d) %s %s running for %.1fs; its stacks follow",
                        rec.slot, rec.pid, view.method, view.path, running)
            master.signal_worker(rec, DUMP_SIGNAL)
    elif now - view.heartbeat > cfg.timeout:
        return stop_hung(master, rec, now, f"loop silent for {now - view.heartbeat:.1f}s "
                                           f"(timeout {cfg.timeout:g}s)")
    if not rec.recycle_reason:
        rec.recycle_reason = recycle_reason(master, rec, view, now)
        if rec.recycle_reason:
            log.info("worker %d (pid %d) will be recycled: %s", rec.slot, rec.pid,
                     rec.recycle_reason)
    return None


def stop_hung(master, rec, now, why):
    log.error("worker %d (pid %d) is stuck: %s; dumping its stacks, then stopping it",
              rec.slot, rec.pid, why)
    master.totals.timeouts += 1
    master.signal_worker(rec, DUMP_SIGNAL)
    rec.state = "stopping"
    rec.exit_reason = "timeout"
    rec.term_at = now + DUMP_WAIT
    rec.stop_deadline = now + DUMP_WAIT + master.config.workers.kill_grace


def recycle_reason(master, rec, view, now) -> str:
    cfg = master.config.workers
    if rec.max_requests and view.requests >= rec.max_requests:
        return f"served {view.requests} requests (max_requests {rec.max_requests})"
    if cfg.max_age and now - rec.spawned > cfg.max_age:
        return f"age {now - rec.spawned:.0f}s (max_age {cfg.max_age:g}s)"
    if cfg.max_rss and now - rec.rss_sampled >= RSS_EVERY:
        rec.rss_sampled = now
        try:
            rss = psutil.Process(rec.pid).memory_info().rss
        except psutil.Error:
            return ""
        rec.rss_over = rec.rss_over + 1 if rss > cfg.max_rss * 1048576 else 0
        if rec.rss_over >= RSS_SAMPLES:
            return f"RSS {rss / 1048576:.0f} MiB over max_rss {cfg.max_rss} MiB {RSS_SAMPLES} times"
    return ""


def run_recycling(master):
    """Start replacements for workers due for recycling, and retire each old
    worker once its replacement is ready."""
    replacements = [r for r in master.workers.values() if r.replaces]
    for new in replacements:
        if new.state == "ready":
            old = master.workers.get(new.replaces)
            new.replaces = 0
            if old is not None:
                master.stop_worker(old, "recycled")
    busy = sum(1 for r in replacements if r.replaces)
    due = sorted((r for r in master.workers.values()
                  if r.recycle_reason and not r.replaced_by and r.state == "ready"
                  and r.generation == master.generation), key=lambda r: r.spawned)
    for old in due[:max(0, master.config.workers.max_recycling - busy)]:
        new = master.spawn(master.config, master.generation, master.listeners)
        new.replaces = old.pid
        old.replaced_by = new.pid


def forget(master, rec):
    """A worker is gone: undo any recycling pairing it was part of."""
    for other in master.workers.values():
        if other.replaced_by == rec.pid:
            other.replaced_by = 0       # its replacement died: try again later
        if other.replaces == rec.pid:
            other.replaces = 0          # the worker it replaced died: it is simply a member
