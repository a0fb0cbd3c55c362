"""The master's watch over serving workers: hangs, deadlines, recycling.

Owns: its own per-worker timers (slow request already logged, jittered
max_requests, RSS samples, the recycling reason) and the decisions, made each
tick from the scoreboard and psutil:
  - a worker whose loop stops beating for [workers] timeout (outside the app),
    or whose loop's own app call passes request_timeout (timeout when 0), gets
    its thread stacks dumped to the error log, then SIGTERM, then SIGKILL
    after kill_grace;
  - a request on one of its app threads past request_timeout: its stacks are
    dumped and the worker is recycled (a thread cannot be killed: the
    replacement is ready before the worker stops accepting, and its other
    threads finish within graceful_timeout);
  - slow_request_log dumps the stacks of a request running that long, once,
    without stopping anything (PHP-FPM's slowlog);
  - recycling (max_requests + jitter, max_rss over RSS_SAMPLES samples in a
    row, max_age) through one scheduler: at most max_recycling at a time, and
    the replacement is ready before the old worker stops accepting.
Must not: signal, spawn or stop a worker except through the pool.
"""
from __future__ import annotations

import dataclasses
import logging
import random

import psutil

from ..signals import DUMP_SIGNAL

log = logging.getLogger("prefork.master")
RSS_SAMPLES = 3          # consecutive samples over max_rss before recycling
RSS_EVERY = 1.0          # seconds between RSS samples of one worker


@dataclasses.dataclass
class Watch:
    """The watchdog's timers for one worker."""
    max_requests: int               # jittered recycling limit (0: none)
    slow_logged: set = dataclasses.field(default_factory=set)   # (thread, start) dumped
    rss_sampled: float = 0.0
    rss_over: int = 0
    recycle_reason: str = ""


class Watchdog:
    def __init__(self, pool, scoreboard):
        self.pool = pool
        self.scoreboard = scoreboard
        self.watches: dict[int, Watch] = {}   # pid -> timers
        self.timeouts = 0                     # workers stopped as stuck

    def watch(self, rec, workers_config) -> Watch:
        watch = self.watches.get(rec.pid)
        if watch is None:
            limit = workers_config.max_requests
            if limit:   # jittered, so workers do not recycle together
                limit += random.randint(0, workers_config.max_requests_jitter)
            watch = self.watches[rec.pid] = Watch(limit)
        return watch

    def forget(self, pid):
        self.watches.pop(pid, None)

    def check(self, current, now):
        """Look at every ready worker; then run the recycling scheduler.
        current: the running Generation (pool.py)."""
        cfg = current.config.workers
        for rec in self.pool:
            if rec.state == "ready":
                self.check_one(rec, now, cfg)
        self.recycle(current, now)

    def check_one(self, rec, now, cfg):
        watch = self.watch(rec, cfg)
        view = self.scoreboard.read(rec.slot)
        limit = cfg.request_timeout or cfg.timeout
        if view.inline_busy:
            running = now - view.request_start
            if running > limit:
                return self.stop_stuck(rec, now, cfg, f"request {view.method} {view.path} has "
                                                      f"run {running:.1f}s (limit {limit:g}s)")
            self.log_slow(rec, watch, cfg, -1, view, now)
        elif now - view.heartbeat > cfg.timeout:
            return self.stop_stuck(rec, now, cfg, f"loop silent for {now - view.heartbeat:.1f}s "
                                                  f"(timeout {cfg.timeout:g}s)")
        for seat in view.running:
            running = now - seat.request_start
            if running > limit and not watch.recycle_reason.startswith("stuck"):
                log.error("worker %d (pid %d) is stuck: request %s %s on thread %d has run "
                          "%.1fs (limit %gs); dumping its stacks, then replacing the worker",
                          rec.slot, rec.pid, seat.method, seat.path, seat.seat, running, limit)
                self.timeouts += 1
                self.pool.signal(rec, DUMP_SIGNAL)
                watch.recycle_reason = f"stuck request on thread {seat.seat}"
            else:
                self.log_slow(rec, watch, cfg, seat.seat, seat, now)
        watch.slow_logged &= {(-1, view.request_start)} | {(s.seat, s.request_start)
                                                           for s in view.running}
        if not watch.recycle_reason:
            watch.recycle_reason = self.recycle_reason(rec, watch, view, now, cfg)
            if watch.recycle_reason:
                log.info("worker %d (pid %d) will be recycled: %s", rec.slot, rec.pid,
                         watch.recycle_reason)

    def log_slow(self, rec, watch, cfg, thread, request, now):
        """slow_request_log: a request running that long has its stacks
        dumped, once (request: the slot's or a seat's view)."""
        running = now - request.request_start
        key = (thread, request.request_start)
        if cfg.slow_request_log and running > cfg.slow_request_log and key not in watch.slow_logged:
            watch.slow_logged.add(key)
            where = f" on thread {thread}" if thread >= 0 else ""
            log.warning("slow request: worker %d (pid %d) %s %s%s running for %.1fs; its "
                        "stacks follow", rec.slot, rec.pid, request.method, request.path,
                        where, running)
            self.pool.signal(rec, DUMP_SIGNAL)

    def stop_stuck(self, rec, now, cfg, why):
        log.error("worker %d (pid %d) is stuck: %s; dumping its stacks, then stopping it",
                  rec.slot, rec.pid, why)
        self.timeouts += 1
        self.pool.stop(rec, "timeout", now, cfg.kill_grace, dump=True)

    @staticmethod
    def recycle_reason(rec, watch, view, now, cfg) -> str:
        if watch.max_requests and view.requests >= watch.max_requests:
            return f"served {view.requests} requests (max_requests {watch.max_requests})"
        if cfg.max_age and now - rec.spawned > cfg.max_age:
            return f"age {now - rec.spawned:.0f}s (max_age {cfg.max_age:g}s)"
        if cfg.max_rss and now - watch.rss_sampled >= RSS_EVERY:
            watch.rss_sampled = now
            try:
                rss = psutil.Process(rec.pid).memory_info().rss
            except psutil.Error:
                return ""
            watch.rss_over = watch.rss_over + 1 if rss > cfg.max_rss * 1048576 else 0
            if watch.rss_over >= RSS_SAMPLES:
                return (f"RSS {rss / 1048576:.0f} MiB over max_rss {cfg.max_rss} MiB "
                        f"{RSS_SAMPLES} times")
        return ""

    def recycle(self, current, now):
        """Start replacements for workers due for recycling, and retire each
        old worker once its replacement is ready."""
        pool = self.pool
        booting = 0
        replaced = set()
        for new in pool:
            if not new.replaces:
                continue
            if new.state == "ready":
                old = pool.get(new.replaces)
                new.replaces = 0
                if old is not None:
                    pool.stop(old, "recycled", now, current.config.workers.stop_grace)
            else:
                booting += 1
                replaced.add(new.replaces)
        cfg = current.config.workers
        due = sorted((r for r in pool.members(current.number)
                      if r.state == "ready" and r.pid not in replaced and not r.replaces
                      and self.watch(r, cfg).recycle_reason),
                     key=lambda r: r.spawned)
        for old in due[:max(0, cfg.max_recycling - booting)]:
            pool.spawn(current, now, replaces=old.pid)
